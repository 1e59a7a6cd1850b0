#!/usr/bin/env bash
# Set up .venv if missing, then run the offline demo end to end (the README's demo command).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m sst_lab.demo "$@"
