"""Launch checks and the distributed summary of a run: settings that would otherwise fail silently fail loudly."""

from __future__ import annotations

import os

from .errors import SettingsError

__all__ = ["check_launch_environment", "check_world_size", "distributed_summary"]


def check_launch_environment(training_args, environ=os.environ) -> None:
    """Fail loudly on launch settings that otherwise degrade silently (before anything is loaded): a
    `SettingsError`, one line on the command line (each launched process says it)."""
    deepspeed = str(environ.get("ACCELERATE_USE_DEEPSPEED", "false")).lower() == "true"
    if deepspeed and training_args.use_cpu:
        raise SettingsError(
            "`use_cpu: true` switches DeepSpeed off (the run would silently fall back to plain data parallel). Under "
            "a DeepSpeed accelerate config on CPU pass `--use_cpu false --ddp_backend gloo --bf16 false` instead."
        )
    fsdp = str(environ.get("ACCELERATE_USE_FSDP", "false")).lower() == "true"
    if fsdp and training_args.use_cpu:
        raise SettingsError(
            "FSDP needs GPUs: accelerate sets FSDP up only on GPU-like devices, and with `use_cpu: true` the run would "
            "silently fall back to plain data parallel (MULTI_CPU). On CPU processes use ddp.yaml with `use_cpu: true` "
            "or a DeepSpeed config."
        )
    precision = environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if deepspeed and precision in ("bf16", "fp16") and not getattr(training_args, precision):
        raise SettingsError(
            f"The accelerate config asks for mixed_precision={precision} but training has `{precision}` off (set "
            f"false, or left automatic: off on a CPU). DeepSpeed needs both to agree: on CPU add `--mixed_precision "
            f"no` to `accelerate launch`; on GPUs set `{precision}: true` in the recipe."
        )


def check_world_size(state, environ=os.environ) -> None:
    """A launcher that started N processes which do not form one group (accelerate's MULTI_GPU config without GPUs
    and without `use_cpu`) would train N independent copies: refuse. With `--ddp_backend` set there the N processes
    do form a process group, but accelerate's distributed type stays NO (nothing synchronised): refuse that too. An
    FSDP config on a process that runs on the CPU (which trained without FSDP) is refused first. A `SettingsError`:
    one line from each process."""
    fsdp = str(environ.get("ACCELERATE_USE_FSDP", "false")).lower() == "true"
    if fsdp and getattr(getattr(state, "device", None), "type", None) == "cpu":  # one process trained plain, silently
        raise SettingsError(
            "FSDP needs GPUs: this process runs on the CPU (no GPU found), where accelerate does not set FSDP up and "
            "the run would train without it. On CPU processes use ddp.yaml with `use_cpu: true` or a DeepSpeed config."
        )
    launched = int(environ.get("WORLD_SIZE", "1") or 1)
    distributed_type = getattr(state.distributed_type, "value", str(state.distributed_type))
    if launched != state.num_processes or (launched > 1 and distributed_type == "NO"):
        raise SettingsError(
            f"The launcher started {launched} processes (WORLD_SIZE) but this one trains in a group of "
            f"{state.num_processes} ({state.distributed_type}): they would be {launched} independent "
            "trainings. On CPU use an accelerate config with `distributed_type: MULTI_GPU` and `use_cpu: true` plus "
            "`--use_cpu true --ddp_backend gloo` (or a DeepSpeed config with `--ddp_backend gloo --bf16 false`)."
        )


def distributed_summary(trainer) -> dict:
    """World size, distributed type, ZeRO stage, backend, device and precision of a built trainer."""
    import torch.distributed as dist

    acc = trainer.accelerator
    dtype = acc.distributed_type
    zero_stage = None
    if trainer.is_deepspeed_enabled:
        zero_stage = acc.state.deepspeed_plugin.zero_stage
    return {
        "world_size": dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1,
        "num_processes": acc.num_processes,
        "distributed_type": getattr(dtype, "value", str(dtype)),
        "zero_stage": zero_stage,
        "backend": getattr(acc.state, "backend", None),
        "device": str(acc.device),
        "mixed_precision": acc.mixed_precision,
        # torchrun (behind `accelerate launch`) exports the number of machines as GROUP_WORLD_SIZE
        "num_machines": int(os.environ.get("GROUP_WORLD_SIZE", "1") or 1),
    }
