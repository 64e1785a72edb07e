"""Path settings checked first, one helper for every command: a missing local path is one line, not the Hub's error.

A value of a path setting (`model_name_or_path`, `dataset_name`, `reward_model`, `--config`, ...) reads as a local
path when it starts with `.`, `/` or `~`, has more than one `/`, ends with a file extension (`.jsonl`, `.yaml`, ...),
or its first folder exists here (`outputs/model` beside an `outputs/` folder). Such a path that does not exist is
refused at once, before any network call, model load or folder creation:

    nca-trl train: error: no such file or folder: data/does_not_exist.jsonl (dataset_name)

The tiny recipes' models (`outputs/tiny-mistral`, ... : `TINY_MODELS`) are local paths too, and a missing one names
the `nca-trl make-tiny-model` command that makes it.

Anything else may be a Hugging Face Hub id (`org/name`): left to the Hub, except when the Hub cannot be reached
because it is switched off (`HF_HUB_OFFLINE=1`, or `HF_DATASETS_OFFLINE=1` for a dataset) and the id is not in the
local cache; that is one line too. Both are `SettingsError`s: `nca-trl CMD: error: MESSAGE`, exit 2, on the command
line; a `ValueError` from Python.

`check_path` checks one value; `check_path_settings` checks the path settings of a command's argv and recipe before
anything heavy is imported (what each command's `check_argv` runs). Imports nothing heavy.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from .errors import SettingsError

__all__ = ["BUILDERS", "FILE_SUFFIXES", "KINDS", "NOT_PATHS", "TINY_MODELS", "check_data_folder", "check_output_file",
           "check_path", "check_path_settings", "hub_cached", "looks_local", "recorded_output_name",
           "reward_function_path"]

#: Extensions that make a value a local file (data, recipes, code, weights, archives); a Hub id's last part may hold
#: a dot followed by a digit (`Mistral-7B-v0.1`, `Qwen2.5-0.5B`), which is no extension
FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv", ".tsv", ".txt", ".arrow", ".py", ".yaml", ".yml", ".toml",
                 ".bin", ".safetensors", ".pt", ".pth", ".gguf", ".gz", ".zip", ".tar", ".zst", ".xz", ".bz2")
#: Values of a path setting that are not paths (`resume_from_checkpoint: true` resumes from the last checkpoint)
NOT_PATHS = ("true", "false", "last", "latest", "none", "null")
#: `datasets`' packaged builders, which a dataset setting may name instead of a path (a mixture's `path: json` with
#: its `data_files`)
BUILDERS = ("arrow", "audiofolder", "csv", "hdf5", "imagefolder", "json", "pandas", "parquet", "sql", "text",
            "videofolder", "webdataset", "xml")
#: The models the tiny recipes train (`model_name_or_path: outputs/tiny-mistral`), made by `nca-trl make-tiny-model`:
#: local paths wherever they are written, never Hub ids -> the command that makes each
TINY_MODELS = {
    "outputs/tiny-mistral": "nca-trl make-tiny-model outputs/tiny-mistral",
    "outputs/tiny-digits": "nca-trl make-tiny-model outputs/tiny-digits --vocab digits",
    "outputs/tiny-mixtral": "nca-trl make-tiny-model outputs/tiny-mixtral --arch mixtral",
}
#: What a path setting names: `model` and `dataset` may be Hub ids (checked against that cache when offline); `file`
#: and `folder` are local only (a `--config` recipe, a DeepSpeed JSON, a reward-function file, a checkpoint)
KINDS = ("model", "dataset", "file", "folder")


def looks_local(value: str) -> bool:
    """Whether `value` reads as a local path rather than a Hub id (see the module docstring)."""
    text = str(value)
    path = Path(os.path.expanduser(text))
    return (text.startswith(("/", ".", "~")) or text.count("/") > 1 or path.suffix.lower() in FILE_SUFFIXES
            or (len(path.parts) > 1 and Path(path.parts[0]).is_dir()))


def _tiny_model_command(text: str) -> str | None:
    """The command that makes the tiny model `text` names (`TINY_MODELS`, however the path is spelled: `./outputs/...`,
    `/abs/outputs/...`, a trailing `/`), with the user's spelling of the path, or None."""
    parts = Path(os.path.normpath(os.path.expanduser(text))).parts
    key = "/".join(parts[-2:])
    command = TINY_MODELS.get(key)
    return None if command is None else command.replace(key, shlex.quote(text.rstrip("/")), 1)


def _offline(kind: str) -> str | None:
    """The environment variable that switches the Hub off for `kind`, if one is set."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if kind == "dataset" else ("HF_HUB_OFFLINE",
                                                                                 "TRANSFORMERS_OFFLINE")
    for name in names:
        if os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


def hub_cached(repo_id: str, kind: str) -> bool:
    """Whether the Hub repo `repo_id` (a `model` or a `dataset`) has a copy in the local caches (the Hub's, and for a
    dataset also the `datasets` library's)."""
    from huggingface_hub import constants

    prefix = "datasets" if kind == "dataset" else "models"
    if (Path(constants.HF_HUB_CACHE) / f"{prefix}--{repo_id.replace('/', '--')}").is_dir():
        return True
    if kind == "dataset":
        datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE") or Path(constants.HF_HOME) / "datasets")
        return (datasets_cache / repo_id.replace("/", "___")).is_dir()
    return False


def check_path(value, setting: str, kind: str = "model", hub: bool = True) -> None:
    """Refuse `value` of the path setting `setting` with a `SettingsError` when it reads as a local path that does not
    exist (`no such file or folder: PATH (SETTING)`), or, for a `model` / `dataset` Hub id, when the Hub is switched
    off and the id is not cached (unless `hub=False`: a dry run loads nothing). Unset values (None, "") and the
    values of `NOT_PATHS` pass."""
    if kind not in KINDS:
        raise ValueError(f"`kind` must be one of {KINDS}, got {kind!r}.")
    if value is None or str(value) == "" or str(value).strip().lower() in NOT_PATHS:
        return
    text = str(value)
    if text.lstrip().startswith(("{", "[")):  # an inline JSON value (`--deepspeed '{...}'`), not a path
        return
    if kind == "dataset" and text in BUILDERS or any(c in text for c in "*?["):  # a builder, a glob of files
        return
    if Path(os.path.expanduser(text)).exists():
        return
    tiny = _tiny_model_command(text) if kind == "model" else None
    if tiny and (hub or looks_local(text)):  # a tiny recipe's model not made yet here (it read as a Hub id: minutes
        # of retries without a network); with `hub=False` (parsing a recipe, loading nothing) only where it reads local
        raise SettingsError(f"no such folder: {text} ({setting}), the tiny recipes' model: make it first with "
                            f"`{tiny}`")
    if kind in ("file", "folder") or looks_local(text):
        raise SettingsError(f"no such file or folder: {text} ({setting})")
    offline = _offline(kind) if hub else None
    if offline and not hub_cached(text, kind):
        raise SettingsError(f"{text} ({setting}) is neither a local path nor in the Hugging Face cache, and the Hub "
                            f"cannot be reached offline ({offline}=1): download it once online, or give a local path.")


def reward_function_path(spec: str) -> str | None:
    """The file of a reward-function spec `path/to/file.py:function` (None for `module:function` or a bundled name)."""
    module = str(spec).strip().rpartition(":")[0]
    return module if module and (module.endswith(".py") or "/" in module or os.sep in module) else None


def _mixture_entry(entry, i: int, kind: str) -> list[tuple]:
    """The paths of a `datasets:` mixture entry (a mapping or a `trl` `DatasetConfig`): its `path`, and with a
    builder as `path` (`json`, `csv`, ...) its `data_files` (a file, a list, or split -> files: local files)."""
    field = entry.get if isinstance(entry, dict) else lambda name: getattr(entry, name, None)
    checks = [(field("path"), f"datasets[{i}].path", kind)]
    files = field("data_files")
    if field("path") in BUILDERS and files:
        groups = files.items() if isinstance(files, dict) else [(None, files)]
        for split, group in groups:
            for file in [group] if isinstance(group, str) else group:
                checks.append((file, f"datasets[{i}].data_files" + (f".{split}" if split else ""), "file"))
    return checks


def check_path_settings(argv: list[str], settings: dict[str, str], recipe: dict | None = None,
                        hub: bool = True) -> dict:
    """Check the path settings of a command before anything heavy is imported, and return its recipe: `--config`
    first (a file), then, for each `setting: kind` of `settings`, its value on the command line (`--setting X`, the
    last one wins) or else in the recipe (`recipe`, read from `--config` when not given; a parser's resolved values
    with `argv=[]`). `reward_funcs` checks the file of each `path/file.py:function` spec; `datasets` (a mixture) each
    entry's `path` (a mapping's or an object's). Every missing local path is reported before a Hub id offline."""
    from .recipes import load_recipe, peek, peek_all

    check_path(peek(argv, "config"), "config", "file")
    if recipe is None:
        recipe, _ = load_recipe(argv)
    checks = []  # (value, setting, kind)
    for setting, kind in settings.items():
        if setting == "reward_funcs":
            specs = peek_all(argv, setting)
            if specs is None:
                specs = recipe.get(setting) or []
                specs = [specs] if isinstance(specs, str) else specs
            checks += [(reward_function_path(spec), setting, "file") for spec in specs]
        elif setting == "datasets":
            entries = recipe.get("datasets") if peek(argv, "datasets") is None else None
            for i, entry in enumerate(entries if isinstance(entries, list) else []):
                checks += _mixture_entry(entry, i, kind)
        else:
            value = peek(argv, setting)
            checks.append((recipe.get(setting) if value is None else value, setting, kind))
    checks = [(value, setting, kind) for value, setting, kind in checks if isinstance(value, str)]
    for value, setting, kind in checks:
        check_path(value, setting, kind, hub=False)
    if hub:
        for value, setting, kind in checks:
            check_path(value, setting, kind)
    return recipe


def check_output_file(output, setting: str, sidecar: Path | None = None, parts: Path | None = None) -> None:
    """Refuse, before anything is read or loaded, an output file that cannot be written: a folder, under a file, in a
    folder not writable, a sidecar path that is a folder or a `parts` path (generate's `<output>.parts/`) that is a
    file (met after the work was done); and one whose sidecar (`<stem>.generation.json`, `<stem>.scoring.json`,
    beside it) records another output that exists (`out.jsonl` and `out.parquet` share their stem: the new run would
    replace the other's record, and a rerun of the other took the new settings for its own)."""
    path = Path(output)  # as the command writes it (the arguments expand `~`)
    if path.is_dir():
        raise SettingsError(f"{output} is a folder ({setting}): give a file name, e.g. {path / 'rows.jsonl'}")
    for other, kind in ((sidecar, "the record of the run"), (parts, None)):
        if other is not None and (other.is_dir() if kind else other.exists() and not other.is_dir()):
            what = f"a folder where {kind} is written" if kind else "a file where the run's chunks go (a folder)"
            raise SettingsError(f"{other} is {what}, beside {output} ({setting}): move it away or choose another "
                                "output name")
    existing = next(p for p in (path.parent, *path.parent.parents) if p.exists() or p == p.parent)
    if existing.exists() and not existing.is_dir():
        raise SettingsError(f"{existing} is a file, so {output} cannot be written ({setting}): choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SettingsError(f"{existing} is not writable, so {output} cannot be written ({setting})")
    recorded = recorded_output_name(sidecar) if sidecar is not None else None
    other = sidecar.parent / recorded if recorded else None
    if other is not None and other.name != path.name and other.exists():
        raise SettingsError(
            f"{sidecar} is the record of {other}, which {output} shares its name with: writing {output} would replace "
            f"that record ({setting}). Name this output otherwise, e.g. "
            f"{path.with_name(path.stem + '-2' + path.suffix)}")


def recorded_output_name(sidecar: Path) -> str | None:
    """The file name of the output that a generate or score record (`sidecar`) names; None where there is no record,
    it cannot be read, or it names none."""
    import json

    if not sidecar.is_file():
        return None
    try:
        recorded = json.loads(sidecar.read_text()).get("output")
    except (ValueError, OSError, AttributeError):
        return None
    return Path(str(recorded)).name if recorded else None


def check_data_folder(dataset_name, setting: str, output=None) -> None:
    """Refuse a data folder (`dataset_name`) that holds a generate or score record (`*.generation.json`,
    `*.scoring.json`), or that `output` would be written into: `datasets` reads every data file of a folder as one
    table, so the record and the output (its `.parts/` chunks too) would be read as rows (a cast error, or the samples
    taken for prompts by the next run)."""
    folder = Path(str(dataset_name)).expanduser()
    if not folder.is_dir():
        return
    if output is not None and folder.resolve() in Path(output).resolve().parents:
        raise SettingsError(f"`output` {output} is inside the data folder {dataset_name} ({setting}), which would read "
                            "it back as rows on the next run: write the output outside that folder, or pass the data "
                            "file itself")
    records = sorted([*folder.glob("*.generation.json"), *folder.glob("*.scoring.json")])
    if records:
        outputs = sorted(f.name for f in folder.iterdir() if f.suffix.lower() in (".jsonl", ".parquet"))
        raise SettingsError(f"{dataset_name} is a folder holding {records[0].name}, the record of a generate or "
                            f"score run, which would be read as rows too: pass the data file itself ({setting}), "
                            f"e.g. {folder / (outputs or ['OUTPUT.jsonl'])[0]}")
