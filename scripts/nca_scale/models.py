"""The random models of the run, built once per WORK: Mistral-7B and Mixtral-8x7B width (or tiny, in the smoke run),
the digits policy of `iterate`, and its tiny reward model."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from .common import EXPERTS, EXPERTS_PER_TOKEN, FULL, MODEL_CONFIGS, ROUTER_AUX_LOSS_COEF, SMOKE, model_request


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
