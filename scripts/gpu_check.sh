#!/usr/bin/env bash
# The GPU check: the `gpu` tests (training, bf16, the merge sweep and its evaluation on CUDA,
# against the CPU), then one LoRA front (configs/lora_tweets.yaml: 3 finetunes, 3 sweeps, 1
# multitask finetune) timed on the device, which must finish within 5 minutes.
#
#   bash scripts/gpu_check.sh [OUTPUT_DIR]        # default: runs/gpu_check
#
# PYTHON picks the interpreter (default .venv/bin/python, else python3). Writes
# OUTPUT_DIR/gpu_check.json with the timings and the front's stages. Where no CUDA device is
# visible it says so and exits 0 without running anything (the gpu tests skip there anyway).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
OUTPUT=${1:-runs/gpu_check}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export DO_NOT_TRACK=true MLFLOW_DISABLE_TELEMETRY=true PREFECT_SERVER_ANALYTICS_ENABLED=false

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "gpu_check: no CUDA device is visible here: nothing to check (the gpu tests skip on a CPU)"
  exit 0
fi
mkdir -p "$OUTPUT"
"$PYTHON" -c 'import torch; print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__, "| CUDA", torch.version.cuda)'

t0=$(date +%s.%N)
"$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py
t1=$(date +%s.%N)
rm -rf "$OUTPUT/lora"
timeout 300 "$PYTHON" -m flows.cli run configs/lora_tweets.yaml --output "$OUTPUT/lora" -q
t2=$(date +%s.%N)

"$PYTHON" - "$OUTPUT" "$t0" "$t1" "$t2" <<'PY'
import json, sys
from pathlib import Path

import torch

out, t0, t1, t2 = Path(sys.argv[1]), *map(float, sys.argv[2:])
front = json.loads((out / "lora" / "lora_tweets" / "front.json").read_text())
result = {
    "device": torch.cuda.get_device_name(0),
    "torch": torch.__version__,
    "gpu_tests_s": round(t1 - t0, 1),
    "lora_front_s": round(t2 - t1, 1),
    "lora_front_stages_s": {k: round(v, 1) for k, v in front["seconds"].items()},
    "lora_front_under_5_min": t2 - t1 < 300,
    "chosen": front["chosen"],
}
(out / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
PY
