"""What every stage shares: the sizes of the full and the smoke run, the repository's paths, the stage's error, and
child processes run under the stage's time limit (killed with everything they started)."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

SCRIPTS = Path(__file__).resolve().parents[1]
ENTRY = SCRIPTS / "gpu_scale.py"  # the entry point: a child process that builds a model runs it
REPO = SCRIPTS.parent
ACCEL = REPO / "recipes" / "accelerate_configs"
MODEL_CONFIGS = REPO / "recipes" / "model_configs"
VICUNA = REPO / "data" / "vicuna_rated.jsonl"
SORT_PROMPTS = REPO / "data" / "sort_prompts.jsonl"
GB = 1e9


class Sizes(NamedTuple):
    """Every shape and count of the run in one place: `FULL` on the GPU, `SMOKE` for the CPU dry run."""

    width: str  # "7b": recipes/model_configs' Mistral-7B / Mixtral-8x7B; "tiny": nca_trl.tiny.SIZES["tiny"]
    mistral_layers: int
    mixtral_layers: int
    max_length: int
    completions: int  # K
    batch: int  # prompts per step (Mistral stages)
    mixtral_batch: int
    warmup: int  # untimed steps before the timed ones
    steps: int  # timed steps: zero3
    offload_steps: int
    mixtral_steps: int
    fsdp_steps: int  # all counted from step 1: step 1 is the comparison
    prompt_fraction: float  # the training prompts fill this much of max_length
    gen_prompts: int
    gen_prompt_tokens: int
    gen_completions: int
    gen_new_tokens: int
    gen_repeats: int
    iterate_prompts: int
    iterate_heldout: int
    iterate_completions: int
    layouts: tuple[str, ...]  # scripts/benchmark.py arguments


FULL = Sizes(
    width="7b", mistral_layers=8, mixtral_layers=2, max_length=1024, completions=4, batch=4, mixtral_batch=1,
    warmup=2, steps=4, offload_steps=2, mixtral_steps=3, fsdp_steps=2, prompt_fraction=0.7,
    gen_prompts=8, gen_prompt_tokens=1500, gen_completions=8, gen_new_tokens=128, gen_repeats=2,
    iterate_prompts=16, iterate_heldout=8, iterate_completions=4,
    layouts=("--size", "7b-2l", "--layers", "4", "--bf16", "--steps", "20", "--warmup", "2", "--workloads",
             "long,vicuna"),
)
SMOKE = Sizes(
    width="tiny", mistral_layers=2, mixtral_layers=2, max_length=128, completions=4, batch=2, mixtral_batch=1,
    warmup=1, steps=1, offload_steps=1, mixtral_steps=1, fsdp_steps=2, prompt_fraction=0.6,
    gen_prompts=2, gen_prompt_tokens=100, gen_completions=2, gen_new_tokens=4, gen_repeats=1,
    iterate_prompts=8, iterate_heldout=4, iterate_completions=2,
    layouts=("--size", "tiny", "--layers", "1", "--steps", "2", "--warmup", "0", "--batch", "2", "--max-length", "160",
             "--context-chars", "300", "--workloads", "long"),
)
EXPERTS, EXPERTS_PER_TOKEN, ROUTER_AUX_LOSS_COEF = 8, 2, 0.02  # Mixtral-8x7B's routing, at every size
#: step-1 agreement of FSDP2 with the plain run: relative, per logged value (bf16 keeps 8 significant bits; a sum of
#: hundreds of bf16 log-probs and a norm over every gradient drift a few of its 2^-8 steps)
FSDP_TOLERANCE = {"loss": 1e-3, "logps/chosen": 1e-2, "logps/rejected": 1e-2, "grad_norm": 5e-2}
FAMILIES_LIMIT = 120  # seconds for scripts/gpu_families.py in layouts_median (every family of tests/model_families.py)


class StageError(RuntimeError):
    """A stage's result is wrong or missing: its message is the one-line `error` of the stage."""


def model_request(sizes: Sizes, arch: str) -> dict:
    """What a built model must match to be reused: its architecture, width and layers."""
    layers = {"mistral": sizes.mistral_layers, "mixtral": sizes.mixtral_layers, "digits": 2}[arch]
    return {"arch": arch, "width": "tiny" if arch == "digits" else sizes.width, "layers": layers}


# ------------------------------------------------------------------------------------------------ child processes
_children: list[subprocess.Popen] = []


def kill_children(signum, frame):
    """SIGTERM from the stage's `timeout`: kill the training launched in its own session (which `timeout` cannot
    reach), then fail the stage so that what it measured is written."""
    for proc in list(_children):
        _kill(proc)
    raise StageError(f"stopped by the stage's time limit (signal {signum}): raise its limit in gpu_scale.sh or "
                     "shrink the stage")


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: the launcher, torchrun and the workers
    except ProcessLookupError:
        pass
    proc.wait()


def run_child(cmd: list[str], timeout: float, what: str, env: dict | None = None) -> float:
    """Run `cmd` (output into this stage's log) in its own session, killed with everything it started after
    `timeout` seconds; returns its wall seconds. A non-zero exit or the timeout is a StageError."""
    print("$ " + shlex.join(cmd), flush=True)
    if timeout < 5:
        raise StageError(f"{what}: no time left in the stage's budget: raise its limit in gpu_scale.sh")
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    _children.append(proc)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise StageError(f"{what} timed out after {timeout:.0f} s: raise the stage's limit in gpu_scale.sh") from None
    finally:
        _children.remove(proc)
    if code != 0:
        raise StageError(f"{what} exited with code {code}: its traceback is above it in gpu_scale.log")
    return time.time() - start


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
