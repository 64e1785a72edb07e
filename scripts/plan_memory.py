#!/usr/bin/env python
"""Per-GPU memory plan of a training recipe: does it fit the hardware it is meant for?

```bash
python scripts/plan_memory.py recipes/mixtral-8x7b/nca.yaml                    # the hardware the recipe states
python scripts/plan_memory.py recipes/mixtral-8x7b/nca.yaml --gpus 8 --gpu-mem 80 --nodes 1   # what if
python scripts/plan_memory.py recipes/mistral-7b/*.yaml recipes/mixtral-8x7b/*.yaml --markdown
python scripts/plan_memory.py recipes/mistral-7b/iterate_nca.yaml                # an `nca-trl iterate` recipe: its rounds' training
```

Nothing is downloaded and no weights are created: the architecture is built on the meta device from the recipe's
`model_config_file` (recipes/model_configs/*.json) or from `model_name_or_path`'s config.json when it is a local
folder. The recipe is parsed with the real `nca-trl train` parser. Per GPU it adds up:

- **model states** (policy): DeepSpeed's own estimators (`estimate_zero3_model_states_mem_needs`, ZeRO-2's for
  ZeRO-2) from the parameter count and the largest unit ZeRO-3 gathers at once (the biggest module, or a whole sparse
  MoE block, which nca-trl makes a ZeRO-3 leaf). Without DeepSpeed: weights + gradients + 2 Adam moments in the model
  dtype; QLoRA: `nn.Linear` weights in 4 bits (+ quantization constants), every other parameter in the model dtype,
  the LoRA adapters in fp32 with gradients and Adam moments (16 bytes each);
- **reference model**: ZeRO-3 shards it like the policy (weights only, 2 bytes/param / GPUs; on CPU when parameters
  are offloaded); ZeRO-0/2 and DDP replicate it; none with PEFT (adapters disabled) or precomputed log-probs;
- **activations** of one micro-batch: `per_device_train_batch_size x K x max_length` tokens (every sequence at
  `max_length`, K = 4 for UltraFeedback, 2 for pairs): with gradient checkpointing one hidden state per layer plus one
  layer recomputed with its gradients, without it every layer; attention is assumed flash/SDPA (no L x L scores);
  plus the fused LM head's fp32 tiles;
- **overhead**: CUDA context, NCCL and DeepSpeed buffers, allocator fragmentation (a fixed 4 GB).

It fits when the total is at most 95% of the GPU memory (and, with offload, the host memory per node holds
DeepSpeed's CPU estimate).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path

import yaml

from nca_trl.runtime.errors import SettingsError
from nca_trl.runtime.paths import check_path

_HARDWARE_RE = re.compile(
    r"^\s*(\d+)\s*nodes?\s*x\s*(\d+)\s*GPUs?\s*x\s*(\d+(?:\.\d+)?)\s*GB(?:\s*,\s*(\d+(?:\.\d+)?)\s*GB\s*CPU)?\s*$",
    re.IGNORECASE,
)


def parse_hardware(text: str) -> dict:
    """A recipe's `hardware` launch metadata, `"2 nodes x 8 GPUs x 80 GB[, 2048 GB CPU]"` -> `{"nodes": 2,
    "gpus_per_node": 8, "gpu_mem_gb": 80.0, "cpu_mem_gb": 2048.0 or None}`."""
    m = _HARDWARE_RE.match(text)
    if m is None:
        raise ValueError(
            f"`hardware` must read like '2 nodes x 8 GPUs x 80 GB' or '1 node x 8 GPUs x 80 GB, 2048 GB CPU', got "
            f"{text!r}."
        )
    return {
        "nodes": int(m.group(1)),
        "gpus_per_node": int(m.group(2)),
        "gpu_mem_gb": float(m.group(3)),
        "cpu_mem_gb": float(m.group(4)) if m.group(4) else None,
    }

REPO = Path(__file__).resolve().parents[1]
GB = 1e9
OVERHEAD_BYTES = 4 * GB
USABLE_FRACTION = 0.95
LM_HEAD_TILE_TOKENS, LM_HEAD_TILE_VOCAB = 4096, 32768


def _resolve(path: str | None, base: Path) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if p.is_absolute() or p.exists():
        return p
    return (base / p) if (base / p).exists() else (REPO / p)


def load_architecture(script_args, model_args, recipe_dir: Path):
    """(config, meta-device model) of the recipe's architecture."""
    import torch
    import transformers
    from transformers import AutoConfig

    from nca_trl.runtime.models import auto_class_name

    config_file = _resolve(script_args.model_config_file, recipe_dir)
    if config_file is None:
        local = Path(model_args.model_name_or_path)
        if (local / "config.json").exists():
            config_file = local / "config.json"
        else:
            raise ValueError(
                f"{model_args.model_name_or_path} is not a local folder: name its architecture with "
                "`model_config_file: recipes/model_configs/<model>.json` in the recipe."
            )
    values = json.loads(Path(config_file).read_text())
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    config = AutoConfig.for_model(**values)
    auto = getattr(transformers, auto_class_name(config.model_type))  # Mistral 3: AutoModelForImageTextToText
    with torch.device("meta"):
        model = auto.from_config(config)
    return config, model


def _accelerate_strategy(script_args, recipe_dir: Path) -> dict:
    path = _resolve(script_args.accelerate_config, recipe_dir)
    if path is None:
        return {"name": "single process", "zero_stage": None, "offload_optimizer": False, "offload_params": False}
    accel = yaml.safe_load(Path(path).read_text())
    if accel.get("distributed_type") != "DEEPSPEED":
        return {"name": "DDP", "zero_stage": None, "offload_optimizer": False, "offload_params": False}
    ds = accel.get("deepspeed_config", {})
    stage = int(ds.get("zero_stage", 0))
    off_opt = ds.get("offload_optimizer_device", "none") not in (None, "none")
    off_par = ds.get("offload_param_device", "none") not in (None, "none")
    name = f"ZeRO-{stage}" + (" + CPU offload" if off_opt or off_par else "")
    return {"name": name, "zero_stage": stage, "offload_optimizer": off_opt, "offload_params": off_par}


def _count(model):
    """Total parameters, the largest unit ZeRO-3 gathers at once, and the model's MoE block classes."""
    from nca_trl.runtime.distributed import find_moe_block_classes

    moe = tuple(find_moe_block_classes(model))
    total = sum(p.numel() for p in model.parameters())
    largest = 0
    for module in model.modules():
        own = sum(p.numel() for p in module.parameters(recurse=isinstance(module, moe)))
        largest = max(largest, own)
    return total, largest, moe


def _completions(script_args, training_args, override: int | None) -> int:
    if override is not None:
        return override
    k = {"ultrafeedback": 4, "preference": 2}.get(script_args.dataset_format, 4)
    if getattr(training_args, "max_completions", None):
        k = min(k, training_args.max_completions)
    return k


def _activation_bytes(config, tokens: int, checkpointing: bool, act_bytes: int) -> dict:
    config = config.get_text_config()  # a multimodal model's (Mistral 3): its language model's
    h = config.hidden_size
    inter = getattr(config, "intermediate_size", 4 * h)
    heads = config.num_attention_heads
    kv_dim = getattr(config, "num_key_value_heads", heads) * (getattr(config, "head_dim", None) or h // heads)
    top_k = getattr(config, "num_experts_per_tok", 1)
    layers = config.num_hidden_layers
    # Saved tensors of one decoder layer per token: norms/residuals and q, k, v, attention output, o-proj input (6h +
    # 2 kv), and per routed expert the MLP input, gate and up outputs, activation and down-proj input (h + 4 inter)
    per_token_layer = act_bytes * (6 * h + 2 * kv_dim + top_k * (h + 4 * inter))
    if checkpointing:
        stored = layers * tokens * h * act_bytes  # one hidden state per layer
        working = 2 * per_token_layer * tokens  # one layer recomputed, with its activation gradients
    else:
        stored = layers * per_token_layer * tokens
        working = per_token_layer * tokens
    lm_head = 2 * min(tokens, LM_HEAD_TILE_TOKENS) * min(config.vocab_size, LM_HEAD_TILE_VOCAB) * 4
    router = layers * tokens * getattr(config, "num_local_experts", 0) * 4
    return {"checkpoints": stored, "layer": working, "lm_head": lm_head, "router": router}


def _qlora_states(model, model_args, dtype_bytes: int) -> tuple[float, int]:
    """(bytes of the quantized base model, number of LoRA parameters) for bitsandbytes + LoRA on nn.Linear layers."""
    import torch

    bits = 4 if model_args.load_in_4bit else 8
    # 4-bit: one fp32 absmax per 64 weights, or with nested quantization an 8-bit one + a second level (~0.127 bit)
    const = (0.127 / 8 if model_args.use_bnb_nested_quant else 4 / 64) if bits == 4 else 4 / 64
    targets = model_args.lora_target_modules
    all_linear = targets in (None, "all-linear", ["all-linear"])
    quantized = lora = 0
    linear_ids = set()
    output = model.get_output_embeddings()
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and module is not output:
            linear_ids.add(id(module.weight))
            quantized += module.weight.numel()
            if all_linear or any(name.endswith(t) for t in targets):
                lora += model_args.lora_r * (module.in_features + module.out_features)
    rest = sum(p.numel() for p in model.parameters() if id(p) not in linear_ids)
    return quantized * (bits / 8 + const) + rest * dtype_bytes, lora


@contextlib.contextmanager
def _train_recipe(recipe: str):
    """(a train recipe, K, loss): the recipe itself, or for an `nca-trl iterate` recipe (a `training:` mapping) the
    train recipe one of its rounds runs (a temporary file), its `num_completions` and its `loss` (`loss: dpo` trains
    pairs: planned as NCA on K=2, the same sequences per micro-batch, and named dpo)."""
    with open(recipe) as f:
        content = yaml.safe_load(f) or {}
    if "training" not in content:
        yield recipe, None, None
        return
    loss = content.get("loss", "nca")
    train = {"loss": "nca" if loss == "dpo" else loss, "model_name_or_path": content["model_name_or_path"],
             "dataset_name": "rated.jsonl", **content["training"]}
    k = 2 if loss == "dpo" else content.get("num_completions", 4)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(train, f)
        yield path, k, loss


def plan(recipe: str, gpus: int | None = None, gpu_mem: float | None = None, nodes: int | None = None,
         cpu_mem: float | None = None, completions: int | None = None) -> dict:
    """The memory plan of one recipe (bytes, per GPU unless stated)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from nca_trl.train.arguments import parse_train_args

    recipe_dir = Path(recipe).resolve().parent
    with _train_recipe(recipe) as (train_recipe, iterate_k, iterate_loss):
        args = parse_train_args(["--config", train_recipe], dry_run=True)
    completions = completions or iterate_k
    script_args, training_args, model_args = args.script, args.training, args.model
    stated = parse_hardware(script_args.hardware) if script_args.hardware else {}
    nodes = nodes or stated.get("nodes", 1)
    gpus = gpus or stated.get("gpus_per_node", 1)
    gpu_mem = gpu_mem or stated.get("gpu_mem_gb", 80.0)
    cpu_mem = cpu_mem or stated.get("cpu_mem_gb")
    total_gpus = nodes * gpus

    config, model = load_architecture(script_args, model_args, recipe_dir)
    strategy = _accelerate_strategy(script_args, recipe_dir)
    total, largest, moe = _count(model)
    dtype_bytes = 2 if str(model_args.dtype) in ("bfloat16", "float16", "torch.bfloat16", "auto") else 4
    quantized = bool(model_args.load_in_4bit or model_args.load_in_8bit)
    peft = bool(model_args.use_peft)
    stage = strategy["zero_stage"]

    cpu_bytes = 0.0
    lora_params = 0
    if quantized or (peft and stage is None):
        if quantized:
            base, lora_params = _qlora_states(model, model_args, dtype_bytes)
        else:
            base = total * dtype_bytes
            _, lora_params = _qlora_states(model, model_args, dtype_bytes)
        states = base + 16 * lora_params
        strategy = dict(strategy, name=("QLoRA" if quantized else "LoRA") + f" ({strategy['name']})")
    elif stage == 3:
        cpu_bytes, states, _ = estimate_zero3_model_states_mem_needs(
            total, largest, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=strategy["offload_optimizer"],
            cpu_offload_params=strategy["offload_params"], zero_init=True,
        )
    elif stage in (1, 2):
        cpu_bytes, states = estimate_zero2_model_states_mem_needs(
            total, num_gpus_per_node=gpus, num_nodes=nodes, cpu_offload=strategy["offload_optimizer"]
        )
    else:  # DDP / one process, full fine-tuning: weights, gradients, two Adam moments in the model dtype
        states = 4 * dtype_bytes * total

    # Reference model
    if peft or training_args.precompute_ref_log_probs:
        reference = 0.0
    elif stage == 3:
        reference = 0.0 if strategy["offload_params"] else 2 * total / total_gpus
        if strategy["offload_params"]:
            cpu_bytes += 2 * total / nodes
    else:
        reference = dtype_bytes * total

    k = _completions(script_args, training_args, completions)
    tokens = training_args.per_device_train_batch_size * k * training_args.max_length
    act = _activation_bytes(config, tokens, bool(training_args.gradient_checkpointing), 2 if training_args.bf16 else 4)
    activations = sum(act.values())
    total_gpu = states + reference + activations + OVERHEAD_BYTES
    fits_gpu = total_gpu <= USABLE_FRACTION * gpu_mem * GB
    fits_cpu = cpu_mem is None or cpu_bytes <= cpu_mem * GB
    return {
        "recipe": os.path.relpath(recipe, REPO) if Path(recipe).resolve().is_relative_to(REPO) else recipe,
        "loss": iterate_loss or script_args.loss,  # an iterate recipe's `loss: dpo` is planned as NCA on K=2
        "architecture": type(model).__name__,
        "params": total,
        "largest_gathered_params": largest,
        "moe_leaf_classes": [c.__name__ for c in moe],
        "strategy": strategy["name"],
        "nodes": nodes,
        "gpus_per_node": gpus,
        "gpu_mem_gb": gpu_mem,
        "cpu_mem_gb": cpu_mem,
        "completions": k,
        "global_batch_prompts": training_args.per_device_train_batch_size
        * training_args.gradient_accumulation_steps * total_gpus,
        "tokens_per_micro_batch": tokens,
        "lora_params": lora_params,
        "model_states": states,
        "reference": reference,
        "activations": activations,
        "activation_parts": act,
        "overhead": OVERHEAD_BYTES,
        "total_gpu": total_gpu,
        "cpu_per_node": cpu_bytes,
        "fits_gpu": fits_gpu,
        "fits_cpu": fits_cpu,
        "fits": fits_gpu and fits_cpu,
    }


def _gb(x: float) -> str:
    return f"{x / GB:.1f}"


def _hardware(p: dict) -> str:
    hw = f"{p['nodes']}x{p['gpus_per_node']}x{p['gpu_mem_gb']:g} GB"
    return hw + (f", {p['cpu_mem_gb']:g} GB CPU" if p["cpu_mem_gb"] else "")


COLUMNS = [
    ("Recipe", lambda p: f"`{p['recipe']}`"),
    ("Loss", lambda p: p["loss"]),
    ("Params", lambda p: f"{p['params'] / 1e9:.2f}B"),
    ("Strategy", lambda p: p["strategy"]),
    ("Hardware (nodes x GPUs x mem)", _hardware),
    ("Tokens/micro-batch", lambda p: f"{p['tokens_per_micro_batch']} (K={p['completions']})"),
    ("Model states", lambda p: _gb(p["model_states"])),
    ("Reference", lambda p: _gb(p["reference"])),
    ("Activations", lambda p: _gb(p["activations"])),
    ("Overhead", lambda p: _gb(p["overhead"])),
    ("Total / GPU (GB)", lambda p: _gb(p["total_gpu"])),
    ("CPU / node (GB)", lambda p: _gb(p["cpu_per_node"])),
    ("Fits", lambda p: "yes" if p["fits"] else "**no**"),
]


def markdown_table(plans: list[dict]) -> str:
    lines = ["| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    lines += ["| " + " | ".join(f(p) for _, f in COLUMNS) + " |" for p in plans]
    return "\n".join(lines)


def text_table(plans: list[dict]) -> str:
    rows = [[c for c, _ in COLUMNS]] + [[f(p).replace("`", "").replace("**", "") for _, f in COLUMNS] for p in plans]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    out = ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipes", nargs="+", help="recipe YAML file(s)")
    parser.add_argument("--gpus", type=int, help="GPUs per node (default: the recipe's `hardware`)")
    parser.add_argument("--gpu-mem", type=float, help="GB per GPU (default: the recipe's `hardware`, else 80)")
    parser.add_argument("--nodes", type=int, help="number of nodes (default: the recipe's `hardware`, else 1)")
    parser.add_argument("--cpu-mem", type=float, help="host memory per node in GB (checked with offload)")
    parser.add_argument("--completions", type=int, help="completions per prompt K (default: 4, 2 for pairs)")
    parser.add_argument("--markdown", action="store_true", help="print a markdown table")
    parser.add_argument("--json", action="store_true", help="print the plans as JSON")
    ns = parser.parse_args(argv)
    try:  # a missing recipe: one line, exit 2
        for recipe in ns.recipes:
            check_path(recipe, "recipes", "file")
    except SettingsError as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    plans = []
    for r in ns.recipes:  # a recipe that cannot be planned (an unknown key, no model config): one line, exit 2, as
        try:  # a missing one; exit 1 stays "does not fit"
            plans.append(plan(r, gpus=ns.gpus, gpu_mem=ns.gpu_mem, nodes=ns.nodes, cpu_mem=ns.cpu_mem,
                              completions=ns.completions))
        except ValueError as error:
            parser.exit(2, f"{parser.prog}: error: {r}: {error}\n")
    if ns.json:
        print(json.dumps(plans, indent=1))
    elif ns.markdown:
        print(markdown_table(plans))
    else:
        print(text_table(plans))
        for p in plans:
            a = p["activation_parts"]
            print(
                f"\n{p['recipe']}: {p['architecture']} {p['params'] / 1e9:.2f}B params, largest gathered unit "
                f"{p['largest_gathered_params'] / 1e6:.0f}M params"
                + (f" (ZeRO-3 leaf: {', '.join(p['moe_leaf_classes'])})" if p["moe_leaf_classes"] else "")
                + f"; activations = checkpoints {_gb(a['checkpoints'])} + layer {_gb(a['layer'])} + LM head "
                f"{_gb(a['lm_head'])} + router {_gb(a['router'])} GB; "
                + f"global batch: x {p['nodes'] * p['gpus_per_node']} processes = {p['global_batch_prompts']} "
                "prompts (global batch); "
                + ("fits" if p["fits"] else "DOES NOT FIT")
                + f" ({_gb(p['total_gpu'])} of {p['gpu_mem_gb']:g} GB per GPU"
                + (f", {_gb(p['cpu_per_node'])} of {p['cpu_mem_gb']:g} GB CPU per node" if p["cpu_mem_gb"] else "")
                + ")"
            )
    return 0 if all(p["fits"] for p in plans) else 1


if __name__ == "__main__":
    sys.exit(main())
