#!/usr/bin/env bash
# GPU throughput check (<= 5 minutes): the three pipelines of benchmarks/throughput.py at 224 px
# with dnfer's automatic mixed precision, on one CUDA device.
#
# Run from the repository root on a machine with a CUDA GPU and torch, torchvision, numpy,
# pillow, opencv-python-headless and pyyaml installed (dnfer itself need not be installed: src/ is
# put on PYTHONPATH). Set PYTHON to choose the interpreter (default: .venv/bin/python if it can
# see a GPU, else python3).
#   bash benchmarks/gpu_check.sh            # prints the tables and the two ratios
# Record the device, date, command and the last lines in docs/performance.md ("GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    PYTHON=.venv/bin/python
  fi
fi

echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ)  $(hostname)  python: $PYTHON"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PYTHON" - <<'EOF'
import importlib, sys
missing = [m for m in ("torch", "torchvision", "numpy", "PIL", "cv2", "yaml") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (install them, or set PYTHON to an interpreter that has them)")
import torch
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
EOF

CPUS=$(nproc)
WORKERS=$(( CPUS > 8 ? 8 : CPUS ))  # the reference pipeline gets up to 8 DataLoader workers
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

echo "== 1/2: (a) reference vs (b) dnfer vs (c) floor, 224 px, batch 128, AMP"
timeout 200 "$PYTHON" benchmarks/throughput.py --device cuda --image-size 224 --batch-size 128 \
  --precision auto --steps 15 --warmup 5 --rounds 3 --workers "$WORKERS" --workdir "$WORK"

echo "== 2/2: where a dnfer step goes on this GPU (synchronised phases; (b) and (c) only)"
timeout 80 "$PYTHON" benchmarks/throughput.py --device cuda --image-size 224 --batch-size 128 \
  --precision auto --steps 10 --warmup 3 --rounds 1 --variants bc --phases --workdir "$WORK" \
  | tail -n 12
echo "== done $(date -u +%Y-%m-%dT%H:%M:%SZ)"
