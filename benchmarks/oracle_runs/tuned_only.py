"""One tuned run of oracle_gap.py without its grid, to vary one setting (here: the warm-up).

    python benchmarks/oracle_runs/tuned_only.py --warmup-steps 200 --epochs 100 --start 0.05
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import oracle_gap  # noqa: E402

from hypertune.experiments import load_image_classification  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashionmnist"])
parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets"))
parser.add_argument("--train-subset", type=int, default=2000)
parser.add_argument("--epochs", type=int, default=100)
parser.add_argument("--start", type=float, default=0.05)
parser.add_argument("--warmup-steps", type=int, default=0)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
run_args = argparse.Namespace(lr=0.01, batch_size=128, warmup_steps=args.warmup_steps, epochs=args.epochs,
                              eval_every=50, seed=args.seed)
torch.set_num_threads(1)
data = load_image_classification(args.dataset, args.data_root, val_fraction=0.15, seed=0)
data["train"] = tuple(t[: args.train_subset] for t in data["train"])
r = oracle_gap.tuned_run(args.dataset, args.start, data, run_args)
print(json.dumps({k: r[k] for k in ("best_val_loss", "test_loss", "final_hparams", "steps", "cpu_seconds")}))
