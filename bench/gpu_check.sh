#!/usr/bin/env bash
# One-shot GPU check for issue 7, items 1-2: run it from the repository root on the lent
# GPU machine (H100/H200, Python 3.12, torch, triton, transformers; no Ray, vLLM or
# DeepSpeed, and this package not installed):
#
#     bash bench/gpu_check.sh                  # results under $OUT (default ./gpu_out)
#     bash bench/gpu_check.sh tests kernel     # a subset of: tests kernel kernel_entropy learner
#
# Steps (each under its own time limit, so one hang cannot eat the others' results; the
# default three stay under 9 minutes in the worst case, typically ~4-5):
#   1. env.txt             GPU, driver, torch / triton / transformers versions
#   2. gpu_tests.txt       the gpu-marked tests: Triton kernel vs fp32 (bf16, 1e-3),
#                          packed vs padded with torch varlen attention
#   3. logprob_kernel.txt  naive / chunked / torch.compile / Triton at N=16,384, H=896,
#                          V=151,936 bf16, goals beside (kernel_entropy: with the entropy)
#   4. learner_step.txt    plain-torch PPO learner step, Qwen2.5-0.5B shape, 8 x 2,048,
#                          padded vs packed, tokens/s and MFU
#   summary.txt            exit status of each step
#
# Imports: the package maps rlhf.kernels -> kernels/ (likewise actors, orchestrator) at
# install time. Without an install, a one-line `rlhf` package in a temp folder whose
# __path__ is this repository gives the same import names (PYTHONPATH points at it).
# pytest: if the machine lacks it, put wheels in $WHEELS (default bench/wheels), e.g.
#     pip download pytest -d bench/wheels --only-binary=:all:   (pure Python, ~1 MB)
set -u
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/gpu_out}"
WHEELS="${WHEELS:-$REPO/bench/wheels}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
cd "$REPO"

SHIM="$(mktemp -d)"
mkdir -p "$SHIM/rlhf"
printf '__path__ = [%s]\n' "'$REPO'" > "$SHIM/rlhf/__init__.py"
export PYTHONPATH="$SHIM${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_PRINT_AUTOTUNING=1   # chosen tile configs go into the logs (tuning input)

: > "$OUT/summary.txt"
step() {  # step NAME LIMIT_S CMD...: run, keep output, record the exit status
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1
  "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda)
for mod in ("triton", "transformers", "pytest"):
    try:
        print(mod, __import__(mod).__version__)
    except Exception as e:
        print(mod, "MISSING:", e)
import rlhf.kernels, rlhf.actors.modeling  # the shim works
from rlhf.kernels.logprobs_triton import triton_unavailable_reason
from rlhf.kernels.varlen_attention import varlen_unavailable_reason
print("triton kernel:", triton_unavailable_reason("cuda") or "usable")
print("varlen attention:", varlen_unavailable_reason(torch.device("cuda")) or "usable")
EOF
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if ! "$PY" -c "import pytest" 2>/dev/null && [ -d "$WHEELS" ]; then
  "$PY" -m pip install --no-index --find-links "$WHEELS" pytest >> "$OUT/env.txt" 2>&1
fi

STEPS="${*:-tests kernel learner}"  # optional: kernel_entropy (log-probs + entropy, ~1.5 min)
for s in $STEPS; do
  case $s in
    # Correctness first: one fixed tile config (no autotuning) keeps compile time short.
    tests) step gpu_tests 180 env RLHF_TRITON_AUTOTUNE=0 "$PY" -m pytest -m gpu -q -p no:cacheprovider -rA \
             tests/unit/test_logprobs_triton.py tests/unit/test_packing.py tests/unit/test_logprobs_kernel.py ;;
    kernel) step logprob_kernel 200 "$PY" bench/logprob_kernel.py ;;
    kernel_entropy) step logprob_kernel_entropy 120 "$PY" bench/logprob_kernel.py --entropy --no-compile ;;
    learner) step learner_step 150 "$PY" bench/learner_step.py ${LEARNER_ARGS:-} ;;
    *) echo "unknown step $s (tests kernel kernel_entropy learner)" | tee -a "$OUT/summary.txt" ;;
  esac
done

rm -rf "$SHIM"
echo "--- results in $OUT"
for f in gpu_tests logprob_kernel logprob_kernel_entropy learner_step; do
  [ -f "$OUT/$f.txt" ] && { echo "=== $f"; grep -v "^Triton autotuning" "$OUT/$f.txt" | tail -25; }
done
exit 0
