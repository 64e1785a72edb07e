"""Generated tokens per second: prefill-once (+ seeded sampling) against HF's `num_return_sequences=K`.

```bash
python -m nca_trl.generation.benchmark --size small --num_prompts 8 --num_completions 8 --max_new_tokens 32
python -m nca_trl.generation.benchmark --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dtype bfloat16   # a GPU
```

Every method generates exactly `max_new_tokens` per sequence (no stop token), from the same prompts with the same
seed, after one untimed warm-up run; the best of `repeats` timed runs (the methods interleaved) is reported, as wall
seconds and as this process's CPU seconds (`time.process_time`, steadier than wall time on a shared CPU). Methods:

- `num_return_sequences`: `generate(prompts, num_return_sequences=K, do_sample=True)`: every prompt prefilled K times;
- `prefill_once_hf`: one prefill per prompt, cache expanded to K rows, HF sampling (one global generator);
- `prefill_once_seeded`: the same with `SeededSampler` (what `nca-trl generate` runs);
- `k_prefills_seeded`: the prompts repeated K times before `generate`, `SeededSampler` (the sampler's cost without
  the prefill saving).
"""

from __future__ import annotations

import argparse
import json
import time

__all__ = ["METHODS", "benchmark_generate"]

METHODS = ("num_return_sequences", "prefill_once_hf", "prefill_once_seeded", "k_prefills_seeded")


def _run(method, model, prompt_ids, num_completions, max_new_tokens, seed, pad_id):
    import torch

    from .sampling import _generation_config, _left_pad, sample_completions

    torch.manual_seed(seed)
    if method == "num_return_sequences":
        input_ids, mask = _left_pad(prompt_ids, pad_id, model.device)
        config = _generation_config(model, max_new_tokens, [], pad_id, True, 1.0, 1.0, 0)
        config.num_return_sequences = num_completions
        with torch.no_grad():
            out = model.generate(input_ids, attention_mask=mask, generation_config=config)
        return (out.shape[1] - input_ids.shape[1]) * out.shape[0]
    sampling = "hf" if method == "prefill_once_hf" else "seeded"
    batch = sample_completions(
        model, prompt_ids, list(range(len(prompt_ids))), num_completions=num_completions,
        max_new_tokens=max_new_tokens, seed=seed, stop_ids=[], pad_token_id=pad_id, sampling=sampling,
        prefill_once=method != "k_prefills_seeded",
    )
    return batch.generated_tokens


def benchmark_generate(model, tokenizer, prompts: list, num_completions: int = 8, max_new_tokens: int = 32,
                       seed: int = 0, repeats: int = 3, methods=METHODS) -> dict:
    """{method: {"tokens", "seconds", "tokens_per_s", "cpu_seconds", "tokens_per_cpu_s"}, "_setup": {...}} for one
    batch of `prompts` (strings or message lists)."""
    import torch

    from .rows import tokenize_prompt

    prompt_ids = [tokenize_prompt({"prompt": p}, tokenizer) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for method in methods:  # warm-up
        _run(method, model, prompt_ids, num_completions, max_new_tokens, seed, pad_id)
    best: dict = {}
    for _ in range(repeats):  # methods interleaved, so that a change of load on a shared machine hits them all
        for method in methods:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter(), time.process_time()
            tokens = _run(method, model, prompt_ids, num_completions, max_new_tokens, seed, pad_id)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            old = best.get(method, (tokens, float("inf"), float("inf")))
            best[method] = (tokens, min(old[1], wall), min(old[2], cpu))
    results = {
        method: {"tokens": tokens, "seconds": round(wall, 4), "tokens_per_s": round(tokens / wall, 1),
                 "cpu_seconds": round(cpu, 4), "tokens_per_cpu_s": round(tokens / cpu, 1)}
        for method, (tokens, wall, cpu) in best.items()
    }
    results["_setup"] = {
        "prompts": len(prompts), "mean_prompt_tokens": round(sum(map(len, prompt_ids)) / len(prompt_ids), 1),
        "num_completions": num_completions, "max_new_tokens": max_new_tokens, "repeats": repeats,
        "device": str(model.device), "dtype": str(model.dtype), "threads": torch.get_num_threads(),
    }
    return results


def main(argv: list[str] | None = None) -> dict:
    import tempfile

    import torch
    from transformers import AutoTokenizer

    from ..runtime.models import load_text_model

    parser = argparse.ArgumentParser(prog="python -m nca_trl.generation.benchmark", description=__doc__.split("\n")[0])
    parser.add_argument("--model_name_or_path", help="a model; default: a tiny Mistral built with nca_trl.tiny")
    parser.add_argument("--size", default="small", help="size of the built tiny model (nca_trl.tiny.SIZES)")
    parser.add_argument("--prompts", help="a .jsonl with a `prompt` column; default: the HH slice in tests/data")
    parser.add_argument("--num_prompts", type=int, default=8)
    parser.add_argument("--num_completions", type=int, default=8)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    ns = parser.parse_args(argv)
    methods = tuple(ns.methods.split(","))
    if unknown := [m for m in methods if m not in METHODS]:
        parser.error(f"--methods: unknown {unknown}, expected some of {', '.join(METHODS)}")
    path = ns.model_name_or_path
    if path is None:
        from ..tiny import build_tiny_model

        path = build_tiny_model(tempfile.mkdtemp(prefix="nca-bench-gen-"), size=ns.size)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_text_model(path, dtype=getattr(torch, ns.dtype)).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = _prompts(ns.prompts, ns.num_prompts)
    results = benchmark_generate(model, tokenizer, prompts, ns.num_completions, ns.max_new_tokens, ns.seed, ns.repeats,
                                 methods)
    print(json.dumps(results, indent=2))
    return results


def _prompts(path: str | None, n: int) -> list:
    from pathlib import Path

    if path is None:
        path = Path(__file__).resolve().parents[2] / "tests" / "data" / "hh_helpful_test.jsonl"
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                prompts.append(json.loads(line)["prompt"])
            if len(prompts) == n:
                break
    return prompts


if __name__ == "__main__":  # pragma: no cover
    main()
