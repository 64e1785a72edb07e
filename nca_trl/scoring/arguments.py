"""Arguments of `nca-trl score`: one dataclass parsed with `trl.TrlParser` (command line and/or `--config X.yaml`)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.errors import settings_errors
from ..runtime.paths import check_path, check_path_settings
from ..runtime.help import check_command_argv, command_help
from ..runtime.recipes import DTYPES, OUTPUT_SUFFIXES, merge_repeated, parse_command

__all__ = ["PATH_SETTINGS", "ScoreArguments", "check_argv", "make_score_parser", "parse_score_args", "print_help"]

#: Flags that take several values and may be repeated (`--reward_funcs a --reward_funcs b`): iterate's too
REPEATABLE = ("reward_funcs", "reward_weights")


@dataclass
class ScoreArguments:
    """`nca-trl score`: add `rewards` to {prompt, completions} rows, from a reward model and/or reward functions."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "The rows to score: a data file (.jsonl, .json, .parquet, .csv, .arrow), a folder of data files, a "
            "`save_to_disk` folder or a Hub dataset id, with `prompt` and `completions` columns (what `nca-trl "
            "generate` writes). Pass generate's output *file*: its folder also holds the `<stem>.generation.json` "
            "sidecar. Other columns are carried through and passed to the reward functions."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read the rows from."})
    output: str | None = field(
        default=None,
        metadata={
            "help": "Output file, `.jsonl` or `.parquet`: rows {prompt, completions, rewards, ...carried columns} that "
            "`nca-trl train --dataset_name OUTPUT` reads as they are. Written atomically; settings, per-source "
            "statistics and dropped counts go to `<output stem>.scoring.json`."
        },
    )
    reward_model: str | None = field(
        default=None,
        metadata={
            "help": "A reward model: an `AutoModelForSequenceClassification` with num_labels=1 (local folder or Hub "
            "id), scored with its own tokenizer and chat template. The first reward source."
        },
    )
    reward_model_revision: str = field(default="main", metadata={"help": "Reward model revision (Hub branch, tag or "
                                                                         "commit)."})
    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Reward functions in TRL's GRPOTrainer convention, `f(prompts, completions, **columns) -> "
            "list[float | None]` (None: the completion is unusable and dropped): `module:function`, "
            "`module.function`, `path/to/file.py:function`, or a bundled name (`sorted_digits`, `ascii_letters`, "
            "TRL's `accuracy_reward`, `reasoning_accuracy_reward`, `think_format_reward`). Several: list them "
            "(`--reward_funcs a:f b:g`) or repeat the flag."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per reward source, the reward model first, then `reward_funcs` in order; reward = "
            "sum of weight x source. Default: all 1.0."
        },
    )
    batch_size: int = field(default=8, metadata={"help": "Sequences per reward-model forward pass."})
    chunk_size: int = field(
        default=64, metadata={"help": "Rows per call of a reward function (each call gets all their completions)."}
    )
    max_length: int | None = field(
        default=None,
        metadata={
            "help": "Reward-model input length in tokens; longer prompt + completion sequences keep their last "
            "`max_length` tokens (the reward is read at the last token, whatever the tokenizer's `truncation_side`), "
            "counted and warned about. Default: the tokenizer's `model_max_length` when set, else the model's "
            "`max_position_embeddings`."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Reward-model dtype: `auto` (bfloat16 on a CUDA GPU that supports it, else float32), "
                          "`bfloat16`, `float16` or `float32`.", "choices": DTYPES},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow the reward model's own modelling code."})
    max_rows: int | None = field(default=None, metadata={"help": "Score only the first N rows of the split."})
    evaluation: bool = field(
        default=False,
        metadata={"help": "Score for an evaluation, not for `nca-trl train`: empty completions are scored like the "
                          "others (an empty answer is the model's too) and a row is kept with one scored completion, so "
                          "the mean reward is the model's; `nca-trl train` refuses such rows. `nca-trl iterate` scores "
                          "its held-out samples so."},
    )

    @property
    def num_sources(self) -> int:
        return int(self.reward_model is not None) + len(self.reward_funcs)

    def __post_init__(self):
        if self.output is not None:  # `~/x.jsonl` from a recipe (no shell expanded it): checked and written alike
            self.output = str(Path(self.output).expanduser())
        if self.output is not None and Path(self.output).suffix.lower() not in OUTPUT_SUFFIXES:
            raise ValueError(f"`output` must end with one of {OUTPUT_SUFFIXES}, got {self.output!r}.")
        if self.dtype not in DTYPES:  # argparse's `choices` check the command line only (iterate builds these)
            raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        self.reward_funcs = list(self.reward_funcs or [])
        empty = [spec for spec in self.reward_funcs if not str(spec).strip()]
        if empty:
            raise ValueError("`reward_funcs` has an empty entry: give each as `module:function` or "
                             "`path/to/file.py:function`.")
        if self.num_sources == 0:
            raise ValueError(
                "`nca-trl score` needs at least one reward source: `--reward_model PATH` (a sequence-classification "
                "model with num_labels=1) and/or `--reward_funcs module:function` (repeatable)."
            )
        if self.reward_weights is not None:
            self.reward_weights = [float(w) for w in self.reward_weights]
            if len(self.reward_weights) != self.num_sources:
                names = (["reward_model"] if self.reward_model is not None else []) + list(self.reward_funcs)
                raise ValueError(
                    f"`reward_weights` has {len(self.reward_weights)} value(s) but there are {self.num_sources} reward "
                    f"source(s) ({', '.join(names)}, in this order: the reward model first, then `reward_funcs`): give "
                    "one weight per source, or none for all 1.0."
                )
            bad = [w for w in self.reward_weights if not math.isfinite(w)]
            if bad:
                raise ValueError(f"`reward_weights` must be finite numbers, got {self.reward_weights}.")
        for name in ("batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"`max_length` must be at least 1 (or unset: the tokenizer's), got {self.max_length}.")
        if self.max_rows is not None and self.max_rows < 0:
            raise ValueError(f"`max_rows` must be >= 0, got {self.max_rows}.")
        check_path(self.reward_model, "reward_model", "model", hub=False)
        from .sources import load_reward_function

        for spec in self.reward_funcs:  # imported now, so that a misspelled one fails before anything is written
            load_reward_function(spec)

    @property
    def weights(self) -> list[float]:
        """One weight per source (reward model first), 1.0 where `reward_weights` is unset."""
        return list(self.reward_weights) if self.reward_weights is not None else [1.0] * self.num_sources


def make_score_parser():
    from trl import TrlParser

    return TrlParser((ScoreArguments,), prog="nca-trl score")


#: what `nca-trl score --help` shows first, and the fields it needs when no recipe gives them
USAGE = ("--dataset_name SAMPLES.jsonl (--reward_model RM | --reward_funcs F ...) --output RATED.jsonl "
         "[--field value ...]")
#: its settings that name a path, and what each names (`nca_trl.runtime.paths.KINDS`): checked before anything is
#: imported, written or loaded (`check_argv`), and again when the run starts (arguments built in Python)
PATH_SETTINGS = {"dataset_name": "dataset", "reward_model": "model", "reward_funcs": "file"}
REQUIRED = ("dataset_name", "output")


def print_help(argv: list[str] | None = None) -> None:
    """`nca-trl score --help`: every field (imports nothing heavy)."""
    print(command_help("score", USAGE, ScoreArguments), end="")


def check_argv(argv: list[str]) -> None:
    """What `nca-trl score` checks before importing anything heavy: something to run, known flags, and every path
    setting (`PATH_SETTINGS`: a missing local path, or a Hub id offline and not cached)."""
    check_command_argv(argv, ScoreArguments, "score", required=REQUIRED)
    check_path_settings(argv, PATH_SETTINGS)




@settings_errors
def parse_score_args(argv: list[str] | None = None) -> ScoreArguments:
    argv = merge_repeated(list(sys.argv[1:] if argv is None else argv), REPEATABLE)
    args = parse_command(make_score_parser(), argv, "score", required=REQUIRED)
    return args
