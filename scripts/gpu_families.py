"""The layout agreement over model families on a GPU: bf16, the fused varlen kernel the automatic layout would take.

For each family of `tests/model_families.py` (tiny random models from transformers' configs, sliding windows of 8
tokens, segments longer than that) this decides the layout as `shared_prompt=None` does on this device
(`nca_trl.shared_prompt.families.shared_prompt_support`, then a fused kernel implementing the model's attention
variants), and where it takes the shared-prompt layout, compares its per-completion log-probs in bf16 with the plain
layout's in bf16, both against a float32 plain-layout reference: the shared-prompt layout must be as close to float32 as
the plain layout is (at most twice its difference, bf16's own rounding being the scale).

    python scripts/gpu_families.py --out OUT.json            # on a CUDA GPU
    python scripts/gpu_families.py --out OUT.json --smoke    # on a CPU: float32, the PyTorch paths, exact to 1e-5

Writes one JSON object: the device, and per family `layout` (`shared` or `plain`), `reason` (why plain), `kernel`,
the differences and `ok`; exits 1 if any family that takes the layout disagrees.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the families' configs live beside the test that checks them on a CPU


def examples(seed: int = 0, vocab: int = 32768) -> list[dict]:
    """Three prompts (20-60 tokens) with K = 4, 3, 2 completions of 20-80 tokens: segments far past the windows."""
    rng = random.Random(seed)
    return [{
        "prompt_ids": [rng.randrange(1, vocab) for _ in range(rng.randint(20, 60))],
        "completion_ids": [[rng.randrange(1, vocab) for _ in range(rng.randint(20, 80))] for _ in range(k)],
        "rewards": [float(i) for i in range(k)],
    } for k in (4, 3, 2)]


def family_agreement(name: str, device: str, smoke: bool) -> dict:
    from accelerate import Accelerator
    from model_families import build_family
    from trl.trainer.utils import add_fused_lm_head

    from nca_trl import NCATrainer
    from nca_trl.data import DataCollatorForRatedCompletions
    from nca_trl.shared_prompt.families import original_attention_implementation, shared_prompt_support
    from nca_trl.shared_prompt.packing import enable_shared_prompt
    from nca_trl.shared_prompt.varlen import cuda_varlen_kernel, reset_kernel_choices, selected_kernels

    half = torch.float32 if smoke else torch.bfloat16
    shim = NCATrainer.__new__(NCATrainer)  # only `_sequence_logps` and the accelerator unwrap are used
    shim.accelerator = Accelerator(cpu=device == "cpu")
    batch_examples = examples()

    def model_in(dtype):
        model = build_family(name).to(device=device, dtype=dtype).eval()
        add_fused_lm_head(model)
        return model

    from model_families import FAMILIES
    from transformers import CONFIG_MAPPING

    if FAMILIES[name][0] not in CONFIG_MAPPING:  # as the CPU test skips it; any other build error is a failure
        return {"layout": "not built", "reason": f"this transformers has no model type {FAMILIES[name][0]!r}",
                "ok": True}
    model = model_in(half)
    support = shared_prompt_support(model, max_length=None)
    result = {"layout": "plain", "needs": sorted(support.needs)}
    if not support.enabled:
        return {**result, "reason": support.reason, "ok": True}
    if device == "cuda":  # these forwards are in eval mode: no attention dropout reaches the kernel
        kernel, why = cuda_varlen_kernel(original_attention_implementation(model), torch.device(device),
                                         needs=support.needs - {"dropout"})
        if kernel is None:
            return {**result, "reason": why, "ok": True}

    def logps(model, shared):
        batch = DataCollatorForRatedCompletions(0, None, shared_prompt=shared)(batch_examples)
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        with torch.no_grad():
            return shim._sequence_logps(model, batch)[-1].float().cpu()

    reset_kernel_choices()
    plain = logps(model, False)
    enable_shared_prompt(model)
    shared = logps(model, True)
    reference = logps(model_in(torch.float32), False)

    def rel(a, b):
        return ((a - b).abs() / b.abs()).max().item()

    differences = {
        "shared_vs_plain": rel(shared, plain),
        "plain_vs_fp32": rel(plain, reference),
        "shared_vs_fp32": rel(shared, reference),
    }
    if smoke:
        ok = differences["shared_vs_plain"] <= 1e-5
    else:
        ok = differences["shared_vs_fp32"] <= 2 * differences["plain_vs_fp32"] + 1e-4
    return {**result, "layout": "shared", "kernel": selected_kernels(), "completions": int(plain.numel()),
            **differences, "ok": ok}


def main(argv=None) -> int:
    from model_families import FAMILIES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--smoke", action="store_true", help="float32 on the CPU (a dry run of the GPU check)")
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated names of FAMILIES")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    out = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "dtype": "float32" if args.smoke else "bfloat16", "command": " ".join(["python", *sys.argv]),
           "families": {}}
    for name in args.families.split(","):
        start = time.perf_counter()
        try:
            out["families"][name] = family_agreement(name, device, args.smoke)
        except Exception as e:  # noqa: BLE001 - one family's failure is recorded, the others still run
            out["families"][name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        out["families"][name]["seconds"] = round(time.perf_counter() - start, 2)
        Path(args.out).write_text(json.dumps(out, indent=1))  # after each family: a time-out keeps what ran
        print(name, json.dumps(out["families"][name]), flush=True)
    failed = [n for n, r in out["families"].items() if not r["ok"]]
    out["ok"] = not failed
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("failed:", failed or "none")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
