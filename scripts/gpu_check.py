#!/usr/bin/env python
"""Prove the GPU path in one run: CUDA, bf16, the fused LM-head log-probs, both layouts, real throughput.

Stages (each runs even if an earlier one failed; a failure is recorded with its traceback):

1. `environment`: device name, torch / CUDA / transformers / trl versions, the measured bf16 matmul peak.
2. `tiny_recipe`: the tiny NCA recipe model (2-layer Mistral, real tokenizer) trained in bf16 on CUDA on the bundled
   data.
3. `layout_agreement_bf16`: on a reduced-depth Mistral-7B-shaped model (full width: hidden 4096, 32 heads, 8 KV heads,
   intermediate 14336, 32k vocabulary; 2 layers instead of 32, ~0.7B parameters), the per-completion log-probs of
   the shared-prompt layout against the plain layout's in bf16, both also compared with a float32 plain-layout
   reference so the bf16 difference has a scale.
4. `mistral7b_2layers_<layout>`: that model trained for a few steps on the bundled data, K = 4, max_length 1024,
   gradient checkpointing, in the shared-prompt and in the plain layout: tokens/s (real plain-layout tokens), step
   time, peak GPU memory, model FLOP utilisation against the measured bf16 peak.

Everything goes to `--out` (JSON), rewritten after every stage. Exit status 1 if any stage failed.

    python scripts/gpu_check.py --out gpu_check.json
    python scripts/gpu_check.py --smoke --out smoke.json   # any device (CPU too): tiny models, 2 steps
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data" / "vicuna_rated.jsonl"

from benchmark import forward_flops, matmul_peak_flops, record_work, step_timer  # noqa: E402


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _max_memory_gb() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def train(model_path: str, shared_prompt: bool, steps: int, max_length: int, batch: int, checkpointing: bool) -> dict:
    """Train `steps` NCA steps in bf16 on the bundled data; throughput over the steps after a warm-up."""
    from datasets import load_dataset

    from nca_trl import NCAConfig, NCATrainer

    data = load_dataset("json", data_files=str(DATA), split="train")
    args = NCAConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_length=max_length, max_steps=steps,
        learning_rate=5e-6, bf16=True, activation_checkpointing=checkpointing, report_to="none", save_strategy="no",
        logging_steps=1, shared_prompt=shared_prompt, model_init_kwargs={"dtype": "bfloat16"},
        use_cpu=_device() == "cpu", disable_tqdm=True,
    )
    trainer = NCATrainer(model=model_path, args=args, train_dataset=data)
    assert trainer.model.device.type == _device(), trainer.model.device
    assert trainer.model.dtype == torch.bfloat16, trainer.model.dtype
    assert trainer.data_collator.shared_prompt == shared_prompt, "layout fell back: see the log"
    work = record_work(trainer)
    timer = step_timer()
    trainer.add_callback(timer)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    skip = min(2, steps - 1)  # warm-up
    times, work = timer.times[skip:], work[skip:]
    config = trainer.model.config
    flops = sum(4 * forward_flops(config, w["tokens"], w["scored"], w["pairs"]) for w in work)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    losses = [h["loss"] for h in logs]
    assert all(map(torch.isfinite, torch.tensor(losses))), f"non-finite loss: {losses}"
    result = {
        "shared_prompt": shared_prompt,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "steps": steps,
        "timed_steps": len(times),
        "batch_prompts": batch,
        "max_length": max_length,
        "gradient_checkpointing": checkpointing,
        "step_seconds": sum(times) / len(times),
        "tokens_per_second": sum(w["plain_tokens"] for w in work) / sum(times),
        "processed_tokens_per_step": sum(w["tokens"] for w in work) / len(work),
        "plain_tokens_per_step": sum(w["plain_tokens"] for w in work) / len(work),
        "peak_gpu_memory_gb": _max_memory_gb(),
        "flops_per_second": flops / sum(times),
        "losses": losses,
        "grad_norms": [h.get("grad_norm") for h in logs],
        "ranking_accuracy": [h.get("rewards/ranking_accuracy") for h in logs],
    }
    del trainer
    return result


def layout_agreement(model_path: str, rows: int = 4) -> dict:
    """Per-completion log-probs of `rows` bundled prompts (K = 4 each) and the gradients of their sum w.r.t. every
    parameter: shared-prompt vs plain layout in bf16, and both against a float32 plain-layout reference, so that the
    bf16 difference has a scale (bf16 keeps 8 significant bits: its own rounding is the tolerance)."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    from nca_trl.data import DataCollatorForRatedCompletions
    from nca_trl.data.tokenize import tokenize_rated_example
    from nca_trl.shared_prompt.packing import enable_shared_prompt
    from nca_trl.trainer import NCATrainer
    from nca_trl.shared_prompt.varlen import selected_kernels

    device = _device()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    examples = [tokenize_rated_example(json.loads(line), tokenizer, tokenizer.eos_token)
                for line in DATA.read_text().splitlines()[:rows]]
    shim = NCATrainer.__new__(NCATrainer)
    shim.accelerator = Accelerator(cpu=device == "cpu")

    def logps_and_grads(dtype, shared):
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
        add_fused_lm_head(model)
        if shared:
            assert enable_shared_prompt(model).enabled
        batch = DataCollatorForRatedCompletions(tokenizer.eos_token_id, 512, shared_prompt=shared)(examples)
        batch = {k: [t.to(device) if hasattr(t, "to") else t for t in v] if isinstance(v, list)
                 else v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
        logps = shim._sequence_logps(model, batch)[-1]
        logps.float().sum().backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None]).cpu()
        out = logps.detach().float().cpu()
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return out, grads

    (plain, g_plain), (packed, g_packed) = logps_and_grads(torch.bfloat16, False), logps_and_grads(torch.bfloat16, True)
    reference, g_reference = logps_and_grads(torch.float32, False)

    def rel(a, b):
        return ((a - b).abs() / b.abs()).max().item()

    def rel_norm(a, b):
        return ((a - b).norm() / b.norm()).item()

    return {
        "completions": int(plain.numel()),
        "kernels": selected_kernels(),
        "mean_sequence_logp_fp32": reference.mean().item(),
        "max_relative_difference_shared_vs_plain_bf16": rel(packed, plain),
        "max_abs_difference_shared_vs_plain_bf16": (packed - plain).abs().max().item(),
        "max_relative_difference_plain_bf16_vs_fp32": rel(plain, reference),
        "max_relative_difference_shared_bf16_vs_fp32": rel(packed, reference),
        "gradient_relative_difference_shared_vs_plain_bf16": rel_norm(g_packed, g_plain),
        "gradient_relative_difference_plain_bf16_vs_fp32": rel_norm(g_plain, g_reference),
        "gradient_relative_difference_shared_bf16_vs_fp32": rel_norm(g_packed, g_reference),
        "tolerance": "the shared-prompt layout in bf16 is as close to the fp32 reference as the plain layout in bf16: "
                     "its difference at most 2x the plain layout's (bf16 rounding, 2^-8 relative per value)",
    }


def build_mistral_7b_shape(out: Path, layers: int) -> str:
    """Mistral-7B-v0.1's config (recipes/model_configs) with `layers` layers, random bf16 weights, real tokenizer."""
    from transformers import AutoModelForCausalLM, MistralConfig

    from nca_trl.tiny import save_mistral_tokenizer

    config = json.loads((REPO / "recipes" / "model_configs" / "mistral-7b-v0.1.json").read_text())
    config.update(num_hidden_layers=layers, sliding_window=None)
    config = MistralConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type") and k[0] != "_"})
    config.vocab_size = len(save_mistral_tokenizer(out))
    torch.manual_seed(0)
    with torch.device(_device()):  # initialise on the GPU: seconds instead of a minute on the CPU
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    return str(out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--steps", type=int, default=6, help="training steps of the Mistral-7B-shaped model")
    parser.add_argument("--smoke", action="store_true", help="tiny models and 2 steps on any device (CI smoke test)")
    parser.add_argument("--stages", default="all", help="comma-separated: environment, tiny_recipe, layout_agreement,"
                        " training (default all)")
    parser.add_argument("--layers", type=int, default=2, help="layers of the Mistral-7B-shaped model")
    args = parser.parse_args(argv)
    wanted = set(args.stages.split(",")) if args.stages != "all" else {"environment", "tiny_recipe",
                                                                        "layout_agreement", "training"}
    if not (torch.cuda.is_available() or args.smoke):
        sys.exit("gpu_check.py needs a CUDA GPU (or --smoke)")

    from nca_trl.tiny import build_tiny_model

    tmp = Path(tempfile.mkdtemp(prefix="nca-gpu-"))
    report: dict = {"smoke": args.smoke, "failed": []}

    def stage(name, fn):
        print(f"== {name}", flush=True)
        t0 = time.time()
        try:
            report[name] = fn()
            report[name]["wall_seconds"] = time.time() - t0
        except Exception as e:  # record, keep going: one run should tell everything
            traceback.print_exc()
            report[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-4000:]}
            report["failed"].append(name)
        print(json.dumps({k: v for k, v in report[name].items() if k != "traceback"}), flush=True)
        Path(args.out).write_text(json.dumps(report, indent=2))

    def environment():
        import transformers
        import trl

        dtype = torch.bfloat16 if _device() == "cuda" else torch.float32
        return {
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "transformers": transformers.__version__,
            "trl": trl.__version__,
            "matmul_peak_tflops": matmul_peak_flops(device=_device(), dtype=dtype, repeats=10) / 1e12,
            "matmul_dtype": str(dtype),
        }

    stage("environment", environment)  # always: the versions and the measured peak
    peak = report["environment"].get("matmul_peak_tflops", float("nan")) * 1e12
    tiny = build_tiny_model(tmp / "tiny", "mistral", seed=0)
    if "tiny_recipe" in wanted:
        stage("tiny_recipe", lambda: train(tiny, True, steps=4 if args.smoke else 20, max_length=128, batch=2,
                                           checkpointing=False))
    if args.smoke:
        big, steps, max_length = tiny, 2, 256
    elif wanted & {"layout_agreement", "training"}:
        big, steps, max_length = (build_mistral_7b_shape(tmp / "mistral-7b", layers=args.layers), args.steps, 1024)
    name = f"mistral7b_{args.layers}layers"
    if "layout_agreement" in wanted:
        stage("layout_agreement_bf16", lambda: layout_agreement(big))
    for shared in (True, False) if "training" in wanted else ():
        def run(shared=shared):
            result = train(big, shared, steps=steps, max_length=max_length, batch=2, checkpointing=True)
            result["mfu"] = result["flops_per_second"] / peak
            return result

        stage(f"{name}_{'shared_prompt' if shared else 'plain'}", run)
    s, p = report.get(f"{name}_shared_prompt", {}), report.get(f"{name}_plain", {})
    if "tokens_per_second" in s and "tokens_per_second" in p:
        report["shared_over_plain_tokens_per_second"] = s["tokens_per_second"] / p["tokens_per_second"]
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}; failed stages: {report['failed'] or 'none'}", flush=True)
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
