"""DeepSpeed ZeRO-3 and Mixture-of-Experts: mark every sparse MoE block as a ZeRO-3 *leaf* module.

Why. ZeRO-3 gathers a module's parameters in a pre-forward hook and records the order in which modules run, to
prefetch them in the next step and to know how many gradient hooks to wait for. In a sparse MoE layer each rank runs
only the experts its tokens are routed to, so with one module per expert (`nn.ModuleList` of expert MLPs: transformers
4.x Mixtral, and many remote-code MoE models) the ranks gather different parameters in different orders and the
collective all-gathers no longer match: the job hangs. A leaf module is gathered as a whole on entry and its children get
no hooks of their own, so every rank gathers the same tensors in the same order whatever the routing.

What the installed stack does (transformers 5.x, DeepSpeed 0.19):

- transformers 5 stores Mixtral's experts fused (`MixtralExperts`: two 3D `nn.Parameter`s, `gate_up_proj` and
  `down_proj`, indexed per expert inside one forward), called on every forward of `MixtralSparseMoeBlock`; the router
  (`MixtralTopKRouter.weight`) is one parameter too. Every rank therefore touches every expert parameter at every step
  and the unrouted experts just get zero gradient: the routing-dependent hang cannot happen with this layout.
- DeepSpeed >= 0.18 marks `MixtralSparseMoeBlock` / `Qwen2MoeSparseMoeBlock` / `Qwen3MoeSparseMoeBlock` as leaves by
  default (`zero_optimization.leaf_module`), in `deepspeed.initialize`, for every engine it builds.

We do not rely on either: older DeepSpeed (this package allows >= 0.16), other MoE architectures and remote code still
have per-expert modules. `zero3_moe_leaf_guard` wraps `deepspeed.initialize` so that *every* ZeRO-3 engine built
inside it (the policy in `accelerator.prepare`, the reference model in `trl.models.prepare_deepspeed`, the inference
engine of `precompute_ref_log_probs`) first gets `deepspeed.utils.set_z3_leaf_modules` on its sparse MoE blocks.
`set_z3_leaf_modules` only sets a flag on the module objects, so it must run before the engine registers its hooks,
i.e. before `deepspeed.initialize`; it works on parameters already partitioned by `zero3_init_flag`.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterable

import torch

logger = logging.getLogger("nca_trl")

__all__ = [
    "MOE_BLOCK_PATTERN",
    "find_moe_block_classes",
    "mark_moe_leaf_modules",
    "count_z3_leaf_modules",
    "zero3_moe_leaf_guard",
    "deepspeed_zero_stage",
]

# Class names of the sparse MoE blocks of transformers' MoE architectures: MixtralSparseMoeBlock,
# Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock, OlmoeSparseMoeBlock, PhimoeSparseMoeBlock, JambaSparseMoeBlock,
# DeepseekV3MoE, GraniteMoeMoE, JetMoeMoE, ... The *block* (router + all experts) is the unit that must be a leaf,
# not the individual experts.
MOE_BLOCK_PATTERN = re.compile(r"(SparseMoeBlock|SparseMoEBlock|MoeBlock|MoEBlock|MoE|Moe)$")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # A DeepSpeedEngine (or DDP) keeps the real model in `.module`
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def find_moe_block_classes(model: torch.nn.Module, class_names: Iterable[str] | None = None) -> list[type]:
    """Classes of the sparse MoE blocks in `model`: those named in `class_names`, or by default every module class
    whose name matches `MOE_BLOCK_PATTERN` and that owns parameters (outermost match only)."""
    model = _unwrap(model)
    wanted = set(class_names) if class_names else None
    found: dict[str, type] = {}
    for module in model.modules():
        name = type(module).__name__
        if wanted is not None:
            if name in wanted:
                found[name] = type(module)
        elif MOE_BLOCK_PATTERN.search(name) and any(True for _ in module.parameters()):
            found[name] = type(module)
    if wanted is not None and set(found) != wanted:
        missing = sorted(wanted - set(found))
        raise ValueError(f"ZeRO-3 leaf module class(es) {missing} not found in {type(model).__name__}.")
    if wanted is None:
        # Keep the outermost class only (a `...MoE` block containing a `...MoeBlock` would be marked at the top)
        outer = set(found.values())
        for module in model.modules():
            if type(module) in outer:
                for child in module.modules():
                    if child is not module and type(child) in outer and type(child) is not type(module):
                        outer.discard(type(child))
        found = {k: v for k, v in found.items() if v in outer}
    return list(found.values())


def mark_moe_leaf_modules(model: torch.nn.Module, class_names: Iterable[str] | None = None) -> int:
    """Flag every sparse MoE block of `model` as a ZeRO-3 leaf module; returns how many modules were flagged.

    Idempotent, cheap (sets an attribute), a no-op (0) for a dense model. Must run before the DeepSpeed engine wrapping
    `model` is built.
    """
    classes = find_moe_block_classes(model, class_names)
    if not classes:
        return 0
    from deepspeed.utils import set_z3_leaf_modules

    leaves = set_z3_leaf_modules(_unwrap(model), classes)
    logger.info("ZeRO-3 leaf modules: %d x %s", len(leaves), sorted(c.__name__ for c in classes))
    return len(leaves)


def count_z3_leaf_modules(model: torch.nn.Module | None) -> int | None:
    """Number of modules of `model` (or of the model inside an engine) flagged as ZeRO-3 leaves; None for no model."""
    if model is None:
        return None
    return sum(1 for m in _unwrap(model).modules() if getattr(m, "_z3_leaf", False))


def deepspeed_zero_stage(config) -> int | None:
    """ZeRO stage of a DeepSpeed config (dict, `HfDeepSpeedConfig`-like object, or JSON path); None if unknown."""
    if config is None:
        return None
    if hasattr(config, "config"):  # HfDeepSpeedConfig / DeepSpeedConfig
        config = config.config
    if isinstance(config, str):
        import json

        try:
            with open(config) as f:
                config = json.load(f)
        except (OSError, ValueError):
            return None
    if not isinstance(config, dict):
        return None
    zero = config.get("zero_optimization", {})
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage is None:
        stage = config.get("zero_optimization.stage")
    return int(stage) if isinstance(stage, (int, str)) and str(stage).isdigit() else None


@contextlib.contextmanager
def zero3_moe_leaf_guard(class_names: Iterable[str] | None = None, marked: list[int] | None = None):
    """Within the block, every `deepspeed.initialize(model=..., config=<ZeRO-3>)` first marks the model's sparse MoE
    blocks as ZeRO-3 leaves (see the module docstring). A no-op without DeepSpeed installed. Yields a list (`marked`,
    or a new one) that gets, for each ZeRO-3 engine built in the block, the number of modules flagged in its model.

    Covers the policy (built in `trainer.train()` by `accelerator.prepare`), the reference model (built in
    `DPOTrainer.__init__` by `trl.models.prepare_deepspeed`) and the `precompute_ref_log_probs` engine, so wrap both the
    trainer construction and `trainer.train()`:

    ```python
    with zero3_moe_leaf_guard():
        trainer = NCATrainer(model="path/to/mixtral", args=args, train_dataset=ds)
        trainer.train()
    ```
    """
    marked = [] if marked is None else marked  # one entry per ZeRO-3 engine built in the block: MoE blocks flagged
    try:
        import deepspeed
    except ImportError:
        yield marked
        return
    original = deepspeed.initialize
    names = list(class_names) if class_names else None

    def initialize(*args, **kwargs):
        # Signature: deepspeed.initialize(args=None, model=None, optimizer=None, ..., config=None, config_params=None)
        model = kwargs.get("model", args[1] if len(args) > 1 else None)
        config = kwargs.get("config", kwargs.get("config_params"))
        if model is not None and deepspeed_zero_stage(config) == 3:
            marked.append(mark_moe_leaf_modules(model, names))
        return original(*args, **kwargs)

    initialize.__wrapped__ = original
    deepspeed.initialize = initialize
    try:
        yield marked
    finally:
        deepspeed.initialize = original
