"""`NCAConfig` and `InfoNCAConfig`: `trl.DPOConfig` plus the reward temperature and the cap on completions."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from trl import DPOConfig

from .refused_fields import UNSUPPORTED_DPO_FIELDS

__all__ = [
    "NCAConfig", "InfoNCAConfig", "RATED_CONFIGS", "DEFAULT_ALPHA", "config_for_loss", "check_rated_config",
    "relaxed_hardware_checks", "hardware_checks_relaxed", "reward_temperature", "auto_bf16", "command_line_spelling",
    "setting",
    "UNSUPPORTED_DPO_FIELDS",
]

#: The reward temperature of rated completions when `alpha` is not set (also for a plain `DPOConfig`).
DEFAULT_ALPHA = 1.0


def reward_temperature(args) -> float:
    """The `alpha` applied to rated completions: the config's, or `DEFAULT_ALPHA` when unset (or a plain `DPOConfig`).
    Preference pairs never use it: their targets are one-hot on the chosen completion."""
    alpha = getattr(args, "alpha", None)
    return DEFAULT_ALPHA if alpha is None else alpha

# `relaxed_hardware_checks()` turns the checks of what this machine can run off (`nca-trl train --dry_run`)
_HARDWARE_CHECKS = {"relaxed": False}
# How messages write a setting: `name=value` from Python, the recipe key and flag from the command line
_SPELLING = {"command_line": False}


@contextlib.contextmanager
def command_line_spelling():
    """Within the block, config errors write settings as recipe keys and flags (`bf16: false` / `--bf16 false`),
    as the command line takes them; outside it as Python arguments (`bf16=False`). `nca-trl train` builds its configs
    inside one."""
    before, _SPELLING["command_line"] = _SPELLING["command_line"], True
    try:
        yield
    finally:
        _SPELLING["command_line"] = before


def setting(name: str, value) -> str:
    """`name` set to `value`, written as the user who made the config writes it (see `command_line_spelling`)."""
    if not _SPELLING["command_line"]:
        return f"`{name}={value!r}`"
    text = {True: "true", False: "false", None: "null"}.get(value, value) if isinstance(value, (bool, type(None))) \
        else value
    return f"`{name}: {text}` in the recipe (or `--{name} {text}`)"


def auto_bf16(args) -> bool:
    """What `bf16=None` (automatic, the default of our configs) resolves to: bfloat16 mixed precision where the device
    training runs on supports it (an NVIDIA Ampere or newer GPU, an XPU / NPU with bf16, a TPU), float32 on a CPU
    (also with `use_cpu=True`) or a GPU without bfloat16. Always the real machine's answer, also within
    `relaxed_hardware_checks()`."""
    import transformers.training_args as ta

    if getattr(args, "use_cpu", False) or getattr(args, "fp16", False):
        return False
    bf16_gpu = _HARDWARE_CHECKS.get("bf16_gpu_check") or ta.is_torch_bf16_gpu_available
    return bool(bf16_gpu() or ta.is_torch_xla_available())


@contextlib.contextmanager
def relaxed_hardware_checks():
    """Within the block, configs skip the checks of what this machine can run: bf16 without a bf16 GPU (transformers'
    check too) and fp16 on the CPU. For validating a GPU recipe on any machine (`nca-trl train --dry_run`)."""
    import transformers.training_args as ta

    original, relaxed = ta.is_torch_bf16_gpu_available, _HARDWARE_CHECKS["relaxed"]
    ta.is_torch_bf16_gpu_available = lambda *a, **k: True
    _HARDWARE_CHECKS.update(relaxed=True, bf16_gpu_check=original)
    try:
        yield
    finally:
        ta.is_torch_bf16_gpu_available = original
        _HARDWARE_CHECKS.update(relaxed=relaxed, bf16_gpu_check=None)


def hardware_checks_relaxed() -> bool:
    """Whether the checks of what this machine can run are off (inside `relaxed_hardware_checks`)."""
    return _HARDWARE_CHECKS["relaxed"]


def _accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, NPU, MPS, ...): what the DataLoader asks before pinning memory."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()  # pragma: no cover - torch < 2.6


_BATCH_FIELDS = {
    "per_device_train_batch_size": "prompts per device per training step, each with its K completions",
    "per_device_eval_batch_size": "prompts per device per evaluation step",
    "gradient_accumulation_steps": "steps whose gradients make one optimizer step",
    "precompute_ref_batch_size": "prompts per batch of the reference log-prob precompute; None means the "
    "train / eval batch size",
}


def _check_batch_sizes(args) -> None:
    for name, what in _BATCH_FIELDS.items():
        value = getattr(args, name, None)
        if value is None and name == "precompute_ref_batch_size":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` ({what}) must be an integer >= 1, got {value!r}.")


def _check_precision(args) -> None:
    """bf16 set explicitly where this machine cannot run it, before transformers' own bf16 check (same condition, a
    message that says what to do). Skipped within `relaxed_hardware_checks()`. An unset `bf16` is automatic and never
    gets here (`auto_bf16`)."""
    import transformers.training_args as ta

    if _HARDWARE_CHECKS["relaxed"]:
        return
    if (args.bf16 or args.bf16_full_eval) and not args.use_cpu:
        if not ta.is_torch_bf16_gpu_available() and not ta.is_torch_xla_available():
            import torch

            which = setting("bf16_full_eval" if not args.bf16 else "bf16", True)
            gpu = (" CUDA is available, but its GPU has no bfloat16 (it needs an NVIDIA Ampere or newer GPU, CUDA >= "
                   "11).") if torch.cuda.is_available() else ""
            raise ValueError(
                f"{which} needs a GPU with bfloat16 support, and this machine has none.{gpu} Leave `bf16` unset "
                f"(automatic: bfloat16 where the device supports it, float32 here) or set {setting('bf16', False)} "
                f"to train in float32, or add {setting('use_cpu', True)} for bfloat16 autocast on the CPU; `nca-trl "
                "train --dry_run` skips this check to validate a GPU recipe on any machine."
            )


def _check_fp16_device(args) -> None:
    """fp16 mixed precision on the CPU: accelerate switches it off there without a word (no autocast, no grad
    scaler), so the run would train in float32 while the config says fp16."""
    if _HARDWARE_CHECKS["relaxed"] or not args.fp16 or args.device.type != "cpu":
        return
    why = setting("use_cpu", True) if args.use_cpu else "no GPU or other accelerator is available"
    raise ValueError(
        f"{setting('fp16', True)} cannot run here: training runs on the CPU ({why}), where accelerate's fp16 mixed "
        "precision needs a CUDA, XPU, NPU, MLU, MUSA, HPU or MPS device and is otherwise switched off without a word "
        "(the run would train in float32). Remove `fp16` (float32), or use "
        f"{setting('bf16', True)} with {setting('use_cpu', True)} for bfloat16 autocast on the CPU."
    )

# DPOConfig's default `loss_type`: accepted by every trainer here so that a plain `DPOConfig` works unchanged.
_DPO_DEFAULT_LOSS = "sigmoid"



def _check_inherited_switches(args: DPOConfig) -> None:
    """Switches inherited from `DPOConfig`/`TrainingArguments` that cannot work here, or not on this device."""
    if getattr(args, "padding_free", False) and getattr(args, "shared_prompt", None) is False:
        raise ValueError(
            f"{setting('padding_free', True)} asks for nca-trl's padding-free layout, which is the shared-prompt "
            f"layout, but {setting('shared_prompt', False)} forbids it. Set one of them: `shared_prompt` unset (the "
            f"default, automatic) or true is padding-free, {setting('shared_prompt', False)} the plain padded layout."
        )
    padding_free = getattr(args, "padding_free", False)
    if padding_free or getattr(args, "shared_prompt", None) is True:  # what the trainer refused after the model loaded
        pad = getattr(args, "pad_to_multiple_of", None)
        why = (f"{setting('truncation_mode', 'keep_end')} cuts each sequence's prompt differently"
               if getattr(args, "truncation_mode", None) == "keep_end" else
               f"{setting('pad_to_multiple_of', pad)} asks for padded shapes" if isinstance(pad, int) else
               f"{setting('neftune_noise_alpha', args.neftune_noise_alpha)} scales its embedding noise by the row's "
               "length, which the shared-prompt row changes" if getattr(args, "neftune_noise_alpha", None) else "")
        if why:
            fix = "remove `padding_free`" if padding_free else "leave `shared_prompt` unset (automatic) or set it false"
            raise ValueError(f"{setting('padding_free' if padding_free else 'shared_prompt', True)} requires the "
                             f"shared-prompt layout, which cannot run exactly here: {why}. Change that, or {fix} to "
                             "train with the plain padded layout.")
    if getattr(args, "sync_ref_model", False) and getattr(args, "precompute_ref_log_probs", False):
        raise ValueError(f"{setting('sync_ref_model', True)} with {setting('precompute_ref_log_probs', True)}: the "
                         "reference is updated during training, so precomputed reference log-probs would go stale "
                         "(trl.DPOTrainer refuses it too). Set one of them false.")
    if getattr(args, "truncation_mode", "keep_start") not in ("keep_start", "keep_end"):  # met at the first batch
        raise ValueError(f"{setting('truncation_mode', args.truncation_mode)} is not a truncation mode: use "
                         "`keep_start` (the default: the end of a sequence is cut) or `keep_end`.")
    if getattr(args, "use_liger_kernel", False):
        from transformers.utils import is_liger_kernel_available

        if not is_liger_kernel_available():
            raise ValueError(
                f"{setting('use_liger_kernel', True)} needs the `liger-kernel` package, which is not installed "
                "(`pip install liger-kernel`; its Triton kernels need a CUDA, ROCm or XPU GPU). Remove "
                "`use_liger_kernel`."
            )
        if args.device.type in ("cpu", "mps"):
            raise ValueError(
                f"{setting('use_liger_kernel', True)} cannot run on {args.device.type!r}: Liger's kernels are Triton "
                "GPU kernels (CUDA, ROCm or XPU). Remove `use_liger_kernel` to train on this device."
            )
    if getattr(args, "activation_offloading", False) and args.device.type == "cpu":
        raise ValueError(
            f"{setting('activation_offloading', True)} moves activations from the accelerator to CPU memory, but "
            "training runs on the CPU (`use_cpu` or no accelerator): there is nothing to offload, and TRL's offloader "
            "needs an accelerator (`torch.accelerator.current_accelerator()` is None). Remove `activation_offloading`."
        )


def check_rated_config(args: DPOConfig, config_class: type[_RatedCompletionsConfig]) -> None:
    """Raise a `ValueError` if `args` sets a DPO-only loss field or an invalid NCA field.

    `config_class` (`NCAConfig` or `InfoNCAConfig`) names the loss the trainer trains; messages name that loss, not
    the class of `args`. Works on an `NCAConfig`/`InfoNCAConfig`, on a pipeline's subclass of either, and on a plain
    `trl.DPOConfig` (whose new fields are absent and take the NCA defaults).
    """
    name = config_class.display_name()
    accepted = config_class.accepted_loss_types()
    loss_type = args.loss_type if isinstance(args.loss_type, list) else [args.loss_type]
    if len(loss_type) != 1 or loss_type[0] not in accepted:
        raise ValueError(
            f"{setting('loss_type', args.loss_type)} cannot be used to train {name} (loss {config_class.loss!r}): its trainer "
            f"always trains the {name} loss. Leave `loss_type` unset (accepted values: {list(accepted)}); to train "
            "another DPO loss use `trl.DPOTrainer`."
        )
    for field_name, (default, why) in UNSUPPORTED_DPO_FIELDS.items():
        value = getattr(args, field_name, default)
        if value != default:
            raise ValueError(
                f"{setting(field_name, value)} has no meaning for {name} (loss {config_class.loss!r}): {why}. Remove "
                f"it from the config (default {default!r})."
            )
    alpha = getattr(args, "alpha", None)
    if alpha is not None and not alpha >= 0:
        raise ValueError(f"`alpha` (reward temperature) must be >= 0, got {alpha!r}; 0 means one-hot on the best.")
    if not 0 < args.beta < math.inf:
        raise ValueError(f"`beta` must be a finite number > 0, got {args.beta!r}.")
    if not 0 <= args.learning_rate < math.inf:  # inf trained every weight to NaN and saved them, exit 0
        raise ValueError(f"`learning_rate` must be a finite number >= 0, got {args.learning_rate!r}.")
    # Every other float setting is finite (weight_decay inf, like learning_rate inf, saved an all-NaN model as a
    # finished run); alpha inf is the uniform limit
    for f in dataclasses.fields(args):
        value = getattr(args, f.name, None)
        if isinstance(value, float) and not math.isfinite(value) and not (f.name == "alpha" and value == math.inf):
            raise ValueError(f"{setting(f.name, value)} is not a finite number: give it one, or leave it unset.")
    ties = getattr(args, "ties", "keep")
    if ties not in TIES:
        raise ValueError(f"{setting('ties', ties)} is not a choice: `keep` (train tied prompts, uniform targets) or "
                         "`drop` (leave them out, counted).")
    max_completions = getattr(args, "max_completions", None)
    if max_completions is not None and max_completions < 2:
        raise ValueError(f"`max_completions` must be None or >= 2, got {max_completions!r}.")
    _check_inherited_switches(args)


def check_trains_a_step(args) -> None:
    """`SettingsError` for training arguments that train no step (`num_train_epochs` 0 without `max_steps`): `train()`
    saved the initial model as a finished run, exit 0. Checked when training starts, not at construction: a trainer
    built to `evaluate()` only may have them."""
    from .runtime.errors import SettingsError

    if args.max_steps <= 0 and args.num_train_epochs <= 0:
        raise SettingsError(f"{setting('num_train_epochs', args.num_train_epochs)} without `max_steps` trains no step: "
                            "give `num_train_epochs` > 0 or `max_steps` > 0 (to evaluate only, call `evaluate()`).")


_ALPHA_HELP = (
    "Reward temperature of rated completions: the targets are p = softmax(rewards / alpha) over each prompt's "
    "completions. None (the default) means 1.0. 0 means the limit alpha -> 0 (one-hot on the highest reward, ties "
    "split evenly). Rows given as chosen/rejected pairs always have one-hot targets on the chosen (the paper's "
    "pairwise case): alpha does not apply to them, also in a dataset mixing pairs and rated rows. It is the authors' "
    "`temperature_alpha` "
    "(a divisor of the raw scores): their released 1e-4 on UltraFeedback's 1-10 scores puts weight exp(-0.5/1e-4) "
    "~ 0 on a completion even half a point below the best, i.e. one-hot (on a tied best score their code gives all "
    "the weight to the first completion, where 0 here splits it). Scaling all rewards by c is the same as dividing "
    "alpha by c."
)
_MAX_COMPLETIONS_HELP = (
    "If set, prompts with more completions keep only this many: the best, the worst, and an even spread of ranks "
    "between them (ranks by reward). The prompts capped are logged, counted and named."
)
# `ties`: what the trainers do with a prompt whose rewards all tie (`nca_trl.data.rewards.rewards_tie`)
TIES = ("keep", "drop")
_SHARED_PROMPT_HELP = (
    "Shared-prompt, padding-free layout: each prompt is encoded once and followed by its K completions, the whole batch"
    " is one row of real tokens, and its attention is one variable-length call per layer (see `nca_trl.shared_prompt`)."
    " Log-probs equal the plain padded layout's. It runs only where it is exact, decided at construction by an "
    "allow-list: model families whose every layer is attention the varlen path implements "
    "(nca_trl.shared_prompt.families.EXACT_FAMILIES: Llama, Mistral, Qwen, Gemma, GPT-OSS, DeepSeek-V3, ...; hybrids "
    "with Mamba, convolution or linear-attention layers are plain), no compute_metrics. None (the default) is "
    "automatic: there, on a CPU, and on a CUDA GPU with a fused varlen kernel (flash-attn, or torch's varlen_attn) "
    "implementing the model's attention variants and bf16/fp16 training, where it is faster (2.7-3.0x the plain "
    "layout's tokens/s at Mistral-7B width on an H200, short and long prompts alike: results/gpu_layouts.json); "
    "elsewhere the plain layout, with one log line saying why. True forces it wherever it is exact and is refused at "
    "construction elsewhere; False forces the plain layout."
)

_PADDING_FREE_HELP = (
    "True requires nca-trl's padding-free layout, the shared-prompt layout (`shared_prompt=True`): the trainer raises "
    "an error, with the reason, where it cannot run, instead of falling back to the plain layout. TRL's own "
    "padding-free path (flash-attention, currently disabled in TRL) is never used. False (default): the layout is "
    "chosen by `shared_prompt`."
)


@dataclass
class _RatedCompletionsConfig(DPOConfig):
    """Fields shared by `NCAConfig` and `InfoNCAConfig`."""

    beta: float = field(
        default=0.01,
        metadata={"help": "KL coefficient: g_i = beta * (log pi(y_i|x) - log pi_ref(y_i|x)). The paper uses 0.01."},
    )
    alpha: float | None = field(default=None, metadata={"help": _ALPHA_HELP})
    max_completions: int | None = field(default=None, metadata={"help": _MAX_COMPLETIONS_HELP})
    shared_prompt: bool | None = field(default=None, metadata={"help": _SHARED_PROMPT_HELP})
    padding_free: bool = field(default=False, metadata={"help": _PADDING_FREE_HELP})
    ties: str = field(
        default="keep",
        metadata={"help": "Prompts whose rewards all tie (spread at most 1e-12): "
                  "`keep` trains them with uniform targets (for NCA this pulls every completion's log-ratio toward "
                  "0, i.e. toward the reference), `drop` leaves them out, counted in the log and in `run_info.json`. "
                  "Chosen/rejected pairs never tie. DPO (and `nca-trl iterate --loss dpo`) has no pair for them.",
                  "choices": list(TIES)},
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bfloat16 mixed precision. None (default): automatic, on where the device training runs on "
                  "supports it (an NVIDIA Ampere or newer GPU, XPU, NPU, TPU) and off (float32) on a CPU; DPOConfig's "
                  "own default is on everywhere, which fails on a CPU. True where the device has no bfloat16 is "
                  "refused, unless `use_cpu` (bfloat16 autocast on the CPU)."},
    )
    dataloader_pin_memory: bool = field(
        default=True,
        metadata={"help": "Pin the batches' memory for faster copies to the accelerator. Turned off (silently) where "
                  "it cannot have an effect: `use_cpu=True` or no CUDA / XPU / NPU / MPS device, where torch would "
                  "ignore it and warn on every run."},
    )
    activation_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Activation (gradient) checkpointing; None means True, DPOConfig's default. "
                  "`gradient_checkpointing` is transformers' deprecated alias."},
    )
    gradient_checkpointing: bool | None = field(
        default=None, metadata={"help": "Deprecated alias of `activation_checkpointing` (transformers 5)."}
    )
    zero3_leaf_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Under DeepSpeed ZeRO-3: module class names to mark as ZeRO-3 leaf modules in the policy, the "
            "reference and the precompute engine. Default: every sparse Mixture-of-Experts block of the model (e.g. "
            "MixtralSparseMoeBlock), see `nca_trl.runtime.distributed`."
        },
    )
    loss_type: list[str] | None = field(
        default=None,
        metadata={"help": "Always this config's loss (the default, None, means it); see `accepted_loss_types`."},
    )

    # The one place each loss is named: `loss` is its name (`nca-trl train --loss`, `loss_type`, the model card tag),
    # `pairwise_loss_type` the TRL `loss_type` that is the same loss on K = 2 pairs.
    loss: ClassVar[str] = ""
    pairwise_loss_type: ClassVar[str] = ""
    loss_title: ClassVar[str] = ""  # how messages and the model card write the loss's name

    @classmethod
    def display_name(cls) -> str:
        """The loss's name as written ("NCA", "InfoNCA"): a pipeline's subclass (`class DPOConfig(NCAConfig)`) keeps
        it, whatever the subclass is called."""
        return cls.loss_title

    @classmethod
    def accepted_loss_types(cls) -> tuple[str, ...]:
        return tuple(dict.fromkeys((cls.loss, cls.pairwise_loss_type, _DPO_DEFAULT_LOSS)))

    def __post_init__(self):
        if self.loss_type is None:
            self.loss_type = [self.loss]
        if self.activation_checkpointing is None and self.gradient_checkpointing is None:
            self.activation_checkpointing = True  # DPOConfig's default, under transformers 5's name (no warning)
        _check_batch_sizes(self)
        self.bf16_is_automatic = self.bf16 is None  # for the dry run and run_info.json
        if self.bf16 is None:
            self.bf16 = auto_bf16(self)  # before TRL's __post_init__, whose default is bf16 unless fp16
        _check_precision(self)
        super().__post_init__()
        _check_fp16_device(self)
        if self.dataloader_pin_memory and (self.use_cpu or not _accelerator_available()):
            self.dataloader_pin_memory = False  # no effect without an accelerator, and torch warns on every run
        check_rated_config(self, type(self))
        # The saved arguments say what is trained: an accepted alias (DPOConfig's default, TRL's K=2 name) becomes it
        self.loss_type = [self.loss]


@dataclass
class NCAConfig(_RatedCompletionsConfig):
    r"""
    Configuration class for [`NCATrainer`]: every field of [`trl.DPOConfig`] plus the ones below.

    Args:
        beta (`float`, *optional*, defaults to `0.01`):
            KL coefficient, `g_i = beta * (log pi(y_i|x) - log pi_ref(y_i|x))`. The NCA paper uses 0.01.
        alpha (`float`, *optional*, defaults to `None`, i.e. `1.0`):
            Reward temperature of rated completions: targets `p = softmax(rewards / alpha)` over each prompt's
            completions; `0` means one-hot on the best completion (ties split evenly). Rows given as chosen/rejected
            pairs always have one-hot targets on the chosen: `alpha` does not apply to them (also in a dataset
            mixing both kinds), so on pairs `NCATrainer` trains TRL's `nca_pair` loss. The authors'
            `temperature_alpha` is the same divisor of the raw scores; their released `1e-4` on 1-10 scores is
            effectively one-hot.
        max_completions (`int`, *optional*):
            Cap on K per prompt, keeping the best, the worst and an even spread of reward ranks between.
        shared_prompt (`bool`, *optional*):
            Encode each prompt once, followed by its K completions, padding-free, with one varlen attention call per
            layer, only where it is exact (an allow-list of model families, no `compute_metrics`; elsewhere the plain
            padded layout, with a logged reason). `None` (default): automatic, there on a CPU, and on a CUDA GPU
            where a fused varlen kernel runs it in bf16/fp16; `True` forces it, and is refused where it is not exact.
        loss_type (`list[str]`, *optional*):
            Always the NCA loss. Leave unset; `NCAConfig.accepted_loss_types()` lists the values accepted (the loss's
            own name, TRL's name of its K=2 case, and DPOConfig's default, so that a plain `DPOConfig` works); any of
            them is stored as `["nca"]`, the loss trained.

        padding_free (`bool`, *optional*, defaults to `False`):
            `True` requires the shared-prompt layout (an error where it cannot run, no fallback); `True` with
            `shared_prompt=False` is an error.

    DPO-only loss fields (`loss_weights`, `ld_alpha`, `f_divergence_type`, `f_alpha_divergence_coef`,
    `label_smoothing`, `use_weighting`, `discopop_tau`) and `label_smoothing_factor` (which no DPO loss applies) raise
    a `ValueError` when set to anything but their default.
    `use_liger_kernel` needs `liger-kernel` and a GPU, `activation_offloading` an accelerator: on CPU both raise a
    `ValueError` at config time. So do batch sizes below 1 (`per_device_train_batch_size`,
    `per_device_eval_batch_size`, `gradient_accumulation_steps`, `precompute_ref_batch_size`), `fp16=True` where
    training runs on the CPU (accelerate would switch it off silently), and an explicit `bf16=True` without a bf16
    GPU unless `use_cpu=True` (CPU bfloat16 autocast); `relaxed_hardware_checks()` (`nca-trl train --dry_run`)
    skips the last two. `bf16` left unset is automatic: on where the device supports it, off on a CPU. `dataloader_pin_memory` is turned off where it has no effect (no accelerator, `use_cpu`).

    Example:
    ```python
    >>> from nca_trl import NCAConfig
    >>> args = NCAConfig(output_dir="out", alpha=1.0, per_device_train_batch_size=2)
    ```
    """

    loss: ClassVar[str] = "nca"
    pairwise_loss_type: ClassVar[str] = "nca_pair"
    loss_title: ClassVar[str] = "NCA"


@dataclass
class InfoNCAConfig(_RatedCompletionsConfig):
    r"""
    Configuration class for [`InfoNCATrainer`]: every field of [`trl.DPOConfig`] plus the ones below.

    Args:
        beta (`float`, *optional*, defaults to `0.01`):
            KL coefficient, `g_i = beta * (log pi(y_i|x) - log pi_ref(y_i|x))`. The NCA paper uses 0.01.
        alpha (`float`, *optional*, defaults to `None`, i.e. `1.0`):
            Reward temperature of rated completions, as in [`NCAConfig`]. Chosen/rejected pairs always have one-hot
            targets, so on pairs `InfoNCATrainer` trains exactly DPO's sigmoid loss.
        max_completions (`int`, *optional*):
            Cap on K per prompt, keeping the best, the worst and an even spread of reward ranks between.
        shared_prompt (`bool`, *optional*):
            Shared-prompt, padding-free layout, as in [`NCAConfig`] (`None`: automatic).
        padding_free (`bool`, *optional*, defaults to `False`):
            `True` requires the shared-prompt layout, as in [`NCAConfig`].
        loss_type (`list[str]`, *optional*):
            Always the InfoNCA loss. Leave unset; `InfoNCAConfig.accepted_loss_types()` lists the values accepted
            (its own name, and DPOConfig's default, which is its K=2 case: DPO); stored as `["infonca"]`.

    Example:
    ```python
    >>> from nca_trl import InfoNCAConfig
    >>> args = InfoNCAConfig(output_dir="out", alpha=0.0)
    ```
    """

    loss: ClassVar[str] = "infonca"
    pairwise_loss_type: ClassVar[str] = "sigmoid"
    loss_title: ClassVar[str] = "InfoNCA"


RATED_CONFIGS = (NCAConfig, InfoNCAConfig)


def config_for_loss(loss: str) -> type[_RatedCompletionsConfig]:
    """The config class whose `loss` is `loss` (`"nca"` -> `NCAConfig`, `"infonca"` -> `InfoNCAConfig`)."""
    for config_class in RATED_CONFIGS:
        if config_class.loss == loss:
            return config_class
    raise ValueError(f"`loss` must be one of {[c.loss for c in RATED_CONFIGS]}, got {loss!r}.")
