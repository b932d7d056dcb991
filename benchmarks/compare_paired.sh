#!/usr/bin/env bash
# Run compare.py jobs two at a time, each pair started together and waited for together, so the
# two methods of a pair share the 2 cores with each other and nothing else (RESULTS.md, "Defaults
# that tune, fourth pass"). Each job is "dataset method seed [dropout-init]"; jobs pair up in order.
#
#   bash benchmarks/compare_paired.sh OUT_DIR                      # this file's round (18 runs)
#   bash benchmarks/compare_paired.sh OUT_DIR "mnist delta 0" "mnist centered 0"
#   BUDGET=5 bash benchmarks/compare_paired.sh /tmp/out "mnist delta 0" "mnist centered 0"   # a quick check
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: compare_paired.sh OUT_DIR [JOB JOB ...]}
shift
mkdir -p "$out"
jobs=("$@")
if [ ${#jobs[@]} -eq 0 ]; then
  for ds in fashionmnist mnist; do for s in 0 1 2; do jobs+=("$ds delta $s" "$ds centered $s"); done; done
  jobs+=("fashionmnist stn 0" "fashionmnist delta 1 0.6" "fashionmnist stn 1" "fashionmnist delta 2 0.6"
         "fashionmnist stn 2" "mnist delta 2 0.85")
fi

run() {  # dataset method seed [init]
  local ds=$1 method=$2 seed=$3 init=${4:-} extra=() tag=""
  if [ -n "$init" ]; then extra=(--dropout-init "$init"); tag="_from$init"; fi
  python benchmarks/compare.py --dataset "$ds" --budget "${BUDGET:-420}" --clock cpu --threads 1 \
    --train-subset 2000 --trial-epochs 25 --eval-every 100 --warmup-steps 200 \
    --seeds "$seed" --methods "$method" "${extra[@]}" \
    --json "$out/compare_${ds}_${method}${tag}_seed${seed}.json" > "$out/log_${ds}_${method}${tag}_seed${seed}.txt" 2>&1
}

for ((i = 0; i < ${#jobs[@]}; i += 2)); do
  echo "$(date +%T) ${jobs[i]} | ${jobs[i + 1]:-}"
  # shellcheck disable=SC2086
  run ${jobs[i]} &
  if [ -n "${jobs[i + 1]:-}" ]; then
    # shellcheck disable=SC2086
    run ${jobs[i + 1]} &
  fi
  wait
done
python benchmarks/compare.py --table-from "$out"/compare_*.json
