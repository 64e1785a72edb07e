"""The `nca-trl` command line.

```bash
nca-trl make-tiny-model outputs/tiny-mistral                 # tiny random Mistral + the real Mistral tokenizer
nca-trl train --config recipes/tiny/nca.yaml                 # one process (CPU or one GPU)
nca-trl train --config recipes/tiny/nca.yaml --max_steps 5   # any field can be overridden on the command line
accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero3.yaml \
    scripts/train.py --config recipes/mistral-7b/nca_ultrafeedback.yaml   # 8 GPUs, ZeRO-3
nca-trl train --config recipes/mistral-7b/nca_ultrafeedback.yaml --dry_run   # parse and print, load nothing
```

`train` parses, with `trl.TrlParser`, a YAML recipe and the command line into four dataclasses: `ScriptArguments`
(below: which loss, which data), `NCAConfig` or `InfoNCAConfig` (every `trl.DPOConfig` / `TrainingArguments` field,
picked by the `loss` key), `trl.ModelConfig` (model path, dtype, attention implementation, LoRA / QLoRA flags) and
`trl.DatasetMixtureConfig` (several datasets mixed with fractions). A key that belongs to none of them is an error
that names it.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["ScriptArguments", "main", "train_main", "make_parser", "parse_train_args", "parse_hardware", "TrainArgs"]

LOSSES = ("nca", "infonca")
DATASET_FORMATS = ("auto", "rated", "preference", "ultrafeedback", "columns")
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
_HARDWARE_RE = re.compile(
    r"^\s*(\d+)\s*nodes?\s*x\s*(\d+)\s*GPUs?\s*x\s*(\d+(?:\.\d+)?)\s*GB(?:\s*,\s*(\d+(?:\.\d+)?)\s*GB\s*CPU)?\s*$",
    re.IGNORECASE,
)


@dataclass
class ScriptArguments:
    """Arguments of `nca-trl train` that are not training hyperparameters: the loss and the data.

    Keys of the recipe YAML like every other field; on the command line `--loss infonca`, `--dataset_name path`, ...
    """

    loss: str = field(
        default="nca",
        metadata={"help": "Which loss to train: `nca` (NCAConfig / NCATrainer) or `infonca` (InfoNCA).", "choices": LOSSES},
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
    zero3_leaf_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Module class names to mark as DeepSpeed ZeRO-3 leaf modules (policy and reference). Default: "
            "every sparse Mixture-of-Experts block of the model (e.g. MixtralSparseMoeBlock), see nca_trl.distributed."
        },
    )
    # Launch metadata: read by humans and by scripts/plan_memory.py, not by training
    accelerate_config: str | None = field(
        default=None,
        metadata={
            "help": "The accelerate config this recipe is meant to be launched with (documentation and "
            "scripts/plan_memory.py; what counts at run time is `accelerate launch --config_file`)."
        },
    )
    hardware: str | None = field(
        default=None,
        metadata={
            "help": "The hardware this recipe is sized for, e.g. `2 nodes x 8 GPUs x 80 GB` or "
            "`1 node x 8 GPUs x 80 GB, 2048 GB CPU` (scripts/plan_memory.py checks that it fits)."
        },
    )
    model_config_file: str | None = field(
        default=None,
        metadata={
            "help": "A config.json of the model architecture (recipes/model_configs/), so that scripts/plan_memory.py "
            "can size a Hub model without downloading anything. Training ignores it."
        },
    )
    # Run control
    dry_run: bool = field(
        default=False,
        metadata={
            "help": "Parse the recipe and the command line, print the resolved arguments and exit: nothing is "
            "loaded, and the bf16-needs-a-GPU check is skipped so a GPU recipe can be checked on a laptop."
        },
    )
    record_param_checksums: bool = field(
        default=False,
        metadata={
            "help": "Write the sum and sum of squares of every final parameter, gathered across ZeRO-3 shards, into "
            "run_info.json (to check a saved checkpoint against the in-memory weights). Small models only."
        },
    )

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"`loss` must be one of {LOSSES}, got {self.loss!r}.")
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
            raise ValueError(f"`eval_fraction` must be in (0, 1), got {self.eval_fraction!r}.")
        if self.eval_fraction is not None and self.dataset_test_split is not None:
            raise ValueError("Set either `dataset_test_split` or `eval_fraction`, not both.")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value!r}.")
        if self.hardware is not None:
            parse_hardware(self.hardware)


def parse_hardware(text: str) -> dict:
    """`"2 nodes x 8 GPUs x 80 GB[, 2048 GB CPU]"` -> `{"nodes": 2, "gpus_per_node": 8, "gpu_mem_gb": 80.0,
    "cpu_mem_gb": 2048.0 or None}`."""
    m = _HARDWARE_RE.match(text)
    if m is None:
        raise ValueError(
            f"`hardware` must read like '2 nodes x 8 GPUs x 80 GB' or '1 node x 8 GPUs x 80 GB, 2048 GB CPU', got "
            f"{text!r}."
        )
    return {
        "nodes": int(m.group(1)),
        "gpus_per_node": int(m.group(2)),
        "gpu_mem_gb": float(m.group(3)),
        "cpu_mem_gb": float(m.group(4)) if m.group(4) else None,
    }


@dataclass
class TrainArgs:
    script: ScriptArguments
    training: "NCAConfig | InfoNCAConfig"  # noqa: F821
    model: "ModelConfig"  # noqa: F821
    mixture: "DatasetMixtureConfig"  # noqa: F821
    recipe: dict


# ---------------------------------------------------------------------------------------------------------- parsing
def _config_class(loss: str):
    from .config import InfoNCAConfig, NCAConfig

    return {"nca": NCAConfig, "infonca": InfoNCAConfig}[loss]


def make_parser(loss: str = "nca"):
    """The `trl.TrlParser` of `nca-trl train` for `loss` (`nca` or `infonca`)."""
    from trl import DatasetMixtureConfig, ModelConfig, TrlParser

    return TrlParser((ScriptArguments, _config_class(loss), ModelConfig, DatasetMixtureConfig), prog="nca-trl train")


def _peek(argv: list[str], name: str) -> str | None:
    """Value of `--name X` / `--name=X` in argv (the last one wins), else None."""
    value = None
    flags = {f"--{name}", f"--{name.replace('_', '-')}"}  # HfArgumentParser accepts both spellings
    for i, arg in enumerate(argv):
        if arg in flags:
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else "true"
        elif "=" in arg and arg.split("=", 1)[0] in flags:
            value = arg.split("=", 1)[1]
    return value


def _truthy(value) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "y", "on")


def _load_recipe(argv: list[str]) -> tuple[dict, str | None]:
    import yaml

    path = _peek(argv, "config")
    if path is None:
        return {}, None
    with open(path) as f:
        recipe = yaml.safe_load(f) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"The recipe {path} must hold a YAML mapping of field: value, got {type(recipe).__name__}.")
    return recipe, path


def _check_recipe_keys(recipe: dict, path: str, parser) -> None:
    """Fail on recipe keys that no dataclass of the parser knows, naming each key and the closest known ones."""
    known = {action.dest for action in parser._actions} | {"env"}
    unknown = [key for key in recipe if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=3)
            hints.append(f"'{key}'" + (f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""))
        raise ValueError(
            f"Unknown key(s) in the recipe {path}: {'; '.join(hints)}. Every key must be a field of ScriptArguments "
            "(nca-trl), NCAConfig/InfoNCAConfig (trl.DPOConfig, transformers.TrainingArguments), trl.ModelConfig or "
            "trl.DatasetMixtureConfig; see `nca-trl train --help`."
        )


@contextlib.contextmanager
def _relaxed_hardware_checks():
    """Let `TrainingArguments` accept `bf16=True` without a GPU (for `--dry_run` of a GPU recipe on any machine)."""
    import transformers.training_args as ta

    original = ta.is_torch_bf16_gpu_available
    ta.is_torch_bf16_gpu_available = lambda *a, **k: True
    try:
        yield
    finally:
        ta.is_torch_bf16_gpu_available = original


def parse_train_args(argv: list[str] | None = None, dry_run: bool | None = None) -> TrainArgs:
    """Parse `nca-trl train` arguments (`--config RECIPE.yaml` and `--field value` overrides).

    `dry_run=True` (or `--dry_run` / `dry_run: true` in the recipe) skips the hardware checks of
    `TrainingArguments` (bf16 without a GPU), so a GPU recipe can be validated anywhere.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe, path = _load_recipe(argv)
    loss = _peek(argv, "loss") or recipe.get("loss", "nca")
    if loss not in LOSSES:
        raise ValueError(f"`loss` must be one of {LOSSES}, got {loss!r}.")
    if dry_run is None:
        dry_run = _truthy(_peek(argv, "dry_run") or recipe.get("dry_run", False))
    parser = make_parser(loss)
    if path is not None:
        _check_recipe_keys(recipe, path, parser)
    with _relaxed_hardware_checks() if dry_run else contextlib.nullcontext():
        script_args, training_args, model_args, mixture = parser.parse_args_and_config(argv, fail_with_unknown_args=True)
    script_args.dry_run = script_args.dry_run or dry_run
    if mixture.streaming:
        raise ValueError("`streaming: true` is not supported by `nca-trl train`: the data is converted and validated.")
    if model_args.model_name_or_path is None:
        raise ValueError("`model_name_or_path` is required (a local folder or a Hub model id).")
    if not mixture.datasets and not script_args.dataset_name:
        raise ValueError("Give the data: `dataset_name` (Hub id, file or folder) or `datasets` (a mixture).")
    _set_model_init_kwargs(training_args, model_args)
    return TrainArgs(script_args, training_args, model_args, mixture, recipe)


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


# ---------------------------------------------------------------------------------------------------------- data
def _load_raw(script_args, mixture):
    """The raw data as a `DatasetDict`."""
    import datasets

    if mixture.datasets:
        from trl import get_dataset

        return get_dataset(mixture)
    name = script_args.dataset_name
    path = Path(name).expanduser()
    if path.is_file():
        builder = _FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"Unknown data file type {path.suffix!r} for {path}: use one of {sorted(_FILE_BUILDERS)}.")
        return datasets.load_dataset(builder, data_files=str(path))
    if path.is_dir():
        if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
            loaded = datasets.load_from_disk(str(path))
            return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})
        return datasets.load_dataset(str(path), name=script_args.dataset_config)
    return datasets.load_dataset(name, name=script_args.dataset_config)


def load_datasets(script_args, mixture, training_args):
    """(train, eval or None) in the rated format, following the script arguments."""
    from .data import convert_dataset

    raw = _load_raw(script_args, mixture)
    train_split = "train" if mixture.datasets else script_args.dataset_train_split
    if train_split not in raw:
        raise ValueError(f"Split {train_split!r} not found; the data has splits {list(raw)} (`dataset_train_split`).")
    eval_raw = None
    test_split = "test" if mixture.datasets and mixture.test_split_size else script_args.dataset_test_split
    if test_split is not None:
        if test_split not in raw:
            raise ValueError(f"Split {test_split!r} not found; the data has splits {list(raw)} (`dataset_test_split`).")
        eval_raw = raw[test_split]

    kwargs = script_args.dataset_format_kwargs or {}
    train = convert_dataset(raw[train_split], script_args.dataset_format, dataset_name="train", **kwargs)
    evaluation = None
    if eval_raw is not None:
        evaluation = convert_dataset(eval_raw, script_args.dataset_format, dataset_name="eval", **kwargs)
    if script_args.eval_fraction is not None:
        split = train.train_test_split(test_size=script_args.eval_fraction, seed=training_args.seed)
        train, evaluation = split["train"], split["test"]
    if script_args.max_train_samples is not None:
        train = train.select(range(min(script_args.max_train_samples, len(train))))
    if evaluation is not None and script_args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(script_args.max_eval_samples, len(evaluation))))
    return train, evaluation


# ---------------------------------------------------------------------------------------------------------- train
def _resume_value(value):
    if value is None:
        return None
    if str(value).lower() in ("true", "last", "latest"):
        return True
    return value


def _progress_recorder():
    """A callback recording the step training starts from (non-zero when resumed) and the steps this run logged."""
    from transformers import TrainerCallback

    class ProgressRecorder(TrainerCallback):
        def __init__(self):
            self.start_step = None
            self.logged_steps = []

        def on_train_begin(self, args, state, control, **kwargs):
            self.start_step = state.global_step

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.logged_steps.append(state.global_step)

    return ProgressRecorder()


def check_launch_environment(training_args, environ=os.environ) -> None:
    """Fail loudly on launch settings that otherwise degrade silently (before anything is loaded)."""
    deepspeed = str(environ.get("ACCELERATE_USE_DEEPSPEED", "false")).lower() == "true"
    if deepspeed and training_args.use_cpu:
        raise ValueError(
            "`use_cpu: true` switches DeepSpeed off (the run would silently fall back to plain data parallel). Under "
            "a DeepSpeed accelerate config on CPU pass `--use_cpu false --ddp_backend gloo --bf16 false` instead."
        )
    precision = environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if deepspeed and precision in ("bf16", "fp16") and not getattr(training_args, precision):
        raise ValueError(
            f"The accelerate config asks for mixed_precision={precision} but the recipe has `{precision}: false`. "
            "DeepSpeed needs both to agree: on CPU add `--mixed_precision no` to `accelerate launch`; on GPUs set "
            f"`{precision}: true` in the recipe."
        )


def check_world_size(state, environ=os.environ) -> None:
    """A launcher that started N processes which do not form one group (accelerate's MULTI_GPU config without GPUs
    and without `use_cpu`) would train N independent copies: refuse."""
    launched = int(environ.get("WORLD_SIZE", "1") or 1)
    if launched != state.num_processes:
        raise RuntimeError(
            f"The launcher started {launched} processes (WORLD_SIZE) but this one trains in a group of "
            f"{state.num_processes} ({state.distributed_type}): they would be {launched} independent "
            "trainings. On CPU use an accelerate config with `distributed_type: MULTI_GPU` and `use_cpu: true` plus "
            "`--use_cpu true --ddp_backend gloo` (or a DeepSpeed config with `--ddp_backend gloo --bf16 false`)."
        )


def _process_info(accelerator) -> list[dict]:
    from accelerate.utils import gather_object

    info = {
        "process_index": accelerator.process_index,
        "local_process_index": accelerator.local_process_index,
        "pid": os.getpid(),
        "hostname": socket.gethostname(),
    }
    return gather_object([info]) if accelerator.num_processes > 1 else [info]


def _param_checksums(trainer) -> dict:
    """{name: [sum, sum of squares]} of the final weights, gathered across ZeRO-3 shards (all ranks must call)."""
    import torch

    model = trainer.accelerator.unwrap_model(trainer.model)
    gather = contextlib.nullcontext
    if trainer.is_deepspeed_enabled:
        import deepspeed

        gather = lambda p: deepspeed.zero.GatheredParameters([p], modifier_rank=None)  # noqa: E731
    sums = {}
    for name, param in model.named_parameters():
        with gather(param) if trainer.is_deepspeed_enabled else contextlib.nullcontext():
            t = param.detach().to(torch.float64)
            sums[name] = [t.sum().item(), (t * t).sum().item(), list(t.shape)]
    return sums


def _distributed_summary(trainer) -> dict:
    import torch.distributed as dist

    acc = trainer.accelerator
    dtype = acc.distributed_type
    zero_stage = None
    if trainer.is_deepspeed_enabled:
        zero_stage = acc.state.deepspeed_plugin.zero_stage
    return {
        "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
        "num_processes": acc.num_processes,
        "distributed_type": getattr(dtype, "value", str(dtype)),
        "zero_stage": zero_stage,
        "backend": getattr(acc.state, "backend", None),
        "device": str(acc.device),
        "mixed_precision": acc.mixed_precision,
        # torchrun (behind `accelerate launch`) exports the number of machines as GROUP_WORLD_SIZE
        "num_machines": int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1),
    }


def train_main(argv: list[str] | None = None) -> dict | None:
    """`nca-trl train`: parse, load and convert the data, train, save, write run_info.json, print a summary.

    Returns the run info (on every process) or None for `--dry_run`.
    """
    args = parse_train_args(argv)
    script_args, training_args, model_args = args.script, args.training, args.model
    if script_args.dry_run:
        _print_dry_run(args)
        return None

    from trl import get_peft_config, get_quantization_config

    from .distributed import count_z3_leaf_modules, zero3_moe_leaf_guard
    from .trainer import InfoNCATrainer, NCATrainer

    trainer_cls = {"nca": NCATrainer, "infonca": InfoNCATrainer}[script_args.loss]
    check_launch_environment(training_args)
    check_world_size(training_args.distributed_state)
    with training_args.main_process_first(desc="loading and converting the data"):
        train_dataset, eval_dataset = load_datasets(script_args, args.mixture, training_args)
    if eval_dataset is not None and training_args.eval_strategy == "no":
        eval_dataset_for_trainer = None
    else:
        eval_dataset_for_trainer = eval_dataset
    if eval_dataset_for_trainer is None and training_args.eval_strategy != "no":
        raise ValueError(
            f"`eval_strategy={training_args.eval_strategy.value!r}` needs evaluation data: set `dataset_test_split` or "
            "`eval_fraction`, or `eval_strategy: no`."
        )

    start = time.time()
    progress = _progress_recorder()
    with zero3_moe_leaf_guard(script_args.zero3_leaf_modules) as leaf_marked:
        trainer = trainer_cls(
            model=model_args.model_name_or_path,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset_for_trainer,
            peft_config=get_peft_config(model_args),
            quantization_config=get_quantization_config(model_args),
            callbacks=[progress],
        )
        acc = trainer.accelerator
        dist_info = _distributed_summary(trainer)
        acc.print(
            f"[nca-trl] {script_args.loss}: {len(train_dataset)} training prompts"
            + (f", {len(eval_dataset_for_trainer)} evaluation prompts" if eval_dataset_for_trainer is not None else "")
            + f"; world size {dist_info['world_size']} ({dist_info['distributed_type']}"
            + (f", ZeRO-{dist_info['zero_stage']}" if dist_info["zero_stage"] is not None else "")
            + f", backend {dist_info['backend']}, device {dist_info['device']})"
        )
        train_result = trainer.train(resume_from_checkpoint=_resume_value(training_args.resume_from_checkpoint))

    metrics = dict(train_result.metrics)
    metrics["train_samples"] = len(train_dataset)
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    eval_metrics = None
    if eval_dataset_for_trainer is not None:
        eval_metrics = trainer.evaluate()
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)

    trainer.save_model(training_args.output_dir)
    processes = _process_info(acc)
    checksums = _param_checksums(trainer) if script_args.record_param_checksums else None
    leaf = {
        "policy": count_z3_leaf_modules(trainer.model),
        "reference": count_z3_leaf_modules(trainer.ref_model),
        "precompute_engine": count_z3_leaf_modules(getattr(trainer, "_precompute_engine", None)),
        # per ZeRO-3 engine built (reference / precompute in __init__, policy in train): MoE blocks nca-trl flagged
        "marked_by_nca_trl": leaf_marked,
    }
    info = {
        **dist_info,
        "processes": processes,
        "loss": script_args.loss,
        "trainer": type(trainer).__name__,
        "model_name_or_path": model_args.model_name_or_path,
        "output_dir": os.path.abspath(training_args.output_dir),
        "global_step": trainer.state.global_step,
        "start_step": progress.start_step,  # > 0 when resumed from a checkpoint
        "resumed_from": training_args.resume_from_checkpoint,
        "steps_logged_this_run": progress.logged_steps,
        "step_losses": [
            {"step": e["step"], "loss": e["loss"]} for e in trainer.state.log_history if "loss" in e and "step" in e
        ],
        "log_history": trainer.state.log_history,
        "train_metrics": metrics,
        "eval_metrics": eval_metrics,
        "z3_leaf_modules": leaf,
        "wall_time_s": time.time() - start,
    }
    if checksums is not None:
        info["param_checksums"] = checksums
    if acc.is_main_process:
        out = Path(training_args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "run_info.json").write_text(json.dumps(info, indent=1, default=str))
        _print_summary(info, metrics)
    acc.wait_for_everyone()
    trainer.end()  # finish the trackers, destroy the process group
    return info


def _print_summary(info: dict, metrics: dict) -> None:
    dist = info["distributed_type"] + (f", ZeRO-{info['zero_stage']}" if info["zero_stage"] is not None else "")
    hosts = sorted({p["hostname"] for p in info["processes"]})
    lines = [
        "",
        "=" * 72,
        f"nca-trl: {info['trainer']} finished",
        f"  train loss       : {metrics.get('train_loss', float('nan')):.6f}",
        f"  steps            : {info['global_step']}",
        f"  runtime          : {metrics.get('train_runtime', float('nan')):.1f} s",
        f"  world size       : {info['world_size']} ({dist}; backend {info['backend']}; {len(hosts)} host(s))",
        f"  model saved to   : {info['output_dir']}  (AutoModelForCausalLM.from_pretrained)",
        f"  run info         : {os.path.join(info['output_dir'], 'run_info.json')}",
    ]
    if info.get("eval_metrics"):
        lines.insert(4, f"  eval loss        : {info['eval_metrics'].get('eval_loss', float('nan')):.6f}")
    lines.append("=" * 72)
    print("\n".join(lines), flush=True)


def _print_dry_run(args: TrainArgs) -> None:
    from dataclasses import asdict

    t = args.training
    world = None
    if args.script.hardware:
        hw = parse_hardware(args.script.hardware)
        world = hw["nodes"] * hw["gpus_per_node"]
    per_step = t.per_device_train_batch_size * t.gradient_accumulation_steps
    print(f"[nca-trl dry run] loss={args.script.loss} trainer config={type(t).__name__}")
    print("  script:", json.dumps(asdict(args.script), default=str))
    print("  model :", json.dumps(asdict(args.model), default=str))
    if args.mixture.datasets:
        print("  mixture:", json.dumps(asdict(args.mixture), default=str))
    print(
        f"  training: beta={t.beta} alpha={t.alpha} lr={t.learning_rate} scheduler={getattr(t.lr_scheduler_type, 'value', t.lr_scheduler_type)} "
        f"warmup_steps={t.warmup_steps} epochs={t.num_train_epochs} "
        f"max_steps={t.max_steps} max_length={t.max_length} bf16={t.bf16} "
        f"gradient_checkpointing={t.gradient_checkpointing} model_init_kwargs={t.model_init_kwargs}"
    )
    batch = f"{per_step} prompts per process per optimizer step"
    if world:
        batch += f" x {world} processes = {per_step * world} prompts (global batch)"
    print("  batch :", batch)
    print(f"  output: {t.output_dir}")


# ---------------------------------------------------------------------------------------------------------- tiny model
def make_tiny_model_main(argv: list[str]) -> str:
    import argparse

    from .tiny import SIZES, build_tiny_model

    parser = argparse.ArgumentParser(
        prog="nca-trl make-tiny-model",
        description="Build a tiny random-weight Mistral or Mixtral with the real Mistral-7B tokenizer (offline).",
    )
    parser.add_argument("out_dir")
    parser.add_argument("--arch", choices=("mistral", "mixtral"), default="mistral")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    ns = parser.parse_args(argv)
    path = build_tiny_model(ns.out_dir, arch=ns.arch, seed=ns.seed, size=ns.size)
    print(f"[nca-trl] tiny {ns.arch} ({ns.size}, seed {ns.seed}) written to {os.path.abspath(path)}")
    return path


_USAGE = """usage: nca-trl <command> [options]

commands:
  train             train NCA / InfoNCA from a recipe:  nca-trl train --config RECIPE.yaml [--field value ...]
                    (distributed: accelerate launch --config_file ACCEL.yaml scripts/train.py --config RECIPE.yaml)
  make-tiny-model   build a tiny random model + the Mistral tokenizer:  nca-trl make-tiny-model OUT_DIR [--arch mixtral]

`nca-trl train --help` lists every recipe field.
"""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `nca-trl` console script (and of `scripts/train.py`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "train":
        if rest and rest[0] in ("-h", "--help"):
            make_parser(_peek(rest, "loss") or "nca").print_help()
            return 0
        train_main(rest)
        return 0
    if command in ("make-tiny-model", "make_tiny_model"):
        make_tiny_model_main(rest)
        return 0
    print(f"nca-trl: unknown command {command!r}\n\n{_USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
