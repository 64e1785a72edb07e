"""Arguments of `nca-trl train`: the recipe YAML and the command line, parsed with `trl.TrlParser`.

Four dataclasses: `ScriptArguments` (below: which loss, which data), `NCAConfig` or `InfoNCAConfig` (every
`trl.DPOConfig` / `TrainingArguments` field, picked by the `loss` key), `trl.ModelConfig` (model path, dtype, attention
implementation, LoRA / QLoRA flags) and `trl.DatasetMixtureConfig` (several datasets mixed with fractions). A key that
belongs to none of them is an error that names it.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import dataclass, field

from ..config import (
    command_line_spelling,
    config_for_loss,
    hardware_checks_relaxed,
    relaxed_hardware_checks,
    reward_temperature,
)
from ..data.formats import DATASET_FORMATS
from ..runtime.errors import settings_errors
from ..runtime.models import remote_code_problem
from ..runtime.paths import check_path_settings
from ..runtime.recipes import check_recipe_keys, load_recipe, peek
from .options import LOSSES, PATH_SETTINGS, truthy

__all__ = ["ScriptArguments", "TrainArgs", "check_paths", "make_parser", "parse_train_args", "print_dry_run",
           "run_settings", "train_args_from_recipe"]



@dataclass
class ScriptArguments:
    """Arguments of `nca-trl train` that are not training hyperparameters: the loss and the data.

    Keys of the recipe YAML like every other field; on the command line `--loss infonca`, `--dataset_name path`, ...
    """

    loss: str = field(
        default=LOSSES[0],
        metadata={"help": f"Which loss to train, one of {LOSSES}: picks the config class whose `loss` it is, and its "
                  "trainer.", "choices": LOSSES},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face Hub dataset id, a local data file (.json, .jsonl, .parquet, .csv), a folder of data "
            "files, or a folder written by `datasets.save_to_disk`. Ignored when `datasets` (a mixture) is given."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Dataset configuration name (`name` of `datasets.load_dataset`)."}
    )
    dataset_format: str = field(
        default="auto",
        metadata={
            "help": "Layout of the raw data, converted with `nca_trl.data.convert_dataset`: `rated` "
            "({prompt, completions, rewards}), `preference` (TRL chosen/rejected, K=2), `ultrafeedback` (raw "
            "openbmb/UltraFeedback), `columns` (A0..A{K-1} + A0_score..), or `auto` (detected from the first row).",
            "choices": DATASET_FORMATS,
        },
    )
    dataset_format_kwargs: dict | str | None = field(
        default=None,
        metadata={
            "help": "Keyword arguments of the converter, a mapping in YAML or a JSON string on the command line, e.g. "
            '`{"score_field": "overall_score"}` for `ultrafeedback`.'
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on (must exist). Leave unset to use `eval_fraction`."}
    )
    eval_fraction: float | None = field(
        default=None,
        metadata={
            "help": "Hold out this fraction of the training split (after conversion, seeded by `seed`) as the "
            "evaluation set. Exclusive with `dataset_test_split`."
        },
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Keep only the first N training prompts (after conversion and hold-out)."}
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only the first N evaluation prompts."})
    # Launch metadata: read by humans and by scripts/plan_memory.py, not by training
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "The accelerate config this recipe is meant to be launched with (documentation and "
            "scripts/plan_memory.py of a clone; what counts at run time is `accelerate launch --config_file`)."
        },
    )
    hardware: str | None = field(
        default=None,
        metadata={
            "help": "The hardware this recipe is sized for, e.g. `2 nodes x 8 GPUs x 80 GB` or "
            "`1 node x 8 GPUs x 80 GB, 2048 GB CPU`. Training ignores it; scripts/plan_memory.py (in a clone) parses "
            "it and checks that the recipe fits."
        },
    )
    model_config_file: str | None = field(
        default=None,
        metadata={
            "help": "A config.json of the model architecture (recipes/model_configs/), so that scripts/plan_memory.py "
            "(in a clone) can size a Hub model without downloading anything. Training ignores it."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The reference model, a local folder or Hub id loaded like the policy (`model_init_kwargs`: "
            "dtype, attention implementation, revision). Default: none, the reference is the initial policy "
            "(`model_name_or_path`, or the policy with its adapter disabled under PEFT). `nca-trl iterate` sets it to "
            "the initial model when later rounds start from a trained policy."
        },
    )
    report_train_prompts: int = field(
        default=0,
        metadata={
            "help": "Evaluate this many training prompts (and the held-out prompts, if any) at the start and at the "
            "end of training, and print a table of what changed (loss, reward margin, ranking accuracy, log-probs). "
            "0 (default) turns it off. Sets `eval_on_start`; metrics are then logged per set (`eval_train_prompts_*`, "
            "`eval_heldout_*`)."
        },
    )
    # Run control
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace a run of other settings in `output_dir` (a finished run's `run_info.json`, or an "
            "unfinished run's checkpoints, says what it was): its checkpoints and `run_info.json` are removed before "
            "training, and the new model is saved over it. "
            "Without it such a run is refused before anything is loaded. Resuming (`resume_from_checkpoint`) and "
            "rerunning the same settings need no flag."
        },
    )
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Parse the recipe and the command line, print the resolved arguments and exit: nothing is "
            "loaded, and the checks of what this machine can run (bf16 without a bf16 GPU, fp16 on the CPU) are "
            "skipped so a GPU recipe can be checked on a laptop."
        },
    )

    def __post_init__(self):
        config_for_loss(self.loss)  # raises on an unknown loss, naming the choices
        if self.dataset_format not in DATASET_FORMATS:
            raise ValueError(f"`dataset_format` must be one of {DATASET_FORMATS}, got {self.dataset_format!r}.")
        if isinstance(self.dataset_format_kwargs, str):
            try:
                self.dataset_format_kwargs = json.loads(self.dataset_format_kwargs)
            except ValueError as e:
                raise ValueError(
                    f"`dataset_format_kwargs` must be a JSON object, got {self.dataset_format_kwargs!r}: {e}"
                ) from e
        if self.dataset_format_kwargs is not None and not isinstance(self.dataset_format_kwargs, dict):
            raise ValueError(f"`dataset_format_kwargs` must be a mapping, got {self.dataset_format_kwargs!r}.")
        if self.eval_fraction is not None and not 0 < self.eval_fraction < 1:
            raise ValueError(f"`eval_fraction` must be in (0, 1), got {self.eval_fraction!r}: for no evaluation "
                             "set, leave it unset (`eval_fraction: null`, or `--eval_fraction null`).")
        if self.eval_fraction is not None and self.dataset_test_split is not None:
            raise ValueError("Set either `dataset_test_split` or `eval_fraction`, not both.")
        if self.report_train_prompts < 0:
            raise ValueError(f"`report_train_prompts` must be >= 0, got {self.report_train_prompts!r}.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value!r}.")


@dataclass
class TrainArgs:
    script: ScriptArguments
    training: "NCAConfig | InfoNCAConfig"
    model: "ModelConfig"
    mixture: "DatasetMixtureConfig"
    recipe: dict


# ---------------------------------------------------------------------------------------------------------- parsing
def make_parser(loss: str = LOSSES[0]):
    """The `trl.TrlParser` of `nca-trl train` for `loss` (`nca` or `infonca`)."""
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    return TrlParser((ScriptArguments, config_for_loss(loss), ModelConfig, DatasetMixtureConfig), prog="nca-trl train")


_RECIPE_FIELDS = ("ScriptArguments (nca-trl), NCAConfig/InfoNCAConfig (trl.DPOConfig, transformers.TrainingArguments), "
                  "trl.ModelConfig or trl.DatasetMixtureConfig")

# Accept `bf16=True` without a bf16 GPU and `fp16=True` on the CPU (for `--dry_run` of a GPU recipe on any machine)
_relaxed_hardware_checks = relaxed_hardware_checks


@settings_errors
def parse_train_args(argv: list[str] | None = None, dry_run: bool | None = None) -> TrainArgs:
    """Parse `nca-trl train` arguments (`--config RECIPE.yaml` and `--field value` overrides).

    `dry_run=True` (or `--dry_run` / `dry_run: true` in the recipe) skips the hardware checks (bf16 without a bf16
    GPU, fp16 on the CPU), so a GPU recipe can be validated anywhere.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe, path = load_recipe(argv)
    loss = peek(argv, "loss") or recipe.get("loss", ScriptArguments.loss)
    config_for_loss(loss)  # raises on an unknown loss, naming the choices
    if dry_run is None:
        dry_run = truthy(peek(argv, "dry_run") or recipe.get("dry_run", False))
    parser = make_parser(loss)
    if path is not None:
        check_recipe_keys(recipe, path, parser, "train", fields=_RECIPE_FIELDS)
    with _relaxed_hardware_checks() if dry_run else contextlib.nullcontext(), command_line_spelling():
        script_args, training_args, model_args, mixture = parser.parse_args_and_config(
            argv, fail_with_unknown_args=True)
    args = _checked(script_args, training_args, model_args, mixture, recipe, dry_run)
    check_paths(args, hub=False)  # the Hub (offline?) when the run starts: `train`
    return args


@settings_errors
def train_args_from_recipe(recipe: dict, where: str = "the recipe") -> TrainArgs:
    """`TrainArgs` from a recipe mapping (what `--config RECIPE.yaml` holds), with the checks of `parse_train_args`:
    for a caller that builds the recipe itself (`nca-trl iterate`, once per run). `where` names it in errors."""
    loss = recipe.get("loss", ScriptArguments.loss)
    config_for_loss(loss)
    parser = make_parser(loss)
    check_recipe_keys(recipe, where, parser, "train", fields=_RECIPE_FIELDS)
    recipe = read_booleans(recipe, parser.dataclass_types, where)
    dry_run = truthy(recipe.get("dry_run", False))
    with _relaxed_hardware_checks() if dry_run else contextlib.nullcontext(), command_line_spelling():
        script_args, training_args, model_args, mixture = parser.parse_dict(recipe)
    args = _checked(script_args, training_args, model_args, mixture, dict(recipe), dry_run, where)
    check_paths(args, skip=("dataset_name",), hub=False)  # the caller's data is written later (a round's rated rows)
    return args


def read_booleans(recipe: dict, dataclass_types, where: str) -> dict:
    """`recipe` with the string values of the boolean fields of `dataclass_types` read as `--config` and the command
    line read them ("false", "no", "0": False), for a mapping given to `parse_dict` or to a dataclass, which take values
    as they are (the string "false" would be true). A junk value of a boolean field is refused naming it; a field that
    also takes strings (`include_num_input_tokens_seen: str | bool`) keeps the strings that are not booleans."""
    import types
    import typing

    from transformers.hf_argparser import string_to_bool

    kinds = {}  # field name -> whether it takes strings too
    for dataclass_type in dataclass_types:
        for name, hint in typing.get_type_hints(dataclass_type).items():
            union = isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union
            options = set(typing.get_args(hint)) if union else {hint}
            if bool in options:
                kinds[name] = str in options
    out = dict(recipe)
    for key, value in recipe.items():
        if key in kinds and isinstance(value, str):
            try:
                out[key] = string_to_bool(value)
            except Exception:
                if not kinds[key]:
                    raise ValueError(f"`{key}` in {where} is a boolean: true or false, got {value!r}.") from None
    return out


def check_paths(args: TrainArgs, skip: tuple[str, ...] = (), hub: bool = True) -> None:
    """Every path setting of the parsed arguments (`options.PATH_SETTINGS`) but `skip`, through
    `nca_trl.runtime.paths`, before anything is written or loaded: a missing local path, and with `hub` a Hub id
    offline and not cached. Not in a dry run: it checks a recipe meant for another machine and loads nothing."""
    if args.script.dry_run:
        return
    groups = (args.script, args.model, args.mixture, args.training)
    values = {name: next((getattr(g, name) for g in groups if hasattr(g, name)), None) for name in PATH_SETTINGS
              if name not in skip}
    check_path_settings([], {k: v for k, v in PATH_SETTINGS.items() if k not in skip}, values, hub=hub)


def _checked(script_args, training_args, model_args, mixture, recipe: dict, dry_run: bool,
             where: str | None = None) -> TrainArgs:
    """The checks of every `TrainArgs`; `where` names the mapping the settings came from, where it is not the recipe or
    command line of `nca-trl train` (`nca-trl iterate`'s `training:`)."""
    script_args.dry_run = script_args.dry_run or dry_run
    if mixture.streaming:
        raise ValueError("`streaming: true` is not supported by `nca-trl train`: the data is converted and validated.")
    if model_args.model_name_or_path is None:
        raise ValueError("`model_name_or_path` is required (a local folder or a Hub model id).")
    if not mixture.datasets and not script_args.dataset_name:
        raise ValueError("Give the data: `dataset_name` (Hub id, file or folder) or `datasets` (a mixture).")
    held_out = (script_args.dataset_test_split is not None or script_args.eval_fraction is not None
                or bool(mixture.datasets and mixture.test_split_size))
    if not held_out and training_args.eval_strategy != "no":
        raise ValueError(
            f"`eval_strategy: {training_args.eval_strategy.value}` needs evaluation data: set `dataset_test_split` or "
            "`eval_fraction`, or `eval_strategy: no`."
        )
    if training_args.sync_ref_model and model_args.use_peft:  # trl.DPOTrainer raised it once everything had loaded
        raise ValueError("`sync_ref_model: true` with `use_peft: true`: with an adapter the reference is the base "
                         "model (the adapter disabled), and there is no separate reference to sync (trl.DPOTrainer "
                         "refuses it too). Set `sync_ref_model: false`, or train without `use_peft`.")
    if not dry_run and not hardware_checks_relaxed():  # a dry run checks a recipe meant for another machine
        _check_packages(model_args, where)
    switch = "`trust_remote_code: true` " + (f"in {where}" if where else "(`--trust_remote_code true`)")
    for path in (model_args.model_name_or_path, script_args.ref_model_name_or_path):
        problem = remote_code_problem(path, training_args.trust_remote_code, switch)
        if problem:
            raise ValueError(problem)
    _set_model_init_kwargs(training_args, model_args)
    training_args.resume_from_checkpoint = resume_setting(training_args.resume_from_checkpoint)
    return TrainArgs(script_args, training_args, model_args, mixture, recipe)


# Settings that need a package `pip install nca-trl` does not bring: setting -> (module, what to install)
_PACKAGES = {
    "use_peft": ("peft", "pip install \"nca-trl[peft]\""),
    "load_in_4bit": ("bitsandbytes", "pip install bitsandbytes (4-bit QLoRA trains on a CUDA GPU)"),
    "load_in_8bit": ("bitsandbytes", "pip install bitsandbytes (8-bit loading trains on a CUDA GPU)"),
}


def _check_packages(model_args, where: str | None = None) -> None:
    """A setting whose package is not installed fails here, before anything is written or loaded (TRL would raise
    once the data is loaded and tokenized, and `nca-trl iterate` after a round's generation and scoring)."""
    import importlib.util

    at, there = (f" in {where}", " there") if where else ("", "")
    for name, (module, fix) in _PACKAGES.items():
        if getattr(model_args, name, False) and importlib.util.find_spec(module) is None:
            raise ValueError(f"`{name}: true`{at} needs the `{module}` package, which is not installed: {fix}, or "
                             f"set `{name}: false`{there}.")


# Fields that say where and how a run is written or watched, not what it trains: a change of them is the same run
_NOT_SETTINGS = ("output_dir", "logging_dir", "resume_from_checkpoint", "run_name", "report_to", "overwrite_output_dir",
                 "dry_run", "hub_token", "disable_tqdm", "dataloader_num_workers", "logging_steps", "save_steps",
                 "save_total_limit", "accelerate_config", "hardware", "model_config_file")


def run_settings(args: TrainArgs) -> dict:
    """What a run trains, as recorded in `run_info.json` (`settings`) and compared by a later run into the same
    `output_dir`: the loss, the data, the model and every training field, less where the run is written and how it is
    watched (`output_dir`, logging, reporting). A copy: nothing the run changes later in place (TRL sets
    `gradient_checkpointing_kwargs["use_reentrant"]` for LoRA under ZeRO-3) reaches it; and the same on every process
    (a quantized model's `device_map` is each process's own device, recorded as `local_process_index`)."""
    import copy
    from dataclasses import asdict

    fields = {"loss": args.script.loss}
    for group in (asdict(args.script), asdict(args.model), asdict(args.mixture), args.training.to_dict()):
        fields.update({k: copy.deepcopy(v) for k, v in group.items() if k not in _NOT_SETTINGS})
    init = fields.get("model_init_kwargs")
    if isinstance(init, dict) and init.get("device_map") == {"": args.training.local_process_index}:
        init["device_map"] = {"": "local_process_index"}  # what `_set_model_init_kwargs` sets for 4/8-bit loading
    return fields


def _set_model_init_kwargs(training_args, model_args) -> None:
    """Model loading arguments from `ModelConfig` (dtype, attention implementation, revision) into
    `model_init_kwargs`, which the trainer uses for the policy and the implicit reference model; explicit
    `model_init_kwargs` of the recipe win."""
    kwargs = {
        "revision": model_args.model_revision,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if model_args.load_in_4bit or model_args.load_in_8bit:
        # bitsandbytes places the quantized weights at load time: one whole model per process
        kwargs["device_map"] = {"": training_args.local_process_index}
    kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = kwargs


def resume_setting(value) -> str | None:
    """`resume_from_checkpoint` as a recipe or the command line spells it: None for no resume (`false`, `none`,
    `null`, any case), "true" for the last complete checkpoint (`true`, `last`, `latest`), otherwise a path."""
    if value is None or value is False or str(value).strip().lower() in ("", "false", "none", "null"):
        return None
    return "true" if value is True or str(value).strip().lower() in ("true", "last", "latest") else str(value)


def print_dry_run(args: TrainArgs) -> None:
    from dataclasses import asdict

    t = args.training
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    print(f"[nca-trl dry run] loss={args.script.loss} trainer config={type(t).__name__}")
    print("  script:", json.dumps(asdict(args.script), default=str))
    print("  model :", json.dumps(asdict(args.model), default=str))
    if args.mixture.datasets:
        print("  mixture:", json.dumps(asdict(args.mixture), default=str))
    print(
        f"  training: beta={t.beta} alpha={reward_temperature(t)}{'' if t.alpha is not None else ' (default)'} lr={t.learning_rate} scheduler={getattr(t.lr_scheduler_type, 'value', t.lr_scheduler_type)} "
        f"warmup_steps={t.warmup_steps} epochs={t.num_train_epochs} "
        f"max_steps={t.max_steps} max_length={t.max_length} bf16={t.bf16}"
        f"{' (automatic on this machine)' if getattr(t, 'bf16_is_automatic', False) else ''} "
        f"activation_checkpointing={t.activation_checkpointing} model_init_kwargs={t.model_init_kwargs}"
    )
    print("  batch :", f"{per_step} prompts per process per optimizer step (scripts/plan_memory.py of a clone: global "
          "batch, memory)")
    print(f"  output: {t.output_dir}")
