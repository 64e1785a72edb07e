"""What every command's arguments share: reading `--config RECIPE.yaml`, refusing its unknown keys by name, and the
value sets of the fields that more than one command has (model dtypes, output file types)."""

from __future__ import annotations

import difflib

__all__ = ["DTYPES", "OUTPUT_SUFFIXES", "as_argv", "check_config_keys", "check_recipe_keys", "load_recipe",
           "merge_repeated", "parse_command", "peek", "peek_all"]

#: Accepted `dtype` values of the commands that load a model for inference (`generate`, `score`, `iterate`).
DTYPES = ("auto", "bfloat16", "float16", "float32")
#: File types the commands write rows to.
OUTPUT_SUFFIXES = (".jsonl", ".parquet")


def peek(argv: list[str], name: str) -> str | None:
    """Value of `--name X` / `--name=X` in argv (the last one wins; a flag with no value reads "true"), else None."""
    value = None
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}  # HfArgumentParser accepts both spellings
    for i, arg in enumerate(argv):
        if arg in flags:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "true"
        elif "=" in arg and arg.split("=", 1)[0] in flags:
            value = arg.split("=", 1)[1]
    return value


def peek_all(argv: list[str], name: str) -> list[str] | None:
    """The values of every `--name A B` / `--name=A` of argv, in order (a repeatable list field such as
    `--reward_funcs`), else None."""
    values = None
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}
    for i, arg in enumerate(argv):
        flag, eq, inline = arg.partition("=")
        if flag not in flags:
            continue
        values = values if values is not None else []
        if eq:
            values.append(inline)
            continue
        for value in argv[i + 1:]:
            if value.startswith("--"):
                break
            values.append(value)
    return values


def load_recipe(argv: list[str]) -> tuple[dict, str | None]:
    """`(the YAML mapping of --config, its path)`, or `({}, None)` without `--config`."""
    import yaml

    path = peek(argv, "config")
    if path is None:
        return {}, None
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"The config {path} must hold a YAML mapping of field: value, got {type(recipe).__name__}.")
    return recipe, path


def check_recipe_keys(recipe: dict, path: str, parser, command: str, fields: str = "") -> None:
    """Fail on keys of `recipe` that no dataclass of `parser` knows (TrlParser would ignore them), naming each key and
    the closest known ones; `fields` says which classes the keys come from, `command` whose `--help` lists them.
    `parser` may also be the set of known keys (`nca-trl train`'s check before anything heavy is imported)."""
    known = ({action.dest for action in parser._actions} if hasattr(parser, "_actions") else set(parser)) | {"env"}
    unknown = [key for key in recipe if key not in known]
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, sorted(known), n=3)
        hints.append(f"'{key}'" + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""))
    where = f" Every key must be a field of {fields};" if fields else ""
    raise ValueError(f"Unknown key(s) in {path}: {'; '.join(hints)}.{where} see `nca-trl {command} --help`.")


def check_config_keys(argv: list[str], parser, command: str) -> None:
    """`check_recipe_keys` on the `--config` YAML of argv, if any (`nca-trl generate`, `score`, `iterate`)."""
    recipe, path = load_recipe(argv)
    if path is not None:
        check_recipe_keys(recipe, path, parser, command)


def parse_command(parser, argv: list[str], command: str, required: tuple[str, ...] = ()):
    """The one arguments dataclass of `nca-trl <command>` from argv (`--config X.yaml` and overrides): unknown recipe
    keys refused by name, then each of `required` must be set."""
    check_config_keys(argv, parser, command)
    (args,) = parser.parse_args_and_config(argv, fail_with_unknown_args=True)
    missing = [name for name in required if getattr(args, name) is None]
    if missing:
        raise ValueError(f"`nca-trl {command}` needs {', '.join(f'`{m}`' for m in missing)}.")
    return args


def as_argv(arguments) -> list[str]:
    """The command line equivalent to an arguments dataclass: `--field value` for every field that differs from its
    default (lists as repeated values), in field order. What `nca-trl iterate` prints for each stage it runs."""
    import dataclasses

    argv = []
    for f in dataclasses.fields(arguments):
        if not f.init:
            continue
        value = getattr(arguments, f.name)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if value == default or (value in (None, []) and default in (None, [])):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        argv += [f"--{f.name}", *map(str, values)]
    return argv


def merge_repeated(argv: list[str], names: tuple[str, ...]) -> list[str]:
    """`--reward_funcs a --reward_funcs b c` -> `--reward_funcs a b c` for each flag of `names` (argparse would keep
    only the last flag's values)."""
    rest: list[str] = []
    values: dict[str, list[str]] = {}
    i = 0
    while i < len(argv):
        flag, eq, inline = argv[i].partition("=")
        name = flag[2:].replace("-", "_") if flag.startswith("--") else None
        i += 1
        if name not in names:
            rest.append(argv[i - 1])
            continue
        found = values.setdefault(name, [])
        if eq:
            found.append(inline)
        while i < len(argv) and not (argv[i].startswith("--") or argv[i][:1] == "-" and argv[i][1:2].isalpha()):
            found.append(argv[i])  # values, negative numbers included (`--reward_weights 1 -0.5`)
            i += 1
    for name, found in values.items():
        rest += [f"--{name}", *found]
    return rest
