#!/usr/bin/env python
"""Prove the GPU path in one run: CUDA, bf16, the fused LM-head log-probs, both layouts, real throughput.

1. The tiny NCA recipe model (2-layer Mistral, real tokenizer) trained in bf16 on CUDA on the bundled data.
2. A reduced-depth Mistral-7B-shaped model (full width: hidden 4096, 32 heads, 8 KV heads, intermediate 14336, 32k
   vocabulary; 2 layers instead of 32, ~0.7B parameters) trained for a few steps on the bundled data, K = 4,
   max_length 1024, gradient checkpointing, in the shared-prompt and in the plain layout.
3. In bf16 on CUDA, the shared-prompt log-probs against the plain layout's on one batch.

Reports tokens/s (real plain-layout tokens), step time, peak GPU memory and model FLOP utilisation against the bf16
matmul peak it measures, and writes everything to `--out` (JSON).

    python scripts/gpu_check.py --out gpu_check.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))

from benchmark import StepTimer, forward_flops, matmul_peak_flops, record_work  # noqa: E402


def train(model_path: str, shared_prompt: bool, steps: int, max_length: int, batch: int, checkpointing: bool) -> dict:
    from datasets import load_dataset

    from nca_trl import NCAConfig, NCATrainer

    data = load_dataset("json", data_files=str(REPO / "data" / "vicuna_rated.jsonl"), split="train")
    args = NCAConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=batch, max_length=max_length, max_steps=steps,
        learning_rate=5e-6, bf16=True, gradient_checkpointing=checkpointing, report_to="none", save_strategy="no",
        logging_steps=1, shared_prompt=shared_prompt, model_init_kwargs={"dtype": "bfloat16"},
    )
    trainer = NCATrainer(model=model_path, args=args, train_dataset=data)
    assert trainer.model.device.type == "cuda" and trainer.model.dtype == torch.bfloat16
    assert trainer.data_collator.shared_prompt == shared_prompt
    work = record_work(trainer)
    timer = StepTimer()
    trainer.add_callback(timer)
    torch.cuda.reset_peak_memory_stats()
    trainer.train()
    torch.cuda.synchronize()
    skip = min(2, steps - 1)  # warm-up
    times, work = timer.times[skip:], work[skip:]
    config = trainer.model.config
    flops = sum(4 * forward_flops(config, w["tokens"], w["scored"], w["pairs"]) for w in work)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    return {
        "shared_prompt": shared_prompt,
        "parameters": sum(p.numel() for p in trainer.model.parameters()),
        "step_seconds": sum(times) / len(times),
        "tokens_per_second": sum(w["plain_tokens"] for w in work) / sum(times),
        "peak_gpu_memory_gb": torch.cuda.max_memory_allocated() / 2**30,
        "flops_per_second": flops / sum(times),
        "losses": losses,
    }


def layout_agreement(model_path: str) -> float:
    """Max relative difference of per-completion log-probs, shared-prompt vs plain layout, bf16 on CUDA."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    from nca_trl.data import DataCollatorForRatedCompletions
    from nca_trl.data.tokenize import tokenize_rated_example
    from nca_trl.packing import enable_shared_prompt
    from nca_trl.trainer import NCATrainer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).cuda().eval()
    add_fused_lm_head(model)
    rows = [json.loads(line) for line in open(REPO / "data" / "vicuna_rated.jsonl")][:4]
    examples = [tokenize_rated_example(r, tokenizer, tokenizer.eos_token) for r in rows]
    shim = NCATrainer.__new__(NCATrainer)
    shim.accelerator = Accelerator()
    to_cuda = lambda b: {k: v.cuda() for k, v in b.items()}  # noqa: E731
    with torch.no_grad():
        plain = shim._sequence_logps(model, to_cuda(DataCollatorForRatedCompletions(2, 512)(examples)))[-1]
        enable_shared_prompt(model)
        packed_batch = DataCollatorForRatedCompletions(2, 512, shared_prompt=True)(examples)
        packed = shim._sequence_logps(model, to_cuda(packed_batch))[-1]
    return ((packed - plain).abs() / plain.abs()).max().item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU")

    from transformers import AutoModelForCausalLM, MistralConfig

    from nca_trl.tiny import build_tiny_model, save_mistral_tokenizer

    tmp = Path(tempfile.mkdtemp(prefix="nca-gpu-"))
    peak = matmul_peak_flops(device="cuda", dtype=torch.bfloat16)
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "bf16_matmul_peak_tflops": peak / 1e12}
    print(report, flush=True)

    tiny = build_tiny_model(tmp / "tiny", "mistral", seed=0)
    report["tiny_recipe"] = train(tiny, True, steps=20, max_length=128, batch=2, checkpointing=False)
    print("tiny", report["tiny_recipe"], flush=True)

    big = tmp / "mistral-7b-2layers"
    config = json.loads((REPO / "recipes" / "model_configs" / "mistral-7b-v0.1.json").read_text())
    config.update(num_hidden_layers=2, sliding_window=None)
    config = MistralConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type") and k[0] != "_"})
    tokenizer = save_mistral_tokenizer(big)
    config.vocab_size = len(tokenizer)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(big)
    report["layout_max_relative_logp_difference_bf16"] = layout_agreement(str(big))
    for shared in (True, False):
        t0 = time.time()
        result = train(str(big), shared, steps=args.steps, max_length=1024, batch=2, checkpointing=True)
        result["mfu"] = result["flops_per_second"] / peak
        result["wall_seconds"] = time.time() - t0
        report[f"mistral7b_2layers_{'shared_prompt' if shared else 'plain'}"] = result
        print(result, flush=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
