"""What a stage measures, from scripts/measured_train.py's numbers: throughput and MFU, memory beside the plan, the
logged losses, how the run was distributed, the reload check of a saved model; and the long-prompt data."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

from .common import GB, VICUNA, StageError


def measure_peak(gpu: bool) -> float:
    """The matmul peak of this device: bf16 on a GPU, fp32 on the CPU (the MFU denominator)."""
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
