"""Arguments of `nca-trl generate`: one dataclass parsed with `trl.TrlParser` (command line and/or `--config X.yaml`)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.errors import settings_errors
from ..runtime.paths import check_path, check_path_settings
from ..runtime.help import check_command_argv, command_help
from ..runtime.models import remote_code_problem
from ..runtime.recipes import DTYPES, OUTPUT_SUFFIXES, parse_command

__all__ = ["PATH_SETTINGS", "GenerateArguments", "check_argv", "make_generate_parser", "parse_generate_args",
           "print_help"]



@dataclass
class GenerateArguments:
    """`nca-trl generate`: sample K completions per prompt from a model (the first step of the rated-data loop)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The policy to sample from: a local folder or a Hugging Face Hub model id."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "The prompts: a Hub dataset id, a data file (.json, .jsonl, .parquet, .csv, .arrow), a folder of "
            "data files or a `save_to_disk` folder, with a `prompt` column (a string, or a list of chat messages). "
            "Other columns are carried through to the output."
        },
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read the prompts from."})
    output: str | None = field(
        default=None,
        metadata={
            "help": "Output file, `.jsonl` or `.parquet`. Rows {prompt, completions, finished, ...carried columns} "
            "(`finished`: per completion, false where it was cut at `max_new_tokens`). The run writes "
            "`<output>.parts/` chunk by chunk and merges at the end; rerunning with the same `output` and settings "
            "continues a stopped run. Settings and versions go to `<output stem>.generation.json`."
        },
    )
    num_completions: int = field(default=4, metadata={"help": "K, the number of completions sampled per prompt."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest completion, in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling: keep the smallest set of tokens with this "
                                                          "probability mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Keep the top_k most likely tokens (0: off)."})
    seed: int = field(
        default=0,
        metadata={
            "help": "Sampling seed. Each completion draws from its own random stream, seeded by (seed, the prompt's "
            "row number, the completion's number): the same seed gives the same samples whatever the batch size, "
            "chunk size, number of processes or restarts (up to floating-point differences between batch shapes)."
        },
    )
    batch_size: int = field(
        default=8, metadata={"help": "Prompts per forward batch (each becomes K sequences). May change on a restart."}
    )
    chunk_size: int = field(
        default=256,
        metadata={"help": "Prompts per written chunk: the unit of resumption and of the work split across processes."},
    )
    max_prompts: int | None = field(default=None, metadata={"help": "Use only the first N prompts of the split."})
    overwrite_output: bool = field(
        default=False,
        metadata={"help": "Replace an `output` (or its unfinished `.parts/`) generated with other settings: they are "
                  "removed first. Without it they are refused, naming the changed settings; the same settings "
                  "continue a stopped run or find it done."},
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Model weights dtype: `auto` (the checkpoint's), `bfloat16`, `float16` or `float32`.",
                  "choices": DTYPES},
    )
    attn_implementation: str | None = field(
        default=None, metadata={"help": "Attention implementation passed to `from_pretrained` (e.g. `sdpa`)."}
    )
    model_revision: str = field(default="main", metadata={"help": "Model revision (Hub branch, tag or commit)."})
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Run the checkpoint's own modelling code (the Python files its config's `auto_map` names), "
                  "for the config, the tokenizer and the model, as `nca-trl train`'s `trust_remote_code` does."},
    )

    def __post_init__(self):
        if self.output is not None:  # `~/x.jsonl` from a recipe (no shell expanded it): checked and written alike
            self.output = str(Path(self.output).expanduser())
        if self.output is not None and Path(self.output).suffix.lower() not in OUTPUT_SUFFIXES:
            raise ValueError(f"`output` must end with one of {OUTPUT_SUFFIXES}, got {self.output!r}.")
        if self.dtype not in DTYPES:  # argparse's `choices` check the command line only (iterate builds these)
            raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}, got {self.dtype!r}.")
        for name in ("num_completions", "max_new_tokens", "batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.num_completions < 2:
            raise ValueError(f"`num_completions` must be at least 2, got {self.num_completions}: `nca-trl train` "
                             "compares each prompt's completions (K >= 2), and refuses rows with fewer.")
        check_path(self.model_name_or_path, "model_name_or_path", "model", hub=False)
        problem = remote_code_problem(
            self.model_name_or_path, self.trust_remote_code,
            "`trust_remote_code: true` (`--trust_remote_code true`; for `nca-trl iterate`, in its `training:` mapping)",
        )
        if problem:
            raise ValueError(problem)
        if self.max_prompts is not None and self.max_prompts < 1:  # 0 wrote an empty output, which score refused
            raise ValueError(f"`max_prompts` must be at least 1 (or unset: every prompt), got {self.max_prompts}.")
        if not self.temperature > 0:
            raise ValueError(f"`temperature` must be > 0, got {self.temperature} (K greedy completions are identical).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"`top_p` must be in (0, 1], got {self.top_p}.")
        if self.top_k < 0:
            raise ValueError(f"`top_k` must be >= 0 (0: off), got {self.top_k}.")


def make_generate_parser():
    from trl import TrlParser

    return TrlParser((GenerateArguments,), prog="nca-trl generate")


#: what `nca-trl generate --help` shows first, and the fields it needs when no recipe gives them
USAGE = "--model_name_or_path M --dataset_name PROMPTS --output OUT.jsonl [--field value ...]"
#: its settings that name a path, and what each names (`nca_trl.runtime.paths.KINDS`): checked before anything is
#: imported, written or loaded (`check_argv`), and again when the run starts (arguments built in Python)
PATH_SETTINGS = {"model_name_or_path": "model", "dataset_name": "dataset"}
REQUIRED = ("model_name_or_path", "dataset_name", "output")


def print_help(argv: list[str] | None = None) -> None:
    """`nca-trl generate --help`: every field (imports nothing heavy)."""
    print(command_help("generate", USAGE, GenerateArguments), end="")


def check_argv(argv: list[str]) -> None:
    """What `nca-trl generate` checks before importing anything heavy: something to run, known flags, and every path
    setting (`PATH_SETTINGS`: a missing local path, or a Hub id offline and not cached)."""
    check_command_argv(argv, GenerateArguments, "generate", required=REQUIRED)
    check_path_settings(argv, PATH_SETTINGS)


@settings_errors
def parse_generate_args(argv: list[str] | None = None) -> GenerateArguments:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_command(make_generate_parser(), argv, "generate",
                         required=REQUIRED)
    return args
