#!/usr/bin/env bash
# The one-run GPU proof, for a machine with a CUDA GPU whose Python lacks trl / datasets / mistral-common.
#
#   bash scripts/gpu_proof.sh OUT_DIR [WHEEL_DIR]
#
# The wheels: trl, datasets (+ dill, multiprocess) and transformers for Python 3.12. Not mistral-common: without its
# dependencies (pydantic) it breaks transformers' AutoTokenizer; give the tokenizer file instead with
# NCA_TRL_MISTRAL_TOKENIZER=/path/to/tokenizer.model (mistral_common/data/tokenizer.model.v1).
#
# Installs the wheels in WHEEL_DIR (if given) into a private folder, then runs, each with its own time limit:
#   1. scripts/gpu_check.py            (tiny recipe in bf16, layout agreement in bf16, Mistral-7B-shaped 2-layer
#                                       model in both layouts: tokens/s, peak GPU memory, MFU)
#   2. scripts/benchmark.py --bf16     (DPOTrainer vs NCATrainer, workloads vicuna and long)
# and merges both JSON files into OUT_DIR/gpu_results.json. Logs go to OUT_DIR/*.log.
set -uo pipefail
out=${1:?usage: gpu_proof.sh OUT_DIR [WHEEL_DIR]}
wheels=${2:-}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 TQDM_DISABLE=1
if [ -n "$wheels" ]; then
  rm -rf /tmp/site  # a warm machine keeps an earlier install: start clean
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$wheels"/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/nvidia_smi.txt"
python3 -c "import torch, transformers, trl, datasets; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'trl', trl.__version__, 'datasets', datasets.__version__)"

timeout ${GPU_CHECK_TIMEOUT:-240} python3 scripts/gpu_check.py --out "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
check=$?
timeout ${BENCH_TIMEOUT:-180} python3 scripts/benchmark.py --bf16 --size ${BENCH_SIZE:-50m} --steps ${BENCH_STEPS:-8} \
  --warmup 2 --json "$out/benchmark_gpu.json" 2>&1 | tee "$out/benchmark_gpu.log"
bench=$?
python3 - "$out" "$check" "$bench" <<'PY'
import json, sys
from pathlib import Path
out, check, bench = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def load(name):
    path = out / name
    return json.loads(path.read_text()) if path.exists() else None
results = {"gpu_check": load("gpu_check.json"), "benchmark": load("benchmark_gpu.json"),
           "exit_codes": {"gpu_check": check, "benchmark": bench}}
(out / "gpu_results.json").write_text(json.dumps(results, indent=2))
print("gpu_results.json written; exit codes", results["exit_codes"])
PY
[ "$check" = 0 ] && [ "$bench" = 0 ]
