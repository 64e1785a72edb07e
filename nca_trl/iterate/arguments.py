"""Arguments of `nca-trl iterate`: one dataclass parsed with `trl.TrlParser` (a recipe `--config X.yaml`, any field
overridden on the command line, e.g. `--rounds 5`).

The trainer's own settings (learning rate, beta, epochs, batch size, max_length, ...) go under `training:`, a mapping of
the fields `nca-trl train` takes (`NCAConfig` / `InfoNCAConfig` and `trl.ModelConfig`), or of `trl.DPOConfig` for
`loss: dpo`.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from ..runtime.errors import settings_errors
from ..runtime.paths import check_path, check_path_settings
from ..runtime.help import check_command_argv, command_help
from ..runtime.models import remote_code_problem
from ..runtime.recipes import DTYPES, merge_repeated, parse_command

__all__ = ["LOSSES", "PATH_SETTINGS", "REFERENCES", "IterateArguments", "StageArguments", "build_stage_arguments",
           "check_argv", "dpo_fields", "make_iterate_parser", "parse_iterate_args", "print_help"]

LOSSES = ("nca", "infonca", "dpo")
REFERENCES = ("initial", "previous")
# Set by `iterate` itself for every round: a `training:` mapping that sets them is refused
_OWNED_TRAINING_KEYS = ("model_name_or_path", "ref_model_name_or_path", "dataset_name", "output_dir", "loss",
                        "resume_from_checkpoint", "dataset_format", "dataset_train_split", "datasets")


@dataclass
class IterateArguments:
    """`nca-trl iterate`: R rounds of generate -> score -> train, each round sampling from the previous round's policy.

    Round r (1..R) samples `num_completions` completions for each prompt of its own slice of the prompts
    (`prompts_per_round` prompts, in order) from the policy of round r-1 (round 0: `model_name_or_path`), scores them,
    and trains that policy on them with `loss`. After each round (and before the first) the policy is evaluated on
    `heldout_prompts` prompts that no round trains on: mean and best-of-K reward of its samples, KL proxy to the
    initial model, completion length.
    """

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "The initial policy (round 0): a local folder or a Hub model id."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "The prompts: a Hub dataset id, a data file or a folder, with a `prompt` column (string or "
                  "chat messages); other columns are carried to the reward functions."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    dataset_split: str = field(default="train", metadata={"help": "Split to read the prompts from."})
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Everything of the run: `round-0/eval/`, `round-r/{prompts,samples,rated}.jsonl`, "
                  "`round-r/model/`, `round-r/eval/`, `iterate.json` (settings), `iterate_results.json` and "
                  "`iterate_curves.png`. Rerunning the same command resumes where a stopped run stopped."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace a run of other settings in `output_dir` (its `iterate.json` says what it was): its "
                  "rounds, results and settings are removed first. Without it such a run is refused, naming the "
                  "changed settings, before any model loads; a rerun with the same settings continues the run."},
    )
    rounds: int = field(default=3, metadata={"help": "R, the number of rounds. A finished run rerun with a larger "
                                                      "`--rounds` continues with the next round."})
    prompts_per_round: int | None = field(
        default=None,
        metadata={"help": "Prompts sampled and trained on per round (round r takes the r-th slice, in order). Default: "
                  "the prompts left after the held-out ones, divided evenly among the rounds."},
    )
    heldout_prompts: int = field(
        default=64, metadata={"help": "The last N prompts of the split: never trained on, used for the evaluation."}
    )
    loss: str = field(
        default="nca",
        metadata={"help": "`nca` or `infonca` (all K rated completions, `nca-trl train`), or `dpo`: `trl.DPOTrainer` on "
                  "the best-vs-worst pair of each prompt (prompts whose completions all have the same reward have no "
                  "pair and are dropped, counted), the usual iterative-DPO baseline.", "choices": LOSSES},
    )
    reference: str = field(
        default="previous",
        metadata={"help": "The reference model of round r's loss: `previous` (round r-1's policy, the model the round "
                  "starts from; default, chosen by the pre-registered ablation in results/ablation/: +0.011 [+0.001, "
                  "+0.021] held-out reward over `initial` for NCA) or `initial` (the round-0 model every round).",
                  "choices": REFERENCES},
    )
    # Generation (`nca-trl generate`)
    num_completions: int = field(default=4, metadata={"help": "K completions sampled per prompt (training and eval)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest completion, in tokens."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1.0: off)."})
    top_k: int = field(default=0, metadata={"help": "Top-k sampling (0: off)."})
    generation_batch_size: int = field(default=8, metadata={"help": "Prompts per generation batch."})
    generation_dtype: str = field(default="auto", metadata={"help": "dtype of the sampling model (`auto`, "
                                                                     "`bfloat16`, `float16`, `float32`).",
                                                             "choices": DTYPES})
    seed: int = field(
        default=0,
        metadata={"help": "Round r samples its training prompts with seed `seed + r`; every evaluation samples the "
                  "held-out prompts with the same seed `seed` (common random numbers: rounds differ by the policy "
                  "only). Also the training seed unless `training:` sets `seed`."},
    )
    # Scoring (`nca-trl score`)
    reward_model: str | None = field(
        default=None, metadata={"help": "A reward model (`AutoModelForSequenceClassification`, num_labels=1)."}
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={"help": "Reward functions `module:function` (or `path/file.py:function`), TRL's GRPO convention "
                  "`f(prompts, completions, **columns) -> list[float | None]`."},
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per source (reward model first, then reward_funcs); default 1."}
    )
    scoring_batch_size: int = field(default=8, metadata={"help": "Reward-model forward batch."})
    # Training
    training: dict | str | None = field(
        default=None,
        metadata={"help": "The trainer's settings, a mapping (a JSON object on the command line): any field of "
                  "`nca-trl train` (NCAConfig / InfoNCAConfig, trl.ModelConfig), or of trl.DPOConfig for `loss: "
                  "dpo`. `iterate` sets the model, reference, data and output_dir of each round itself. Its "
                  "`trust_remote_code` lets generation and the evaluation run the model's own code too."},
    )
    eval_batch_size: int = field(default=8, metadata={"help": "Sequences per forward pass of the KL-proxy evaluation."})

    def __post_init__(self):
        from ..train.arguments import make_parser, read_booleans

        check_path(self.model_name_or_path, "model_name_or_path", "model", hub=False)
        check_path(self.dataset_name, "dataset_name", "dataset", hub=False)
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}, got {self.loss!r}.")
        if self.reference not in REFERENCES:
            raise ValueError(f"`reference` must be one of {REFERENCES}, got {self.reference!r}.")
        for name in ("rounds", "num_completions", "max_new_tokens", "generation_batch_size", "scoring_batch_size",
                     "heldout_prompts", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        if self.num_completions < 2:
            raise ValueError(f"`num_completions` must be at least 2 (a ranking needs two), got {self.num_completions}.")
        if self.prompts_per_round is not None and self.prompts_per_round < 1:
            raise ValueError(f"`prompts_per_round` must be at least 1, got {self.prompts_per_round}.")
        if not self.reward_model and not self.reward_funcs:
            raise ValueError("Give a reward: `reward_model` and/or `reward_funcs` (module:function).")
        if isinstance(self.training, str):
            try:
                self.training = json.loads(self.training)
            except ValueError as e:
                raise ValueError(f"`training` must be a mapping (a JSON object on the command line): {e}") from e
        self.training = dict(self.training or {})
        # Booleans given as strings read as `nca-trl train` reads them, for the DPOConfig of `loss: dpo` too
        self.training = read_booleans(self.training, make_parser(LOSSES[0]).dataclass_types,
                                      "the `training:` mapping of the iterate run")
        owned = [key for key in self.training if key in _OWNED_TRAINING_KEYS]
        if owned:
            raise ValueError(f"`training` sets {owned}: `nca-trl iterate` sets them for each round (use the top-level "
                             "`model_name_or_path`, `dataset_name`, `output_dir`, `loss` and `reference`).")
        adapters = [key for key in ("use_peft", "load_in_4bit", "load_in_8bit") if self.training.get(key)]
        if adapters and self.loss == "dpo":
            raise ValueError(f"`training.{adapters[0]}` with `loss: dpo` is not supported: the DPO baseline of "
                             "`nca-trl iterate` trains full weights (trl.DPOTrainer on a DPOConfig). Use `loss: nca` "
                             f"or `infonca` for LoRA / QLoRA rounds, or set `{adapters[0]}: false`.")


def dpo_fields(training: dict) -> tuple[dict, list[str]]:
    """The `training:` mapping of an NCA recipe as `trl.DPOConfig` fields, so that `--loss dpo` runs the same recipe:
    model loading fields (dtype, attention, revision) go to `model_init_kwargs`; the NCA-only fields (alpha, ...), the
    LoRA settings of `trl.ModelConfig` (`use_peft` itself is false here: `IterateArguments` refuses it) and the launch
    metadata of `nca-trl train` are left out and returned (`(fields, left out)`), for the log."""
    from dataclasses import fields

    from trl import DPOConfig, ModelConfig

    from ..config import NCAConfig

    dpo = {f.name for f in fields(DPOConfig)}
    model_keys = {"dtype": "dtype", "attn_implementation": "attn_implementation", "model_revision": "revision"}
    out, init, ignored = {}, {}, []
    for key, value in training.items():
        if key in dpo:
            out[key] = value
        elif key in model_keys:
            init[model_keys[key]] = value
        else:
            ignored.append(key)
    if init:
        out["model_init_kwargs"] = {**init, **(out.get("model_init_kwargs") or {})}
    known = {f.name for f in fields(NCAConfig)} | {f.name for f in fields(ModelConfig)} | set(_TRAIN_SCRIPT_KEYS)
    unknown = [k for k in ignored if k not in known]
    if unknown:
        raise ValueError(f"`training` has {unknown}: not fields of trl.DPOConfig nor of `nca-trl train`.")
    return out, ignored


_TRAIN_SCRIPT_KEYS = ("accelerate_config", "hardware", "model_config_file", "report_train_prompts", "eval_fraction",
                      "max_train_samples", "max_eval_samples", "dataset_test_split", "dataset_format_kwargs")


@dataclass
class StageArguments:
    """The arguments of every round's stages, built once per run from `IterateArguments` (by `parse_iterate_args`):
    a round replaces only its own fields (the model sampled from or trained, the prompts and files, the seed), so a
    bad setting of any stage fails before the run writes or loads anything.

    Args:
        generate (`GenerateArguments`): `nca-trl generate` of each round's prompts and of the held-out prompts.
        score (`ScoreArguments`): `nca-trl score` of each round's samples.
        train (`TrainArgs` or `trl.DPOConfig`): `nca-trl train` of each round (`TrainArgs` of the `training:` mapping),
            or the `trl.DPOConfig` of `loss: dpo`.
        ignored_training_fields (`list[str]`): `training:` fields that `loss: dpo` leaves out (NCA-only,
            LoRA settings, launch metadata).
    """

    generate: "GenerateArguments"
    score: "ScoreArguments"
    train: object
    ignored_training_fields: list[str] = field(default_factory=list)


def build_stage_arguments(args: IterateArguments) -> StageArguments:
    """`StageArguments` of the run, with round 1's paths under `output_dir` (the rounds replace them)."""
    from ..generation.arguments import GenerateArguments
    from ..scoring.arguments import ScoreArguments

    first = Path(args.output_dir) / "round-1"
    training = {"seed": args.seed, **args.training}
    ignored: list[str] = []
    if args.loss == "dpo":
        from trl import DPOConfig

        from types import SimpleNamespace

        from ..config import auto_bf16

        fields_, ignored = dpo_fields(training)
        if fields_.get("bf16") is None:  # automatic, as in our configs (DPOConfig's own default is on everywhere)
            fields_["bf16"] = auto_bf16(SimpleNamespace(use_cpu=fields_.get("use_cpu", False),
                                                        fp16=fields_.get("fp16", False)))
        train = DPOConfig(output_dir=str(first / "model"), **fields_)
        trust_remote_code = train.trust_remote_code
        problem = remote_code_problem(args.model_name_or_path, trust_remote_code,
                                      "`trust_remote_code: true` in the `training:` mapping of the iterate run")
        if problem:  # as `nca-trl train` refuses it for the other losses (generation's message names its own flag)
            raise ValueError(problem)
    else:
        from ..train.arguments import train_args_from_recipe

        recipe = {"loss": args.loss, "model_name_or_path": args.model_name_or_path,
                  "dataset_name": str(first / "rated.jsonl"), "dataset_format": "rated",
                  "output_dir": str(first / "model"), **training}
        train = train_args_from_recipe(recipe, "the `training:` mapping of the iterate run")
        trust_remote_code = train.training.trust_remote_code  # parsed: "false" is False
    generate = GenerateArguments(
        model_name_or_path=args.model_name_or_path, dataset_name=str(first / "prompts.jsonl"),
        output=str(first / "samples.jsonl"), num_completions=args.num_completions,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, batch_size=args.generation_batch_size, dtype=args.generation_dtype,
        trust_remote_code=bool(trust_remote_code),  # the same model's code as training runs
    )
    score = ScoreArguments(
        dataset_name=str(first / "samples.jsonl"), output=str(first / "rated.jsonl"),
        batch_size=args.scoring_batch_size, reward_model=args.reward_model, reward_funcs=list(args.reward_funcs or []),
        reward_weights=args.reward_weights,
    )
    return StageArguments(generate, score, train, ignored)


def make_iterate_parser():
    from trl import TrlParser

    return TrlParser((IterateArguments,), prog="nca-trl iterate")


#: what `nca-trl iterate --help` shows first, and the fields it needs when no recipe gives them
USAGE = "--config RECIPE.yaml [--rounds N] [--field value ...]"
#: its settings that name a path, and what each names (`nca_trl.runtime.paths.KINDS`): checked before anything is
#: imported, written or loaded (`check_argv`), and again when the run starts (arguments built in Python)
PATH_SETTINGS = {"model_name_or_path": "model", "dataset_name": "dataset", "reward_model": "model",
                 "reward_funcs": "file"}
REQUIRED = ("model_name_or_path", "dataset_name", "output_dir")


def print_help(argv: list[str] | None = None) -> None:
    """`nca-trl iterate --help`: every field (imports nothing heavy)."""
    print(command_help("iterate", USAGE, IterateArguments), end="")


def check_argv(argv: list[str]) -> None:
    """What `nca-trl iterate` checks before importing anything heavy: something to run, known flags, and every path
    setting (`PATH_SETTINGS`: a missing local path, or a Hub id offline and not cached)."""
    check_command_argv(argv, IterateArguments, "iterate", required=REQUIRED)
    check_path_settings(argv, PATH_SETTINGS)


@settings_errors
def parse_iterate_args(argv: list[str] | None = None, dry_run: bool = False) -> IterateArguments:
    """Parse `nca-trl iterate` (a recipe `--config X.yaml` and overrides) and build the arguments of every stage
    (`args.stages`), so that any bad setting fails here. `dry_run=True` skips the checks of what this machine can run
    (bf16 without a bf16 GPU), to validate a GPU recipe anywhere."""

    # `--reward_funcs a --reward_funcs b` is both, as in `nca-trl score` (argparse kept the last flag's alone)
    argv = merge_repeated(list(sys.argv[1:] if argv is None else argv), ("reward_funcs", "reward_weights"))
    args = parse_command(make_iterate_parser(), argv, "iterate",
                         required=REQUIRED)
    from ..config import relaxed_hardware_checks

    with relaxed_hardware_checks() if dry_run else contextlib.nullcontext():
        args.stages = build_stage_arguments(args)
    return args
