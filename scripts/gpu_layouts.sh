#!/usr/bin/env bash
# The GPU run of the shared-prompt layout's varlen attention, one run on a machine with a CUDA GPU:
#
#   bash scripts/gpu_layouts.sh OUT_DIR [WHEEL_DIR]       # SMOKE=1: tiny sizes, any device (a dry run on a CPU)
#
# WHEEL_DIR: wheels the machine's Python lacks (trl, datasets + dill + multiprocess, transformers), installed into a
# private folder as scripts/gpu_proof.sh does; NCA_TRL_MISTRAL_TOKENIZER names the tokenizer file where
# mistral-common is missing. Two stages, each with its own time limit and its JSON written as soon as it ends:
#   1. scripts/gpu_check.py --stages layout_agreement   bf16 log-probs and gradients of the shared-prompt (varlen)
#      layout against the plain layout, and both against float32, on a Mistral-7B-width model (4 layers)
#   2. scripts/benchmark.py --layouts --systems a,n     side by side in one process, on the long workload and on
#      vicuna, max_length 2048: trl.DPOTrainer on best-vs-worst pairs, NCA plain K=4, NCA shared-prompt K=4 (auto
#      kernel), NCA with the automatic layout rule; step time, tokens/s, MFU against the measured bf16 peak, peak memory
# OUT_DIR/gpu_layouts.json is the benchmark's own JSON (results/gpu_layouts.json), OUT_DIR/gpu_agreement.json stage 1's.
set -uo pipefail
out=${1:?usage: gpu_layouts.sh OUT_DIR [WHEEL_DIR]}
wheels=${2:-}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: stage 1 runs from scripts/
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ -n "$wheels" ]; then
  rm -rf /tmp/site
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
if [ "${SMOKE:-0}" = 1 ]; then
  agree=(--smoke) bench=(--size tiny --layers 2 --steps 1 --warmup 1)
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia_smi.txt"
  agree=(--layers 4) bench=(--size 7b-2l --layers 4 --bf16 --steps "${BENCH_STEPS:-5}" --warmup 2)
fi
python3 -c "import torch, transformers, trl, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)"

(cd scripts && timeout "${AGREE_TIMEOUT:-150}" python3 gpu_check.py --stages layout_agreement "${agree[@]}" \
  --out "$out/gpu_agreement.json") 2>&1 | tee "$out/gpu_agreement.log"
agreement=$?
timeout "${BENCH_TIMEOUT:-360}" python3 scripts/benchmark.py --layouts --systems a,n --workloads long,vicuna \
  "${bench[@]}" --json "$out/gpu_layouts.json" 2>&1 | tee "$out/gpu_layouts.log"
benchmark=$?
echo "exit codes: agreement $agreement, benchmark $benchmark"
[ "$agreement" = 0 ] && [ "$benchmark" = 0 ]
