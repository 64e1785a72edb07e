"""`--help` and argument checks of the commands that answer at once: no torch, transformers or TRL import.

The commands' fields are dataclasses; `render_help` lists them as argparse would (`--name TYPE`, the help text, the
default), `check_flags` refuses a `--flag` that no field has, naming the closest ones. Both need only the dataclass
fields, so `nca-trl <command> --help` and a typo'd flag answer before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import re
import textwrap

__all__ = ["CONFIG_OPTION", "check_command_argv", "check_flags", "command_help", "field_entry", "render_help"]

WIDTH = 110
#: The `--config` option every command takes (TrlParser's), listed first in every help
CONFIG_OPTION = ("config", "RECIPE.yaml", ("A YAML file of `field: value` (the recipe); flags given on the "
                                           "command line override its values. An unknown key is an error that "
                                           "names it."))


def _kind(f: dataclasses.Field) -> str:
    choices = f.metadata.get("choices")
    if choices:
        return "{" + ",".join(str(c) for c in choices) + "}"
    if isinstance(f.type, type):
        kind = f.type.__name__
    elif isinstance(f.type, str):
        kind = f.type
    else:
        for arg in getattr(f.type, "__args__", ()):
            if isinstance(arg, type) and issubclass(arg, enum.Enum):
                return "{" + ",".join(str(m.value) for m in arg) + "}"
        kind = str(f.type).replace("typing.", "")
    kind = re.sub(r"Optional\[(.*)\]", r"\1", kind)
    kind = " | ".join(part for part in (p.strip() for p in kind.split("|")) if part not in ("None", "NoneType"))
    return kind.upper() or "VALUE"


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "required"
    if isinstance(value, enum.Enum):
        value = value.value
    return {True: "true", False: "false", None: "null"}.get(value, repr(value)) if isinstance(
        value, (bool, type(None))) else repr(value)


def field_entry(name: str, kind: str, text: str, short: bool = False) -> str:
    """One option as argparse lists it: `  --name KIND` and its help below, wrapped; `short` keeps the first
    sentence."""
    text = " ".join(text.split())
    if short:
        text = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    body = textwrap.fill(text, WIDTH, initial_indent=" " * 8, subsequent_indent=" " * 8) if text else ""
    return f"  --{name} {kind}" + (f"\n{body}" if body else "")


def render_help(usage: str, sections: list[tuple[str, list[dataclasses.Field]]], short: tuple[str, ...] = (),
                epilog: str = "") -> str:
    """The help text: `usage`, `--config`, then each `(title, fields)` section; sections whose title is in `short`
    keep one sentence per field."""
    lines = [f"usage: {usage}", "", field_entry(*CONFIG_OPTION)]
    for title, fields in sections:
        lines += ["", f"{title}:"]
        for f in fields:
            help_text = f.metadata.get("help", "")
            lines.append(field_entry(f.name, _kind(f), f"{help_text} (default: {_default(f)})" if title not in short
                                     else help_text, short=title in short))
    if epilog:
        lines += ["", textwrap.fill(" ".join(epilog.split()), WIDTH)]
    return "\n".join(lines) + "\n"


def check_flags(argv: list[str], known: set[str], command: str, bools: set[str] = frozenset()) -> None:
    """Raise a `ValueError` naming each `--flag` of argv that is not an option of `command` (`known`), with the
    closest known ones; `--no_<flag>` is accepted for the `bools` (as HfArgumentParser does), `-` for `_`."""
    unknown = []
    for arg in argv:
        if not arg.startswith("--") or arg == "--":
            continue
        name = arg[2:].split("=", 1)[0].replace("-", "_")
        if name in known or (name.startswith("no_") and name[3:] in bools):
            continue
        unknown.append(name)
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hints.append(f"--{name}" + (f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""))
        raise ValueError(f"`nca-trl {command}` has no option {'; '.join(hints)}. `nca-trl {command} --help` lists "
                         "them.")


def command_help(command: str, usage: str, arguments) -> str:
    """The help of a command whose fields are the one dataclass `arguments`."""
    return render_help(f"nca-trl {command} {usage}", [(f"nca-trl {command}", dataclasses.fields(arguments))])


def check_command_argv(argv: list[str], arguments, command: str, required: tuple[str, ...]) -> None:
    """The checks `nca-trl <command>` makes before importing anything heavy: something to run (`--config` or the
    `required` fields), and every flag an option of the dataclass `arguments`."""
    if not argv:
        need = " and ".join(f"`--{name}`" for name in required)
        raise ValueError(f"`nca-trl {command}` needs a recipe (`--config RECIPE.yaml`) or {need}. "
                         f"`nca-trl {command} --help` lists every option.")
    fields = dataclasses.fields(arguments)
    check_flags(argv, {f.name for f in fields} | {"config"}, command, {f.name for f in fields if _kind(f) == "BOOL"})
