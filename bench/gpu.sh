#!/usr/bin/env bash
# Every figure issues 11 and 19 ask of a GPU, into one file, on one H100 (issue 11's steps in at
# most 8 minutes, issue 19's in at most 9 more, their timeouts; not yet timed on a GPU):
# throughput of Table 1 and of the small config (bench/throughput.py), then a whole
# default-space study on 50,000 synthetic images for as many trials as fit in the time left
# (bench/study.py; 2 workers on the one GPU, at least 24 trials asked for); then issue 19's
# paths: `hpo start --gpus all --jobs-per-gpu 2` (two jobs per GPU on one study, children
# named by the job's CUDA_VISIBLE_DEVICES), an out-of-memory draw (bench/oom.py: Table 1 on a
# GPU filled to 0.5 GiB free, retried once, memory back after it) and a resumed trial against
# an uninterrupted one (bench/resume.py: same layout and the other one).
#
#   bench/gpu.sh                  # CUDA; figures in bench-cuda-<UTC time>.txt
#   bench/gpu.sh --device cpu     # the same steps at CPU sizes (a few minutes), end to end
#   bench/gpu.sh --smoke          # every step at its smallest size, on the CPU (the suite runs it)
#
# Environment: PYTHON (default .venv/bin/python, else python), OUT (the figures file), DATA
# (the synthetic set, kept between runs), STUDY_S (seconds after which the study's workers
# start no new trial; default 240 on CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
SMOKE=false
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE=${2:?--device needs cpu or cuda}; shift 2 ;;
    --smoke) SMOKE=true; shift ;;
    *) echo "bench/gpu.sh: unknown argument $1 (--device cpu|cuda, --smoke)" >&2; exit 2 ;;
  esac
done
if [[ "$SMOKE" == true ]]; then DEVICE=cpu; fi
if [[ -x .venv/bin/python ]]; then DEFAULT_PYTHON=.venv/bin/python; else DEFAULT_PYTHON=python; fi
PYTHON=${PYTHON:-$DEFAULT_PYTHON}
OUT=${OUT:-bench-$DEVICE-$(date -u +%Y%m%d-%H%M).txt}
DATA=${DATA:-/tmp/hpo-bench-$DEVICE}

step() {
  echo "\$ $*  # $(date -u +%H:%M:%S)"
  "$@"
  echo
}

# Two jobs per GPU on one study (on the CPU: two workers, no --gpus), a tiny space on the
# synthetic set; then the study's status: which worker ran which trial, none failed.
two_per_gpu() {
  local url="sqlite:///$DATA/two-per-gpu-$$.db"
  mkdir -p "$DATA"
  step timeout 240 "$PYTHON" -m search.cli start --study two-per-gpu --storage "$url" \
    --space tiny --dataset synthetic --data-dir "$DATA" --jobs-per-gpu 2 "$@"
  step "$PYTHON" -m search.cli status --study two-per-gpu --storage "$url"
}

{
  echo "bench/gpu.sh --device $DEVICE, $(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  if [[ "$SMOKE" == true ]]; then  # on the CPU, whatever --device says
    step "$PYTHON" bench/throughput.py --smoke
    step "$PYTHON" bench/study.py --smoke --data-dir "$DATA"  # its 200 images serve the next
    two_per_gpu --trials 2 --epochs 1
    step "$PYTHON" bench/oom.py --smoke
    step "$PYTHON" bench/resume.py --smoke
  elif [[ "$DEVICE" == cuda ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    step "$PYTHON" bench/throughput.py --device cuda --data-dir "$DATA" --rounds 2
    step "$PYTHON" bench/throughput.py --device cuda --data-dir "$DATA" --config small --rounds 2
    # Issue 30: every recipe lever on against off, per epoch, and the eval cost of test-time views.
    step timeout 300 "$PYTHON" bench/levers.py --device cuda --rounds 2
    step timeout 420 "$PYTHON" bench/study.py --device cuda --data-dir "$DATA" \
      --trials 200 --workers 2 --timeout "${STUDY_S:-240}"
    two_per_gpu --trials 8 --epochs 3 --gpus all
    step timeout 120 "$PYTHON" bench/oom.py --device cuda
    step timeout 180 "$PYTHON" bench/resume.py --device cuda --data-dir "$DATA/resume"
  else
    step "$PYTHON" bench/throughput.py --device cpu --data-dir "$DATA" --config table1 \
      --batch-size 32 --images 200 --rounds 1
    step "$PYTHON" bench/throughput.py --device cpu --data-dir "$DATA" --rounds 1
    step "$PYTHON" bench/levers.py --device cpu --config small --rounds 1
    step "$PYTHON" bench/study.py --device cpu --trials 4 --epochs 3 --images 1000
    two_per_gpu --trials 4 --epochs 2  # the 240 s bound holds on a busy CPU too
    step "$PYTHON" bench/oom.py --device cpu
    step "$PYTHON" bench/resume.py --device cpu --images 1000 --epochs 3
  fi
  echo "done $(date -u +%H:%M:%S)"
} 2>&1 | tee "$OUT"
echo "figures in $OUT"
