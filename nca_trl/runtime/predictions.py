"""What `compute_metrics` gets: the padded logits and labels of every completion of the evaluation set.

`prediction_step` (DPOTrainer's, through `compute_loss(return_outputs=True)`) returns one row per completion of a
batch (`[N, L, V]` logits, `[N, L]` labels; N = the batch's completions, slot-major, so for pairs DPOTrainer's
`[chosen; rejected]`). The evaluation loop gathers them with `accelerator.gather_for_metrics`, which cuts a last
batch to its first `remainder` rows, counted in prompts (the dataloader's samples): of 3 prompts in batches of 2
with K = 3, 2, 4, only 6 of the 9 completions reached `compute_metrics` (`trl.DPOTrainer` cuts its rejected rows so).

- One process has no padding duplicates to drop: its rows are gathered whole (the per-prompt losses as before).
- Several processes pad a last batch with duplicates of other prompts, which rows of completions cannot tell apart:
  an evaluation set that fills every process's last batch has none, and another is refused before it is evaluated
  (at construction for the evaluation sets given then), naming the sizes that would fit.
"""

from __future__ import annotations

import torch

__all__ = ["EvalPredictionsMixin", "check_whole_batches"]


def check_whole_batches(trainer, dataset, name: str = "eval") -> None:
    """A `ValueError` if `compute_metrics` would get a cut last batch: several processes and a map-style `dataset`
    (or one of a dict of them) whose size is not a multiple of `per_device_eval_batch_size` x processes."""
    if isinstance(dataset, dict):
        for key, one in dataset.items():
            check_whole_batches(trainer, one, key)
        return
    processes = trainer.accelerator.num_processes
    if trainer.compute_metrics is None or processes == 1 or not hasattr(dataset, "__len__"):
        return
    step = trainer.args.per_device_eval_batch_size * processes
    if len(dataset) % step:
        raise ValueError(
            f"compute_metrics on {processes} processes: the {name} dataset's {len(dataset)} prompts leave a last "
            f"batch of {len(dataset) % step}, which the processes pad with duplicates of other prompts; their "
            "completions' logits cannot be told from the real ones. Evaluate a multiple of "
            f"per_device_eval_batch_size x processes = {step} prompts (e.g. {len(dataset) - len(dataset) % step} or "
            f"{len(dataset) - len(dataset) % step + step}), or per_device_eval_batch_size=1 with a multiple of "
            f"{processes}."
        )


class EvalPredictionsMixin:
    """`evaluation_loop` gathering the completions' logits and labels whole (see the module)."""

    def evaluation_loop(self, dataloader, *args, **kwargs):
        if self.compute_metrics is None:
            return super().evaluation_loop(dataloader, *args, **kwargs)
        check_whole_batches(self, dataloader.dataset)
        gather = self.gather_function
        self.gather_function = self._gather_predictions
        try:
            return super().evaluation_loop(dataloader, *args, **kwargs)
        finally:
            self.gather_function = gather

    def _gather_predictions(self, tensors):
        # Per-prompt losses are 1-D: cut as accelerate cuts them; a process's completion rows are all real
        if self.accelerator.num_processes == 1 and isinstance(tensors, torch.Tensor) and tensors.dim() > 1:
            return tensors
        return self.accelerator.gather_for_metrics(tensors)
