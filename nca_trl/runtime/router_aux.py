"""The MoE load-balancing loss through TRL's fused LM head, on every MoE family that returns its router logits.

TRL 1.16 turns the loss on for any model whose config declares `output_router_logits`, with the config's
`router_aux_loss_coef` (DPOTrainer's `aux_loss_enabled`), and its fused forward (`trl.trainer.utils.add_fused_lm_head`)
then reads the number of experts as `config.num_experts`. Granite-MoE, Granite-MoE-shared and the Granite 4 hybrids
name it `num_local_experts`, so their first training step raised `AttributeError: ... has no attribute 'num_experts'`
with the default settings, in `trl.DPOTrainer` as in these trainers. `expert_count` finds the number where the config
lacks it (the model's own `num_experts`, as its forward uses it, or the config's other names), and
`router_aux_forward` sets it on the config for the policy's forward only: nothing is saved with the config.
`check_router_aux` refuses at construction a model whose number of experts cannot be found, naming the setting that
turns the loss off.
"""

from __future__ import annotations

import contextlib

__all__ = ["add_router_aux_loss", "check_router_aux", "expert_count", "router_aux_forward"]

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


def check_router_aux(trainer) -> int | None:
    """At construction: the number of experts to lend for the policy's forwards (`router_aux_forward`), or None.
    Raises `ValueError` where the loss is on and the number cannot be found."""
    if not trainer.aux_loss_enabled:
        return None
    model = trainer.accelerator.unwrap_model(trainer.model)
    return expert_count(getattr(model, "get_base_model", lambda: model)())


@contextlib.contextmanager
def router_aux_forward(trainer):
    """Around the policy's forward: yields the model keyword arguments that ask for the router logits (none where the
    loss is off), with `config.num_experts` set to `trainer._lent_experts` for the body only where the config lacks
    it (TRL's fused head reads it there)."""
    count = getattr(trainer, "_lent_experts", None) if trainer.aux_loss_enabled else None
    if count is None:
        yield {"output_router_logits": True} if trainer.aux_loss_enabled else {}
        return
    config = trainer.model.config.get_text_config()
    config.num_experts = count
    try:
        yield {"output_router_logits": True}
    finally:
        del config.num_experts


def add_router_aux_loss(trainer, loss, outputs, mode: str):
    """`loss` plus the MoE load-balancing loss weighted by `router_aux_loss_coef` where it is on (DPOTrainer's rule),
    its value logged as `aux_loss`."""
    if not trainer.aux_loss_enabled:
        return loss
    aux = outputs.aux_loss
    trainer._metrics[mode]["aux_loss"].append(trainer.accelerator.gather_for_metrics(aux).mean().item())
    return loss + trainer.router_aux_loss_coef * aux
