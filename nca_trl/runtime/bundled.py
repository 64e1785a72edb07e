"""The recipes, accelerate configs and data that ship with nca-trl, found by name from any folder; `nca-trl recipes`.

The repository's `recipes/` and `data/` folders are the one source. A wheel carries a copy of them inside the package
(`nca_trl/bundled/recipes`, `nca_trl/bundled/data`), made by the build step in `setup.py`; a clone, and an editable
install of it, reads the repository's folders themselves. Names are paths relative to the recipes folder
(`tiny/nca.yaml`, `accelerate_configs/deepspeed_zero3.yaml`; a leading `recipes/` is accepted too) or to the data
folder with a leading `data/` (`data/vicuna_rated.jsonl`).

```bash
nca-trl recipes                                    # every bundled recipe, accelerate config and data file, full paths
nca-trl recipes --path accelerate_configs/deepspeed_zero3.yaml
nca-trl recipes --copy tiny/nca.yaml .             # a copy to edit
nca-trl train --config tiny/nca.yaml               # no such local file: the bundled recipe, and it says so
```

A command's `--config NAME` that is not a file here is looked up among the bundled recipes (`resolve_argv`), and a
recipe's or the command line's `dataset_name: data/NAME` that is not a file here among the bundled data, so the tiny
quick start runs from any folder. Imports nothing heavy.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import SettingsError

__all__ = ["DATA_SETTINGS", "bundle_root", "catalog", "data_dir", "find_bundled", "main", "recipes_dir",
           "resolve_argv"]

PACKAGE = Path(__file__).resolve().parents[1]
#: Settings whose bundled data a recipe names (`dataset_name: data/vicuna_rated.jsonl`)
DATA_SETTINGS = ("dataset_name",)
#: The listing's sections: title, how each is used, which names belong to it
_SECTIONS = (
    ("recipes", "nca-trl train --config NAME; iterate_*: nca-trl iterate --config NAME",
     lambda name: name.endswith(".yaml") and not name.startswith("accelerate_configs/")),
    ("accelerate configs", 'accelerate launch --config_file "$(nca-trl recipes --path NAME)" -m nca_trl.cli train ...',
     lambda name: name.startswith("accelerate_configs/")),
    ("model configs and launch scripts", "scripts/plan_memory.py (in a clone), SLURM",
     lambda name: not name.endswith(".yaml") and not name.startswith("data/")),
    ("data", "what the tiny recipes train on; a `dataset_name: data/NAME` not found here falls back to it",
     lambda name: name.startswith("data/")),
)


def bundle_root() -> Path:
    """The folder holding `recipes/` and `data/`: the package's own copy in a wheel, else the repository of a clone or
    an editable install."""
    packaged = PACKAGE / "bundled"
    if (packaged / "recipes").is_dir():
        return packaged
    source = PACKAGE.parent
    if (source / "recipes").is_dir() and (source / "pyproject.toml").is_file():
        return source
    raise FileNotFoundError(f"nca-trl's recipes are missing: neither {packaged / 'recipes'} (a wheel) nor "
                            f"{source / 'recipes'} (a clone) exists. Reinstall nca-trl.")


def recipes_dir() -> Path:
    return bundle_root() / "recipes"


def data_dir() -> Path:
    return bundle_root() / "data"


def catalog() -> dict[str, Path]:
    """Every bundled file by its name: recipes, accelerate configs, model configs and scripts relative to the recipes
    folder, data files as `data/NAME`."""
    names = {p.relative_to(recipes_dir()).as_posix(): p for p in sorted(recipes_dir().rglob("*")) if p.is_file()}
    if data_dir().is_dir():
        names.update({f"data/{p.name}": p for p in sorted(data_dir().iterdir()) if p.is_file()})
    return {name: path for name, path in names.items() if "__pycache__" not in name and not name.endswith(".pyc")}


def find_bundled(name: str) -> Path | None:
    """The bundled file called `name` (`tiny/nca.yaml`, `recipes/tiny/nca.yaml`, `data/vicuna_rated.jsonl`), or
    None."""
    text = _name(name)
    if text.startswith("recipes/"):
        text = text[len("recipes/"):]
    return catalog().get(text)


def _name(value) -> str:
    """`value` with forward slashes and no leading `./`."""
    text = str(value).replace("\\", "/")
    while text.startswith("./"):
        text = text[2:]
    return text


# ------------------------------------------------------------------------------------ --config NAME from any folder
def resolve_argv(argv: list[str], notes=None) -> list[str]:
    """`argv` of a command (`train`, `generate`, `score`, `iterate`) with bundled files where the named ones are not
    here: `--config NAME` (not a file here, but a bundled recipe) becomes the bundled recipe's full path, and
    `dataset_name` (on the command line, or in the recipe) that names a missing `data/...` file the bundled one.
    Each replacement is told on stderr (once, by the main process of a launch), or appended to `notes`."""
    from .recipes import peek, peek_all

    argv = list(argv)
    told = []
    configs = peek_all(argv, "config") or []
    if len(configs) > 1:  # TrlParser reads one; the others failed as a traceback or were not read
        raise SettingsError(f"`--config` given {len(configs)} times ({', '.join(configs)}): give one recipe, and "
                            "override its keys with flags (`--learning_rate 1e-5`).")
    config = peek(argv, "config")
    if config and not Path(os.path.expanduser(config)).exists():
        found = find_bundled(config)
        if found is None:
            raise SettingsError(f"no such file or folder: {config} (config), and no bundled recipe of that name: "
                                "`nca-trl recipes` lists them.")
        argv = _replace(argv, "config", str(found))
        told.append(f"--config {config}: no such file here, using the bundled recipe {found}")
        config = str(found)
    recipe = _read(config) if config else {}
    for setting in DATA_SETTINGS:
        given = peek(argv, setting)
        value = given if given is not None else recipe.get(setting)
        if not isinstance(value, str) or not value or Path(os.path.expanduser(value)).exists():
            continue
        found = find_bundled(value) if _name(value).startswith(("data/", "recipes/")) else None
        if found is None:
            continue
        argv = _replace(argv, setting, str(found)) if given is not None else [*argv, f"--{setting}", str(found)]
        told.append(f"{setting} {value}: no such file here, using the bundled data {found}")
    if notes is not None:
        notes.extend(told)
    elif told and os.environ.get("RANK", "0") == "0":
        for line in told:
            print(f"[nca-trl] {line}", file=sys.stderr)
    return argv


def _replace(argv: list[str], name: str, value: str) -> list[str]:
    """argv with the value of the last `--name X` / `--name=X` (either spelling) set to `value`."""
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}
    for i in range(len(argv) - 1, -1, -1):
        arg = argv[i]
        if arg in flags and i + 1 < len(argv):
            return [*argv[: i + 1], value, *argv[i + 2:]]
        if "=" in arg and arg.split("=", 1)[0] in flags:
            return [*argv[:i], f"{arg.split('=', 1)[0]}={value}", *argv[i + 1:]]
    return argv


def _read(path: str) -> dict:
    """The recipe's mapping, or {} when it cannot be read (the command's own checks report that)."""
    try:
        import yaml

        with open(os.path.expanduser(path)) as f:
            recipe = yaml.safe_load(f)
    except Exception:  # noqa: BLE001 - an unreadable recipe is the command's own checks' to report
        return {}
    return recipe if isinstance(recipe, dict) else {}


# ------------------------------------------------------------------------------------------------- nca-trl recipes
def main(argv: list[str] | None = None) -> None:
    """`nca-trl recipes [--path NAME | --copy NAME DIR]`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="nca-trl recipes",
        description="List the recipes, accelerate configs and data bundled with nca-trl, with their full paths; "
        "print one path, or copy one to edit.",
    )
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--path", metavar="NAME", help="print the full path of one bundled file, e.g. "
                       'accelerate launch --config_file "$(nca-trl recipes --path accelerate_configs/ddp.yaml)"')
    group.add_argument("--copy", nargs=2, metavar=("NAME", "DIR"), help="copy one bundled file into DIR (created)")
    parser.error = _refuse  # one line, `nca-trl recipes: error: MESSAGE`, exit 2 (the command line's contract)
    ns = parser.parse_args(argv)
    if ns.path is not None:
        print(_lookup(ns.path))
    elif ns.copy is not None:
        print(_copy(*ns.copy))
    else:
        print(listing(), end="")


def _refuse(message: str):
    raise SettingsError(message)


def _lookup(name: str) -> Path:
    found = find_bundled(name)
    if found is not None:
        return found
    import difflib

    names, wanted = list(catalog()), _name(name)
    base = wanted.rsplit("/", 1)[-1]
    close = [n for n in names if n.rsplit("/", 1)[-1] == base]
    close += [n for n in names if base and base in n and n not in close]
    close += [n for n in difflib.get_close_matches(wanted, names, n=3, cutoff=0.6) if n not in close]
    hint = f" (did you mean {', '.join(close[:4])}?)" if close else ""
    raise SettingsError(f"no bundled file named {name}{hint}; `nca-trl recipes` lists them.")


def _copy(name: str, folder: str) -> Path:
    """Copy the bundled `name` into `folder`; refuses to replace a different file of that name."""
    import filecmp
    import shutil

    source = _lookup(name)
    target = Path(folder) / source.name
    if Path(folder).exists() and not Path(folder).is_dir():
        raise SettingsError(f"{folder} is a file: `nca-trl recipes --copy NAME FOLDER` copies into a folder.")
    if target.exists():
        if target.is_file() and filecmp.cmp(source, target, shallow=False):
            return target
        raise SettingsError(f"{target} exists (and differs from the bundled {name}): remove it, or copy into another "
                            "folder.")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def listing() -> str:
    """What `nca-trl recipes` prints: every bundled file by section, its name and its full path."""
    files = catalog()
    width = max(map(len, files)) + 2
    lines = [f"Bundled with nca-trl, in {bundle_root()}:"]
    for title, use, belongs in _SECTIONS:
        names = [name for name in files if belongs(name)]
        if names:
            lines += ["", f"{title} ({use}):"] + [f"  {name:<{width}}{files[name]}" for name in names]
    lines += ["", "`nca-trl recipes --path NAME` prints one path; `nca-trl recipes --copy NAME DIR` copies one to edit;",
              "`--config NAME` takes a bundled recipe by its name where no such local file exists."]
    return "\n".join(lines) + "\n"
