"""`nca-trl train --help` and the argument checks made before anything heavy is imported.

The fields of `nca-trl train` are `ScriptArguments`, `NCAConfig` / `InfoNCAConfig` (every `trl.DPOConfig` and
`transformers.TrainingArguments` field), `trl.ModelConfig` and `trl.DatasetMixtureConfig`: listing them needs TRL,
transformers and torch, seconds of imports. So the help text is rendered once per loss into `help_texts/<loss>.txt`
(`python -m nca_trl.train.help` rewrites them; a test fails when they differ from what the installed stack
renders), stamped with the TRL and transformers versions it was rendered with; with other versions installed the help
is rendered live instead. The option names of the same text let `check_argv` refuse an unknown flag at once.

Order of the help: usage and `--config`, the fields of `nca-trl train` itself, the loss's own fields, the model and
the dataset mixture, then the inherited `DPOConfig` / `TrainingArguments` fields (first sentence each); the DPO loss
fields that the config refuses are named at the end, not listed as options.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from ..runtime.help import check_flags, render_help
from ..runtime.paths import check_path, check_path_settings
from ..runtime.recipes import check_recipe_keys, load_recipe, peek
from .options import LOSSES, PATH_SETTINGS, truthy

__all__ = ["check_argv", "help_text", "print_help", "render", "write_help_files"]

HELP_DIR = Path(__file__).with_name("help_texts")
_STACK = ("trl", "transformers")
USAGE = ("nca-trl train --config RECIPE.yaml [--field value ...]\n"
         "       nca-trl train --model_name_or_path MODEL --dataset_name DATA [--field value ...]\n"
         "       accelerate launch --config_file ACCELERATE.yaml -m nca_trl.cli train --config RECIPE.yaml")
_INHERITED = "inherited from trl.DPOConfig and transformers.TrainingArguments (first sentence; see their docs)"


def _stamp() -> str:
    versions = ", ".join(f"{name} {metadata.version(name)}" for name in _STACK)
    return f"# nca-trl train --help, rendered by `python -m nca_trl.train.help` with {versions}\n"


def render(loss: str) -> str:
    """The help text of `nca-trl train --loss <loss>`, from the dataclasses themselves (imports TRL)."""
    from dataclasses import fields

    from trl import DatasetMixtureConfig, DPOConfig, ModelConfig

    from ..config import UNSUPPORTED_DPO_FIELDS, config_for_loss
    from .arguments import ScriptArguments, make_parser

    make_parser(loss)  # HfArgumentParser rewrites some fields' types (`dict | str` -> `str`): list them as it parses
    config = config_for_loss(loss)
    dpo = {f.name: f for f in fields(DPOConfig)}
    own = [f for f in fields(config) if f.name not in dpo or f.metadata.get("help") != dpo[f.name].metadata.get("help")
           or f.default != dpo[f.name].default]
    refused = [name for name in UNSUPPORTED_DPO_FIELDS if name in dpo]
    own_names = {f.name for f in own}
    inherited = [f for f in fields(config) if f.name not in own_names and f.name not in refused]
    sections = [
        ("nca-trl train (the loss and the data)", fields(ScriptArguments)),
        (f"{config.display_name()} ({config.__name__}'s own fields and changed defaults)", own),
        ("model (trl.ModelConfig)", fields(ModelConfig)),
        ("dataset mixture (trl.DatasetMixtureConfig)", fields(DatasetMixtureConfig)),
        (_INHERITED, inherited),
    ]
    epilog = (f"Refused (DPO-only loss fields, an error if set): {', '.join(refused)}. `--loss infonca --help` lists "
              "the InfoNCA fields. Every field is also a key of the recipe YAML.")
    return render_help(USAGE, sections, short=(_INHERITED,), epilog=epilog)


def write_help_files() -> list[Path]:
    """Render `help_texts/<loss>.txt` for every loss with the installed stack (`python -m nca_trl.train.help`)."""
    HELP_DIR.mkdir(exist_ok=True)
    written = []
    for loss in LOSSES:
        path = HELP_DIR / f"{loss}.txt"
        path.write_text(_stamp() + render(loss))
        written.append(path)
    return written


def help_text(loss: str) -> str:
    """The help of `loss`: the rendered file where it was rendered with the installed TRL and transformers, else
    rendered now."""
    path = HELP_DIR / f"{loss}.txt"
    if path.is_file():
        stamp, _, text = path.read_text().partition("\n")
        if stamp + "\n" == _stamp():
            return text
    return render(loss)


def _loss(argv: list[str], recipe: dict | None = None) -> str:
    loss = peek(argv, "loss") or (recipe or {}).get("loss") or "nca"
    if loss not in LOSSES:
        raise ValueError(f"`--loss {loss}` is not a loss of `nca-trl train`; choose one of {list(LOSSES)}.")
    return loss


def print_help(argv: list[str]) -> None:
    """`nca-trl train --help [--loss infonca]`."""
    print(help_text(_loss(argv)), end="")


def check_argv(argv: list[str]) -> None:
    """What `nca-trl train` checks before importing anything heavy: something to train, a recipe file that exists,
    known flags and recipe keys, and every path setting (`options.PATH_SETTINGS`: a missing local path, or a Hub id
    offline and not cached; not for `--dry_run`, which checks a recipe meant for another machine and loads nothing).
    The full checks (values) run when the arguments are parsed."""
    if not argv:
        raise ValueError("`nca-trl train` needs a recipe or a model and data: `nca-trl train --config RECIPE.yaml` "
                         "(e.g. recipes/tiny/nca.yaml), or `--model_name_or_path MODEL --dataset_name DATA`. "
                         "`nca-trl train --help` lists every option.")
    check_path(peek(argv, "config"), "config", "file")
    recipe, path = load_recipe(argv)
    text = help_text(_loss(argv, recipe))
    options = _options(text)
    refused = _refuse_refused_fields(argv, recipe, path, text)  # at their defaults they pass, as from Python
    check_flags(argv, set(options) | refused, "train", {name for name, kind in options.items() if kind == "BOOL"})
    if path is not None:
        check_recipe_keys(recipe, path, (set(options) | refused) - {"config"}, "train")
    if not truthy(peek(argv, "dry_run") or recipe.get("dry_run", False)):  # a dry run loads nothing, here or elsewhere
        check_path_settings(argv, PATH_SETTINGS, recipe)


def _refuse_refused_fields(argv: list[str], recipe: dict, path: str | None, text: str) -> set[str]:
    """A refused DPO field (the help's "Refused" list) set off its default by a flag or a recipe key: refused saying
    why, where the unknown-flag check answered "did you mean" another field (`--label_smoothing`:
    `--label_smoothing_factor`, which no DPO loss applies). Returns the refused fields: at their defaults they are
    known flags and keys (a DPO recipe's `label_smoothing_factor: 0.0`)."""
    import yaml

    from ..refused_fields import UNSUPPORTED_DPO_FIELDS

    listed = re.search(r"^Refused \(DPO-only loss fields, an error if set\): (.*?)\. ", text, re.MULTILINE | re.DOTALL)
    refused = set(re.split(r",\s*", listed.group(1))) if listed else set()

    def set_off_default(name, value) -> bool:  # its default (`label_smoothing_factor: 0.0` of a DPO recipe) is fine
        try:
            value = yaml.safe_load(value) if isinstance(value, str) else value
        except yaml.YAMLError:
            return True
        return value != UNSUPPORTED_DPO_FIELDS[name][0]

    given = [(name, f"--{name}") for name in refused if (value := peek(argv, name)) is not None
             and set_off_default(name, value)]
    given += [(key, f"the key {key!r} of {path}") for key in recipe if key in refused
              and set_off_default(key, recipe[key])]
    if given:
        name, where = given[0]
        raise ValueError(f"{where}: `{name}` has no meaning for nca-trl's losses: {UNSUPPORTED_DPO_FIELDS[name][1]}. "
                         "Remove it.")
    return refused


def _options(text: str) -> dict[str, str]:
    """`{option: its TYPE}` of a help text."""
    return dict(re.findall(r"^  --(\S+) (\S+)", text, flags=re.MULTILINE))


if __name__ == "__main__":  # pragma: no cover
    for written in write_help_files():
        print(written)
    sys.exit(0)
