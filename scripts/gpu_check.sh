#!/usr/bin/env bash
# The GPU check of issue 26 (python -m scripts.gpu_check): on one GPU in at most 8 minutes, bench/gpu/check.{json,md}.
#   scripts/gpu_check.sh                       # on the GPU machine
#   scripts/gpu_check.sh --dry-run --out DIR   # every stage on a CPU, tiny sizes
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
exec "${PYTHON:-python}" -m scripts.gpu_check "$@"
