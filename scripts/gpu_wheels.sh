#!/usr/bin/env bash
# The wheels the lent GPU machine lacks, for scripts/gpu_scale.sh (and gpu_layouts.sh): built here, carried there.
#
#   bash scripts/gpu_wheels.sh .wheels        # in the repository root; .wheels/ is git-ignored
#
# The device image (Python 3.12, torch 2.11, transformers 5.17, accelerate 1.15, peft, huggingface_hub 1.x; no trl,
# datasets, deepspeed, pydantic or mistral-common; /work/.library/device/KINDS.md) gets, for CPython 3.12 on
# x86-64 Linux:
#   trl, datasets + dill + multiprocess (pure Python; pyarrow, pandas, xxhash and fsspec are in the image),
#   transformers 5.24.0 (nca-trl needs >= 5.23; 5.25 would need huggingface_hub 2.x, httpx2 and hf-xet as well, and
#     5.24.0 with the image's huggingface_hub is what the earlier H200 runs used), accelerate, peft,
#   deepspeed (PyPI has only its source: built here into a pure-Python wheel with DS_BUILD_OPS=0, so DeepSpeed
#     JIT-builds the ops it uses on the device, CPU Adam with the image's C++ compiler and ninja) + pydantic,
#     pydantic-core, annotated-types, typing-inspection, typing-extensions and hjson (its requirements the image lacks),
#   and tokenizer.model.v1, the Mistral-7B tokenizer file from this machine's mistral-common (gpu_scale.sh points
#     NCA_TRL_MISTRAL_TOKENIZER at it: mistral-common itself would need more of pydantic's world than the image has).
# One version of each package (pip refuses two); the folder is emptied of wheels first. It prints the folder's size,
# which must stay under the device's 64 MiB (working tree and carried paths together): exit 1 if over 48 MiB.
#
# Then, on the device (the `run` tool of this workplace; OUT is its output folder):
#   run(command="bash scripts/gpu_scale.sh $OUT .wheels", carry=[".wheels"], timeout_s=570, kind="nvidia-h200")
#
# Versions: the variables below (e.g. TRANSFORMERS=5.24.0); PYTHON: the interpreter whose pip downloads (any
# Python >= 3.9 with pip; the wheels are chosen for 3.12, not for it) and builds DeepSpeed (it needs torch and
# setuptools installed: the project's virtual environment has them).
set -euo pipefail
out=${1:?usage: gpu_wheels.sh WHEEL_DIR}
py=${PYTHON:-python3}
TRL=${TRL:-1.16.0} DATASETS=${DATASETS:-5.2.0} DILL=${DILL:-0.4.1} MULTIPROCESS=${MULTIPROCESS:-0.70.19}
TRANSFORMERS=${TRANSFORMERS:-5.24.0} ACCELERATE=${ACCELERATE:-1.16.0} PEFT=${PEFT:-0.21.2}
DEEPSPEED=${DEEPSPEED:-0.19.8} PYDANTIC=${PYDANTIC:-2.14.4} PYDANTIC_CORE=${PYDANTIC_CORE:-2.50.5}
ANNOTATED_TYPES=${ANNOTATED_TYPES:-0.8.0} TYPING_INSPECTION=${TYPING_INSPECTION:-0.4.5}
TYPING_EXTENSIONS=${TYPING_EXTENSIONS:-4.16.0} HJSON=${HJSON:-3.1.0}

mkdir -p "$out"
rm -f "$out"/*.whl "$out"/tokenizer.model.v1
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${platforms[@]}" \
  -d "$out" "trl==$TRL" "datasets==$DATASETS" "dill==$DILL" "multiprocess==$MULTIPROCESS" \
  "transformers==$TRANSFORMERS" "accelerate==$ACCELERATE" "peft==$PEFT" "pydantic==$PYDANTIC" \
  "pydantic-core==$PYDANTIC_CORE" "annotated-types==$ANNOTATED_TYPES" "typing-inspection==$TYPING_INSPECTION" \
  "typing-extensions==$TYPING_EXTENSIONS" "hjson==$HJSON"
# DeepSpeed: no wheel on PyPI. Its source, built without ops into a py3-none-any wheel (torch from $py's environment)
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
"$py" -m pip download -q --no-deps --no-binary=:all: -d "$src" "deepspeed==$DEEPSPEED"
DS_BUILD_OPS=0 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out" "$src"/deepspeed-*.tar.gz
# The Mistral-7B tokenizer file of the tiny models (nca_trl.tiny.mistral_tokenizer_file)
"$py" -c "import shutil, sys; from nca_trl.tiny import mistral_tokenizer_file as f; shutil.copy(f(), sys.argv[1])" \
  "$out/tokenizer.model.v1"

ls -l "$out"
bytes=$(du -cb "$out"/*.whl "$out"/tokenizer.model.v1 | tail -1 | cut -f1)
echo "$out: $(ls "$out"/*.whl | wc -l) wheels + tokenizer.model.v1, $((bytes / 1024 / 1024)) MiB ($bytes bytes)"
if [ "$bytes" -gt $((48 * 1024 * 1024)) ]; then
  echo "gpu_wheels.sh: $out is over 48 MiB: with the working tree it would pass the device's 64 MiB;" \
       "drop a package the image has"
  exit 1
fi
