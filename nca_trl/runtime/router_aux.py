"""The MoE load-balancing loss through TRL's fused LM head, on every MoE family that returns its router logits.

TRL 1.16 turns the loss on for any model whose config declares `output_router_logits`, with the config's
`router_aux_loss_coef` (DPOTrainer's `aux_loss_enabled`). Its fused forward (`trl.trainer.utils.add_fused_lm_head`)
then computes it with `config.num_experts`, in every forward that asks for the router logits or whose config sets
`output_router_logits` (the reference model's too). Two kinds of models failed there, in `trl.DPOTrainer` as in these
trainers, at their first step with the default settings:

- families that name the number otherwise: Granite-MoE, Granite-MoE-shared and the Granite 4 hybrids
  (`num_local_experts`), DeepSeek-V3, GLM-4-MoE, MiniCPM5-MoE (`n_routed_experts`): `AttributeError`;
- dense models of an MoE family (Granite 4's dense checkpoints: `num_local_experts` 0; a Jamba downcycled to one
  expert; MoE configs whose `mlp_only_layers` cover every layer) have no router logits to balance: `IndexError`.

So: `check_router_aux` turns the loss off at construction for a policy with no router module (`router_count`, from
the hooks transformers records router logits with) or at most one expert (saying so; one expert's loss is a
constant), and refuses one whose number cannot be found, naming the setting that turns the loss off.
`experts_for_fused_head` wraps each forward: where the loss is asked for, `config.num_experts` is the model's number
(`expert_count`) for that forward only (nothing is saved with the config); where it is not (reference forwards, a
policy with the loss off), the config's `output_router_logits` is False for that forward, so no loss is computed that
would not be used.
"""

from __future__ import annotations

import contextlib
import logging

from accelerate.utils import extract_model_from_parallel

__all__ = [
    "add_router_aux_loss", "check_router_aux", "expert_count", "experts_for_fused_head", "router_aux_forward",
    "router_count",
]

logger = logging.getLogger("nca_trl")

# Other names of the number of routed experts in transformers' MoE configs
_OTHER_NAMES = ("num_local_experts", "n_routed_experts", "moe_num_experts")


def expert_count(model) -> int:
    """The number of routed experts of `model` (a transformers model, unwrapped): its text config's `num_experts`, else
    the model's own `num_experts` (GraniteMoeForCausalLM's, the number its forward uses), else the config's other
    names; 0 for a dense model of an MoE family. Raises `ValueError` where none says it."""
    config = model.config.get_text_config()
    candidates = (getattr(config, "num_experts", None), getattr(model, "num_experts", None),
                  *(getattr(config, name, None) for name in _OTHER_NAMES))
    count = next((c for c in candidates if isinstance(c, int)), None)
    if count is None:
        raise ValueError(
            f"The MoE load-balancing loss is on ({type(config).__name__} declares output_router_logits, "
            f"router_aux_loss_coef is not 0), but neither {type(model).__name__} nor its config gives the number of "
            f"experts (config.num_experts, or {', '.join(_OTHER_NAMES)}), which TRL's fused LM head needs to compute "
            "it. Set router_aux_loss_coef=0.0 in the trainer's config to train without that loss."
        )
    return count


def check_router_aux(trainer) -> None:
    """At construction (and before a reference precompute), where the loss is on: turns it off for a policy with no
    router to balance (`router_count` 0) or at most one expert (logged), raises `ValueError` where the number of
    experts cannot be found (`expert_count`)."""
    if trainer.aux_loss_enabled and (router_count(policy := _base(trainer.model)) == 0 or expert_count(policy) <= 1):
        trainer.aux_loss_enabled = False
        logger.warning("%s has no router to balance (no MoE layer, or at most one expert: a dense model of an MoE "
                       "family): no MoE load-balancing loss is added.", type(policy).__name__)


def router_count(model) -> int | None:
    """How many modules of `model` give its router logits (those transformers' `_can_record_outputs["router_logits"]`
    hooks record), or None where the model does not declare them that way."""
    from transformers import PreTrainedModel
    from transformers.utils.output_capturing import OutputRecorder

    specs = []
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and (spec := (module._can_record_outputs or {}).get("router_logits")):
            specs += spec if isinstance(spec, list) else [spec]
    if not specs:
        return None
    targets = [(s.target_class, s.class_name) if isinstance(s, OutputRecorder) else (None, s) if isinstance(s, str)
               else (s, None) for s in specs]  # a class, a class name, or an OutputRecorder of either

    def records(name, module) -> bool:
        return any(cls is not None and isinstance(module, cls) or suffix is not None and (
            name.endswith(suffix) or type(module).__name__ == suffix) for cls, suffix in targets)

    return sum(records(name, module) for name, module in model.named_modules())


@contextlib.contextmanager
def experts_for_fused_head(model, asked: bool = False):
    """Around a forward of `model` (wrapped or not), for the body only: where the caller asks for the router logits
    (`asked`: the policy's forward with the loss on), the text config's `num_experts` is the model's number if it has
    none; otherwise its `output_router_logits` is False."""
    base = _base(model)
    config = base.config.get_text_config()
    if asked and not isinstance(getattr(config, "num_experts", None), int):
        name, value = "num_experts", expert_count(base)
    elif not asked and getattr(config, "output_router_logits", False):
        name, value = "output_router_logits", False
    else:
        yield
        return
    lent, before = hasattr(config, name), getattr(config, name, None)
    setattr(config, name, value)
    try:
        yield
    finally:
        if lent:
            setattr(config, name, before)
        else:
            delattr(config, name)


@contextlib.contextmanager
def router_aux_forward(trainer):
    """Around the policy's forward: yields the model keyword arguments that ask for the router logits where the loss is
    on (none otherwise), with `experts_for_fused_head`."""
    with experts_for_fused_head(trainer.model, trainer.aux_loss_enabled):
        yield {"output_router_logits": True} if trainer.aux_loss_enabled else {}


def add_router_aux_loss(trainer, loss, outputs, mode: str):
    """`loss` plus the MoE load-balancing loss weighted by `router_aux_loss_coef` where it is on (DPOTrainer's rule),
    its value logged as `aux_loss`."""
    if not trainer.aux_loss_enabled:
        return loss
    aux = outputs.aux_loss
    trainer._metrics[mode]["aux_loss"].append(trainer.accelerator.gather_for_metrics(aux).mean().item())
    return loss + trainer.router_aux_loss_coef * aux


def _base(model):
    """The transformers model inside DDP / DeepSpeed / FSDP / torch.compile wrappers and a PEFT model."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
