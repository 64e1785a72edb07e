"""What a run records about where it ran, and the process group of a command run under `accelerate launch`."""

from __future__ import annotations

import contextlib
import os
import platform
from importlib import metadata

__all__ = ["PACKAGES", "broadcast", "distributed_state", "end_process_group", "main_process_first",
           "quiet_deepspeed_cpu_notice", "quiet_replica_notices", "skip_deepspeed_cpu_shm_build", "versions"]

#: The packages a run depends on, in the order `versions()` lists them.
PACKAGES = ("nca-trl", "torch", "transformers", "trl", "datasets", "accelerate", "peft", "deepspeed")


def versions() -> dict:
    """Installed versions of `PACKAGES` (None where absent), and Python's: recorded by every command's output."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def distributed_state(environ=None):
    """accelerate's `PartialState`; processes of a launch without GPUs join one gloo group (`cpu=True`), and a launch
    whose processes do not form one group is refused (each would do all of the work, into the same files)."""
    import torch
    from accelerate import PartialState

    environ = os.environ if environ is None else environ
    launched = int(environ.get("WORLD_SIZE", "1") or 1)
    on_cpu = launched > 1 and not torch.cuda.is_available()
    state = PartialState(cpu=True, backend="gloo") if on_cpu else PartialState()
    if launched != state.num_processes:
        raise RuntimeError(
            f"The launcher started {launched} processes (WORLD_SIZE) but this one is in a group of "
            f"{state.num_processes} ({state.distributed_type}): they would each do all of the work."
        )
    return state


def end_process_group(state) -> None:
    """The end of a launched command: every process here, the collectives' finished work freed, the process group
    destroyed. gloo's worker threads can still hold a finished work's tensors (a DDP reducer's, a gather's): freed at
    the interpreter's exit instead, they aborted a process after its run had finished ("terminate called without an
    active exception", exit status -6, pytorch/pytorch#179291)."""
    import gc

    state.wait_for_everyone()
    gc.collect()
    state.destroy_process_group()


@contextlib.contextmanager
def main_process_first(state):
    """accelerate's `state.main_process_first()` (the main process runs the block first, then the others), but the
    main process joins the others also when its block raises: they then run it and meet the same error, instead of
    waiting for it until the process group times out (transformers' `TrainingArguments.main_process_first` does the
    same with `try` / `finally`)."""
    if not state.is_main_process:
        state.wait_for_everyone()
    try:
        yield
    finally:
        if state.is_main_process:
            state.wait_for_everyone()


def broadcast(state, value):
    """`value` of the main process, on every process of `state` (a picklable object)."""
    if state.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


class _DeepSpeedCPUNotice:
    """Drops DeepSpeed's "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
    it." where DeepSpeed is not used: accelerate imports DeepSpeed whenever it is installed (to unwrap a model before
    saving), so every command printed it, also for users who never use DeepSpeed."""

    def filter(self, record) -> bool:
        if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
            return True  # a DeepSpeed launch: the notice says something
        return "Setting accelerator to CPU" not in record.getMessage()


def quiet_deepspeed_cpu_notice() -> None:
    """Install `_DeepSpeedCPUNotice` on DeepSpeed's logger (before DeepSpeed is imported: its logger keeps filters)."""
    import logging

    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _DeepSpeedCPUNotice) for f in logger.filters):
        logger.addFilter(_DeepSpeedCPUNotice())


def _no_shm_op():
    """Stands for `deepspeed.comm.torch.build_shm_op` (see `skip_deepspeed_cpu_shm_build`): no kernel."""
    return None


def skip_deepspeed_cpu_shm_build(environ=None) -> bool:
    """On the CPU processes of a DeepSpeed launch (`ACCELERATE_USE_DEEPSPEED=true`), DeepSpeed's communication backend
    compiles a C++ shared-memory all-reduce (`deepspeed_shm_comm`) when it starts: about a minute, and a C++ compiler
    required, for a kernel that only DeepSpeed's inference tensor parallelism calls (`inference_all_reduce`); training
    reduces through torch.distributed either way. Not built there: DeepSpeed's backend then runs as where the kernel
    is missing. On a GPU (or without DeepSpeed) nothing changes. A DeepSpeed that fails to import is left to fail
    where the launch imports it, with its own message. Returns whether the build is skipped."""
    import importlib
    import importlib.util

    environ = os.environ if environ is None else environ
    if environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or not importlib.util.find_spec("deepspeed"):
        return False
    try:
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() != "cpu":
            return False
        # by its module's name: the attribute `deepspeed.comm.torch` is torch itself (deepspeed.comm's star import)
        backend = importlib.import_module("deepspeed.comm.torch")
    except Exception:  # noqa: BLE001 - a broken DeepSpeed install: accelerate's import of it says what is wrong
        return False
    backend.build_shm_op = _no_shm_op
    return True


class _ReplicaNotices:
    """Keeps only errors from nca-trl's logger: on the processes of a launch other than each machine's first, which
    say the same notices (the data's rows dropped, the layout chosen) as that one."""

    def filter(self, record) -> bool:
        return record.levelno >= 40  # logging.ERROR


def quiet_replica_notices(environ=None) -> None:
    """Install `_ReplicaNotices` on the `nca_trl` logger of a launched process whose `LOCAL_RANK` is not 0: notices are
    said once per machine, as transformers' `TrainingArguments.should_log` (with `log_on_each_node`) logs."""
    import logging

    environ = os.environ if environ is None else environ
    logger = logging.getLogger("nca_trl")
    try:
        local_rank = int(environ.get("LOCAL_RANK", "0") or 0)  # -1: not distributed, as transformers reads it
    except ValueError:
        local_rank = 0
    if local_rank > 0 and not any(isinstance(f, _ReplicaNotices) for f in logger.filters):
        logger.addFilter(_ReplicaNotices())
