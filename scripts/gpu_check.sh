#!/usr/bin/env bash
# The prepared device check (issue 31): the gpu-marked tests and a short benchmark on the
# packaged SmolLM2 and MiniLM (LoRA-SB vs peft LoRA training tokens/s, peak GPU memory per
# phase, generation tokens/s at batch 32, one federated round), written as JSON to
# results/gpu_check.json. Under 8 minutes on one H100.
#
#   scripts/gpu_check.sh             # on a machine with CUDA
#   scripts/gpu_check.sh --dry-run   # anywhere: resolves the device, lists what it would measure
#
# Extra arguments go to scripts/gpu_check.py (--out FILE, --device cuda:N).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TOKENIZERS_PARALLELISM=false
if [[ " $* " != *" --dry-run "* ]]; then
  exec timeout 480 "$PYTHON" scripts/gpu_check.py "$@"
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
