"""What `compute_metrics` gets: the padded logits and labels of every completion of the evaluation set, once each.

`prediction_step` (DPOTrainer's, through `compute_loss(return_outputs=True)`) returns one row per completion of a
batch (`[N, L, V]` logits, `[N, L]` labels; N = the batch's completions, slot-major, so for pairs DPOTrainer's
`[chosen; rejected]`). `Trainer.evaluation_loop` gathers them with `accelerator.gather_for_metrics`, which counts
rows as the dataloader's samples, prompts here:
- it cut a last batch to its first `remainder` rows: of 3 prompts in batches of 2 with K = 3, 2, 4, only 6 of the 9
  completions reached `compute_metrics` (`trl.DPOTrainer` cuts its rejected rows so);
- on several processes, batches of different numbers of completions (prompts of different K) cannot be gathered as
  one tensor: gloo aborted the process ("Received data size doesn't match expected size").

Here the rows of completions (a tensor whose first dimension is the batch's number of completions) are gathered
whole, ragged across processes: each process's rows padded to the largest count, gathered, the padding dropped. Each
row is keyed by its prompt's place in the global batch (the processes' prompts in process order, as accelerate
gathers samples) and its slot. A last batch's padding duplicates (on several processes) are dropped as accelerate
drops them, counted in prompts: the real prompts are the first `remainder` of the global batch, and a row is kept
when its prompt is one of them (the rows of a process's prompts are interleaved, slot-major: cutting the first rows
kept a duplicate's completion and lost a real one). The rows kept are put in the global batch's slot-major order,
the order one process with the whole batch gives, so rows are in the same order on any number of processes. One
process has no duplicates: its rows are kept as they are. Per-prompt tensors (the losses) go through
`gather_for_metrics` as before.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["EvalPredictionsMixin", "gather_rows"]


def gather_rows(accelerator, rows: torch.Tensor) -> torch.Tensor:
    """Every process's `rows` (`[N_p, ...]`, N_p may differ between processes; the other dimensions equal), in process
    order: `[sum N_p, ...]`."""
    count = torch.tensor([rows.shape[0]], device=rows.device)
    counts = accelerator.gather(count).tolist()
    padded = accelerator.pad_across_processes(rows, dim=0)
    gathered = accelerator.gather(padded)
    most = padded.shape[0]
    return torch.cat([gathered[p * most: p * most + n] for p, n in enumerate(counts)])


class EvalPredictionsMixin:
    """`evaluation_loop` gathering the completions' logits and labels whole and once (see the module)."""

    def evaluation_loop(self, dataloader, *args, **kwargs):
        # With compute_metrics, and in `predict` (it returns the logits too): gloo aborted `predict` on 2 processes
        # whose last batches held different numbers of completions ("Received data size doesn't match")
        gather = self.gather_function
        self.gather_function = self._gather_predictions
        try:
            return super().evaluation_loop(dataloader, *args, **kwargs)
        finally:
            self.gather_function = gather
            self._batch_completions, self._batch_slots, self._loss_pending = None, None, False

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        """`Trainer.predict`, its `{metric_key_prefix}_loss` the mean over prompts, each once, as an evaluation's
        (`Trainer`'s is a mean of its batches' means: a last batch of 1 prompt of 5 weighed as 2). The metrics its
        batches logged are dropped after it (they are not its output's): they stayed and were averaged into the next
        evaluation's (`trl.DPOTrainer` mixes them so)."""
        self._pooled["eval"].clear()
        try:
            output = super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
            pooled = self._pooled["eval"].values()
            if "loss" in pooled and f"{metric_key_prefix}_loss" in output.metrics:
                output.metrics[f"{metric_key_prefix}_loss"] = pooled["loss"]
            return output
        finally:
            self._metrics["eval"].clear()
            self._pooled["eval"].clear()

    def prediction_step(self, model, inputs, *args, **kwargs):
        # How many completions each prompt of the batch has: which gathered tensors are rows of completions
        slots = inputs.get("completion_slots") if isinstance(inputs, Mapping) else None
        self._batch_completions = None if slots is None else slots.sum(dim=1)
        self._batch_slots = slots
        outputs = super().prediction_step(model, inputs, *args, **kwargs)
        self._loss_pending = outputs[0] is not None  # the next tensor gathered is this batch's loss
        return outputs

    def _gather_predictions(self, tensors):
        if isinstance(tensors, (tuple, list)):
            return type(tensors)(self._gather_predictions(t) for t in tensors)
        if isinstance(tensors, dict):
            return {key: self._gather_predictions(value) for key, value in tensors.items()}
        completions = getattr(self, "_batch_completions", None)
        # The batch's loss, which `evaluation_loop` gathers first, repeated to `[batch_size]`: per prompt, whatever its
        # length (a last, smaller batch's completions can number batch_size too: 1 prompt of K = 2 in batches of 2)
        loss = getattr(self, "_loss_pending", False) and isinstance(tensors, torch.Tensor) and tensors.dim() == 1
        self._loss_pending = False
        # K >= 2 per prompt: a batch has more completions than prompts, so the first dimension says which it counts
        # (logits, labels, input ids, and a `preprocess_logits_for_metrics` score per completion)
        if loss or completions is None or not isinstance(tensors, torch.Tensor) or tensors.dim() == 0 \
                or tensors.shape[0] != int(completions.sum()):
            return self.accelerator.gather_for_metrics(tensors)
        if self.accelerator.num_processes == 1:
            return tensors
        real = self.accelerator.gather_for_metrics(completions).shape[0]  # the real prompts: duplicates cut
        keys = _row_keys(self.accelerator, self._batch_slots.to(tensors.device))
        kept = keys[:, 0] < real
        return gather_rows(self.accelerator, tensors)[kept][_slot_major(keys[kept])]


def _row_keys(accelerator, slots: torch.Tensor) -> torch.Tensor:
    """`[sum N_p, 2]`: every process's completion rows (`slots`: `[B_p, Kmax_p]`, its batch's `completion_slots`,
    rows in the order of `slots.T`'s True entries) as (prompt's place in the global batch, slot), in process order."""
    slot, prompt = slots.T.nonzero(as_tuple=True)
    sizes = accelerator.gather(torch.tensor([slots.shape[0]], device=slots.device)).tolist()
    offset = sum(sizes[: accelerator.process_index])
    return gather_rows(accelerator, torch.stack([prompt + offset, slot], dim=1))


def _slot_major(keys: torch.Tensor) -> torch.Tensor:
    """The order (indices into `keys`, `[N, 2]` of (prompt, slot)) that sorts rows by slot, then prompt."""
    return torch.argsort(keys[:, 1] * (int(keys[:, 0].max()) + 1) + keys[:, 0]) if len(keys) else keys[:, 0]
