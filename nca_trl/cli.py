"""The `nca-trl` command line: `train`, `generate`, `score`, `iterate`, `make-tiny-model` and `recipes`.

```bash
nca-trl make-tiny-model outputs/tiny-mistral                 # tiny random Mistral + the real Mistral tokenizer
nca-trl train --config recipes/tiny/nca.yaml                 # one process (CPU or one GPU)
nca-trl train --config recipes/tiny/nca.yaml --max_steps 5   # any field can be overridden on the command line
nca-trl train --config tiny/nca.yaml                         # from any folder: a bundled recipe by its name
nca-trl recipes                                              # the bundled recipes and accelerate configs, full paths
accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml \
    -m nca_trl.cli train --config recipes/mistral-7b/nca_ultrafeedback.yaml   # 8 GPUs, ZeRO-3
nca-trl train --config recipes/mistral-7b/nca_ultrafeedback.yaml --dry_run   # parse and print, load nothing
```

Each command lives in its own package, shaped alike (arguments dataclass, run module): `train` in `nca_trl.train`
(the shape of TRL's `scripts/dpo.py`), `generate` in `nca_trl.generation`, `score` in `nca_trl.scoring`, `iterate` in
`nca_trl.iterate`, `make-tiny-model` in `nca_trl.tiny`, `recipes` in `nca_trl.runtime.bundled`. This module only
dispatches; a `--config` or `dataset_name` that is not a file here but a bundled one is replaced by the bundled file's
path first (`nca_trl.runtime.bundled.resolve_argv`, which says so).
"""

from __future__ import annotations

import contextlib
import importlib
import sys

__all__ = ["COMMANDS", "main"]

#: command -> (its package, the function of the package that runs it on argv)
COMMANDS = {
    "train": ("nca_trl.train", "train"),
    "generate": ("nca_trl.generation", "generate"),
    "score": ("nca_trl.scoring", "score"),
    "iterate": ("nca_trl.iterate", "iterate"),
    "make-tiny-model": ("nca_trl.tiny", "main"),
    "recipes": ("nca_trl.runtime.bundled", "main"),
}
#: command -> the module with its `print_help(argv)` and `check_argv(argv)`, which import nothing heavy: `--help`, a
#: command with nothing to run and an unknown flag are answered before torch, transformers or TRL are imported
ARGUMENTS = {
    "train": "nca_trl.train.help",
    "generate": "nca_trl.generation.arguments",
    "score": "nca_trl.scoring.arguments",
    "iterate": "nca_trl.iterate.arguments",
}

_USAGE = """usage: nca-trl <command> [options]

commands:
  train             train NCA / InfoNCA from a recipe:  nca-trl train --config RECIPE.yaml [--field value ...]
                    (distributed: accelerate launch --config_file ACCEL.yaml -m nca_trl.cli train --config RECIPE.yaml)
  make-tiny-model   build a tiny random model + the Mistral tokenizer:  nca-trl make-tiny-model OUT_DIR [--arch mixtral]
                    (or 14 digit tokens for the sorting task: --vocab digits)
  generate          sample K completions per prompt:  nca-trl generate --model_name_or_path M --dataset_name PROMPTS
                    --output OUT.jsonl [--num_completions 4 ...]   (`nca-trl generate --help` lists the fields)
  score             add rewards from a reward model and/or reward functions:  nca-trl score --dataset_name OUT.jsonl
                    --reward_funcs my_module:my_reward --output RATED.jsonl   (`nca-trl score --help`)
  iterate           rounds of generate -> score -> train:  nca-trl iterate --config RECIPE.yaml [--rounds N]
  recipes           the bundled recipes, accelerate configs and data with their full paths:  nca-trl recipes
                    [--path NAME | --copy NAME DIR]   (`--config NAME` finds a bundled recipe from any folder)

`nca-trl <command> --help` lists the fields of each command; `nca-trl --version` the versions of nca-trl and its stack.
"""

#: The packages whose versions `nca-trl --version` prints after nca-trl's (what a bug report needs)
_STACK = ("trl", "transformers", "torch", "accelerate", "datasets", "peft", "deepspeed")


def _versions() -> str:
    """`nca-trl 0.1.0 (trl 1.16.0, transformers 5.25.0, ..., peft not installed)`, from the installed metadata (nothing
    imported)."""
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(name: str) -> str:
        try:
            return f"{name} {version(name)}"
        except PackageNotFoundError:
            return f"{name} not installed"

    return f"nca-trl {__version__} ({', '.join(installed(name) for name in _STACK)})"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nca-trl` console script, of `python -m nca_trl.cli` and of `scripts/train.py`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0
    if argv[0] in ("--version", "-V", "version"):
        print(_versions())
        return 0
    command, rest = ("make-tiny-model" if argv[0] == "make_tiny_model" else argv[0]), argv[1:]
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        print(f"nca-trl: unknown command {command!r}{hint}\n\n{_USAGE}", file=sys.stderr)
        return 2
    package, run = COMMANDS[command]
    if command in ARGUMENTS:  # make-tiny-model: argparse, light already
        arguments = importlib.import_module(ARGUMENTS[command])
        if any(arg in ("-h", "--help") for arg in rest):
            arguments.print_help(rest)
            return 0
        try:
            from .runtime.bundled import resolve_argv

            rest = resolve_argv(rest)
            arguments.check_argv(rest)
        except ValueError as error:
            print(f"nca-trl {command}: error: {error}", file=sys.stderr)
            return 2
    from .runtime.environment import quiet_deepspeed_cpu_notice
    from .runtime.errors import DataError, OutputDirError, SettingsError

    quiet_deepspeed_cpu_notice()
    with _library_log(), _sigterm_as_interrupt():
        try:
            getattr(importlib.import_module(package), run)(rest)
        # A setting refused before anything was written or loaded, a bad row or data file (its row or line): the
        # message is the whole story
        except (SettingsError, DataError, OutputDirError) as error:
            print(f"nca-trl {command}: error: {error}", file=sys.stderr)
            return 2
        except KeyboardInterrupt as stop:  # Ctrl-C: a line saying how to continue, not a traceback through the library
            how = "terminated (SIGTERM)" if isinstance(stop, Terminated) else "interrupted"
            print(f"nca-trl {command}: {how}. {_CONTINUE.get(command, '')}".rstrip(), file=sys.stderr)
            return 143 if isinstance(stop, Terminated) else 130
    return 0


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's preemption or time limit, `kill`), raised where the command is, as Ctrl-C is."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM ends the command as Ctrl-C does, with the line saying how it continues (exit 143): it ended with no
    word (a scheduler's preemption). Only where SIGTERM has its default action, in the main thread (a program that
    calls `main` and handles it keeps its own)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    import os

    installer = os.getpid()

    def terminated(signum, frame):
        if os.getpid() != installer:  # a forked child (a reward function's worker): SIGTERM's default action, as
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # before (`Process.terminate()` did not end it)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated

    signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


#: How a command stopped by Ctrl-C continues
_CONTINUE = {
    "train": "Continue from the last complete checkpoint (if `save_strategy` wrote one) with the same command and "
             "`--resume_from_checkpoint true`.",
    "generate": "The same command continues from the chunks written.",
    "iterate": "The same command continues the run (its finished stages are skipped).",
    "score": "The same command scores again; nothing was written.",
}


@contextlib.contextmanager
def _library_log():
    """The `nca_trl` logger's INFO lines (the shared-prompt kernel that runs, a reused reference cache, ZeRO-3 leaves)
    shown for the command, as `[nca-trl] ...`, from the main process of a launch only (warnings from every process,
    as before); Python's default shows WARNING and above only. Left alone where logging is set up already (a handler
    on the logger or the root logger: a program that calls `main` and chose its own levels and format)."""
    import logging
    import os

    log = logging.getLogger("nca_trl")
    if log.handlers or logging.getLogger().handlers:
        yield
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[nca-trl] %(message)s"))
    if os.environ.get("RANK", "0") != "0":  # `accelerate launch` / torchrun set RANK on every process
        handler.setLevel(logging.WARNING)
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
