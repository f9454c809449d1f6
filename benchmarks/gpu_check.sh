#!/usr/bin/env bash
# GPU check, one prepared script for a CUDA machine. It ends within a time budget
# (GPU_CHECK_BUDGET_S, default 330 s, about 4 minutes expected on an H200): every step has its own
# time limit, cut to what is left of the budget, and a step that no longer fits is skipped (and
# said so), so the steps run in order of importance:
#   1. benchmarks/throughput.py's three pipelines at 224 px, batch 128, dnfer's automatic mixed
#      precision (bf16): (a) the authors' style of pipeline, (b) dnfer's defaults, (c) the floor;
#      speedup (b)/(a) and efficiency (b)/(c)  <- goal: efficiency >= 0.85
#   2. the same at 112 px (more, shorter steps, 3 rounds)  <- goal: efficiency >= 0.75
#   3. the CUDA tests (tests/test_cuda.py: batched augmentation and input pipeline vs the CPU,
#      side-stream prefetch, bf16 training reproducible and resumed exactly, fp16 + GradScaler,
#      torch.compile, CLI, no host<->device syncs in the step loop)
#   4. one epoch of each method at the paper's budget (benchmarks/epoch_cost.py: ResNet-18,
#      224 px, batch 128, bf16, RAF-DB-sized synthetic set) and the projected cost of a sweep
#   5. torch.profiler: the ops of (b) with the most GPU time (224 px)
#   6. where a step of (b) goes (synchronised phases; (b) and (c)), at 224 and at 112 px
#   7. the input pipeline alone (benchmarks/batch_pipeline.py): read, copy, each view, in line
#      vs prefetched on a side stream, host<->device synchronisations per batch
#   8. (b) and (c) again with train.deterministic off (cuDNN autotuning): what determinism costs
# The summary ends with one line per image size:
#   GPU efficiency at 224 px: 0.NN (DEVICE, DATE)
#
# Needs torch, torchvision, numpy, pillow, opencv-python-headless, pyyaml, tqdm, rich, matplotlib
# and pytest (checked first; the script installs nothing);
# dnfer itself need not be installed (src/ is put on PYTHONPATH). Run from anywhere:
#   bash benchmarks/gpu_check.sh
# Logs: everything printed goes to $LOG_DIR/gpu_check.log, the summary also to summary.txt and
# the epoch-cost table to epoch_cost.json (3 files). LOG_DIR defaults to $OUT when that is
# set (a folder a remote runner collects), else a new folder under /tmp (printed). PYTHON picks the
# interpreter (default: .venv/bin/python if it sees a GPU, else python3).
# GPU_CHECK_SMOKE=1 runs every step on the CPU at toy sizes (32/16 px, tiny_cnn, a few steps):
# it checks the script itself, not the speed; the CUDA tests then skip.
# Record the device, date, command and the summary in docs/performance.md ("GPU").
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# Deterministic cuBLAS (what `dnfer train` sets itself) before any process touches the GPU.
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"

BUDGET=${GPU_CHECK_BUDGET_S:-330}
SMOKE=${GPU_CHECK_SMOKE:-0}
if [[ -z "${LOG_DIR:-}" ]]; then
  if [[ -n "${OUT:-}" ]]; then LOG_DIR=$OUT; else LOG_DIR=$(mktemp -d /tmp/gpu_check-XXXXXX); fi
fi
mkdir -p "$LOG_DIR" || exit 1

if [[ -z "${PYTHON:-}" ]]; then
  PYTHON=python3
  if [[ -x .venv/bin/python ]] && .venv/bin/python -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    PYTHON=.venv/bin/python
  fi
fi

if [[ $SMOKE == 1 ]]; then
  DEV=cpu; BIG=32; SMALL=16; BATCH=16
  THROUGHPUT_MODEL=(--model tiny_cnn --threads 2)
  EPOCH_COST_SIZE=(--model tiny_cnn --image-size 32 --batch-size 16 --train-size 200 --test-size 40 --threads 2)
  STEPS_BIG=(--steps 2 --warmup 1 --rounds 2); STEPS_SMALL=(--steps 3 --warmup 1 --rounds 2)
  STEPS_SHORT=(--steps 2 --warmup 1 --rounds 1); PROFILE_STEPS=(--steps 2 --warmup 1)
  PIPELINE_SIZE=(--repeats 2 --epochs 1)
else
  DEV=cuda; BIG=224; SMALL=112; BATCH=128
  THROUGHPUT_MODEL=(); EPOCH_COST_SIZE=(--image-size 224 --batch-size 128)
  STEPS_BIG=(--steps 15 --warmup 5 --rounds 5); STEPS_SMALL=(--steps 40 --warmup 5 --rounds 3)
  STEPS_SHORT=(--steps 15 --warmup 5 --rounds 3); PROFILE_STEPS=(--steps 5 --warmup 3)
  PIPELINE_SIZE=()
fi

main() {
  # Which code ran: a hash of the Python sources on disk (a copied working tree can carry a stale
  # .git, so the commit it names is no proof); the same command in a checkout gives the same hash.
  local src_hash
  src_hash=$(find src benchmarks -type f -name '*.py' -print0 | LC_ALL=C sort -z | xargs -0 cat | sha1sum | cut -c1-12)
  echo "== $(date -u +%Y-%m-%dT%H:%M:%SZ)  $(hostname)  python: $PYTHON  sources: $src_hash (git HEAD as copied: $(git rev-parse --short HEAD 2>/dev/null || echo n/a))"
  echo "budget ${BUDGET} s; logs in $LOG_DIR$([[ $SMOKE == 1 ]] && echo '; SMOKE run on the CPU: toy sizes, no speed measured')"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader 2>/dev/null || true
  echo "CPU cores: $(nproc)"
  DEVICE_NAME=$(SMOKE=$SMOKE "$PYTHON" - <<'EOF'
import importlib.util, os, sys
missing = [m for m in ("torch", "torchvision", "numpy", "PIL", "cv2", "yaml", "tqdm", "rich", "matplotlib", "pytest")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {', '.join(missing)} (install them, or set PYTHON to an interpreter that has them)")
import torch, torchvision
if os.environ["SMOKE"] == "1":
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CPU smoke run", file=sys.stderr)
    print("CPU smoke run")
    sys.exit(0)
if not torch.cuda.is_available():
    sys.exit("torch sees no CUDA device")
print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}, {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}",
      file=sys.stderr)
print(torch.cuda.get_device_name(0))
EOF
  ) || return 1
  RUN_DATE=$(date -u +%Y-%m-%d)

  local cpus workers
  cpus=$(nproc)
  workers=$(( cpus > 8 ? 8 : cpus ))  # the reference pipeline gets up to 8 DataLoader workers
  [[ $SMOKE == 1 ]] && workers=1
  COMMON=(--device "$DEV" --batch-size "$BATCH" --precision auto --workdir "$WORK" "${THROUGHPUT_MODEL[@]}")

  step 1 60 120 "(a) reference vs (b) dnfer vs (c) floor, $BIG px, batch $BATCH, AMP" \
    "$PYTHON" benchmarks/throughput.py "${COMMON[@]}" --image-size "$BIG" "${STEPS_BIG[@]}" --workers "$workers"
  step 2 40 90 "(a) vs (b) vs (c) at $SMALL px, batch $BATCH, AMP" \
    "$PYTHON" benchmarks/throughput.py "${COMMON[@]}" --image-size "$SMALL" "${STEPS_SMALL[@]}" --workers "$workers"
  step 3 45 150 "CUDA tests (tests/test_cuda.py)" \
    "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests/test_cuda.py
  step 4 45 150 "one epoch of each method at the paper's budget, projected to a sweep" \
    "$PYTHON" benchmarks/epoch_cost.py --device "$DEV" "${EPOCH_COST_SIZE[@]}" --epochs 2 --workdir "$WORK" \
      --json "$LOG_DIR/epoch_cost.json"
  step 5 25 45 "torch.profiler: ops of (b) with the most GPU time, $BIG px" \
    "$PYTHON" benchmarks/throughput.py "${COMMON[@]}" --image-size "$BIG" "${PROFILE_STEPS[@]}" --profile
  step 6 35 60 "where a dnfer step goes (synchronised phases; (b) and (c)), $BIG px then $SMALL px" \
    bash -c '"$@" --image-size '"$BIG"'; a=$?; "$@" --image-size '"$SMALL"'; b=$?; exit $(( a ? a : b ))' _ \
      "$PYTHON" benchmarks/throughput.py "${COMMON[@]}" "${STEPS_SHORT[@]}" --rounds 1 --variants bc --phases
  step 7 25 60 "the input pipeline alone, $BIG px, batch $BATCH" \
    "$PYTHON" benchmarks/batch_pipeline.py --device "$DEV" --image-size "$BIG" --batch-size "$BATCH" "${PIPELINE_SIZE[@]}"
  step 8 25 50 "(b) and (c) with train.deterministic off (cuDNN autotuner), $BIG px" \
    "$PYTHON" benchmarks/throughput.py "${COMMON[@]}" --image-size "$BIG" "${STEPS_SHORT[@]}" --variants bc --no-deterministic

  summary | tee "$LOG_DIR/summary.txt"
  local n
  for n in "${!RC[@]}"; do [[ ${RC[$n]} == 0 || ${RC[$n]} == skipped ]] || return 1; done
  return 0
}

declare -A RC
# step N MIN_S LIMIT_S TITLE COMMAND...: run with a time limit of LIMIT_S, cut to what is left of
# the budget (keeping 10 s for the summary); skipped when less than MIN_S would be left.
step() {
  local n=$1 min=$2 limit=$3 title=$4
  shift 4
  local left=$(( BUDGET - SECONDS - 10 ))
  echo
  if (( left < min )); then
    echo "== $n/8: $title: SKIPPED, ${left} s of the budget left (needs ${min} s)"
    RC[$n]=skipped
    return
  fi
  (( limit > left )) && limit=$left
  echo "== $n/8: $title  ($(date -u +%H:%M:%S), limit ${limit} s, at ${SECONDS} s of ${BUDGET})"
  timeout -k 5 "$limit" "$@" 2>&1 | tee "$WORK/step$n.log"
  RC[$n]=${PIPESTATUS[0]}
  [[ ${RC[$n]} == 0 ]] || echo "!! step $n exited with ${RC[$n]}$([[ ${RC[$n]} == 124 ]] && echo ' (time limit)')"
}

# the value after "efficiency (b)/(c): " in a throughput log (the median of the per-round ratios)
efficiency() { grep -h -m1 '^efficiency (b)/(c):' "$WORK/step$1.log" 2>/dev/null | awk '{print $3}'; }

summary() {
  local n e size goal
  echo
  echo "== summary $(date -u +%Y-%m-%dT%H:%M:%SZ), ${SECONDS} s"
  printf 'step exit codes:'; for n in 1 2 3 4 5 6 7 8; do printf ' %s=%s' "$n" "${RC[$n]:-n/a}"; done; echo
  for n in 1 2; do
    echo "-- $([[ $n == 1 ]] && echo $BIG || echo $SMALL) px:"
    grep -h -E "^\(a\)|^\(b\)|^\(c\)|^speedup|^efficiency" "$WORK/step$n.log" 2>/dev/null || echo "(no result)"
  done
  echo "-- deterministic off, $BIG px:"
  grep -h -E "^\(b\)|^\(c\)|^efficiency" "$WORK/step8.log" 2>/dev/null || echo "(no result)"
  echo "-- phases of a (b) step ($BIG px, then $SMALL px):"
  grep -h -A8 "^where a step of (b) goes" "$WORK/step6.log" 2>/dev/null | grep -E "^  " || echo "(no result)"
  echo "-- input pipeline alone:"
  grep -h -E "synchronisations|^whole batch|^in-line" "$WORK/step7.log" 2>/dev/null || echo "(no result)"
  echo "-- one epoch per method ($BIG px):"
  sed -n '/^method /,$p' "$WORK/step4.log" 2>/dev/null | grep -v '^$' || echo "(no result)"
  echo "-- tests:"
  tail -n 1 "$WORK/step3.log" 2>/dev/null || echo "(no result)"
  for n in 1 2; do
    size=$([[ $n == 1 ]] && echo $BIG || echo $SMALL)
    goal=$([[ $n == 1 ]] && echo 0.85 || echo 0.75)
    e=$(efficiency $n)
    echo "GPU efficiency at $size px: ${e:-n/a} ($DEVICE_NAME, $RUN_DATE)"
    [[ -n $e ]] && echo "   goal >= $goal: $(awk -v e="$e" -v g="$goal" 'BEGIN { print (e + 0 >= g + 0) ? "met" : "NOT met" }')"
  done
}

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
DEVICE_NAME=unknown
RUN_DATE=$(date -u +%Y-%m-%d)
main 2>&1 | tee "$LOG_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
