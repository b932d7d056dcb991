#!/usr/bin/env bash
# Δ-STN against centered STN at an equal number of steps (not seconds): by default the
# FashionMNIST CNN, 2,000 images × 120 epochs = 1,920 steps from dropout 0.05, compare.py's
# 200-step warm-up, scored every 100 steps and at the end. Each seed's two modes run side by
# side, one thread each.
#
#     bash benchmarks/oracle_runs/modes_equal_steps.sh [SEED ...]     # default seeds 0 1 2
#     DATASET=mnist EPOCHS=400 bash benchmarks/oracle_runs/modes_equal_steps.sh   # the MLP, 6,400 steps
set -u
dataset=${DATASET:-fashionmnist}
epochs=${EPOCHS:-120}
out=benchmarks/oracle_runs/modes
mkdir -p "$out"
seeds=("$@")
[ ${#seeds[@]} -eq 0 ] && seeds=(0 1 2)
for seed in "${seeds[@]}"; do
    for mode in delta centered; do
        python benchmarks/oracle_runs/tuned_only.py --dataset "$dataset" --epochs "$epochs" --start 0.05 \
            --warmup-steps 200 --eval-every 100 --mode "$mode" --seed "$seed" \
            > "$out/${dataset}_${mode}_seed${seed}.json" 2> "$out/${dataset}_${mode}_seed${seed}.log" &
    done
    wait
done
python - "$out" "$dataset" <<'PY'
import json, statistics, sys
from pathlib import Path
rows = {}
for f in sorted(Path(sys.argv[1]).glob(f"{sys.argv[2]}_*_seed*.json")):
    mode, seed = f.stem.split("_")[1], int(f.stem.rsplit("seed", 1)[1])
    r = json.loads(f.read_text().strip().splitlines()[-1])
    rows.setdefault(mode, {})[seed] = r["best_val_loss"]
    print(f"{mode:>9} seed {seed}: best val {r['best_val_loss']:.4f}, test {r['test_loss']:.4f}, steps {r['steps']}")
for mode, by_seed in rows.items():
    print(f"{mode:>9} mean over seeds {sorted(by_seed)}: {statistics.fmean(by_seed.values()):.4f}")
PY
