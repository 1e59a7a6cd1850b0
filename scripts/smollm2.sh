#!/usr/bin/env bash
# Set up .venv and SmolLM2-135M-Instruct if missing, then run base, utility (SST-2), safety
# (safety-tuned-LLaMAs) and merged (linear, SST-Merge) SmolLM2 models end to end through the sweep
# (configs/studies/smollm2-demo.yaml) and print the side-by-side table with intervals.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m sst_lab.demo --model smollm2 "$@"
