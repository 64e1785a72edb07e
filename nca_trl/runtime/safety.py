"""Run safety of the trainers: no silent wrong result, no lost run.

- **Non-finite loss or gradient.** `check_loss` runs on every training micro-batch before its backward pass (under
  DeepSpeed the optimizer step happens inside the backward, so this is the check that covers DeepSpeed) and
  `check_grad_norm` on the gradient norm the Trainer computes before each optimizer step. Either raises
  `NonFiniteError` on every process, naming the step and the dataset rows of the batch (the `ROW_INDEX` column,
  `nca_trl.data.tokenize.with_row_index`): nothing is logged as 0.0, the optimizer never applies the update, and nothing is saved after the
  last good checkpoint. With fp16 loss scaling an infinite gradient norm is the scaler's business (it skips the step
  and lowers the scale), so only the loss is checked there.
The output_dir checks and lock live in `nca_trl.runtime.output_dir`, the checkpoint marker in
`nca_trl.runtime.checkpoints`; this module puts them to work in the trainer:

- **output_dir writable.** `check_output_dir_writable` creates and deletes a probe file (a real write, which also
  refuses root on a read-only mount), before the model is loaded.
- **output_dir lock.** `claim_output_dir` holds `fcntl.flock` on `output_dir/.nca-trl.lock` (body: pid, host, start,
  command) for the whole run, on the global main process only. A second run refuses naming the holder. The kernel
  drops the lock of a dead process: a lock file left behind with a body is a stale lock, taken over with a warning.
- **Complete checkpoints.** `save_checkpoint` writes `nca_trl_complete.json` into `checkpoint-N` last, after every
  process wrote its part, and rotates old checkpoints only then. `resolve_resume` makes `resume_from_checkpoint=True`
  pick the last complete checkpoint (skipping incomplete ones with a warning) and refuses an explicit incomplete one.
- **Resuming at the end.** A checkpoint at the run's last step (`max_steps`, or the end of its last epoch, as
  transformers computes them) trains no further step when resumed, where transformers would train one past
  `max_steps` (it skips `global_step` batches, then trains the next without checking): the weights stay the
  checkpoint's. A resumed run's `train_loss` is the mean over the whole run (the sum of the losses before the resume
  that the checkpoint's marker records, with this call's), not over this call's steps only (0.0 at the end).
- **Final model.** `save_final_model` writes into `output_dir/.nca-trl-saving`, then moves the files into place and
  writes the marker last: a failure half-way leaves the previous model whole.

All writers are the processes with `args.should_save` (the main process), as in `transformers.Trainer`; the others
only join the barriers.
"""

from __future__ import annotations

import logging
import math

import torch

from .checkpoints import (ResumeAtTheEndMixin, last_complete_checkpoint, resolve_resume, restore_synced_reference,
                          save_checkpoint, save_final_model)
from .errors import ROW_INDEX
from .output_dir import claim_output_dir

logger = logging.getLogger("nca_trl")

__all__ = ["NonFiniteError", "NonFiniteStopsMixin", "RunSafetyMixin", "check_grad_norm", "check_loss"]


class NonFiniteError(RuntimeError):
    """A training loss or gradient norm that is NaN or infinite."""




def _gathered_rows(trainer, rows: torch.Tensor | None) -> list[int] | None:
    """Every process's `rows`, sorted (collective: all processes call it); None if a process does not know its rows."""
    accelerator = trainer.accelerator
    # -1 pads (and stands for "no row" on a process with none), -2 for "unknown"
    unknown = torch.full((1,), -2, dtype=torch.long)
    rows = unknown if rows is None else torch.cat([torch.full((1,), -1, dtype=torch.long), rows.reshape(-1).cpu().long()])
    rows = rows.to(accelerator.device)
    if accelerator.num_processes > 1:
        rows = accelerator.pad_across_processes(rows, dim=0, pad_index=-1)
        rows = accelerator.gather(rows)
    rows = rows.tolist()
    if -2 in rows:
        return None
    return sorted(r for r in rows if r >= 0)


def _rows_text(trainer, rows: list[int] | None, name: str = "train") -> str:
    """The dataset rows of a step of `trainer` (ours, or `nca-trl iterate`'s `trl.DPOTrainer`, whose batches carry no
    row index)."""
    if rows is None:
        return (f"rows unknown (the collator does not pass `{ROW_INDEX}` through: use the trainer's own "
                "DataCollatorForRatedCompletions)") if isinstance(trainer, RunSafetyMixin) else \
            "rows unknown (its batches do not name them)"
    return f"rows {rows} of the {name} dataset (0-based, as given to the trainer)"


# ------------------------------------------------------------------------------------------------ non-finite checks
def _step_text(trainer) -> str:
    state = trainer.state
    epoch = f", epoch {state.epoch:.2f}" if state.epoch is not None else ""
    return f"step {state.global_step + 1} of {state.max_steps}{epoch}"


def _last_checkpoint_text(trainer) -> str:
    last = last_complete_checkpoint(trainer.args.output_dir, warn=False)
    if last is None:
        return "There is no complete checkpoint yet."
    return f"The last complete checkpoint is {last}: resume from it with resume_from_checkpoint=True."


def check_loss(trainer, loss: torch.Tensor, inputs: dict) -> None:
    """Raise `NonFiniteError` on every process if the training loss of any process is not finite (before backward).

    Records the batch's rows for `check_grad_norm`. One all-gather of a flag per micro-batch."""
    rows = inputs.get(ROW_INDEX) if hasattr(inputs, "get") else None
    rows = rows.detach().cpu() if rows is not None else None
    trainer._nca_step_rows.append(rows)
    bad = (~torch.isfinite(loss.detach())).any().reshape(1).to(torch.int32)
    accelerator = trainer.accelerator
    if accelerator.num_processes > 1:
        bad = accelerator.gather(bad)
    if not bad.any():
        return
    row_losses = getattr(trainer, "_row_losses", None)
    bad_rows = None
    if rows is not None and row_losses is not None and row_losses.shape[0] == rows.shape[0]:
        bad_rows = rows[~torch.isfinite(row_losses.detach().cpu())]
    ref_logps, slots = getattr(trainer, "_ref_logps", (None, None))  # the batch's reference log-probs, `[B, Kmax]`
    ref_bad = None
    if rows is not None and ref_logps is not None and ref_logps.shape[0] == rows.shape[0]:
        ref_bad = rows[~torch.isfinite(ref_logps).logical_or(~slots).all(dim=1).cpu()]
    all_rows = _gathered_rows(trainer, rows)
    bad_rows = _gathered_rows(trainer, bad_rows)
    ref_bad = _gathered_rows(trainer, ref_bad)
    worst = loss.detach().float().item()
    advice = ("The reference model's log-probs are not finite for rows "
              f"{ref_bad}: the reference gives them, not the data or the update. Check its weights for NaN / inf, and "
              "its dtype (float16 overflows: load it in bfloat16 or float32)." if ref_bad else
              "Check these rows (rewards, completions), then lower the learning rate or `beta`, or use a smaller "
              "`max_grad_norm`.")
    raise NonFiniteError(
        f"Non-finite training loss ({worst if not math.isfinite(worst) else 'on another process'}) at "
        f"{_step_text(trainer)}, computed on {_rows_text(trainer, all_rows)}"
        + (f"; the per-prompt loss is not finite for rows {bad_rows}" if bad_rows else "")
        + ". The run stopped before this step's backward pass and optimizer step: the weights in memory are those "
        f"of the previous step and nothing was saved after it. {advice} " + _last_checkpoint_text(trainer)
    )


def check_grad_norm(trainer, grad_norm) -> None:
    """Raise `NonFiniteError` on every process if the gradient norm about to be applied is not finite.

    The norm is global (identical on every process), so every process raises. Skipped under fp16 loss scaling."""
    rows = [r for r in trainer._nca_step_rows]
    trainer._nca_step_rows = []
    if grad_norm is None or _fp16_loss_scaling(trainer):
        return
    value = float(grad_norm.item() if hasattr(grad_norm, "item") else grad_norm)
    if math.isfinite(value):
        return
    known = rows and all(r is not None for r in rows)
    all_rows = _gathered_rows(trainer, torch.cat(rows) if known else None)
    where = ("the optimizer step already ran inside DeepSpeed's backward: the weights in memory are not to be "
             "trusted, but nothing was saved after the previous step"
             if trainer.is_deepspeed_enabled else
             "the run stopped before the optimizer step: the weights in memory are those of the previous step and "
             "nothing was saved after it")
    raise NonFiniteError(
        f"Non-finite gradient norm ({value}) at {_step_text(trainer)}, from a finite loss on "
        f"{_rows_text(trainer, all_rows)}; "
        f"{where}. Lower the learning rate, check these rows, or look for an overflow in the model (bf16/fp16). "
        + _last_checkpoint_text(trainer)
    )


def _fp16_loss_scaling(trainer) -> bool:
    if getattr(trainer.args, "fp16", False):
        return True
    if trainer.is_deepspeed_enabled:
        config = getattr(trainer.accelerator.state.deepspeed_plugin, "deepspeed_config", {}) or {}
        return bool((config.get("fp16") or {}).get("enabled") is True)
    return False


class NonFiniteStopsMixin:
    """A `transformers.Trainer` that stops at a non-finite loss or gradient norm (`check_loss`, `check_grad_norm`):
    ours, and `nca-trl iterate`'s `trl.DPOTrainer` of `loss: dpo` (which trained on to a model of NaN weights)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.model.training and getattr(self, "is_in_train", False):
            if not hasattr(self, "_nca_step_rows"):
                self._nca_step_rows = []
            check_loss(self, out[0] if return_outputs else out, inputs)
        return out

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if not hasattr(self, "_nca_step_rows"):
            self._nca_step_rows = []
        check_grad_norm(self, grad_norm)
        return grad_norm


# ------------------------------------------------------------------------------------------------ output_dir
class RunSafetyMixin(NonFiniteStopsMixin, ResumeAtTheEndMixin):
    """The `transformers.Trainer` overrides of this module; `_RatedCompletionsTrainer` inherits them first."""

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        from ..config import check_trains_a_step

        check_trains_a_step(self.args)
        self._nca_step_rows = []
        with claim_output_dir(self.args):
            resume = resolve_resume(self.args, resume_from_checkpoint)
            self._nca_resumed_from = resume or None  # the checkpoint taken (`True` resolved), for run_info.json
            restore_synced_reference(self, resume)
            return super().train(resume, trial, ignore_keys_for_eval, **kwargs)  # `ResumeAtTheEndMixin.train`

    def _save_checkpoint(self, model, trial):
        save_checkpoint(self, super()._save_checkpoint, model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if _internal_call:  # a checkpoint (marked by `_save_checkpoint`) or the parent's push
            return super().save_model(output_dir, _internal_call=True)
        save_final_model(self, super().save_model, output_dir)
