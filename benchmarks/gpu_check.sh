#!/usr/bin/env bash
# GPU check, one prepared script for a lent or rented CUDA machine (about 3 minutes on an H200;
# every step has its own time limit, so it ends within 9.5 minutes whatever happens):
#   1. benchmarks/throughput.py's three pipelines at 224 px with dnfer's automatic mixed
#      precision: (a) the authors' style of pipeline, (b) dnfer's defaults, (c) the floor;
#      prints speedup (b)/(a) and efficiency (b)/(c)  <- the issue's goal: efficiency >= 0.85
#   2. the input pipeline alone (benchmarks/batch_pipeline.py): read, copy, each view, in line
#      vs prefetched on a side stream, host<->device synchronisations per batch
#   3. the CUDA tests (tests/test_cuda.py: batched augmentation and input pipeline vs the CPU,
#      side-stream prefetch, bf16 training reproducible and resumed exactly, fp16 + GradScaler,
#      torch.compile, CLI)
#   4. (b) and (c) again with train.deterministic off (cuDNN autotuning) - what determinism costs
#   5. where a step of (b) goes (synchronised phases)
#   6. torch.profiler: the ops of (b) with the most GPU time
#
# Run from the repository root on a machine with a CUDA GPU and torch, torchvision, numpy, pillow,
# opencv-python-headless, pyyaml, tqdm, rich and pytest installed (dnfer itself need not be
# installed: src/ is put on PYTHONPATH). Set PYTHON to choose the interpreter (default:
# .venv/bin/python if it can see a GPU, else python3); set LOG_DIR to also keep each step's
# full output there (step1.log ... step6.log).
#   bash benchmarks/gpu_check.sh            # prints the tables, the two ratios and a summary
# Record the device, date, command and the summary in docs/performance.md ("GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Deterministic cuBLAS (what `dnfer train` sets itself) before any process touches the GPU.
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"

if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    PYTHON=.venv/bin/python
  fi
fi

# Which code ran: a hash of the Python sources on disk (a copied working tree can carry a stale
# .git, so the commit it names is no proof); the same command in a checkout gives the same hash.
SRC_HASH=$(find src benchmarks -type f -name '*.py' -print0 | LC_ALL=C sort -z | xargs -0 cat | sha1sum | cut -c1-12)
echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ)  $(hostname)  python: $PYTHON  sources: $SRC_HASH (git HEAD as copied: $(git rev-parse --short HEAD 2>/dev/null || echo n/a))"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
echo "CPU cores: $(nproc)"
"$PYTHON" - <<'EOF' || exit 1
import importlib.util, sys
missing = [m for m in ("torch", "torchvision", "numpy", "PIL", "cv2", "yaml", "tqdm", "rich", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (install them, or set PYTHON to an interpreter that has them)")
import torch, torchvision
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
EOF

CPUS=$(nproc)
WORKERS=$(( CPUS > 8 ? 8 : CPUS ))  # the reference pipeline gets up to 8 DataLoader workers
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
LOGS="${LOG_DIR:-$WORK/logs}"
mkdir -p "$LOGS"
COMMON=(--device cuda --image-size 224 --batch-size 128 --precision auto --workdir "$WORK")
declare -A RC

# step N LIMIT_S TITLE COMMAND...: run with a time limit, keep the whole output in $LOGS/stepN.log
step() {
  local n=$1 limit=$2 title=$3
  shift 3
  echo
  echo "== $n/6: $title  ($(date -u +%H:%M:%S), limit ${limit} s)"
  timeout "$limit" "$@" 2>&1 | tee "$LOGS/step$n.log"
  RC[$n]=${PIPESTATUS[0]}
  [[ ${RC[$n]} == 0 ]] || echo "!! step $n exited with ${RC[$n]}$([[ ${RC[$n]} == 124 ]] && echo ' (time limit)')"
}

step 1 150 "(a) reference vs (b) dnfer vs (c) floor, 224 px, batch 128, AMP" \
  "$PYTHON" benchmarks/throughput.py "${COMMON[@]}" --steps 15 --warmup 5 --rounds 5 --workers "$WORKERS"
step 2 80 "the input pipeline alone, 224 px, batch 128" \
  "$PYTHON" benchmarks/batch_pipeline.py --device cuda --image-size 224 --batch-size 128
step 3 150 "CUDA tests (tests/test_cuda.py)" \
  "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
step 4 60 "(b) and (c) with train.deterministic off (cuDNN autotuner)" \
  "$PYTHON" benchmarks/throughput.py "${COMMON[@]}" --steps 15 --warmup 5 --rounds 3 --variants bc --no-deterministic
step 5 50 "where a dnfer step goes on this GPU (synchronised phases; (b) and (c) only)" \
  "$PYTHON" benchmarks/throughput.py "${COMMON[@]}" --steps 10 --warmup 3 --rounds 1 --variants bc --phases
step 6 50 "torch.profiler: ops of (b) with the most GPU time" \
  "$PYTHON" benchmarks/throughput.py "${COMMON[@]}" --steps 5 --warmup 3 --profile

echo
echo "== summary $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "step exit codes: 1=${RC[1]} 2=${RC[2]} 3=${RC[3]} 4=${RC[4]} 5=${RC[5]} 6=${RC[6]}"
grep -h -E "^\(a\)|^\(b\)|^\(c\)|^speedup|^efficiency" "$LOGS/step1.log" || true
echo "-- deterministic off:"
grep -h -E "^\(b\)|^\(c\)|^efficiency" "$LOGS/step4.log" || true
echo "-- input pipeline alone:"
grep -h -E "synchronisations|^whole batch|^  |^in-line" "$LOGS/step2.log" || true
echo "-- tests:"
tail -n 1 "$LOGS/step3.log"
fail=0
for n in 1 2 3 4 5 6; do [[ ${RC[$n]} == 0 ]] || fail=1; done
exit $fail
