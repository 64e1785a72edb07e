"""Helpers of the tests that start `accelerate launch` (tests/test_distributed.py, tests/test_launch.py).

A launch is 2 CPU processes over gloo; it writes run_info.json (and, through tests/launch_probe.py, probe.json) from
inside the run, which the tests read. Each launch gets its own free port and runs in its own process group, which a
timeout kills (a hang is a failure). The `launch_env` fixture (tests/conftest.py) gives the environment.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VICUNA = REPO / "data" / "vicuna_rated.jsonl"
ACCEL = REPO / "recipes" / "accelerate_configs"
PROBE = Path(__file__).resolve().parent / "launch_probe.py"
LAUNCH_TIMEOUT = 300  # seconds; first DeepSpeed launch compiles a small C++ op (~35 s)


def common_args(model, recipe: str = "nca.yaml", dataset=VICUNA, config=None, evaluate: bool = False) -> list[str]:
    """Tiny, fast, and with a learning rate large enough that the step losses move apart from step 2 on.

    `recipe` names a file of recipes/tiny; `config` (a path, relative to the launch's cwd or absolute) replaces it.
    Without `evaluate` nothing is evaluated (the recipe's start and end evaluations cost more than the 4 training steps,
    and do not change the step losses); with it, 2 training and 2 held-out prompts (one per process) are evaluated at
    the start and the end, and the run reports its learning table, as the recipe does on all its prompts (the
    two-machine ZeRO-3 run of tests/test_distributed.py evaluates; tests/test_cli.py evaluates in one process).
    """
    return [
        "--config", str(config if config is not None else REPO / "recipes" / "tiny" / recipe),
        "--model_name_or_path", str(model),
        "--dataset_name", str(dataset),
        "--bf16", "false",
        "--max_length", "64",
        "--max_train_samples", "8",
        "--max_steps", "4",
        "--per_device_train_batch_size", "1",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--logging_steps", "1",
        "--warmup_steps", "0",
        "--lr_scheduler_type", "constant",
        "--beta", "0.1",
        "--learning_rate", "5e-3",
        "--report_to", "none",
        "--seed", "42",
        "--report_train_prompts", "2" if evaluate else "0",
        "--max_eval_samples", "2",
    ]


# Plain DDP on CPU processes: the shipped ddp.yaml (MULTI_GPU) with `use_cpu: true` plus these training arguments;
# accelerate then reports MULTI_CPU (see the comment in recipes/accelerate_configs/ddp.yaml)
DDP_CPU_ARGS = ("--use_cpu", "true", "--ddp_backend", "gloo")


def cpu_config(path: Path, name: str = "ddp") -> Path:
    """Write recipes/accelerate_configs/<name>.yaml with `use_cpu: true` to `path`."""
    accel = yaml.safe_load((ACCEL / f"{name}.yaml").read_text())
    accel["use_cpu"] = True
    path.write_text(yaml.safe_dump(accel))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_cmd(config, port, extra_launch=(), target=(str(PROBE),)) -> list[str]:
    """`accelerate launch` of `target` (the probe script by default; `("-m", "nca_trl.cli", "train")` for the
    installed package)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(port), "--mixed_precision", "no", *extra_launch, *target,
    ]


# glibc malloc settings of the launched processes (unless `env` sets them): keep freed memory for reuse instead of
# returning it to the system after every large tensor (the LM head's [tokens, vocab] tiles), which otherwise costs a
# page fault per page at every allocation (a third of a training step on CPU). Speed only: nothing computed changes.
MALLOC_ENV = {
    "MALLOC_TOP_PAD_": str(512 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(2**30),
    "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20),
}


def start(cmd: list[str], log: Path, env: dict, cwd=REPO) -> subprocess.Popen:
    """Start `cmd` in its own process group (so a timeout can kill all it started), output to `log`."""
    with open(log, "w") as f:
        return subprocess.Popen(
            cmd, cwd=cwd, env={**MALLOC_ENV, **env}, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )


def wait(procs, logs, timeout=LAUNCH_TIMEOUT, check=True):
    """Wait for all processes; on timeout kill their process groups (only the ones started here) and fail; with
    `check`, fail on a non-zero exit too."""
    deadline = time.time() + timeout
    try:
        for proc in procs:
            proc.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        pytest.fail(f"launch timed out after {timeout}s (hang?)\n" + "\n".join(tail(log) for log in logs))
    for proc, log in zip(procs, logs):
        if check and proc.returncode != 0:
            pytest.fail(f"launch failed with exit code {proc.returncode}\n{tail(log)}")


def tail(log: Path, n: int = 60) -> str:
    lines = log.read_text(errors="replace").splitlines()
    keep = [line for line in lines if "Warning" not in line and "warnings.warn" not in line]
    return f"--- {log} ---\n" + "\n".join(keep[-n:])


def launch(env, config, train_args, out: Path, extra_launch=(), target=(str(PROBE),), cwd=REPO) -> dict:
    """`accelerate launch` 2 processes of `target` (the probe by default) with `train_args`; returns what the run
    wrote (see `read_run`)."""
    out.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    cmd = launch_cmd(config, free_port(), ("--num_processes", "2", *extra_launch), target)
    wait([start(cmd + [*train_args, "--output_dir", str(out)], log, env, cwd)], [log])
    return read_run(out)


def read_run(out: Path) -> dict:
    """run_info.json, merged with the probe's probe.json when the probe ran."""
    info = json.loads((out / "run_info.json").read_text())
    probe = out / "probe.json"
    return {**info, **json.loads(probe.read_text())} if probe.exists() else info


def losses(info: dict) -> list[float]:
    return [s["loss"] for s in info["step_losses"]]


def assert_world_of_two(info: dict, distributed_type: str, zero_stage=None):
    """What run_info.json says (the user-facing part): one group of 2 processes of the right type, 4 steps."""
    assert info["world_size"] == 2 and info["num_processes"] == 2
    assert info["distributed_type"] == distributed_type and info["zero_stage"] == zero_stage
    assert info["backend"] == "gloo"
    assert info["global_step"] == 4


def assert_two_processes(info: dict, distributed_type: str, zero_stage=None):
    """`assert_world_of_two` plus the probe's view: two distinct processes with ranks 0 and 1."""
    assert_world_of_two(info, distributed_type, zero_stage)
    assert sorted(p["process_index"] for p in info["processes"]) == [0, 1]
    assert len({p["pid"] for p in info["processes"]}) == 2
