#!/usr/bin/env bash
# One prepared run on the GPU machine (method in GPU.md of the project notes):
# versions and GPU name, the GPU test subset, then the FlashAttention sweep with torch SDPA in
# the same process. Results land in "$OUT" (JSON, markdown table, PNG, logs). Under 6 minutes.
#   OUT=/some/dir bash benchmarks/gpu_check.sh        (run from the repository root)
set -uo pipefail
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
export PYTHONPATH=.
unset TRITON_INTERPRET

python3 - <<'PY' 2>&1 | tee "$OUT/versions.txt"
import platform, torch, triton
print("python", platform.python_version(), "| torch", torch.__version__, "| triton",
      triton.__version__, "| cuda", torch.version.cuda)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none")
PY

# GPU test subset (the conformance matrix runs the CPU-usable backends only; it is not repeated).
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/attention/test_triton.py \
    2>&1 | tee "$OUT/pytest_gpu.txt"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_gpu.txt"

# The sweep; SWEEP_QUICK=1 measures two sequence lengths and two caches only.
QUICK_FLAG=""
if [ "${SWEEP_QUICK:-0}" = "1" ]; then QUICK_FLAG="--quick"; fi
timeout 190 python3 benchmarks/attention_gpu.py --out "$OUT" $QUICK_FLAG 2>&1 | tee "$OUT/sweep.txt"
echo "sweep exit: ${PIPESTATUS[0]}" | tee -a "$OUT/sweep.txt"
ls -l "$OUT"
