#!/usr/bin/env python
"""Side-by-side training throughput of `trl.DPOTrainer` and the NCA trainers, in one process run.

Systems, on the same data, model, batch (prompts per step) and max_length:

    a  trl.DPOTrainer on the best-vs-worst pair of each prompt (what users do today)
    b  NCATrainer on the same pairs (K = 2), default settings
    c  NCATrainer on all K completions, plain padded layout (shared_prompt=False)
    d  NCATrainer on all K completions, shared-prompt padding-free layout (shared_prompt=True)

Workloads: `vicuna` (the bundled real `data/vicuna_rated.jsonl`: short prompts, long answers, K = 4) and `long`
(long-context prompts built from real text: another Vicuna answer given as a reference document before the question,
K = 4). `--data PATH` benchmarks any rated-completions file instead.

Per system: steps timed after warm-up (median and min-max), sequence tokens per second (the real tokens of the plain
layout, prompt repeated per completion and no padding, so that layouts compare on equal work), time per prompt, peak
RSS while the system ran, and model FLOP utilisation against this machine's fp32 matmul peak, measured here:
`mfu` counts the matmul FLOPs each system really needs in its layout (policy forward + backward = 3 forwards, plus
the reference forward; LM head on scored tokens only; attention scores over real keys), `mfu_8nt` is the common
`8 x parameters x plain-layout tokens` estimate (embeddings included). Per workload, `ratios` are seq tokens/s of
one system over another on mean step times, `ratios_median` the same on median step times (`tokens_per_second_median`:
tokens per step over the median step), which a few slow steps cannot move.

`--layouts` is the layout report: the plain layout (c) against the shared-prompt layout (d) with each attention kernel
of `--kernels` (`auto`: the one `nca_trl.shared_prompt.varlen` picks here; `reference`, `padded`: the PyTorch paths;
`flash_attn`, `torch`: the fused CUDA kernels), on the `long` workload with prompts of three reference answers, at
max_length 2048 unless given. Each system says which kernel ran (`kernel`). `--size 7b-2l` is Mistral-7B's width (hidden
4096, MLP 14336, 32 query / 8 key-value heads) with 2 layers; `--layers N` sets the layers of any size.

Usage:
    python scripts/benchmark.py                       # 50M-parameter Mistral, both workloads, prints a table
    python scripts/benchmark.py --json bench.json     # also writes the numbers
    python scripts/benchmark.py --size tiny --steps 1 --warmup 0   # smoke run
    python scripts/benchmark.py --layouts --size 7b-2l --bf16 --json layouts.json   # the GPU layout report
    python scripts/benchmark.py --layouts --size small --kernels reference,padded   # the CPU paths compared
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# torch, datasets and transformers are imported where used, after the arguments and the --data path are checked:
# a refusal comes in well under 2 s (tests/test_paths.py)
from nca_trl.runtime.errors import SettingsError  # noqa: E402
from nca_trl.runtime.paths import check_path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = {
    "a": "DPOTrainer, best-vs-worst pairs",
    "b": "NCATrainer, same pairs (K=2)",
    "c": "NCATrainer, K=4, plain padded",
    "d": "NCATrainer, K=4, shared-prompt packed",
    "n": "NCATrainer, K=4, automatic layout (shared_prompt=None)",
}
# `--size` values beyond nca_trl.tiny.SIZES: (hidden, intermediate, layers, heads, kv heads)
EXTRA_SIZES = {"7b-2l": (4096, 14336, 2, 32, 8)}  # Mistral-7B-v0.1's width, 2 layers
KERNELS = ("auto", "flash_attn", "torch", "reference", "padded")


# ------------------------------------------------------------------------------------------------ workloads
def rated_rows(path: str) -> list[dict]:
    from datasets import load_dataset

    return load_dataset("json", data_files=str(path), split="train").to_list()


def long_context_rows(rows: list[dict], context_chars: int, answers: int = 1) -> list[dict]:
    """Each question preceded by the real answers of the next `answers` prompts as a reference document (RAG-style
    long prompt), cut to `context_chars` characters."""
    out = []
    for i, row in enumerate(rows):
        doc = "\n\n".join(rows[(i + j) % len(rows)]["completions"][0] for j in range(1, answers + 1))[:context_chars]
        prompt = f"Reference document:\n{doc}\n\nUsing the document where it helps, answer the question.\n{row['prompt']}"
        out.append({"prompt": prompt, "completions": row["completions"], "rewards": row["rewards"]})
    return out


def best_worst_pairs(rows: list[dict]) -> list[dict]:
    pairs = []
    for row in rows:
        rewards = row["rewards"]
        best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
        worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
        pairs.append({"prompt": row["prompt"], "chosen": row["completions"][best], "rejected": row["completions"][worst]})
    return pairs


# ------------------------------------------------------------------------------------------------ measurement
def matmul_peak_flops(size: int = 2048, repeats: int = 5, device: str = "cpu", dtype=None) -> float:
    """Best matmul FLOP/s of this machine (fp32 on the CPU with torch's current threads, bf16 on a GPU); `dtype`
    defaults to float32."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    if device != "cpu":
        size = 8192
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


class PeakRSS:
    """Peak resident set size of this process while the context is open (sampled every 5 ms from /proc)."""

    def __enter__(self):
        self.peak, self._stop = self._rss(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) * 1024
        except OSError:  # not Linux: fall back to the process-wide maximum
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return 0


def step_timer():
    """A trainer callback whose `times` gets the wall seconds of every training step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self._start = [], None

        def on_step_begin(self, args, state, control, **kwargs):
            self._start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self._start)

    return StepTimer()


def forward_flops(config, tokens: int, scored: int, attention_pairs: int) -> float:
    """Matmul FLOPs of one forward: linear layers on `tokens`, the LM head on `scored` tokens only (fused head),
    attention scores and values over `attention_pairs` (query, key) pairs per layer."""
    h, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    experts = getattr(config, "num_experts_per_tok", 1) if hasattr(config, "num_local_experts") else 1
    per_token = h * (2 * q + 2 * kv) + experts * 3 * h * inter
    return 2 * (layers * per_token * tokens + config.vocab_size * h * scored) + 4 * layers * q * attention_pairs


def batch_work(batch: dict) -> dict:
    """Tokens processed, scored tokens, attention pairs and plain-layout tokens of one collated batch."""
    if "cu_seqlens_q" in batch:  # shared-prompt layout: segment s has lq queries over lk keys, causal bottom-right
        lq = (batch["cu_seqlens_q"][1:] - batch["cu_seqlens_q"][:-1]).long()
        lk = (batch["cu_seqlens_k"][1:] - batch["cu_seqlens_k"][:-1]).long()
        pairs = int((lq * (lk - lq) + lq * (lq + 1) // 2).sum())
        return {
            "tokens": batch["input_ids"].numel(),
            "scored": int((batch["token_sequence"] >= 0).sum()),
            "pairs": pairs,
            "plain_tokens": int(batch["sequence_tokens"].sum()),
            "computed_tokens": batch["input_ids"].numel(),
        }
    lengths = batch["attention_mask"].sum(dim=1)
    scored = int(batch["completion_mask"][:, 1:].sum())
    return {
        "tokens": int(lengths.sum()),
        "scored": scored,
        "pairs": int((lengths * (lengths + 1) // 2).sum()),
        "plain_tokens": int(lengths.sum()),
        "computed_tokens": batch["input_ids"].numel(),  # padding included
    }


def record_work(trainer) -> list[dict]:
    """A list that gets `batch_work` of every batch the trainer computes a loss on."""
    work, original = [], trainer.compute_loss

    def compute_loss(model, inputs, *args, **kwargs):
        work.append(batch_work(inputs))
        return original(model, inputs, *args, **kwargs)

    trainer.compute_loss = compute_loss
    return work


def run_system(system: str, model_path: str, rated: list[dict], args, out_dir: str, peak: float) -> dict:
    """Train `system` (a key of SYSTEMS, `d` optionally as `d:<kernel>`) for warm-up + timed steps; its numbers."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from nca_trl import NCAConfig, NCATrainer
    from nca_trl.shared_prompt.packing import is_shared_prompt_batch
    from nca_trl.shared_prompt.varlen import KERNEL_ENV, reset_kernel_choices, selected_kernels

    system, _, kernel = system.partition(":")
    os.environ.pop(KERNEL_ENV, None)
    if kernel and kernel != "auto":
        os.environ[KERNEL_ENV] = kernel
    reset_kernel_choices()

    common = dict(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch,
        max_length=args.max_length,
        max_steps=args.warmup + args.steps,
        learning_rate=1e-6,
        logging_steps=10**6,
        report_to="none",
        save_strategy="no",
        bf16=args.bf16,
        use_cpu=not args.cuda,
        activation_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
    )
    pairs = best_worst_pairs(rated)
    if system == "a":
        trainer = DPOTrainer(model=model_path, args=DPOConfig(beta=0.1, **common), train_dataset=Dataset.from_list(pairs))
    elif system == "b":
        trainer = NCATrainer(model=model_path, args=NCAConfig(beta=0.1, **common), train_dataset=Dataset.from_list(pairs))
    else:
        config = NCAConfig(beta=0.1, shared_prompt={"c": False, "d": True, "n": None}[system], **common)
        trainer = NCATrainer(model=model_path, args=config, train_dataset=Dataset.from_list(rated))
    layouts = []  # per batch: the layout the collator chose (the automatic rule decides per batch)
    if system in "bcd":
        assert trainer.data_collator.shared_prompt == (system != "c"), "layout fell back: see the log"
    if system != "a":  # the same collator object, its class extended to count

        class CountingCollator(type(trainer.data_collator)):
            def __call__(self, examples):
                batch = super().__call__(examples)
                layouts.append("shared" if is_shared_prompt_batch(batch) else "plain")
                return batch

        trainer.data_collator.__class__ = CountingCollator

    work = record_work(trainer)
    timer = step_timer()
    trainer.add_callback(timer)
    if args.cuda:
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        trainer.train()

    times = timer.times[args.warmup :]
    work = work[args.warmup :]
    total = sum(times)
    config = trainer.model.config
    params = sum(p.numel() for p in trainer.model.parameters())
    flops = sum(
        4 * forward_flops(config, w["tokens"], w["scored"], w["pairs"]) for w in work
    )  # policy fwd + bwd (= 3 forwards) + reference forward
    plain_tokens = sum(w["plain_tokens"] for w in work)
    result = {
        "name": SYSTEMS[system] + (f" ({kernel} kernel)" if kernel else ""),
        "kernel": ", ".join(selected_kernels()) if "shared" in layouts else None,
        "batch_layouts": {name: layouts.count(name) for name in ("shared", "plain") if name in layouts},
        "step_seconds_median": statistics.median(times),
        "step_seconds_min": min(times),
        "step_seconds_max": max(times),
        "tokens_per_second": plain_tokens / total,
        # the same work per step over the median step time: robust to a few slow steps (allocator, first-call costs)
        "tokens_per_second_median": plain_tokens / len(work) / statistics.median(times),
        "processed_tokens_per_step": sum(w["tokens"] for w in work) / len(work),
        "plain_tokens_per_step": plain_tokens / len(work),
        "computed_tokens_per_step": sum(w["computed_tokens"] for w in work) / len(work),
        "seconds_per_prompt": total / (len(times) * args.batch),
        "peak_rss_mb": rss.peak / 2**20,
        "mfu": flops / total / peak,
        "mfu_8nt": 8 * params * plain_tokens / total / peak,
    }
    if args.cuda:
        result["peak_gpu_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    del trainer
    os.environ.pop(KERNEL_ENV, None)
    return result


def median_ratios(systems: dict, ratios: dict) -> dict:
    """`ratios` (`"x/y"`: seq tokens/s of x over y, on mean step times) recomputed on median step times: each system's
    tokens per step over its median step, so that a few slow steps (a first call, an allocator stall) weigh nothing."""
    tps = {key: r["tokens_per_second_median"] for key, r in systems.items()}
    return {name: tps[x] / tps[y] for name in ratios for x, y in [name.split("/")]}


def table(workload: str, systems: dict, ratios: dict, ratios_median: dict | None = None) -> str:
    lines = [
        f"\n### {workload}\n",
        "| system | step s (median, min-max) | seq tokens/s | s/prompt | peak RSS MB | peak GPU MB | MFU | MFU 8NT "
        "| attention kernel |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in systems.items():
        gpu = f"{r['peak_gpu_memory_mb']:.0f}" if "peak_gpu_memory_mb" in r else "-"
        lines.append(
            f"| {key}: {r['name']} | {r['step_seconds_median']:.2f} ({r['step_seconds_min']:.2f}-"
            f"{r['step_seconds_max']:.2f}) | {r['tokens_per_second']:.0f} | {r['seconds_per_prompt']:.3f} | "
            f"{r['peak_rss_mb']:.0f} | {gpu} | {100 * r['mfu']:.1f}% | {100 * r['mfu_8nt']:.1f}% | "
            f"{r.get('kernel') or '-'} |"
        )
    lines.append("\n" + ", ".join(f"{k} = {v:.2f}" for k, v in ratios.items()) + " (ratios of seq tokens/s)")
    if ratios_median:
        lines.append(", ".join(f"{k} = {v:.2f}" for k, v in ratios_median.items()) + " (the same on median step times)")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="50m", help="nca_trl.tiny.SIZES key (tiny, small, 50m) or 7b-2l")
    parser.add_argument("--layers", type=int, help="number of layers (default: the size's)")
    parser.add_argument("--arch", default="mistral", choices=["mistral", "mixtral"])
    parser.add_argument("--workloads", help="comma-separated: vicuna, long (default: both; long with --layouts)")
    parser.add_argument("--data", help="benchmark this rated-completions file (json/jsonl) instead")
    parser.add_argument("--systems", help="comma-separated keys of SYSTEMS (default: a,b,c,d; with --layouts: c and d "
                        "per kernel, with a / b first and n last where named)")
    parser.add_argument("--layouts", action="store_true", help="the layout report: plain (c) against shared-prompt "
                        "(d) with each of --kernels, long workload, max_length 2048")
    parser.add_argument("--kernels", default="auto", help=f"with --layouts, comma-separated: {', '.join(KERNELS)}")
    parser.add_argument("--batch", type=int, default=4, help="prompts per step")
    parser.add_argument("--max-length", type=int, help="default 512; 2048 with --layouts")
    parser.add_argument("--steps", type=int, default=6, help="timed steps (after warm-up)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--context-chars", type=int, help="reference document size, long workload (default 1800; "
                        "6000 with --layouts)")
    parser.add_argument("--context-answers", type=int, help="answers in the reference document, long workload "
                        "(default 1; 3 with --layouts)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--bf16", action="store_true", help="bf16 training (on a GPU; MFU against the bf16 peak)")
    args = parser.parse_args(argv)
    try:  # a missing --data file: one line, exit 2, before the model is built
        check_path(args.data, "--data", "file")
    except SettingsError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    layouts = args.layouts
    named = [] if args.systems is None else args.systems.split(",")
    extra_systems = [x for x in named if x in ("a", "b")]
    for name, default, layouts_default in (
        ("workloads", "vicuna,long", "long"), ("systems", "a,b,c,d", None), ("max_length", 512, 2048),
        ("context_chars", 1800, 6000), ("context_answers", 1, 3),
    ):
        if getattr(args, name) is None:
            setattr(args, name, layouts_default if layouts and layouts_default is not None else default)
    kernels = args.kernels.split(",")
    if unknown := [k for k in kernels if k not in KERNELS]:
        parser.error(f"--kernels: unknown {unknown}, expected some of {', '.join(KERNELS)}")
    if layouts:  # plain against shared-prompt per kernel, after the baselines asked for (`--systems a,n`)
        args.systems = ",".join(extra_systems + ["c"] + [f"d:{k}" for k in kernels] + (["n"] if "n" in named else []))
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from nca_trl.tiny import SIZES, build_tiny_model

    args.cuda = torch.cuda.is_available()
    hf_logging.set_verbosity_error()

    shape = EXTRA_SIZES.get(args.size) or SIZES.get(args.size)
    if shape is None:
        parser.error(f"--size {args.size!r}: expected one of {', '.join([*SIZES, *EXTRA_SIZES])}")
    if args.layers is not None:
        shape = (*shape[:2], args.layers, *shape[3:])
    tmp = tempfile.mkdtemp(prefix="nca-bench-")
    model_path = build_tiny_model(Path(tmp) / "model", args.arch, seed=0, size=shape)
    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_path).parameters())
    device = "cuda" if args.cuda else "cpu"
    peak = matmul_peak_flops(device=device, dtype=torch.bfloat16 if args.bf16 else torch.float32)
    machine = {
        "device": torch.cuda.get_device_name() if args.cuda else "cpu",
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "matmul_peak_gflops": peak / 1e9,
        "matmul_dtype": "bf16" if args.bf16 else "fp32",
    }
    print(f"Model: {args.arch} {args.size}, {n_params / 1e6:.1f}M parameters; machine: {machine}", flush=True)

    vicuna = rated_rows(REPO / "data" / "vicuna_rated.jsonl")
    if args.data:
        workloads = {Path(args.data).name: rated_rows(args.data)}
    else:
        available = {"vicuna": vicuna, "long": long_context_rows(vicuna, args.context_chars, args.context_answers)}
        workloads = {name: available[name] for name in args.workloads.split(",")}

    results = {"command": " ".join(["python", "scripts/benchmark.py", *(sys.argv[1:] if argv is None else argv)]),
               "machine": machine,
               "model": {"arch": args.arch, "size": args.size, "shape": dict(zip(
                   ("hidden", "intermediate", "layers", "heads", "kv_heads"), shape)), "parameters": n_params},
               "settings": vars(args), "workloads": {}}
    report = []
    for workload, rows in workloads.items():
        systems = {}
        for system in args.systems.split(","):
            print(f"[{workload}] system {system}: {SYSTEMS[system.partition(':')[0]]} ...", flush=True)
            out_dir = str(Path(tmp) / f"out-{system.replace(':', '-')}")
            systems[system] = run_system(system, model_path, rows, args, out_dir, peak)
            print(f"    {systems[system]['tokens_per_second']:.0f} seq tokens/s"
                  f"{', kernel ' + systems[system]['kernel'] if systems[system]['kernel'] else ''}", flush=True)
        tps = {k: v["tokens_per_second"] for k, v in systems.items()}
        pairs = [("b", "a"), ("d", "c"), ("d", "a"), ("c", "a"), ("n", "c"), ("n", "a")] + [
            (k, y) for k in tps if k.startswith("d:") for y in "ca"]
        ratios = {f"{x}/{y}": tps[x] / tps[y] for x, y in pairs if x in tps and y in tps}
        ratios_median = median_ratios(systems, ratios)
        results["workloads"][workload] = {"systems": systems, "ratios": ratios, "ratios_median": ratios_median}
        report.append(table(workload, systems, ratios, ratios_median))
        if args.json:  # after every workload: a run stopped later keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=2))

    print(f"\nMachine: {machine['processor']}, {machine['cpu_count']} CPUs, torch {machine['torch']} "
          f"({machine['torch_threads']} threads), {machine['device']}, {machine['matmul_dtype']} matmul peak "
          f"{machine['matmul_peak_gflops']:.1f} GFLOP/s; "
          f"model {args.arch} {n_params / 1e6:.1f}M parameters, batch {args.batch} prompts, max_length "
          f"{args.max_length}, {args.steps} timed steps after {args.warmup} warm-up")
    print("\n".join(report))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"\nWrote {args.json}")
    return results


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
