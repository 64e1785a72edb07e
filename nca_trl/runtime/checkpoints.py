"""Checkpoints and the final model count only once complete.

`save_checkpoint` writes `nca_trl_complete.json` into `checkpoint-N` last, after every process wrote its part, and
rotates old checkpoints only then. `resolve_resume` makes `resume_from_checkpoint=True` pick the last complete
checkpoint (skipping incomplete ones with a warning) and refuses an explicit incomplete one. `save_final_model` writes
into `output_dir/.nca-trl-saving`, then moves the files into place and writes the marker last: a failure half-way
leaves the previous model whole. The files of the model it replaces that the new save did not write (a LoRA run's
adapter under a full model, shards under one file) are removed, since a loader would read them too. Writers are the
processes with `args.should_save`, as in `transformers.Trainer`. A resume from a checkpoint at the run's last step
trains no further step (`resumed_at_the_end`), and a resumed run's `train_loss` is its mean over the whole run
(`whole_run_train_loss`, from the sum of the losses each marker records).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from .files import fsync_tree, json_default, write_atomic


logger = logging.getLogger("nca_trl")

__all__ = ["COMPLETE_MARKER", "LOSS_SUM", "LOSS_SUM_BEFORE", "RUN_SETTINGS", "ResumeAtTheEndMixin", "STAGING_DIR",
           "SYNCED_REFERENCE", "checkpoint_loss_sum", "checkpoint_settings", "is_complete", "last_complete_checkpoint",
           "recorded_settings", "resolve_resume", "restore_synced_reference", "resumed_at_the_end", "save_checkpoint",
           "save_final_model", "whole_run_train_loss"]

COMPLETE_MARKER = "nca_trl_complete.json"
STAGING_DIR = ".nca-trl-saving"
_CHECKPOINT = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")


def is_complete(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, COMPLETE_MARKER))


_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin")


def written_by_another_trainer(folder: str) -> bool:
    """Whether `folder`, without our marker, is a complete checkpoint of another `transformers.Trainer` (such as
    `trl.DPOTrainer`): its `trainer_state.json`, which `Trainer._save_checkpoint` writes last, parses and names the
    folder's step, the model weights are there, and its log history has none of the metrics only nca-trl logs. A
    checkpoint nca-trl stopped writing has no `trainer_state.json` (or a torn one), or nca-trl's metrics in it."""
    match = _CHECKPOINT.match(os.path.basename(os.path.normpath(folder)))
    try:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            state = json.load(f)
        step, history = state.get("global_step"), state.get("log_history") or []
    except (OSError, ValueError, AttributeError):
        return False
    if any(isinstance(entry, dict) and "rewards/ranking_accuracy" in entry for entry in history):
        return False  # logged by NCATrainer / InfoNCATrainer only
    has_weights = any(os.path.isfile(os.path.join(folder, name)) for name in _WEIGHTS) or any(
        name.startswith("global_step") for name in os.listdir(folder)  # DeepSpeed's own checkpoint folder
    )
    return has_weights and (match is None or step == int(match.group(1)))


def _foreign_checkpoint_message(path: str) -> str:
    return (
        f"Checkpoint {path!r} looks complete (its trainer_state.json, written last, and its model weights are there) "
        f"but has no {COMPLETE_MARKER}: it was most likely written by another trainer, such as trl.DPOTrainer (an "
        "output_dir shared with an earlier DPO run, e.g. the alignment-handbook's get_last_checkpoint()), not by "
        "nca-trl (whose checkpoints get that file right after trainer_state.json). "
        "Resuming from it would continue that run's optimizer, schedule and step count under a different loss. To "
        "start this run afresh, use another output_dir (or pass resume_from_checkpoint=None and remove that run's "
        f"checkpoints); to continue from it on purpose, create {os.path.join(path, COMPLETE_MARKER)} (e.g. with "
        "'{\"complete\": true}') and resume again."
    )


def _write_marker(folder: str, **info) -> None:
    """fsync the files of `folder`, then write the marker atomically (temporary file renamed), fsynced."""
    fsync_tree(folder)
    write_atomic(os.path.join(folder, COMPLETE_MARKER),
                 json.dumps({"complete": True, "time": time.time(), **info}, default=json_default))


#: The trainer attribute that holds the settings of the `nca-trl train` run (`run_settings`), recorded in each
#: checkpoint's marker
RUN_SETTINGS = "_nca_run_settings"


def _settings_record(trainer) -> dict:
    settings = getattr(trainer, RUN_SETTINGS, None)
    return {"settings": settings} if settings is not None else {}


def checkpoint_settings(output_dir: str) -> dict[str, dict | None]:
    """The complete checkpoints of `output_dir`, newest first: folder -> the settings its marker records (None where it
    records none: written from Python, or by an older nca-trl)."""
    found = {}
    for folder in _checkpoints(output_dir):
        if is_complete(folder):
            found[folder] = recorded_settings(folder)
    return found


def recorded_settings(folder: str) -> dict | None:
    """The settings the marker of checkpoint `folder` records; None where it records none."""
    settings = _marker(folder).get("settings")
    return settings if isinstance(settings, dict) else None


def _marker(folder: str) -> dict:
    """What the marker of `folder` records (`_write_marker`); {} where there is none or it does not parse."""
    try:
        with open(os.path.join(folder, COMPLETE_MARKER)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


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


def resolve_resume(args, resume_from_checkpoint, warn: bool = True):
    """`resume_from_checkpoint` for `Trainer.train`: True becomes the last complete checkpoint (`warn`: naming the
    newer incomplete ones skipped); an explicit path to an incomplete checkpoint is an error."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return resume_from_checkpoint
    if resume_from_checkpoint is True:
        last = last_complete_checkpoint(args.output_dir, warn=warn)
        if last is None:
            found = _checkpoints(args.output_dir)
            foreign = [folder for folder in found if written_by_another_trainer(folder)]
            if foreign:
                raise ValueError(f"No checkpoint of nca-trl in output_dir {args.output_dir!r}. "
                                 + _foreign_checkpoint_message(foreign[0]))
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
        if written_by_another_trainer(path):
            raise ValueError(_foreign_checkpoint_message(path))
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
    except Exception as error:  # a full disk raised torch's "unexpected pos 16984896 vs 16984788", naming nothing
        _say_what_a_failed_save_left(error, folder, run_dir)
        raise
    finally:
        args.save_total_limit = limit
    trainer.accelerator.wait_for_everyone()
    if args.should_save:
        _save_synced_reference(trainer, folder)
        # `nca-trl train` gives its run's settings (`RUN_SETTINGS`): a later fresh run into this output_dir compares
        _write_marker(folder, step=trainer.state.global_step, **_settings_record(trainer), **_loss_record(trainer))
        rotate_checkpoints(
            output_dir=run_dir, save_total_limit=limit, best_model_checkpoint=trainer.state.best_model_checkpoint,
            use_mtime=True,
        )


def _say_what_a_failed_save_left(error: Exception, folder: str, run_dir: str) -> None:
    """A note on `error` (printed with its traceback): the checkpoint is incomplete, which one a resume takes, and the
    disk's free space."""
    if not hasattr(error, "add_note"):  # Python 3.10
        return
    last = last_complete_checkpoint(run_dir, warn=False)
    error.add_note(
        f"nca-trl: writing {folder} failed; it has no {COMPLETE_MARKER}, so no resume takes it. "
        + (f"`--resume_from_checkpoint true` resumes from {last}, the last complete checkpoint. " if last else
           "There is no complete checkpoint yet. ") + _free_space(run_dir))


def _free_space(folder: str) -> str:
    try:
        free = shutil.disk_usage(folder).free / 2**20
    except OSError:
        return ""
    return f"{free:.0f} MiB are free on that disk" + (" (full?)." if free < 1024 else ".")


# What a model or adapter save writes, which a loader reads when present: weights and their index, adapters, configs,
# tokenizer and processor files, and the folders of further adapters (PEFT saves adapter "ref" in `ref/`)
_MODEL_FILE = re.compile(
    r"^(?:(?:model|pytorch_model|adapter_model)(?:-\d+-of-\d+)?\.(?:safetensors|bin)(?:\.index\.json)?|"
    r"(?:adapter_|generation_|preprocessor_|processor_|tokenizer_)?config\.json|tokenizer\.json|tokenizer\.model|"
    r"special_tokens_map\.json|added_tokens\.json|chat_template\.(?:jinja|json)|vocab\.(?:json|txt)|merges\.txt|"
    r"training_args\.bin)$"
)


def _previous_model_files(output_dir: str) -> tuple[list[str], bool]:
    """The files of the final model `output_dir` holds, and whether nca-trl wrote them: as its marker lists them, or,
    for a model saved without that list (an older nca-trl, another program, the base model a pipeline keeps there),
    the names of `_MODEL_FILE` there."""
    listed = _marker(output_dir).get("files")
    if isinstance(listed, list) and all(isinstance(name, str) and os.sep not in name for name in listed):
        return [name for name in listed if name not in (COMPLETE_MARKER, STAGING_DIR)], True
    if not os.path.isdir(output_dir):
        return [], False
    return sorted(name for name in os.listdir(output_dir) if _MODEL_FILE.match(name)), False


#: The reference model of a `sync_ref_model` run, in each of its checkpoints: TRL keeps the synced reference in memory
#: only, and a resume against the initial one would train on other losses from the resumed step on
SYNCED_REFERENCE = "ref_model.safetensors"


def _whole_synced_reference(trainer):
    """The reference model `sync_ref_model` updates, unwrapped, where each process holds it whole; None where there is
    none or it is sharded (ZeRO-3, FSDP)."""
    if not trainer.args.sync_ref_model or trainer.ref_model is None or trainer.is_fsdp_enabled:
        return None
    plugin = trainer.accelerator.state.deepspeed_plugin if trainer.is_deepspeed_enabled else None
    return None if plugin is not None and plugin.zero_stage == 3 else trainer.accelerator.unwrap_model(trainer.ref_model)


def _save_synced_reference(trainer, folder: str) -> None:
    reference = _whole_synced_reference(trainer)
    if reference is not None:
        from safetensors.torch import save_model

        save_model(reference, os.path.join(folder, SYNCED_REFERENCE))


def restore_synced_reference(trainer, checkpoint: str | None) -> None:
    """Resuming a `sync_ref_model` run from `checkpoint`: its reference model as the checkpoint saved it, on every
    process; a `ValueError` if the checkpoint has none (saved sharded, or by another trainer)."""
    if not checkpoint or not trainer.args.sync_ref_model:
        return
    path = os.path.join(checkpoint, SYNCED_REFERENCE)
    reference = _whole_synced_reference(trainer)
    if reference is None or not os.path.isfile(path):
        raise ValueError(
            f"Checkpoint {checkpoint!r} holds no copy of the synced reference model ({SYNCED_REFERENCE}). With "
            "`sync_ref_model` the reference moves toward the policy during training, and TRL keeps it in memory only: "
            "resumed against the initial reference, the losses from this step on would not be the run's. nca-trl "
            "saves the reference in each checkpoint where every process holds it whole (not sharded by ZeRO-3 or "
            "FSDP). Start the run again without `resume_from_checkpoint`, or train without `sync_ref_model`."
        )
    from safetensors.torch import load_model

    load_model(reference, path, strict=True, device=str(next(reference.parameters()).device))
    logger.info("Resuming the synced reference model from %s.", path)


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
    try:
        parent_save_model(staging, _internal_call=True)
    except Exception as error:
        if hasattr(error, "add_note"):
            error.add_note(f"nca-trl: writing the final model into {staging} failed; the files of {output_dir} are "
                           "as they were. " + _free_space(output_dir))
        raise
    if collective:
        trainer.accelerator.wait_for_everyone()
    if args.should_save and os.path.isdir(staging):
        fsync_tree(staging)
        names = sorted(os.listdir(staging))
        previous, ours = _previous_model_files(output_dir)
        stale = [name for name in previous if name not in names]
        if stale and not ours:  # not written by an nca-trl save (a pipeline's base model, another program's save):
            # never deleted. Beside an adapter, a base model is the usual layout: kept in place; what a loader would
            # read on top of or instead of the new save (an old adapter over new full weights, an old shard index)
            # is moved aside
            adapter = "adapter_config.json" in names
            conflicting = [name for name in stale if not adapter or name.startswith("adapter_")]
            if conflicting:
                kept = os.path.join(output_dir, f"replaced-{time.strftime('%Y%m%d-%H%M%S')}")
                os.makedirs(kept, exist_ok=True)
                for name in conflicting:
                    os.replace(os.path.join(output_dir, name), os.path.join(kept, name))
                logger.warning("%s held model files this save did not write (%s): moved to %s, so that a loader "
                               "reads the new model alone.", output_dir, ", ".join(conflicting), kept)
            stale = []
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(output_dir, COMPLETE_MARKER))
        for name in names + stale:  # the previous model's other files, which a loader would read too, go
            target = os.path.join(output_dir, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            if name in names:
                os.replace(os.path.join(staging, name), target)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(target)
        if stale:
            logger.info("Removed the replaced model's files %s from %s.", ", ".join(stale), output_dir)
        os.rmdir(staging)
        _write_marker(output_dir, step=trainer.state.global_step, final_model=True, files=names)
    if collective:
        trainer.accelerator.wait_for_everyone()
    if args.push_to_hub:
        push_model(trainer)


def push_model(trainer) -> None:
    """The push `transformers.Trainer.save_model` makes with `push_to_hub`, for a caller that deferred it."""
    trainer.push_to_hub(commit_message="Model save", revision=trainer.args.hub_revision)


# ------------------------------------------------------------------------------------------------ the trainer side
#: What each marker records of the run's training losses: their sum up to its step, as transformers sums them for
#: `train_loss` (the logged sums and the steps since the last log); a resumed run's `train_loss` starts from it
LOSS_SUM = "train_loss_sum"
#: The trainer attribute that holds that sum at the start of this `train()` call (0.0 from scratch, the checkpoint's
#: on resume); None, or missing (a trainer without `RunSafetyMixin.train`), records none
LOSS_SUM_BEFORE = "_nca_loss_sum_before"


def _loss_record(trainer) -> dict:
    before = getattr(trainer, LOSS_SUM_BEFORE, None)
    logged, pending = getattr(trainer, "_total_loss_scalar", None), getattr(trainer, "_tr_loss", None)
    if before is None or logged is None or pending is None:
        return {}
    return {LOSS_SUM: before + logged + float(pending.item())}


def checkpoint_loss_sum(checkpoint: str | None) -> float | None:
    """The sum of the training losses up to `checkpoint`, as its marker records it; 0.0 for no checkpoint, None where
    the marker records none (written by an older nca-trl)."""
    if not checkpoint:  # None, or False (no resume)
        return 0.0
    value = _marker(checkpoint).get(LOSS_SUM)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def resumed_at_the_end(trainer, max_steps: int, checkpoint: str | None) -> bool:
    """Whether the state `Trainer._init_training_state` just restored from `checkpoint` is at (or past) `max_steps`,
    the run's length as transformers computed it (`Trainer.set_initial_training_values`: `max_steps`, or the epochs
    times the dataloader's update steps). transformers would skip `global_step` batches and train the next one anyway
    (step 3 of 2): the caller then trains no step, so that the weights stay the checkpoint's."""
    step = trainer.state.global_step
    if checkpoint is None or step < max_steps:
        return False
    if step > max_steps:
        logger.warning(
            "Checkpoint %s is at step %d, past this run's %d steps (max_steps or num_train_epochs lowered since): "
            "nothing is trained, the model stays the checkpoint's, of step %d.", checkpoint, step, max_steps, step,
        )
    else:
        logger.info("Checkpoint %s is at step %d, the run's last: nothing left to train.", checkpoint, step)
    return True


class ResumeAtTheEndMixin:
    """A resumed run trains no step past its last (`_init_training_state`, `resumed_at_the_end`) and reports the whole
    run's `train_loss` (`train`, `_whole_run_train_loss`): our trainers' (through `RunSafetyMixin`) and iterate's DPO
    baseline's. `resume_from_checkpoint` reaches `train` as a folder or None (`resolve_resume` resolves `True`)."""

    def train(self, resume_from_checkpoint=None, trial=None, ignore_keys_for_eval=None, **kwargs):
        from transformers.trainer_utils import TrainOutput

        self._nca_resumed_step = None  # the step `_init_training_state` resumed at
        setattr(self, LOSS_SUM_BEFORE, checkpoint_loss_sum(resume_from_checkpoint))  # what each marker adds to
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval, **kwargs)
        if self._nca_resumed_step is None:
            return output
        loss = self._whole_run_train_loss(output.training_loss)
        logged = next((entry for entry in reversed(self.state.log_history) if "train_loss" in entry), None)
        if logged is not None:  # the metrics logged at the end (our trainers' `log` gave them the same already)
            logged["train_loss"] = loss
        return TrainOutput(output.global_step, loss, {**output.metrics, "train_loss": loss})

    def _whole_run_train_loss(self, call_loss: float) -> float:
        """transformers' `train_loss` (`call_loss`) covers this `train()` call's steps only: a resumed run's over all
        its steps (`whole_run_train_loss`); our trainers' `log` gives it to the metrics logged at the end of training
        too."""
        if getattr(self, "_nca_resumed_step", None) is None:
            return call_loss
        return whole_run_train_loss(getattr(self, LOSS_SUM_BEFORE), self.state.log_history, self._nca_resumed_step,
                                    self.state.global_step, call_loss)

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):
        trained = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                               resume_from_checkpoint, trial)
        if resume_from_checkpoint is not None:
            self._nca_resumed_step = self.state.global_step
        if resumed_at_the_end(self, max_steps, resume_from_checkpoint):
            # every epoch counts as trained: the loop runs no step, the end of the run (metrics, callbacks) as usual
            return num_train_epochs, 0
        return trained


def whole_run_train_loss(loss_sum_before: float | None, log_history: list[dict], resumed_step: int, global_step: int,
                         call_loss: float) -> float:
    """The mean training loss of a resumed run over all its steps, where transformers' `train_loss` is the mean over
    the steps of its own `train()` call (`call_loss`; 0.0 when it trained none). From the checkpoint's sum of the
    losses before the resume (`loss_sum_before`, `LOSS_SUM`) where its marker records one; otherwise from the losses
    logged before the resume (`log_history`, each entry the mean over the steps since the one before), where steps
    after the last logged one count for neither part; `call_loss` where neither is known."""
    new = global_step - resumed_step
    if new < 0 or global_step <= 0:
        return call_loss
    if loss_sum_before is not None:
        return (loss_sum_before + call_loss * new) / global_step
    total, counted, last = 0.0, 0, 0
    for entry in log_history:
        step = entry.get("step")
        if "loss" in entry and isinstance(step, int) and last < step <= resumed_step:
            total, counted, last = total + entry["loss"] * (step - last), counted + step - last, step
    return call_loss if counted == 0 else (total + call_loss * new) / (counted + new)
