"""The training stages: zero3, zero3_offload, mixtral_zero3 and fsdp2 (the package's docstring says what each
measures), each one `nca-trl train` launch of a random model through `Run.train`."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from .common import ACCEL, FSDP_TOLERANCE, ROUTER_AUX_LOSS_COEF, StageError
from .environment import cxx_compiler, has_ninja, python_headers
from .measure import check_distributed, finite_losses, logged, memory, reload_check, throughput
from .run import Run


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
    compiler, ninja, headers = cxx_compiler(), has_ninja(), python_headers()
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
