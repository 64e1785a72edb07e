"""Run safety (issue 9): no silent wrong result, no lost run.

- **Non-finite loss or gradient.** `check_loss` runs on every training micro-batch before its backward pass (under
  DeepSpeed the optimizer step happens inside the backward, so this is the check that covers DeepSpeed) and
  `check_grad_norm` on the gradient norm the Trainer computes before each optimizer step. Either raises
  `NonFiniteError` on every process, naming the step and the dataset rows of the batch (the `row_index` column,
  `with_row_index`): nothing is logged as 0.0, the optimizer never applies the update, and nothing is saved after the
  last good checkpoint. With fp16 loss scaling an infinite gradient norm is the scaler's business (it skips the step
  and lowers the scale), so only the loss is checked there.
- **output_dir writable.** `check_output_dir_writable` creates and deletes a probe file (a real write, which also
  refuses root on a read-only mount), before the model is loaded.
- **output_dir lock.** `claim_output_dir` holds `fcntl.flock` on `output_dir/.nca-trl.lock` (body: pid, host, start,
  command) for the whole run, on the global main process only. A second run refuses naming the holder. The kernel
  drops the lock of a dead process: a lock file left behind with a body is a stale lock, taken over with a warning.
- **Complete checkpoints.** `save_checkpoint` writes `nca_trl_complete.json` into `checkpoint-N` last, after every
  process wrote its part, and rotates old checkpoints only then. `resolve_resume` makes `resume_from_checkpoint=True`
  pick the last complete checkpoint (skipping incomplete ones with a warning) and refuses an explicit incomplete one.
- **Final model.** `save_final_model` writes into `output_dir/.nca-trl-saving`, then moves the files into place and
  writes the marker last: a failure half-way leaves the previous model whole.

All writers are the processes with `args.should_save` (the main process), as in `transformers.Trainer`; the others
only join the barriers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import time

import numpy as np
import torch
from datasets import Dataset
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .data.collator import DataCollatorForRatedCompletions

logger = logging.getLogger("nca_trl")

__all__ = [
    "COMPLETE_MARKER",
    "LOCK_NAME",
    "NonFiniteError",
    "OutputDirError",
    "OutputDirLockedError",
    "RowIndexedCollator",
    "RunSafetyMixin",
    "check_output_dir_writable",
    "claim_output_dir",
    "is_complete",
    "last_complete_checkpoint",
    "with_row_index",
]

LOCK_NAME = ".nca-trl.lock"
COMPLETE_MARKER = "nca_trl_complete.json"
STAGING_DIR = ".nca-trl-saving"
ROW_INDEX = "row_index"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


class NonFiniteError(RuntimeError):
    """A training loss or gradient norm that is NaN or infinite."""


class OutputDirError(OSError):
    """`output_dir` cannot be written."""


class OutputDirLockedError(RuntimeError):
    """Another run holds `output_dir`."""


# ------------------------------------------------------------------------------------------------ row indices
def with_row_index(dataset):
    """`dataset` with a `row_index` column: each row's position in the dataset given to the trainer (kept through
    preparation, which may drop rows, so that errors name the user's rows). A dataset that has one keeps it."""
    columns = getattr(dataset, "column_names", None)
    if dataset is None or (columns is not None and ROW_INDEX in columns):
        return dataset
    if isinstance(dataset, Dataset):  # map-style: an added in-memory column, no copy of the data
        from datasets.fingerprint import Hasher

        fingerprint = Hasher.hash((dataset._fingerprint, "nca-trl", ROW_INDEX))
        return dataset.add_column(ROW_INDEX, np.arange(len(dataset)), new_fingerprint=fingerprint)
    return dataset.map(_index_row, with_indices=True)  # a stream: counted as it is read


def _index_row(_, index):
    return {ROW_INDEX: index}


class RowIndexedCollator(DataCollatorForRatedCompletions):
    """`DataCollatorForRatedCompletions` that passes the examples' `row_index` through as a `[B]` tensor."""

    def torch_call(self, examples):
        output = super().torch_call(examples)
        if ROW_INDEX not in output and all(ROW_INDEX in e for e in examples):
            output[ROW_INDEX] = torch.tensor([int(e[ROW_INDEX]) for e in examples])
        return output


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


def _rows_text(rows: list[int] | None, name: str = "train") -> str:
    if rows is None:
        return (f"rows unknown (the collator does not pass `{ROW_INDEX}` through: use the trainer's own "
                "DataCollatorForRatedCompletions)")
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
    all_rows = _gathered_rows(trainer, rows)
    bad_rows = _gathered_rows(trainer, bad_rows)
    worst = loss.detach().float().item()
    raise NonFiniteError(
        f"Non-finite training loss ({worst if not math.isfinite(worst) else 'on another process'}) at "
        f"{_step_text(trainer)}, computed on {_rows_text(all_rows)}"
        + (f"; the per-prompt loss is not finite for rows {bad_rows}" if bad_rows else "")
        + ". The run stopped before this step's backward pass and optimizer step: the weights in memory are those "
        "of the previous step and nothing was saved after it. Check these rows (rewards, completions), then lower "
        "the learning rate or `beta`, or use a smaller `max_grad_norm`. " + _last_checkpoint_text(trainer)
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
        f"Non-finite gradient norm ({value}) at {_step_text(trainer)}, from a finite loss on {_rows_text(all_rows)}; "
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


# ------------------------------------------------------------------------------------------------ output_dir
def check_output_dir_writable(output_dir: str) -> None:
    """Create `output_dir` if needed and write, then delete, a probe file in it; `OutputDirError` if that fails."""
    try:
        os.makedirs(output_dir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".nca-trl-write-probe-", dir=output_dir)
        try:
            os.write(fd, b"nca-trl")
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        raise OutputDirError(
            e.errno,
            f"output_dir {output_dir!r} is not writable ({type(e).__name__}: {e.strerror or e}). Nothing was loaded. "
            "Choose another `output_dir` (`--output_dir PATH`), or make this one writable: create it, fix its "
            "permissions, free disk space, or remount it read-write.",
        ) from e


def _is_main(args) -> bool:
    return getattr(args, "process_index", 0) == 0


def _agree(args, fn):
    """Run `fn` on the global main process only; if it raises an `OutputDirError`/`OutputDirLockedError` there, raise
    on every process (the others would otherwise wait for it at the next collective)."""
    result, error = None, None
    if _is_main(args):
        try:
            result = fn()
        except (OutputDirError, OutputDirLockedError) as e:
            error = e
    state = getattr(args, "distributed_state", None)
    if state is not None and state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = [(type(error).__name__, str(error)) if error is not None else None]
        broadcast_object_list(message, from_process=0)
        if message[0] is not None and error is None:
            kind = OutputDirError if message[0][0] == OutputDirError.__name__ else OutputDirLockedError
            refused = f"The main process refused to start: {message[0][1]}"
            raise kind(refused)
    if error is not None:
        raise error
    return result


def check_output_dir(args) -> None:
    """`check_output_dir_writable(args.output_dir)` on the main process, refused on every process."""
    if args.output_dir:
        _agree(args, lambda: check_output_dir_writable(args.output_dir))


class _Lock:
    def __init__(self, fd: int, path: str):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # while still holding it: a waiting process sees a removed file and retries
        os.close(self.fd)
        self.fd = None


def _read_body(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 65536, 0)
        return json.loads(raw) if raw.strip() else None
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "started": None, "command": "(unreadable lock file)"}


def _holder_text(body: dict | None) -> str:
    if not body:
        return "a process that has just taken it"
    started = body.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, (int, float)) else "?"
    return f"pid {body.get('pid')} on host {body.get('host')} (started {when}: {body.get('command')})"


def acquire_lock(output_dir: str) -> _Lock | None:
    """Take `output_dir/.nca-trl.lock` (non-blocking). `OutputDirLockedError` if another process holds it; None (and a
    warning) on a filesystem without locks."""
    import fcntl

    check_output_dir_writable(output_dir)
    path = os.path.join(output_dir, LOCK_NAME)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            body = _read_body(fd)
            os.close(fd)
            raise OutputDirLockedError(
                f"output_dir {output_dir!r} is in use by another nca-trl run: {_holder_text(body)}. Wait for it to "
                f"finish or stop it, or choose another `output_dir`. (The lock is {path}; it is released when that "
                "process ends, however it ends.)"
            ) from None
        except OSError as e:
            os.close(fd)
            logger.warning(
                "output_dir %s: this filesystem does not support file locks (%s); a second run writing into the same "
                "output_dir will not be stopped.", output_dir, e,
            )
            return None
        try:  # the holder may have released (and removed) the file between our open and our flock
            current = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(fd)
    previous = _read_body(fd)
    if previous:
        if previous.get("host") == socket.gethostname():
            pid = previous.get("pid")
            why = (" (that pid now belongs to another process)" if isinstance(pid, int) and _pid_alive(pid) else
                   " (no longer running)") + ": that run ended without releasing it (killed or crashed)"
        else:
            why = (": its lock is free, so that run ended without releasing it; if it is still running on that host, "
                   "this filesystem does not share locks between hosts (an NFS mount with `nolock`?): stop one run")
        logger.warning(
            "output_dir %s: taking over the stale lock of %s%s. Its checkpoints count only if complete (%s).",
            output_dir, _holder_text(previous), why, COMPLETE_MARKER,
        )
    body = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(body).encode(), 0)
    os.fsync(fd)
    return _Lock(fd, path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_claimed: set[str] = set()  # output_dirs this process has claimed (the CLI's claim covers the trainer's)


@contextlib.contextmanager
def claim_output_dir(args):
    """Check `args.output_dir` is writable and hold its lock (main process) for the block; every process refuses
    together. Reentrant within a process: `nca-trl train` claims it for the whole run, `trainer.train` again."""
    key = os.path.realpath(args.output_dir) if args.output_dir else None
    if key is None or key in _claimed:
        yield
        return
    lock = _agree(args, lambda: acquire_lock(args.output_dir))
    _claimed.add(key)
    try:
        yield
    finally:
        _claimed.discard(key)
        if lock is not None:
            lock.release()


# ------------------------------------------------------------------------------------------------ checkpoints
def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


def _write_marker(folder: str, **info) -> None:
    """fsync the files of `folder`, then write the marker atomically (temporary file renamed), fsynced."""
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
    tmp = os.path.join(folder, f".{COMPLETE_MARKER}.tmp")
    with open(tmp, "w") as f:
        json.dump({"complete": True, "time": time.time(), **info}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, COMPLETE_MARKER))


def _checkpoints(output_dir: str) -> list[str]:
    """Checkpoint folders of `output_dir`, newest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found, reverse=True)
            if os.path.isdir(os.path.join(output_dir, name))]


def last_complete_checkpoint(output_dir: str, warn: bool = True) -> str | None:
    """The newest complete checkpoint of `output_dir` (None if none); warns naming the newer incomplete ones."""
    skipped = []
    for folder in _checkpoints(output_dir):
        if is_complete(folder):
            if skipped and warn:
                logger.warning(
                    "Skipping incomplete checkpoint(s) %s (no %s: the run that wrote them stopped while writing "
                    "them); resuming from %s, the last complete one.", ", ".join(skipped), COMPLETE_MARKER, folder,
                )
            return folder
        skipped.append(folder)
    return None


def resolve_resume(args, resume_from_checkpoint):
    """`resume_from_checkpoint` for `Trainer.train`: True becomes the last complete checkpoint; an explicit path to an
    incomplete checkpoint is an error."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return resume_from_checkpoint
    if resume_from_checkpoint is True:
        last = last_complete_checkpoint(args.output_dir)
        if last is None:
            found = _checkpoints(args.output_dir)
            raise ValueError(
                f"No complete checkpoint in output_dir {args.output_dir!r}"
                + (f" (incomplete: {', '.join(found)}; a checkpoint counts once it has {COMPLETE_MARKER}, written "
                   "last; one written by an nca-trl that did not mark checkpoints can be passed by path once you "
                   "have created that file in it)" if found else "")
                + ". Start without resume_from_checkpoint, or resume from another output_dir."
            )
        return last
    path = str(resume_from_checkpoint)
    if os.path.isdir(path) and _CHECKPOINT.match(os.path.basename(os.path.normpath(path))) and not is_complete(path):
        last = last_complete_checkpoint(os.path.dirname(os.path.normpath(path)), warn=False)
        raise ValueError(
            f"Checkpoint {path!r} is incomplete (it has no {COMPLETE_MARKER}, written last): the run that wrote it "
            "stopped while writing it. Resume from "
            + (f"{last!r}, the last complete checkpoint" if last else "another checkpoint")
            + ", or with resume_from_checkpoint=True. (A checkpoint written by nca-trl before this marker existed: "
            f"if you know it is complete, create {os.path.join(path, COMPLETE_MARKER)} to use it.)"
        )
    return path


def save_checkpoint(trainer, parent_save, model, trial) -> None:
    """The parent's `_save_checkpoint`, then, once every process wrote its part, the marker, then the rotation."""
    args = trainer.args
    run_dir = trainer._get_output_dir(trial=trial)
    folder = os.path.join(run_dir, f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}")
    if args.should_save and os.path.isdir(folder):  # left by an earlier run: written again from scratch
        logger.warning("Removing %s (from an earlier run) before writing it again.", folder)
        shutil.rmtree(folder)
    trainer.accelerator.wait_for_everyone()
    limit = args.save_total_limit
    args.save_total_limit = None  # rotate after the marker: a complete checkpoint is never deleted for a partial one
    try:
        parent_save(model, trial)
    finally:
        args.save_total_limit = limit
    trainer.accelerator.wait_for_everyone()
    if args.should_save:
        _write_marker(folder, step=trainer.state.global_step)
        rotate_checkpoints(
            output_dir=run_dir, save_total_limit=limit, best_model_checkpoint=trainer.state.best_model_checkpoint,
            use_mtime=True,
        )


def save_final_model(trainer, parent_save_model, output_dir: str | None) -> None:
    """The parent's `save_model` into `output_dir/.nca-trl-saving`, then the files moved into place, then the marker.

    Barriers only where the save is collective anyway (DeepSpeed, FSDP): under DDP `save_model` may be called on the
    main process alone, as with `transformers.Trainer`."""
    args = trainer.args
    output_dir = output_dir if output_dir is not None else args.output_dir
    staging = os.path.join(output_dir, STAGING_DIR)
    collective = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
    if args.should_save:
        shutil.rmtree(staging, ignore_errors=True)  # a previous failed save
    if collective:
        trainer.accelerator.wait_for_everyone()
    parent_save_model(staging, _internal_call=True)
    if collective:
        trainer.accelerator.wait_for_everyone()
    if args.should_save and os.path.isdir(staging):
        for root, _, files in os.walk(staging):
            for name in files:
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, COMPLETE_MARKER))
        for name in os.listdir(staging):
            target = os.path.join(output_dir, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            os.replace(os.path.join(staging, name), target)
        os.rmdir(staging)
        _write_marker(output_dir, step=trainer.state.global_step, final_model=True)
    if collective:
        trainer.accelerator.wait_for_everyone()
    if args.push_to_hub:
        trainer.push_to_hub(commit_message="Model save", revision=args.hub_revision)


# ------------------------------------------------------------------------------------------------ the trainer side
class RunSafetyMixin:
    """The `transformers.Trainer` overrides of this module; `_RatedCompletionsTrainer` inherits them first."""

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        self._nca_step_rows = []
        with claim_output_dir(self.args):
            resume = resolve_resume(self.args, resume_from_checkpoint)
            return super().train(resume, trial, ignore_keys_for_eval, **kwargs)

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

    def _save_checkpoint(self, model, trial):
        save_checkpoint(self, super()._save_checkpoint, model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        if _internal_call:  # a checkpoint (marked by `_save_checkpoint`) or the parent's push
            return super().save_model(output_dir, _internal_call=True)
        save_final_model(self, super().save_model, output_dir)
