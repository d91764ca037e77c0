#!/usr/bin/env bash
# One prepared run on the GPU machine (method in GPU.md of the project notes), under 6 minutes.
#   OUT=/some/dir bash benchmarks/gpu_check.sh        (run from the repository root)
# Steps, each under `timeout` with its budget in seconds (they add up to 345):
#   1. versions (15): python, torch, triton, CUDA, the GPU's name.
#   2. tests and compiles (140), in parallel processes, nothing timed: the conformance matrix on
#      CUDA (tests/attention/test_matrix.py, QKV_TEST_DEVICE=cuda, MATRIX_SHARDS processes), the
#      `gpu` tests of test_triton.py (GPU_TEST_SHARDS processes), and WARM_SHARES processes
#      compiling every triton kernel that steps 3 and 4 time into Triton's cache.
#   3. the FlashAttention sweep against torch SDPA's cuDNN, flash and efficient kernels, decode
#      bandwidth against copy bandwidth (130): attention_gpu.{json,md,png}, with the targets.
#   4. the split-KV decode threshold and auto's CUDA order (45): gpu_tuning.{json,md}.
#   5. the RESULTS.md section (15): RESULTS_section.md (benchmarks/gpu_report.py).
# Every step's log is "$OUT/<step>.txt"; steps.tsv holds step, budget, seconds, exit code (124:
# timed out). SWEEP_QUICK=1 measures two sequence lengths and two caches only.
set -uo pipefail
OUT="${OUT:-benchmarks/out}"
PY="${PYTHON:-python3}"
MATRIX_SHARDS="${MATRIX_SHARDS:-6}"
GPU_TEST_SHARDS="${GPU_TEST_SHARDS:-4}"
WARM_SHARES="${WARM_SHARES:-6}"
mkdir -p "$OUT"
export PYTHONPATH=. PYTHONUNBUFFERED=1
unset TRITON_INTERPRET QKV_TEST_DEVICE QKV_TEST_SHARD QKV_TEST_BACKENDS
STEPS="$OUT/steps.tsv"
: > "$STEPS"
START=$(date +%s)

# step NAME BUDGET COMMAND...: run COMMAND under `timeout BUDGET`, output to $OUT/NAME.txt.
step() {
    local name=$1 budget=$2 t0 rc
    shift 2
    t0=$(date +%s)
    timeout -k 5 "$budget" "$@" > "$OUT/$name.txt" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$budget" "$(( $(date +%s) - t0 ))" "$rc" >> "$STEPS"
    echo "[$(( $(date +%s) - START )) s] $name: exit $rc after $(( $(date +%s) - t0 )) s (budget $budget s)"
}

# 1. versions
step versions 15 "$PY" - <<'PY'
import platform, subprocess, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| triton",
      triton.__version__, "| cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
try:
    print("commit", subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                   text=True).stdout.strip() or "unknown")
except OSError:
    print("commit unknown")
PY
cat "$OUT/versions.txt"

# 2. tests and compiles, in parallel (one thread each: the reference runs on the CPU)
PYTEST=("$PY" -m pytest -v -rfE -p no:cacheprovider)
for ((i = 0; i < MATRIX_SHARDS; i++)); do
    OMP_NUM_THREADS=1 QKV_TEST_DEVICE=cuda QKV_TEST_SHARD="$i/$MATRIX_SHARDS" \
        step "matrix_$i" 140 "${PYTEST[@]}" tests/attention/test_matrix.py &
done
for ((i = 0; i < GPU_TEST_SHARDS; i++)); do
    OMP_NUM_THREADS=1 QKV_TEST_TRITON_CONFIGS=first QKV_TEST_SHARD="$i/$GPU_TEST_SHARDS" \
        step "gpu_tests_$i" 140 "${PYTEST[@]}" -m gpu tests/attention/test_triton.py &
done
for ((i = 0; i < WARM_SHARES; i++)); do
    OMP_NUM_THREADS=1 step "warm_$i" 140 "$PY" benchmarks/gpu_tuning.py --warm "$i/$WARM_SHARES" &
done
wait
tail -n 1 "$OUT"/matrix_*.txt "$OUT"/gpu_tests_*.txt

# 3. the sweep, alone on the GPU
QUICK_FLAG=()
if [ "${SWEEP_QUICK:-0}" = "1" ]; then QUICK_FLAG=(--quick); fi
step sweep 130 "$PY" benchmarks/attention_gpu.py --out "$OUT" "${QUICK_FLAG[@]}"
tail -n 30 "$OUT/sweep.txt"

# 4. decode threshold and auto's order
step tuning 45 "$PY" benchmarks/gpu_tuning.py --out "$OUT" "${QUICK_FLAG[@]}"
tail -n 30 "$OUT/tuning.txt"

# 5. the RESULTS.md section
step report 15 "$PY" benchmarks/gpu_report.py "$OUT" --output "$OUT/RESULTS_section.md" \
    --command "OUT=$OUT bash benchmarks/gpu_check.sh"
echo "[$(( $(date +%s) - START )) s] done; the RESULTS.md section is $OUT/RESULTS_section.md"
ls -l "$OUT"
