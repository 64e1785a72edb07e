"""Gradient accumulation that weighs prompts, not micro-batches: a step's loss is the mean over its window's prompts.

`Trainer.training_step` divides each micro-batch's loss (its prompts' mean) by the number of micro-batches in the
accumulation window (`current_gradient_accumulation_steps`; transformers counts items only for batches with
`labels`, which ours have not). Equal micro-batches make that the mean over the window's prompts; an epoch's last
window need not have them: 3 prompts in micro-batches of 2 and 1 weighed the lone prompt as two (loss 1.3325 where
one batch of 3 gives 1.3601; `trl.DPOTrainer` weighs them so too). Here each micro-batch's loss is scaled by
`prompts in it x micro-batches in the window / prompts in the window` before transformers divides it: the window's
sum is the mean over its prompts. The factor is exactly 1 for equal micro-batches (every window but an epoch's last),
so those steps are unchanged to the bit. Per process: a launch's processes see micro-batches of equal sizes
(accelerate pads a last batch with duplicates), so their averaged gradients weigh each prompt alike too.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["PromptWeightedAccumulationMixin"]


class PromptWeightedAccumulationMixin:
    """`get_batch_samples` counts the window's prompts (`completion_slots` rows); `_window_weight(inputs)` is the
    factor of a micro-batch's loss inside `training_step` (1 outside it: a `compute_loss` call of the user's)."""

    _window: tuple[int, int] | None = None  # (prompts, micro-batches) of the accumulation window being trained
    _in_training_step = False

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        prompts = [len(b["completion_slots"]) for b in batches if isinstance(b, Mapping) and "completion_slots" in b]
        self._window = (sum(prompts), len(batches)) if prompts and len(prompts) == len(batches) else None
        return batches, num_items

    def training_step(self, *args, **kwargs):
        self._in_training_step = True
        try:
            return super().training_step(*args, **kwargs)
        finally:
            self._in_training_step = False

    def _window_weight(self, inputs) -> float:
        """`B x n / P` for a micro-batch of B prompts in a window of n micro-batches and P prompts."""
        if not self._in_training_step or self._window is None or "completion_slots" not in inputs:
            return 1.0
        prompts, batches = self._window
        return len(inputs["completion_slots"]) * batches / prompts
