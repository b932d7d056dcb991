#!/usr/bin/env bash
# Every CUDA check in one run, for a session that is lent a GPU (none has been yet, so none of
# this has ever run on CUDA). Writes its JSON and logs under $OUT (default benchmarks/cuda) and
# prints the tables; record the rows in benchmarks/RESULTS.md with device, date and command.
#
#     bash benchmarks/cuda_checks.sh            # about 5 minutes on one GPU
set -u
OUT=${OUT:-benchmarks/cuda}
mkdir -p "$OUT"
status=0
python - <<'PY' || exit 2
import torch
assert torch.cuda.is_available(), "no CUDA device: nothing to check"
print(torch.cuda.get_device_name(0), torch.__version__, torch.version.cuda)
PY
# 1. library paths: eval = plain, fp32 / bf16 / fp16+GradScaler steps, compile, tangent vs CPU
python benchmarks/cuda_smoke.py --device cuda --json "$OUT/cuda_smoke.json" || status=1
# 2. step overhead at the defaults (issue 13: simple_cnn and resnet18 <= 2.0x on CUDA)
python benchmarks/overhead.py --models mlp,simple_cnn,resnet18 --modes delta --device cuda \
    --json "$OUT/overhead_cuda_defaults.json" || status=1
# 3. every mode, and memory, for the record
python benchmarks/overhead.py --models simple_cnn,resnet18,lstm --modes stn,centered,delta --device cuda \
    --memory --json "$OUT/overhead_cuda_modes.json" || status=1
# 4. the CPU test suite still passes on this machine (the GPU runner has its own torch build)
python -m pytest -q -x tests/test_amp.py tests/test_compile.py tests/test_linearize.py tests/test_optimizer.py \
    || status=1
exit $status
