#!/usr/bin/env bash
# One call on a GPU machine: install (compiles the CUDA extension), parity at full
# size, then every benchmark. Prints markdown for bench/RESULTS.md; with $OUT set,
# also writes each part there. The timeouts below keep the whole call inside one
# 10-minute device command; the budget asked for is 8 minutes (not yet measured).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/ncl_fast_gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee "$out/card.txt"
start=$(date +%s)
# The machine has no internet: build against its torch, install nothing else.
$py -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$out/install.log" 2>&1 \
  || { echo "pip install failed:"; tail -30 "$out/install.log"; }
$py - <<'PY' 2>&1 | tee "$out/versions.txt"
import torch, triton
from ncl_fast import _cuda_ops
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, Triton {triton.__version__}, extension {_cuda_ops.BUILD_INFO}")
PY
echo "install + build: $(( $(date +%s) - start )) s"

status=0
timeout 120 $py -m pytest -q -x tests/test_gpu_parity.py 2>&1 | tee "$out/parity.txt" || status=1
timeout 180 $py bench/bench_ncl_loss.py 2>&1 | tee "$out/bench_ncl_loss.md" || status=1
timeout 90 $py bench/bench_pc_loss.py 2>&1 | tee "$out/bench_pc_loss.md" || status=1
if [ -f bench/bench_train_step.py ]; then
  timeout 180 $py bench/bench_train_step.py 2>&1 | tee "$out/bench_train_step.md" || status=1
fi
echo "gpu_check: $(( $(date +%s) - start )) s, status $status"
exit $status
