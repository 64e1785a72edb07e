#!/usr/bin/env bash
# The GPU scale run, in one call on one CUDA GPU: ZeRO-3, ZeRO-3 offload, Mixtral under ZeRO-3, FSDP2, sampling at
# length, one iterate round, the layout benchmark with median steps.
#
#   bash scripts/gpu_scale.sh OUT_DIR WHEEL_DIR          # WHEEL_DIR: built by scripts/gpu_wheels.sh ('' for none)
#   SMOKE=1 bash scripts/gpu_scale.sh OUT_DIR ''         # every stage tiny, on a CPU too (tests/test_gpu_scale.py)
#   STAGES="fsdp2 iterate" bash scripts/gpu_scale.sh OUT_DIR WHEEL_DIR   # some stages; others already in the JSON stay
#   (on the device a second call on the warm machine starts from the first's JSON, kept in GPU_SCALE_WORK; on a fresh
#   one, join the two calls' files here: python scripts/scale_results.py combine ALL.json FIRST.json SECOND.json)
#
# On the lent device machine (its image lacks trl, datasets, deepspeed and pydantic, and has an older transformers),
# from this repository's root, with the wheels built here by `bash scripts/gpu_wheels.sh .wheels` and carried:
#
#   run(command="bash scripts/gpu_scale.sh $OUT .wheels", carry=[".wheels"], timeout_s=570, kind="nvidia-h200")
#
# Then copy $OUT/gpu_scale.json to results/gpu_scale.json (and $OUT/gpu_scale.log to results/).
#
# What it does, all output also in OUT_DIR/gpu_scale.log:
#   1. a 20-second probe of the image, before anything is installed: Python, the packages the run needs and their
#      versions, the C++ compiler, ninja, Python.h and nvcc (DeepSpeed JIT-builds its CPU Adam with the first three),
#      disk and memory;
#   2. the wheels of WHEEL_DIR installed into a private folder (/tmp/site, first on PYTHONPATH; the image is untouched);
#   3. nvidia-smi, then `scripts/gpu_scale.py environment`: versions as installed, the device, the measured bf16
#      matmul peak (the MFU denominator);
#   4. the stages (scripts/nca_scale/'s docstring says what each measures), one process each under its own
#      `timeout`, in this order: zero3 zero3_offload mixtral_zero3 fsdp2 generate_long iterate layouts_median.
#      After each, scripts/scale_results.py merges its object into OUT_DIR/gpu_scale.json (rewritten each time), so a
#      stage that times out or fails keeps what the others measured. A stage's limit is its cap below or what is left
#      of GPU_SCALE_BUDGET (470 s: the whole run stays under 8 minutes), whichever is smaller; a stage left with less
#      than 30 s is recorded as not run.
#   5. `scale_results.py summary`: the targets (planner within 25% of the measured peak on the ZeRO-3 stages,
#      plain-layout MFU > 35% at 7B width, prefill-once >= 1.5x num_return_sequences) and one line per stage.
# Exit status: 0 every stage ok and every target met, 1 a stage failed, 3 all ran but a target was missed.
# Variables: GPU_SCALE_WORK (models, data, runs; default /tmp/nca-gpu-scale, kept so a second call reuses the models),
# GPU_SCALE_BUDGET, CPU_ADAM (auto | fused | torch), LAYOUT_SYSTEMS (benchmark.py --systems; default a),
# NCA_TRL_MISTRAL_TOKENIZER (the Mistral tokenizer file; default WHEEL_DIR/tokenizer.model.v1, which gpu_wheels.sh
# copies there, since the image has no mistral-common).
set -uo pipefail
out=${1:?usage: gpu_scale.sh OUT_DIR WHEEL_DIR}
wheels=${2-}
mkdir -p "$out" && out=$(cd "$out" && pwd)
json="$out/gpu_scale.json"
work=${GPU_SCALE_WORK:-/tmp/nca-gpu-scale}
mkdir -p "$work/results" && work=$(cd "$work" && pwd)
stages=${STAGES:-zero3 zero3_offload mixtral_zero3 fsdp2 generate_long iterate layouts_median}
declare -A cap=([zero3]=110 [zero3_offload]=170 [mixtral_zero3]=110 [fsdp2]=130 [generate_long]=80 [iterate]=70
                [layouts_median]=300)
for name in $stages; do
  [ -n "${cap[$name]-}" ] || { echo "gpu_scale.sh: unknown stage '$name' in STAGES: use some of ${!cap[*]}"; exit 2; }
done
if [ "${SMOKE:-0}" = 1 ]; then
  smoke=(--smoke) budget=${GPU_SCALE_BUDGET:-3000}
  for s in "${!cap[@]}"; do cap[$s]=600; done
  export CPU_ADAM=${CPU_ADAM:-torch}  # no JIT build of DeepSpeed's CPU Adam on the CPU dry run (minutes on 2 cores)
else
  smoke=() budget=${GPU_SCALE_BUDGET:-470}
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TQDM_DISABLE=1
start=$(date +%s)
deadline=$((start + budget))
# A second call on the same (warm) machine goes on from the first's results: the device empties OUT_DIR each call
[ -f "$json" ] || [ ! -f "$work/gpu_scale.json" ] || cp "$work/gpu_scale.json" "$json"

probe() {  # what the image has, before the wheels: read from package metadata, nothing imported
  timeout 20 python3 - "$work/probe.json" <<'PY'
import json, os, shutil, subprocess, sys, sysconfig
from importlib import metadata
names = ["torch", "transformers", "trl", "datasets", "accelerate", "deepspeed", "peft", "pydantic", "pydantic_core",
         "dill", "multiprocess", "pyarrow", "fsspec", "huggingface_hub", "tokenizers", "safetensors", "ninja",
         "mistral_common", "sentencepiece", "flash_attn", "kernels"]
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
def first_line(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout.strip().splitlines()[-1]
    except Exception as e:  # absent or broken: say which
        return f"unavailable ({type(e).__name__})"
tools = {t: shutil.which(t) for t in ("c++", "g++", "gcc", "nvcc", "ninja", "nvidia-smi")}
disk = {p: round(shutil.disk_usage(p).free / 1e9, 1) for p in ("/tmp", "/dev/shm") if os.path.isdir(p)}
mem = next((int(l.split()[1]) / 1e6 for l in open("/proc/meminfo") if l.startswith("MemTotal")), None)
probe = {"python": sys.version.split()[0], "executable": sys.executable, "packages": {n: version(n) for n in names},
         "tools": tools, "nvcc": first_line(["nvcc", "--version"]) if tools["nvcc"] else None,
         "python_headers": os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")),
         "cuda_home": os.environ.get("CUDA_HOME"), "free_disk_gb": disk, "host_memory_gb": mem,
         "cpu_count": os.cpu_count()}
open(sys.argv[1], "w").write(json.dumps(probe, indent=1))
print("[gpu_scale] probe: " + json.dumps(probe))
PY
}

run_stage() {  # NAME: one stage under its own time limit, its object merged into gpu_scale.json
  local name=$1 now left limit rc t0 t1 result="$work/results/$1.json"
  rm -f "$result"
  now=$(date +%s); left=$((deadline - now - 5)); limit=${cap[$name]}
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== stage $name (time limit ${limit} s, $((deadline - now)) s left of ${budget} s)"
  t0=$(date +%s.%N)
  if [ "$limit" -lt 30 ]; then
    rc=125 limit=0  # not run: scale_results.py records why
  else
    timeout -k 10 "$limit" python3 scripts/gpu_scale.py "$name" --work "$work" --result "$result" --results "$json" \
      --budget "$limit" "${smoke[@]}"
    rc=$?
  fi
  t1=$(date +%s.%N)
  python3 scripts/scale_results.py merge "$json" "$name" "$result" --exit-code "$rc" --timeout "$limit" \
    --seconds "$(python3 -c "print($t1 - $t0)")"
}

main() {
  probe || echo "[gpu_scale] probe failed or took over 20 s (exit $?)"
  if [ -n "$wheels" ]; then
    ls "$wheels"/*.whl > /dev/null \
      || { echo "[gpu_scale] no wheels in '$wheels': build them with scripts/gpu_wheels.sh"; return 1; }
    rm -rf /tmp/site  # a warm machine keeps an earlier install: start clean
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$wheels"/*.whl \
      || { echo "[gpu_scale] wheel install failed: one version of each package in '$wheels'?"; return 1; }
    export PYTHONPATH=/tmp/site:$PWD
    if [ -f "$wheels/tokenizer.model.v1" ] && [ -z "${NCA_TRL_MISTRAL_TOKENIZER-}" ]; then
      export NCA_TRL_MISTRAL_TOKENIZER=$(cd "$wheels" && pwd)/tokenizer.model.v1  # the tiny models' tokenizer
    fi
  else
    export PYTHONPATH=$PWD
  fi
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$work/nvidia_smi.txt"
    nvidia-smi
  fi
  if timeout 90 python3 scripts/gpu_scale.py environment --work "$work" --result "$work/environment.json" \
      "${smoke[@]}"; then
    python3 scripts/scale_results.py section "$json" environment "$work/environment.json"
  else
    echo "[gpu_scale] the environment step failed: the stages run anyway (they measure the peak themselves)"
  fi
  for name in $stages; do
    run_stage "$name"
  done
  echo "== summary ($(( $(date +%s) - start )) s)"
  python3 scripts/scale_results.py summary "$json" "${smoke[@]}" --stages "$stages"
  local status=$?
  cp "$json" "$work/gpu_scale.json"
  return "$status"
}

main 2>&1 | tee "$out/gpu_scale.log"
exit "${PIPESTATUS[0]}"
