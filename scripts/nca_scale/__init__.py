"""The stages of the GPU scale run, one process each; scripts/gpu_scale.sh runs them in order, each under its own
time limit, and merges each stage's RESULT.json into OUT_DIR/gpu_scale.json (scripts/scale_results.py).

    python scripts/gpu_scale.py environment --work WORK --result ENV.json [--smoke]
    python scripts/gpu_scale.py STAGE --work WORK --result RESULT.json [--results OUT_DIR/gpu_scale.json]
                                [--budget SECONDS] [--smoke]

Stages (`--smoke`: the same code at tiny sizes, on a CPU too: `common.SMOKE`):

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

The package, one job a module: `common.py` (the sizes of the full and the smoke run, paths, the stage error, child
processes under the stage's time limit), `measure.py` (throughput and MFU, memory against the plan, the logged
losses, the reload check, the long-prompt data), `models.py` (the random models, built once per WORK),
`environment.py` (versions, device, matmul peak, what DeepSpeed's CPU Adam build needs), `run.py` (`Run`: one
stage's context, recipe and training launch), `training_stages.py` (zero3, zero3_offload, mixtral_zero3, fsdp2),
`other_stages.py` (generate_long, iterate, layouts_median), `cli.py` (the command line). Heavy libraries are imported
inside the functions. scripts/gpu_scale.py is the entry point (its folder, scripts/, is then first on the import path:
benchmark.py and plan_memory.py import from there); `python -m nca_scale` from scripts/ is the same.
"""
