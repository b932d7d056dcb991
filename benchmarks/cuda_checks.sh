#!/usr/bin/env bash
# Every CUDA check in one run, for a session that is lent a GPU. Writes its JSON and one log under
# $OUT (default benchmarks/cuda) and prints the tables; record the rows in benchmarks/RESULTS.md
# with device, date and command.
#
#     bash benchmarks/cuda_checks.sh            # core checks about 4 minutes on one GPU
#
# The core checks run first, in order of value; the extras (CUDA graphs through torch.compile,
# the whole CPU suite under this machine's torch) start only while DEADLINE seconds (default 330)
# have not passed, each with a timeout that ends it by then.
set -u
OUT=${OUT:-benchmarks/cuda}
DEADLINE=${DEADLINE:-330}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG="$OUT/cuda_checks.log"
status=0
start=$SECONDS
step() {  # step NAME TIMEOUT CMD...: run with a timeout, log it, remember a failure
    local name=$1 limit=$2
    shift 2
    echo "=== $name ($(date -u +%H:%M:%S), +$((SECONDS - start)) s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name rc=$rc" | tee -a "$LOG"
    [ "$rc" = 0 ] || status=1
}
extra() {  # extra NAME TIMEOUT CMD...: as step, only while the deadline allows, and cut to it
    local name=$1 limit=$2 left=$((DEADLINE - (SECONDS - start)))
    shift 2
    if [ "$left" -lt 60 ]; then echo "=== $name skipped: ${left}s left before the deadline" | tee -a "$LOG"; return; fi
    [ "$left" -lt "$limit" ] && limit=$left
    step "$name" "$limit" "$@"
}
step env 60 python - <<'PY'
import shutil, subprocess, torch
assert torch.cuda.is_available(), "no CUDA device: nothing to check"
print(torch.cuda.get_device_name(0), "torch", torch.__version__, "cuda", torch.version.cuda,
      "cudnn", torch.backends.cudnn.version())
if shutil.which("nvidia-smi"):
    print(subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm", "--format=csv"],
                         capture_output=True, text=True).stdout)
PY
[ "$status" = 0 ] || exit 2
# 1. library paths: eval = plain, fp32 / bf16 / fp16+GradScaler steps, compile, tangent vs CPU
step smoke 150 python benchmarks/cuda_smoke.py --device cuda --json "$OUT/cuda_smoke.json"
# 2. step overhead at the defaults (issue 13: simple_cnn and resnet18 <= 2.0x on CUDA)
step overhead_defaults 120 python benchmarks/overhead.py --models mlp,simple_cnn,resnet18 --modes delta \
    --device cuda --json "$OUT/overhead_cuda_defaults.json"
# 2b. the same at batch 512, where a step is less bound by the host's launches
step overhead_b512 90 python benchmarks/overhead.py --models simple_cnn,resnet18 --modes delta --device cuda \
    --batch 512 --json "$OUT/overhead_cuda_b512.json"
# 3. the library's properties on CUDA (tangents vs finite differences, all-or-nothing steps, ...)
step pytest_cuda 120 python -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_augment.py
# 4. why small models cost more on a GPU: operator calls, launches and syncs per step
step profile 90 python benchmarks/step_profile.py --model simple_cnn --device cuda --json "$OUT/step_profile_cuda.json"
# 5. every mode, and memory, for the record
step overhead_modes 150 python benchmarks/overhead.py --models simple_cnn,resnet18,lstm --modes stn,centered,delta \
    --device cuda --memory --json "$OUT/overhead_cuda_modes.json"
# extras: CUDA graphs through torch.compile, then the CPU suite under this machine's torch build
extra overhead_cuda_graphs 150 python benchmarks/overhead.py --models simple_cnn --modes delta --device cuda \
    --compile reduce-overhead --json "$OUT/overhead_cuda_graphs.json"
extra pytest_cpu_suite 240 python -m pytest -q -p no:cacheprovider -n 14 tests -k "not test_cuda"
echo "=== done in $((SECONDS - start)) s, status $status" | tee -a "$LOG"
exit $status
