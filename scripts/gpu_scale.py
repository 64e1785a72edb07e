#!/usr/bin/env python
"""The stages of the GPU scale run, one process each; scripts/gpu_scale.sh runs them in order, each under its own
time limit, and merges each stage's RESULT.json into OUT_DIR/gpu_scale.json (scripts/scale_results.py).

    python scripts/gpu_scale.py environment --work WORK --result ENV.json [--smoke]
    python scripts/gpu_scale.py STAGE --work WORK --result RESULT.json [--results OUT_DIR/gpu_scale.json]
                                [--budget SECONDS] [--smoke]

Stages (`--smoke`: the same code at tiny sizes, on a CPU too: `SMOKE` below):

- `zero3`: `accelerate launch` of deepspeed_zero3.yaml, one process, of `nca-trl train` (scripts/measured_train.py) on a
  random Mistral-7B-width model (hidden 4096, MLP 14336, 32 / 8 heads, 32k vocabulary) with 8 layers, bf16, K = 4,
  4 prompts per step, max_length 1024 (prompts fill 70% of it, completions are cut at it), activation
  checkpointing, the plain layout: step time, tokens/s, MFU against the measured bf16 peak, peak GPU memory
  allocated and reserved, host RSS; `plan_gb` of scripts/plan_memory.py for the same recipe on this GPU beside
  `peak_gb` (the peak PyTorch reserved), and `plan_over_peak`.
- `zero3_offload`: the same shape under deepspeed_zero3_offload.yaml (weights and optimizer states in CPU memory):
  starts, steps, saves; the saved model reloads (no missing key, weights changed, a finite forward). CPU Adam is
  DeepSpeed's fused op, JIT-built with the C++ compiler; without a compiler, ninja or Python.h (or with
  `CPU_ADAM=torch`) torch's AdamW on the CPU (`zero_force_ds_cpu_optimizer: false`), which the result records.
- `mixtral_zero3`: a 2-layer Mixtral-8x7B-width model (8 experts, top-2, router aux loss 0.02) under ZeRO-3 with
  nca-trl's leaf marking: steps, the aux loss logged at every step, the MoE blocks marked as ZeRO-3 leaves, memory
  against the plan.
- `fsdp2`: fsdp2.yaml, one process, at the `zero3` shape: trains, saves a model that reloads; its step-1 loss,
  log-probs and gradient norm equal a run without FSDP (plain single process) within bf16 rounding. (`--smoke` on a
  CPU: nca-trl refuses FSDP without GPUs, so the stage runs its comparison and reload on a plain run there.)
- `generate_long`: `python -m nca_trl.generation.benchmark` on the `zero3` model with 8 prompts of about 1,500
  tokens, K = 8, 128 new tokens: prefill-once sampling against `generate(num_return_sequences=K)`, tokens/s.
- `iterate`: one `nca-trl iterate` round of the tiny digits-sorting recipe on this device, scored by a tiny reward
  model and the `sorted_digits` reward function: it finishes and writes its round folder.
- `layouts_median`: first scripts/gpu_families.py (where it exists: the layout the automatic rule takes per model
  family, and its bf16 agreement with the plain layout, with the fused kernel), then scripts/benchmark.py --layouts
  --systems a at Mistral-7B width (4 layers), bf16, max_length 2048, 20 timed steps, both workloads: DPOTrainer,
  plain and shared-prompt, with median-step ratios beside the mean ones.

Each RESULT.json holds `ok` (and `error`, one line naming the fix, when false), `shape`, `settings`, `numbers`
and `command`; what a failing stage measured before it failed stays in it. Exit status 0 when ok, 1 otherwise.
A stage cleans up what it wrote except the shared models in WORK (built by the first stage that needs them).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
ACCEL = REPO / "recipes" / "accelerate_configs"
MODEL_CONFIGS = REPO / "recipes" / "model_configs"
VICUNA = REPO / "data" / "vicuna_rated.jsonl"
SORT_PROMPTS = REPO / "data" / "sort_prompts.jsonl"
GB = 1e9
sys.path[:0] = [str(SCRIPTS), str(REPO)]  # benchmark.py, plan_memory.py; the checkout's nca_trl


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
FAMILIES_LIMIT = 90  # seconds for scripts/gpu_families.py inside layouts_median (tiny models)


class StageError(RuntimeError):
    """A stage's result is wrong or missing: its message is the one-line `error` of the stage."""


# ------------------------------------------------------------------------------------------------ child processes
_children: list[subprocess.Popen] = []


def _kill_children(signum, frame):
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


# ------------------------------------------------------------------------------------------------ the run
class Run:
    """One stage's context: sizes, device, folders, the time left, and the result it fills as it goes."""

    def __init__(self, work: Path, smoke: bool, budget: float, results: Path | None):
        import torch

        self.work, self.smoke, self.sizes = work, smoke, SMOKE if smoke else FULL
        self.gpu = torch.cuda.is_available()
        if not (self.gpu or smoke):
            raise StageError("no CUDA GPU here: run on the GPU machine, or pass --smoke for the CPU dry run")
        self.deadline = time.time() + budget
        self.results = results
        self.result: dict = {"shape": {}, "settings": {}, "numbers": {}}
        (work / "runs").mkdir(parents=True, exist_ok=True)

    def left(self, reserve: float = 0.0) -> float:
        """Seconds left of the stage's budget, less `reserve` for the work after the child process."""
        return self.deadline - time.time() - reserve

    def peak_flops(self) -> float:
        """The matmul peak the environment step measured (bf16 on a GPU, fp32 on a CPU), else measured now."""
        if self.results and self.results.exists():
            env = json.loads(self.results.read_text()).get("environment", {})
            if env.get("matmul_peak_tflops"):
                return env["matmul_peak_tflops"] * 1e12
        return _measure_peak(self.gpu)

    # -------------------------------------------------------------------------------------------- models and data
    def model(self, arch: str) -> tuple[Path, dict]:
        """(path, shape) of the stage's random model ("mistral", "mixtral" or "digits"), built once per WORK by a child
        process (so that this one holds no GPU memory while a training runs)."""
        path = self.work / f"model-{arch}"
        wanted = model_request(self.sizes, arch)
        shape_file = path / "shape.json"
        if not (shape_file.exists() and json.loads(shape_file.read_text())["request"] == wanted):
            if arch == "digits":  # tiny, on the CPU: no GPU memory to hold
                build(self.work, arch, self.smoke)
            else:
                cmd = [sys.executable, str(Path(__file__)), "build", "--work", str(self.work), "--arch", arch]
                run_child(cmd + (["--smoke"] if self.smoke else []), self.left(30), f"building the {arch} model")
        return path, json.loads(shape_file.read_text())

    def train_data(self, model: Path) -> tuple[Path, dict]:
        """Rated rows (K = 4, the bundled Vicuna answers) whose prompts (a reference document, then the question) fill
        `prompt_fraction` of max_length, so that most sequences reach max_length: the planner's assumption."""
        path = self.work / f"train-{self.sizes.max_length}.jsonl"
        stats_file = path.with_suffix(".json")
        if not stats_file.exists():
            target = int(self.sizes.prompt_fraction * self.sizes.max_length)
            rows, stats = long_prompt_rows(model, target, self.sizes.max_length - 32, completions=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in rows))
            lengths = [min(p + c, self.sizes.max_length) for p, cs in stats.pop("lengths") for c in cs]
            stats.update(mean_sequence_tokens=statistics.mean(lengths),
                         sequences_at_max_length=sum(n == self.sizes.max_length for n in lengths) / len(lengths))
            stats_file.write_text(json.dumps(stats))
        return path, json.loads(stats_file.read_text())

    # -------------------------------------------------------------------------------------------- training
    def recipe(self, name: str, model: Path, data: Path, accelerate_config: Path, *, batch: int, steps: int,
               learning_rate: float, gpu_mem_gb: float = 80.0, **extra) -> Path:
        """The stage's `nca-trl train` recipe (also what scripts/plan_memory.py plans)."""
        import yaml

        values = {
            "loss": "nca", "model_name_or_path": str(model), "dtype": "bfloat16" if self.gpu else "float32",
            "dataset_name": str(data), "dataset_format": "rated", "max_length": self.sizes.max_length,
            "beta": 0.01, "alpha": 1.0, "learning_rate": learning_rate, "lr_scheduler_type": "constant",
            "warmup_steps": 0, "max_steps": steps, "per_device_train_batch_size": batch,
            "gradient_accumulation_steps": 1, "bf16": self.gpu, "activation_checkpointing": True,
            "activation_checkpointing_kwargs": {"use_reentrant": False}, "shared_prompt": False,
            "logging_steps": 1, "eval_strategy": "no", "save_strategy": "no", "report_to": "none",
            "report_train_prompts": 0, "seed": 42, "output_dir": str(self.work / "runs" / name),
            "accelerate_config": str(accelerate_config), "hardware": f"1 node x 1 GPUs x {gpu_mem_gb:.1f} GB",
            "model_config_file": str(model / "config.json"), **extra,
        }
        path = self.work / "runs" / f"{name}.yaml"
        path.write_text(yaml.safe_dump(values, sort_keys=False))
        return path

    def train(self, name: str, recipe: Path, launch_config: Path | None, reserve: float = 20.0,
              save: bool = True) -> dict:
        """Run the recipe under `accelerate launch --config_file launch_config --num_processes 1` (or, without a
        config, as one plain process) through scripts/measured_train.py; returns its measurements, its run_info.json
        and the command. Without `save`, the final save of `nca-trl train` is skipped (seconds to a minute of
        gathering and writing the model, which the stages that check a save do)."""
        out = self.work / "runs" / name
        shutil.rmtree(out, ignore_errors=True)
        measure = self.work / "runs" / f"{name}.measure.json"
        measure.unlink(missing_ok=True)
        cmd = [sys.executable]
        if launch_config is not None:
            cmd += ["-m", "accelerate.commands.launch", "--config_file", str(launch_config), "--num_processes", "1",
                    "--main_process_port", str(free_port())]
            cmd += [] if self.gpu else ["--mixed_precision", "no"]
        cmd += [str(SCRIPTS / "measured_train.py"), "--measure_out", str(measure), "--config", str(recipe),
                "--output_dir", str(out)] + ([] if save else ["--no_final_save"])
        deepspeed = launch_config is not None and "deepspeed" in Path(launch_config).read_text()
        if not self.gpu:
            cmd += ["--ddp_backend", "gloo"] if deepspeed else ["--use_cpu", "true"]
        seconds = run_child(cmd, self.left(reserve), f"the {name} training")
        if not measure.exists():
            raise StageError(f"the {name} training wrote no {measure.name}: see gpu_scale.log")
        return {"measure": json.loads(measure.read_text()), "run_info": json.loads((out / "run_info.json").read_text()),
                "output_dir": out, "command": shlex.join(cmd), "launch_seconds": seconds}

    def plan(self, recipe: Path, completions: int) -> dict:
        from plan_memory import plan

        return plan(str(recipe), gpus=1, nodes=1, completions=completions)


# ------------------------------------------------------------------------------------------------ helpers
def model_request(sizes: Sizes, arch: str) -> dict:
    """What a built model must match to be reused: its architecture, width and layers."""
    layers = {"mistral": sizes.mistral_layers, "mixtral": sizes.mixtral_layers, "digits": 2}[arch]
    return {"arch": arch, "width": "tiny" if arch == "digits" else sizes.width, "layers": layers}


def _measure_peak(gpu: bool) -> float:
    import torch
    from benchmark import matmul_peak_flops

    if gpu:
        return matmul_peak_flops(device="cuda", dtype=torch.bfloat16, repeats=10)
    return matmul_peak_flops(device="cpu", dtype=torch.float32, repeats=3)


def long_prompt_rows(model: Path, prompt_tokens: int, max_prompt_tokens: int, completions: bool = False,
                     answers: int = 10):
    """The bundled rated rows with a reference document before each question (benchmark.long_context_rows: the next
    `answers` rows' answers, cut to a number of characters), its size set so that the prompts average about
    `prompt_tokens` tokens of `model`'s tokenizer; rows whose prompt exceeds `max_prompt_tokens` are left out. Returns
    (rows, stats); with `completions`, stats["lengths"] holds (prompt tokens, [completion tokens + EOS]) per row."""
    from benchmark import long_context_rows, rated_rows
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    base = rated_rows(VICUNA)

    def measured(chars):
        rows = long_context_rows(base, chars, answers)
        return rows, [len(tokenizer(r["prompt"])["input_ids"]) for r in rows]

    chars = 4 * prompt_tokens
    rows, lengths = measured(chars)
    for _ in range(2):  # rescale the document to the target mean
        chars = max(100, int(chars * prompt_tokens / statistics.mean(lengths)))
        rows, lengths = measured(chars)
    keep = [i for i, n in enumerate(lengths) if n <= max_prompt_tokens]
    if not keep:
        raise StageError(f"no prompt of {max_prompt_tokens} tokens or fewer could be built: lower prompt_fraction")
    rows = [rows[i] for i in keep]
    stats = {"rows": len(rows), "context_chars": chars, "mean_prompt_tokens": statistics.mean(lengths[i] for i in keep)}
    if completions:
        stats["lengths"] = [(lengths[i], [len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1
                                          for c in rows[j]["completions"]]) for j, i in enumerate(keep)]
    return rows, stats


def throughput(measure: dict, warmup: int, peak: float) -> dict:
    """Timed steps (after `warmup`), tokens/s over the plain layout's real tokens, and MFU: the model's matmul FLOPs
    (policy forward + backward + reference forward = 4 forwards, without the activation-checkpointing recompute)
    over the measured peak."""
    from benchmark import forward_flops

    times, work = measure["step_seconds"][warmup:], measure["work"][warmup:]
    if not times or len(work) < len(times):
        raise StageError(f"{len(measure['step_seconds'])} steps measured, {warmup} of them warm-up: no timed step "
                         "with its batch; raise the stage's steps")
    work = work[: len(times)]
    config = SimpleNamespace(**measure["config"])
    flops = sum(4 * forward_flops(config, w["tokens"], w["scored"], w["pairs"]) for w in work)
    total = sum(times)
    return {
        "timed_steps": len(times),
        "step_seconds": [round(t, 4) for t in times],
        "step_seconds_mean": total / len(times),
        "step_seconds_median": statistics.median(times),
        "tokens_per_step": sum(w["plain_tokens"] for w in work) / len(work),
        "computed_tokens_per_step": sum(w["computed_tokens"] for w in work) / len(work),  # padding included
        "tokens_per_second": sum(w["plain_tokens"] for w in work) / total,
        "model_tflops_per_step": flops / len(work) / 1e12,
        "peak_tflops": peak / 1e12,
        "mfu": flops / total / peak,
    }


def memory(measure: dict, plan: dict | None) -> dict:
    """Measured peaks beside the planner's per-GPU total. `peak_gb` is the peak PyTorch reserved (what the caching
    allocator held, fragmentation included; not the CUDA context, which the planner's overhead counts)."""
    keys = ("peak_gpu_allocated_gb", "peak_gpu_reserved_gb", "gpu_used_gb", "gpu_total_gb", "peak_host_rss_gb")
    out = {k: measure.get(k) for k in keys}
    out["peak_gb"] = measure.get("peak_gpu_reserved_gb")
    if plan is not None:
        out.update(
            plan_gb=plan["total_gpu"] / GB, plan_cpu_gb=plan["cpu_per_node"] / GB, plan_strategy=plan["strategy"],
            plan_parts_gb={k: plan[k] / GB for k in ("model_states", "reference", "activations", "overhead")},
            plan_gpu_mem_gb=plan["gpu_mem_gb"],
        )
        out["plan_over_peak"] = out["plan_gb"] / out["peak_gb"] if out["peak_gb"] else None
    return out


def logged(measure: dict, key: str) -> list[float]:
    """`key` at every logged training step (log_history entries with a `loss`)."""
    return [e[key] for e in measure["log_history"] if "loss" in e and key in e]


def finite_losses(measure: dict, steps: int) -> list[float]:
    losses = logged(measure, "loss")
    if len(losses) != steps or not all(math.isfinite(x) for x in losses):
        raise StageError(f"expected {steps} finite step losses, got {losses}: see the training's log in gpu_scale.log")
    return losses


def check_distributed(measure: dict, distributed_type: str, zero_stage: int | None) -> None:
    """The run trained as asked: one process of `distributed_type` at `zero_stage`, in the plain layout."""
    got = (measure["distributed_type"], measure["zero_stage"], measure["num_processes"])
    if got != (distributed_type, zero_stage, 1):
        raise StageError(f"the run trained as {got} (distributed type, ZeRO stage, processes), not "
                         f"({distributed_type}, {zero_stage}, 1): check the accelerate config and the launch")
    if measure["shared_prompt"]:
        raise StageError("the collator packed the prompts although the recipe sets `shared_prompt: false`")


def reload_check(saved: Path, initial: Path, gpu: bool) -> dict:
    """The saved model loads with `from_pretrained` (no missing or unexpected key), its weights are finite and some
    differ from the initial model's, and a forward on the device gives finite logits."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    start = time.time()
    model, info = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16 if gpu else torch.float32,
                                                       output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        raise StageError(f"the saved model in {saved} reloads with {bad}: the save did not gather every weight")
    files = {}
    for shard in initial.glob("*.safetensors"):
        with safe_open(shard, "pt") as f:
            files.update({name: shard for name in f.keys()})
    changed = nonfinite = 0
    state = model.state_dict()
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            nonfinite += 1
        with safe_open(files[name], "pt") as f:
            changed += not torch.equal(f.get_tensor(name).to(tensor.dtype), tensor)
    if nonfinite or not changed:
        raise StageError(f"the saved model has {nonfinite} non-finite tensors and {changed} changed ones of "
                         f"{len(state)}: expected finite weights that training moved")
    device = "cuda" if gpu else "cpu"
    with torch.no_grad():
        logits = model.to(device)(torch.arange(100, 116, device=device)[None]).logits
    if not torch.isfinite(logits).all():
        raise StageError("the reloaded model's forward gives non-finite logits")
    del model
    return {"reloaded": True, "tensors": len(state), "changed_tensors": changed, "reload_seconds": time.time() - start}


def _compiler() -> str | None:
    """The C++ compiler torch's extension builder would use (DeepSpeed JIT-builds CPU Adam with it), if any."""
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _python_headers() -> bool:
    """Python.h of this interpreter, which an extension build includes (a missing python3-dev fails it)."""
    import sysconfig

    return (Path(sysconfig.get_paths()["include"]) / "Python.h").exists()


def _has_ninja() -> bool:
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
        return True
    except Exception:  # noqa: BLE001 - any failure means no ninja
        return False


def torch_adam_offload_config(work: Path) -> Path:
    """An accelerate config for ZeRO-3 offload with torch's AdamW on the CPU instead of DeepSpeed's fused CPU Adam:
    the same offload as deepspeed_zero3_offload.yaml, from a DeepSpeed config file with
    `zero_force_ds_cpu_optimizer: false` (accelerate then keeps the trainer's optimizer and DeepSpeed accepts it)."""
    import yaml

    base = yaml.safe_load((ACCEL / "deepspeed_zero3_offload.yaml").read_text())
    ds = base["deepspeed_config"]
    config = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
        "zero_optimization": {
            "stage": ds["zero_stage"],
            "offload_optimizer": {"device": ds["offload_optimizer_device"], "pin_memory": True},
            "offload_param": {"device": ds["offload_param_device"], "pin_memory": True},
            "stage3_gather_16bit_weights_on_model_save": ds["zero3_save_16bit_model"],
        },
        "zero_force_ds_cpu_optimizer": False,
    }
    ds_file = work / "runs" / "ds_zero3_offload_torch_adam.json"
    ds_file.write_text(json.dumps(config, indent=1))
    accel = {k: v for k, v in base.items() if k not in ("deepspeed_config", "mixed_precision", "downcast_bf16")}
    accel["deepspeed_config"] = {"deepspeed_config_file": str(ds_file), "zero3_init_flag": ds["zero3_init_flag"],
                                 "deepspeed_multinode_launcher": ds["deepspeed_multinode_launcher"]}
    path = work / "runs" / "deepspeed_zero3_offload_torch_adam.yaml"
    path.write_text(yaml.safe_dump(accel))
    return path


def _settings(run: Run, accelerate_config: Path | str, batch: int, steps: int, warmup: int, lr: float) -> dict:
    return {
        "accelerate_config": str(accelerate_config), "num_processes": 1, "precision": "bf16" if run.gpu else "fp32",
        "completions": run.sizes.completions, "batch_prompts": batch, "max_length": run.sizes.max_length,
        "activation_checkpointing": True, "layout": "plain (shared_prompt: false)", "steps": steps,
        "warmup_steps": warmup, "learning_rate": lr, "device": "cuda" if run.gpu else "cpu",
    }


# ------------------------------------------------------------------------------------------------ stages
def stage_zero3(run: Run) -> None:
    s, res = run.sizes, run.result
    model, shape = run.model("mistral")
    data, stats = run.train_data(model)
    config = ACCEL / "deepspeed_zero3.yaml"
    steps = s.warmup + s.steps
    res["shape"].update(model=shape, data=stats)
    res["settings"].update(_settings(run, config, s.batch, steps, s.warmup, 1e-6), final_save=False)
    recipe = run.recipe("zero3", model, data, config, batch=s.batch, steps=steps, learning_rate=1e-6)
    r = run.train("zero3", recipe, config, save=False)
    res["command"] = r["command"]
    m = r["measure"]
    check_distributed(m, "DEEPSPEED", 3)
    res["settings"]["optimizer"] = m["optimizer"]
    res["numbers"].update(losses=finite_losses(m, steps), **throughput(m, s.warmup, run.peak_flops()))
    res["numbers"].update(memory(m, run.plan(_hardware_recipe(recipe, m), s.completions)))
    shutil.rmtree(r["output_dir"], ignore_errors=True)


def _hardware_recipe(recipe: Path, measure: dict) -> Path:
    """The recipe with `hardware` set to this GPU's memory (as measured), for the planner."""
    import yaml

    values = yaml.safe_load(recipe.read_text())
    if measure.get("gpu_total_gb"):
        values["hardware"] = f"1 node x 1 GPUs x {measure['gpu_total_gb']:.1f} GB"
    recipe.write_text(yaml.safe_dump(values, sort_keys=False))
    return recipe


def stage_zero3_offload(run: Run) -> None:
    s, res = run.sizes, run.result
    model, shape = run.model("mistral")
    data, stats = run.train_data(model)
    config = ACCEL / "deepspeed_zero3_offload.yaml"
    choice = os.environ.get("CPU_ADAM", "auto")
    compiler, ninja, headers = _compiler(), _has_ninja(), _python_headers()
    fused = choice == "fused" or (choice == "auto" and compiler is not None and ninja and headers)
    launch = config if fused else torch_adam_offload_config(run.work)
    steps = s.warmup + s.offload_steps
    res["shape"].update(model=shape, data=stats)
    res["settings"].update(_settings(run, config, s.batch, steps, s.warmup, 1e-4), launch_config=str(launch),
                           cpu_adam=("DeepSpeedCPUAdam (fused, JIT-built)" if fused else
                                     "torch AdamW on the CPU (zero_force_ds_cpu_optimizer: false)"),
                           cpu_adam_choice=choice, compiler=compiler, ninja=ninja, python_headers=headers)
    # learning rate 1e-4: large enough that the saved bf16 weights differ from the initial ones
    recipe = run.recipe("zero3_offload", model, data, config, batch=s.batch, steps=steps, learning_rate=1e-4)
    r = run.train("zero3_offload", recipe, launch, reserve=60)
    res["command"] = r["command"]
    m = r["measure"]
    check_distributed(m, "DEEPSPEED", 3)
    expected = "DeepSpeedCPUAdam" if fused else "AdamW"
    if m["optimizer"] != expected:
        raise StageError(f"the optimizer was {m['optimizer']}, not {expected}: check the offload config")
    res["settings"]["optimizer"] = m["optimizer"]
    res["numbers"].update(losses=finite_losses(m, steps), launch_to_end_seconds=r["launch_seconds"],
                          train_seconds=m["train_seconds"], **throughput(m, s.warmup, run.peak_flops()))
    res["numbers"].update(memory(m, run.plan(_hardware_recipe(recipe, m), s.completions)))
    res["numbers"].update(reload_check(r["output_dir"], model, run.gpu))
    shutil.rmtree(r["output_dir"], ignore_errors=True)


def stage_mixtral_zero3(run: Run) -> None:
    s, res = run.sizes, run.result
    model, shape = run.model("mixtral")
    data, stats = run.train_data(model)
    config = ACCEL / "deepspeed_zero3.yaml"
    steps = s.warmup + s.mixtral_steps
    res["shape"].update(model=shape, data=stats)
    res["settings"].update(_settings(run, config, s.mixtral_batch, steps, s.warmup, 1e-6),
                           router_aux_loss_coef=ROUTER_AUX_LOSS_COEF, final_save=False)
    recipe = run.recipe("mixtral_zero3", model, data, config, batch=s.mixtral_batch, steps=steps, learning_rate=1e-6,
                        router_aux_loss_coef=ROUTER_AUX_LOSS_COEF)
    r = run.train("mixtral_zero3", recipe, config, save=False)
    res["command"] = r["command"]
    m = r["measure"]
    check_distributed(m, "DEEPSPEED", 3)
    aux = logged(m, "aux_loss")
    leaves = m["z3_leaf_modules"]
    res["numbers"].update(losses=finite_losses(m, steps), aux_losses=aux, z3_leaf_modules=leaves)
    if len(aux) != steps or not all(math.isfinite(a) and a > 0 for a in aux):
        raise StageError(f"the router aux loss was not logged as a positive number at each of the {steps} steps "
                         f"({aux}): check router_aux_loss_coef / output_router_logits")
    layers = shape["layers"]
    if leaves["policy"] != layers or leaves["reference"] not in (layers, None):
        raise StageError(f"{leaves} MoE blocks marked as ZeRO-3 leaves, expected {layers} in the policy and the "
                         "reference: see nca_trl/runtime/distributed.py")
    res["numbers"].update(throughput(m, s.warmup, run.peak_flops()))
    res["numbers"].update(memory(m, run.plan(_hardware_recipe(recipe, m), s.completions)))
    shutil.rmtree(r["output_dir"], ignore_errors=True)


def stage_fsdp2(run: Run) -> None:
    s, res = run.sizes, run.result
    model, shape = run.model("mistral")
    data, stats = run.train_data(model)
    config = ACCEL / "fsdp2.yaml"
    res["shape"].update(model=shape, data=stats)
    res["settings"].update(_settings(run, config, s.batch, s.fsdp_steps, 0, 1e-4), tolerance=FSDP_TOLERANCE)
    recipe = run.recipe("fsdp2", model, data, config, batch=s.batch, steps=s.fsdp_steps, learning_rate=1e-4)
    if run.gpu:
        fsdp = run.train("fsdp2", recipe, config, reserve=120)
        check_distributed(fsdp["measure"], "FSDP", None)
    else:  # nca-trl refuses FSDP on CPU processes (accelerate would silently not shard): the rest of the stage runs
        res["settings"]["fsdp"] = "not on a CPU (FSDP needs GPUs): a plain run stands in for the FSDP run"
        fsdp = run.train("fsdp2", recipe, None, reserve=60)
    res["command"] = fsdp["command"]
    finite_losses(fsdp["measure"], s.fsdp_steps)
    reference_recipe = run.recipe("fsdp2_reference", model, data, config, batch=s.batch, steps=1, learning_rate=1e-4)
    plain = run.train("fsdp2_reference", reference_recipe, None, reserve=40, save=False)
    check_distributed(plain["measure"], "NO", None)
    comparison = {}
    for key, tolerance in FSDP_TOLERANCE.items():
        a, b = logged(fsdp["measure"], key)[0], logged(plain["measure"], key)[0]
        comparison[key] = {"fsdp": a, "plain": b, "relative_difference": abs(a - b) / max(abs(b), 1e-12),
                           "tolerance": tolerance}
    res["numbers"].update(step1=comparison, losses=logged(fsdp["measure"], "loss"),
                          **memory(fsdp["measure"], None))
    off = {k: v for k, v in comparison.items() if not v["relative_difference"] <= v["tolerance"]}
    if off:
        raise StageError(f"step 1 under FSDP2 differs from the plain run beyond bf16 rounding: {off}")
    res["numbers"].update(reload_check(fsdp["output_dir"], model, run.gpu))
    for r in (fsdp, plain):
        shutil.rmtree(r["output_dir"], ignore_errors=True)


def stage_generate_long(run: Run) -> None:
    from nca_trl.generation.benchmark import main as generation_benchmark

    s, res = run.sizes, run.result
    model, shape = run.model("mistral")
    rows, stats = long_prompt_rows(model, s.gen_prompt_tokens, 4 * s.gen_prompt_tokens)
    prompts = run.work / f"prompts-{s.gen_prompt_tokens}.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[: s.gen_prompts]))
    methods = ("num_return_sequences", "prefill_once_hf", "prefill_once_seeded")
    argv = ["--model_name_or_path", str(model), "--dtype", "bfloat16" if run.gpu else "float32", "--prompts",
            str(prompts), "--num_prompts", str(s.gen_prompts), "--num_completions", str(s.gen_completions),
            "--max_new_tokens", str(s.gen_new_tokens), "--repeats", str(s.gen_repeats), "--methods", ",".join(methods)]
    res["command"] = shlex.join(["python", "-m", "nca_trl.generation.benchmark", *argv])
    res["shape"].update(model=shape, prompts=stats | {"rows": s.gen_prompts})
    res["settings"].update(num_completions=s.gen_completions, max_new_tokens=s.gen_new_tokens,
                           repeats=s.gen_repeats, methods=list(methods), timing="best of the repeats after a warm-up")
    results = generation_benchmark(argv)
    setup = results.pop("_setup")
    res["shape"]["prompts"]["mean_prompt_tokens"] = setup["mean_prompt_tokens"]
    expected = s.gen_prompts * s.gen_completions * s.gen_new_tokens
    wrong = {m: r["tokens"] for m, r in results.items() if r["tokens"] != expected}
    if wrong:
        raise StageError(f"generated tokens {wrong}, expected {expected} per method: a stop token or a cache bug")
    nrs = results["num_return_sequences"]["tokens_per_s"]
    res["numbers"].update(
        methods=results, setup=setup,
        prefill_once_over_num_return_sequences=results["prefill_once_seeded"]["tokens_per_s"] / nrs,
        prefill_once_hf_over_num_return_sequences=results["prefill_once_hf"]["tokens_per_s"] / nrs,
    )


def build_digits_reward_model(path: Path) -> None:
    """A tiny random `MistralForSequenceClassification` (one label) over the digits tokenizer: the reward model of
    the `iterate` stage, beside the `sorted_digits` reward function."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from nca_trl.tiny import model_config, save_digits_tokenizer

    tokenizer = save_digits_tokenizer(path)
    config = model_config(tokenizer, max_position_embeddings=64)
    config.num_labels = 1
    torch.manual_seed(1)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)


def stage_iterate(run: Run) -> None:
    import yaml

    s, res = run.sizes, run.result
    policy, shape = run.model("digits")
    reward_model = run.work / "model-digits-rm"
    if not (reward_model / "config.json").exists():
        build_digits_reward_model(reward_model)
    out = run.work / "runs" / "iterate"
    shutil.rmtree(out, ignore_errors=True)
    recipe = yaml.safe_load((REPO / "recipes" / "tiny" / "iterate_nca.yaml").read_text())
    recipe.update(model_name_or_path=str(policy), dataset_name=str(SORT_PROMPTS), output_dir=str(out), rounds=1,
                  prompts_per_round=s.iterate_prompts, heldout_prompts=s.iterate_heldout,
                  num_completions=s.iterate_completions, reward_model=str(reward_model),
                  reward_funcs=["nca_trl.scoring.functions:sorted_digits"])
    recipe["training"].update(num_train_epochs=1, disable_tqdm=True)
    recipe["training"].update({"dtype": "bfloat16", "bf16": True} if run.gpu else {"use_cpu": True})
    path = run.work / "runs" / "iterate.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    cmd = [sys.executable, "-m", "nca_trl.cli", "iterate", "--config", str(path)]
    res["command"] = shlex.join(cmd)
    res["shape"].update(model=shape, reward_model="tiny MistralForSequenceClassification, digits vocabulary")
    res["settings"].update({k: recipe[k] for k in ("rounds", "prompts_per_round", "heldout_prompts", "num_completions",
                                                    "reward_funcs", "loss")}, training=recipe["training"])
    seconds = run_child(cmd, run.left(10), "nca-trl iterate")
    status = json.loads((out / "round-1" / "status.json").read_text())
    info = json.loads((out / "round-1" / "model" / "run_info.json").read_text())
    results = json.loads((out / "iterate_results.json").read_text())
    res["numbers"].update(seconds=seconds, round_1_stages=sorted(status), train_device=info["device"],
                          rounds=[{k: r.get(k) for k in ("round", "reward_mean", "reward_best_of_k", "kl_to_initial")}
                                  for r in results["rounds"]])
    if not {"generate", "score", "train", "eval"} <= set(status):
        raise StageError(f"round 1 finished only {sorted(status)}: see the iterate log in gpu_scale.log")
    if [r["round"] for r in results["rounds"]] != [0, 1]:
        raise StageError(f"iterate_results.json holds rounds {[r['round'] for r in results['rounds']]}, not [0, 1]")
    if run.gpu and not str(info["device"]).startswith("cuda"):
        raise StageError(f"round 1 trained on {info['device']}, not the GPU: check `use_cpu` in the recipe")


def family_agreement(run: Run) -> tuple[dict | None, StageError | None]:
    """scripts/gpu_families.py (issue 26's check, where it has landed): per model family, the layout the automatic rule
    takes here and, where it is the shared-prompt one, its bf16 log-probs against the plain layout's and float32.
    Returns (its JSON, or None when the script is absent or wrote nothing; the error when it failed or disagreed)."""
    script = SCRIPTS / "gpu_families.py"
    if not script.exists():
        return None, None
    out = run.work / "runs" / "families.json"
    out.unlink(missing_ok=True)
    # the dry run takes two families (every family on 2 CPU cores would take over a minute)
    cmd = [sys.executable, str(script), "--out", str(out)] + (["--smoke", "--families", "mistral,mixtral"]
                                                              if run.smoke else [])
    run.result["settings"]["family_command"] = shlex.join(cmd)
    error = None
    try:
        run_child(cmd, min(FAMILIES_LIMIT, run.left(60)), "scripts/gpu_families.py")
    except StageError as e:  # it exits 1 when a family disagrees: its JSON says which
        error = e
    return (json.loads(out.read_text()) if out.exists() else None), error


def stage_layouts_median(run: Run) -> None:
    s, res = run.sizes, run.result
    families, families_error = family_agreement(run)
    res["numbers"]["family_agreement"] = families if families is not None else (
        "not run: scripts/gpu_families.py (issue 26) is absent" if families_error is None else None)
    out = run.work / "runs" / "layouts.json"
    out.unlink(missing_ok=True)
    systems = os.environ.get("LAYOUT_SYSTEMS", "a")
    cmd = [sys.executable, str(SCRIPTS / "benchmark.py"), "--layouts", "--systems", systems, *s.layouts, "--json",
           str(out)]
    res["command"] = shlex.join(cmd)
    res["settings"].update(systems=f"{systems} beside c (plain) and d:auto (shared-prompt)", arguments=list(s.layouts))
    error = None
    try:
        run_child(cmd, run.left(5), "scripts/benchmark.py --layouts")
    except StageError as e:  # keep the workloads it finished: the JSON is rewritten after each
        error = e
    if not out.exists():
        raise error or families_error or StageError("scripts/benchmark.py wrote no JSON")
    report = json.loads(out.read_text())
    res["shape"].update(model=report["model"])
    res["settings"].update(machine=report["machine"])
    res["numbers"].update(workloads={
        name: {"ratios": w["ratios"], "ratios_median": w["ratios_median"],
               "systems": {k: {f: v.get(f) for f in ("name", "kernel", "step_seconds_median", "step_seconds_min",
                                                       "step_seconds_max", "tokens_per_second",
                                                       "tokens_per_second_median", "mfu", "peak_gpu_memory_mb")}
                           for k, v in w["systems"].items()}}
        for name, w in report["workloads"].items()})
    wanted = [w for w in s.layouts[s.layouts.index("--workloads") + 1].split(",")]
    missing = [w for w in wanted if w not in report["workloads"]]
    if error or missing:
        raise error or StageError(f"workloads {missing} missing from the benchmark's JSON")
    if families_error:
        raise StageError(f"the family layout agreement failed: {families_error} (numbers.family_agreement says which)")


STAGES = {
    "zero3": stage_zero3,
    "zero3_offload": stage_zero3_offload,
    "mixtral_zero3": stage_mixtral_zero3,
    "fsdp2": stage_fsdp2,
    "generate_long": stage_generate_long,
    "iterate": stage_iterate,
    "layouts_median": stage_layouts_median,
}


# ------------------------------------------------------------------------------------------------ build, environment
def build(work: Path, arch: str, smoke: bool) -> None:
    """Build the random model `arch` into WORK/model-<arch>: weights initialised directly on the GPU (seconds; no
    checkpoint is read), saved in bf16 with the Mistral tokenizer for `nca-trl train` to load."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from nca_trl.tiny import build_tiny_model, model_config, save_mistral_tokenizer

    sizes = SMOKE if smoke else FULL
    path = work / f"model-{arch}"
    tmp = work / f"model-{arch}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    request = model_request(sizes, arch)
    start = time.time()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if arch == "digits":
        build_tiny_model(tmp, seed=0, max_position_embeddings=64, vocab="digits")
        config, device = AutoConfig.from_pretrained(tmp), "cpu"
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    else:
        tokenizer = save_mistral_tokenizer(tmp)
        if request["width"] == "tiny":
            config = model_config(tokenizer, arch, "tiny")
        else:
            name = "mistral-7b-v0.1.json" if arch == "mistral" else "mixtral-8x7b-v0.1.json"
            values = json.loads((MODEL_CONFIGS / name).read_text())
            config = AutoConfig.for_model(**{k: v for k, v in values.items() if not k.startswith("_")
                                              and k not in ("architectures",)})
            config.vocab_size = len(tokenizer)
        config.num_hidden_layers, config.sliding_window = request["layers"], None
        if arch == "mixtral":
            config.num_local_experts, config.num_experts_per_tok = EXPERTS, EXPERTS_PER_TOKEN
            config.router_aux_loss_coef = ROUTER_AUX_LOSS_COEF
        torch.manual_seed(0)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
    shape = {
        "request": request, "architecture": type(config).__name__.replace("Config", ""), "parameters": params,
        "hidden": config.hidden_size, "intermediate": config.intermediate_size, "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads, "kv_heads": config.num_key_value_heads, "vocab": config.vocab_size,
        "experts": getattr(config, "num_local_experts", None),
        "experts_per_token": getattr(config, "num_experts_per_tok", None),
        "dtype": "bfloat16" if device == "cuda" else "float32", "initialised_on": device,
        "build_seconds": round(time.time() - start, 1),
    }
    (tmp / "shape.json").write_text(json.dumps(shape))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)
    print(f"[gpu_scale] built {path}: {json.dumps(shape)}", flush=True)


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
    peak = _measure_peak(torch.cuda.is_available())
    env.update(matmul_peak_tflops=peak / 1e12, matmul_dtype="bf16" if torch.cuda.is_available() else "fp32",
               cxx_compiler=_compiler(), ninja=_has_ninja(), python_headers=_python_headers())
    for name, file in (("probe", "probe.json"), ("nvidia_smi", "nvidia_smi.txt")):
        path = work / file
        if path.exists():
            env[name] = json.loads(path.read_text()) if file.endswith(".json") else path.read_text().strip()
    print("[gpu_scale] " + ", ".join(f"{k} {v}" for k, v in env.items() if k not in ("probe", "nvidia_smi")),
          flush=True)
    return env


def _one_line(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}" if not isinstance(error, StageError) else str(error)
    return " ".join(text.split())[:600]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=[*STAGES, "environment", "build"])
    parser.add_argument("--work", required=True, type=Path, help="shared models, data and runs (kept across stages)")
    parser.add_argument("--result", type=Path, help="where the stage's JSON object goes")
    parser.add_argument("--results", type=Path, help="OUT_DIR/gpu_scale.json (its environment's measured peak)")
    parser.add_argument("--budget", type=float, default=600.0, help="seconds this stage may take (its time limit)")
    parser.add_argument("--arch", choices=("mistral", "mixtral", "digits"), help="build: which model")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device (the CPU dry run)")
    ns = parser.parse_args(argv)
    ns.work.mkdir(parents=True, exist_ok=True)
    if ns.stage == "build":
        build(ns.work, ns.arch, ns.smoke)
        return 0
    if ns.result is None:
        parser.error("--result is required")
    if ns.stage == "environment":
        ns.result.write_text(json.dumps(environment(ns.work, ns.smoke), indent=1))
        return 0
    signal.signal(signal.SIGTERM, _kill_children)
    run = None
    try:
        run = Run(ns.work, ns.smoke, ns.budget - 5, ns.results)
        run.result["settings"]["sizes"] = "smoke" if ns.smoke else "full"
        STAGES[ns.stage](run)
        result = {"ok": True, **run.result}
    except BaseException as e:  # noqa: BLE001 - every failure is recorded, with what was measured before it
        traceback.print_exc()
        partial = run.result if run is not None else {"shape": {}, "settings": {}, "numbers": {}}
        result = {"ok": False, "error": _one_line(e), **partial, "traceback": traceback.format_exc()[-3000:]}
    ns.result.parent.mkdir(parents=True, exist_ok=True)
    ns.result.write_text(json.dumps(result, indent=1, default=str, allow_nan=True))
    print(f"[gpu_scale] {ns.stage}: {'ok' if result['ok'] else 'FAILED: ' + result['error']}", flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
