#!/usr/bin/env bash
# One call on a GPU machine: build the extension, parity at full size, a memory
# check of every kernel, then the benchmarks. Each part has its own timeout and
# writes its output under $OUT as it goes, so partial results come back.
#
#   bench/gpu_check.sh                 # every part
#   bench/gpu_check.sh build parity ncl   # some parts (build is always first)
#
# Parts, in order: build parity sanitize ncl ncl_candidates pc step step_compiled train.
# The machine has no internet: it builds against its own torch and installs nothing else.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
out=${OUT:-/tmp/ncl_fast_gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
parts=${*:-"build parity sanitize ncl ncl_candidates pc step step_compiled train"}
want() { [[ " $parts " == *" $1 "* ]]; }
status=0
t0=$(date +%s)
stamp() { echo "[gpu_check] $1: $(( $(date +%s) - t0 )) s since start" | tee -a "$out/timeline.txt"; }
run_part() {  # name timeout command...
  local name=$1 limit=$2; shift 2
  want "$name" || return 0
  stamp "$name start"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "[gpu_check] $name: exit $rc"; status=1; }
  stamp "$name end (exit $rc)"
}

{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.sm,temperature.gpu,power.draw --format=csv; } 2>&1 | tee "$out/card.txt"
# sm_90 only: one architecture builds in half the time
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
stamp "build start"
timeout 240 $py -m pip install -q --no-build-isolation --no-deps --no-index -e . >"$out/build.txt" 2>&1 \
  || { echo "pip install failed:"; tail -30 "$out/build.txt"; status=1; }
$py - <<'PY' 2>&1 | tee -a "$out/card.txt"
import torch, triton
from ncl_fast import _cuda_ops
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, Triton {triton.__version__}, "
      f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs), "
      f"extension {_cuda_ops.BUILD_INFO}")
PY
stamp "build end"

# Triton compiles every kernel variant once: do it in parallel processes first (the
# on-disk cache then serves the parity tests and the benchmarks)
if want parity || want ncl; then
  stamp "warm start"
  for v in "float32 contiguous stored" "float32 channels_last stored" "bfloat16 contiguous stored" \
           "bfloat16 channels_last stored" "float16 contiguous stored" "float16 channels_last stored" \
           "float32 contiguous bounded" "bfloat16 contiguous bounded" "float16 contiguous bounded" \
           "bfloat16 channels_last bounded"; do
    set -- $v
    timeout 150 $py bench/warm_cache.py --dtype "$1" --layout "$2" --path "$3" >>"$out/warm.txt" 2>&1 &
  done
  wait
  stamp "warm end"
fi
run_part parity 150 $py -m pytest -q -p no:cacheprovider tests/ops/test_gpu_parity.py
# every kernel under compute-sanitizer's three tools: out-of-bounds accesses, reads of
# memory never written, shared-memory races (one part and output file each)
if want sanitize; then
  for tool in memcheck initcheck racecheck; do
    parts="$parts sanitize_$tool"  # run_part runs the named parts only
    run_part "sanitize_$tool" 150 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" \
      --error-exitcode 9 $py bench/sanitize_check.py
  done
fi
run_part ncl 200 $py bench/bench_ncl_loss.py --profile ${NCL_BENCH_ARGS:-}
# the kernels' alternatives side by side with the default, bf16 (see bench_ncl_loss.py), at 8-12 %
# tampered area (|P| <= 128 per image at stage 1, where the head kernel and the panel apply):
# the backward without the head kernel (GRAD_HEAD_MAJORS=: the grouped kernel with its panel, the
# default before), and without the panel too (as on sm_80); the similarity GEMM's 128-column
# items (SIM_BN=128), and with at most 5 parts of D (SIM_SPLITS=5: the work model's best at
# [93, 877, 54], 1.48x the floor, at 1.2 items per SM); channels_last (as the training step
# passes them; SIM_BN=128 costs its second block per SM there) and contiguous (one block per
# SM either way)
run_part ncl_candidates 280 $py bench/bench_ncl_loss.py --dtypes bfloat16 --layouts channels_last,contiguous \
  --stages "stage 1" --no-compile --profile --area 0.08,0.12 \
  --variants triton,triton:GRAD_HEAD_MAJORS=,triton:GRAD_HEAD_MAJORS=:GRAD_PANEL=0,triton:SIM_BN=128,triton:SIM_BN=128:SIM_SPLITS=5
run_part pc 90 $py bench/bench_pc_loss.py ${PC_BENCH_ARGS:-}
# the training step eager (fp32 and bf16), then compiled and with CUDA graphs (bf16), the profiler's top kernels of each
run_part step 120 $py bench/bench_train_step.py --no-compile --no-train --profile ${STEP_ARGS:-}
run_part step_compiled 300 $py bench/bench_train_step.py --precisions bf16 --configs "base,NCL fused" \
  --modes eager,compiled,graphed --no-train --profile
# the command for 300 steps on the synthetic set: images/s against the step alone (timed in the same run), the
# data-wait share, host ms per step and GPU utilization sampled by the monitor's thread
run_part train 300 $py bench/bench_train_step.py --precisions bf16 --configs "NCL fused" --modes eager,compiled \
  --train-modes eager,compiled --train-steps 300
stamp "done, status $status"
exit $status
