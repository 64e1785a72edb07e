"""The environment step: versions as installed, the device, the measured matmul peak, and what DeepSpeed's JIT build
of its CPU Adam needs (a C++ compiler, ninja, Python.h), which the offload stage also asks."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from .common import GB
from .measure import measure_peak


def cxx_compiler() -> str | None:
    """The C++ compiler torch's extension builder would use (DeepSpeed JIT-builds CPU Adam with it), if any."""
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def python_headers() -> bool:
    """Python.h of this interpreter, which an extension build includes (a missing python3-dev fails it)."""
    import sysconfig

    return (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()


def has_ninja() -> bool:
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
        return True
    except Exception:  # noqa: BLE001 - any failure means no ninja
        return False


def environment(work: Path, smoke: bool) -> dict:
    """Device, versions, the measured matmul peak, the compiler for DeepSpeed's CPU Adam; the probe (before the
    wheels) and nvidia-smi, which gpu_scale.sh wrote to WORK."""
    from importlib import metadata

    import torch

    env = {"smoke": smoke, "python": sys.version.split()[0]}
    for name in ("torch", "transformers", "trl", "datasets", "accelerate", "deepspeed", "peft", "pydantic",
                 "huggingface_hub", "tokenizers", "safetensors", "flash_attn"):
        try:
            env[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            env[name] = None
    env["cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, gpu_memory_gb=props.total_memory / GB,
                   multiprocessors=props.multi_processor_count)
    else:
        env.update(device="cpu", cpu_count=os.cpu_count())
    peak = measure_peak(torch.cuda.is_available())
    env.update(matmul_peak_tflops=peak / 1e12, matmul_dtype="bf16" if torch.cuda.is_available() else "fp32",
               cxx_compiler=cxx_compiler(), ninja=has_ninja(), python_headers=python_headers())
    for name, file in (("probe", "probe.json"), ("nvidia_smi", "nvidia_smi.txt")):
        path = work / file
        if path.exists():
            env[name] = json.loads(path.read_text()) if file.endswith(".json") else path.read_text().strip()
    print("[gpu_scale] " + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("probe", "nvidia_smi")),
          flush=True)
    return env
