"""The MoE load-balancing loss through TRL's fused LM head, on every MoE family that returns its router logits.

TRL 1.16 turns the loss on for any model whose config declares `output_router_logits`, with the config's
`router_aux_loss_coef` (DPOTrainer's `aux_loss_enabled`), and its fused forward (`trl.trainer.utils.add_fused_lm_head`)
then reads the number of experts as `config.num_experts`. Granite-MoE, Granite-MoE-shared and the Granite 4 hybrids
name it `num_local_experts`, so their first training step raised `AttributeError: ... has no attribute 'num_experts'`
with the default settings, in `trl.DPOTrainer` as in these trainers. `expert_count` finds the number where the config
lacks it (the model's own `num_experts`, as its forward uses it, or the config's other names), and
`experts_for_fused_head` sets it on the config for one forward only: nothing is saved with the config. The fused head
also computes the loss in every forward of a model whose config sets `output_router_logits` (the reference model's
too), so the number is lent around the reference forwards as well. `check_router_aux` refuses at construction a
model whose number of experts cannot be found, naming the setting that turns the loss off.
"""

from __future__ import annotations

import contextlib

from accelerate.utils import extract_model_from_parallel

__all__ = [
    "add_router_aux_loss", "check_router_aux", "computes_aux", "expert_count", "experts_for_fused_head",
    "router_aux_forward",
]

# Other names of the number of routed experts in transformers' MoE configs
_OTHER_NAMES = ("num_local_experts", "n_routed_experts", "moe_num_experts")


def expert_count(model) -> int | None:
    """The number of experts TRL's fused head needs where the text config has no `num_experts` (None where it has
    one). Raises `ValueError` where neither the model nor its config says it."""
    config = model.config.get_text_config()
    if hasattr(config, "num_experts"):
        return None
    count = getattr(model, "num_experts", None)  # GraniteMoeForCausalLM's, the number its own forward uses
    for name in _OTHER_NAMES:
        if not isinstance(count, int):
            count = getattr(config, name, None)
    if not isinstance(count, int):
        raise ValueError(
            f"The MoE load-balancing loss is on ({type(config).__name__} declares output_router_logits, "
            f"router_aux_loss_coef is not 0), but neither {type(model).__name__} nor its config gives the number of "
            f"experts (config.num_experts, or {', '.join(_OTHER_NAMES)}), which TRL's fused LM head needs to compute "
            "it. Set router_aux_loss_coef=0.0 in the trainer's config to train without that loss."
        )
    return count


def check_router_aux(trainer) -> None:
    """At construction: raises `ValueError` where a forward of the policy or the reference model will compute the loss
    (`computes_aux`) and the number of experts cannot be found (`expert_count`)."""
    for model, asked in ((trainer.model, trainer.aux_loss_enabled), (trainer.ref_model, False)):
        if model is not None and computes_aux(base := _base(model), asked):
            expert_count(base)


def computes_aux(model, asked: bool) -> bool:
    """Whether TRL's fused head computes the loss in a forward of `model`: where the caller asks for the router logits
    (the policy's forward, where the loss is on), or on every forward where its config sets `output_router_logits`
    (the reference model's too)."""
    return bool(asked or getattr(model.config.get_text_config(), "output_router_logits", False))


@contextlib.contextmanager
def experts_for_fused_head(model, asked: bool = False):
    """Around a forward of `model` (wrapped or not): where it computes the loss (`computes_aux`) and its text config
    has no `num_experts`, `config.num_experts` is the model's number (`expert_count`) for the body only."""
    base = _base(model)
    config = base.config.get_text_config()
    if not computes_aux(base, asked) or hasattr(config, "num_experts"):
        yield
        return
    config.num_experts = expert_count(base)
    try:
        yield
    finally:
        del config.num_experts


@contextlib.contextmanager
def router_aux_forward(trainer):
    """Around the policy's forward: yields the model keyword arguments that ask for the router logits where the loss is
    on (none otherwise), with the number of experts lent (`experts_for_fused_head`)."""
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
