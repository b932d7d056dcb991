"""One tuned run of oracle_gap.py without its grid, to vary one setting at a time.

    python benchmarks/oracle_runs/tuned_only.py --warmup-steps 200 --epochs 100 --start 0.05
    python benchmarks/oracle_runs/tuned_only.py --hyper-lr 0.03 --epochs 100 --start 0.05
    python benchmarks/oracle_runs/tuned_only.py --dataset fashionmnist --mode centered --epochs 120 --eval-every 100

The loop is oracle_gap.py's tuned run (a λ step after every 5th train step, scored every
``--eval-every`` steps, 50 by default, and at the end); the options not given keep the library's
defaults. Its budget is steps, not seconds, so two modes compare at equal steps, free of timing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT)]

import compare  # noqa: E402
import oracle_gap  # noqa: E402

from hypertune.experiments import load_image_classification  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--dataset", default="mnist", choices=["mnist", "fashionmnist"])
parser.add_argument("--data-root", default=str(ROOT.parent / "shared" / "datasets"))
parser.add_argument("--train-subset", type=int, default=2000)
parser.add_argument("--epochs", type=int, default=100)
parser.add_argument("--start", type=float, default=0.05)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--warmup-steps", type=int, default=0)
parser.add_argument("--hyper-lr", type=float, default=None, help="λ's RMSprop rate (library default 1e-2)")
parser.add_argument("--response-lr", type=float, default=None, help="Θ's Adam rate (library default 1e-3)")
parser.add_argument("--init-scale", type=float, default=compare.DROPOUT_SCALE, help="σ0 of the dropout rates")
parser.add_argument("--response-every", type=int, default=None)
parser.add_argument("--response-fraction", type=float, default=None, help="Θ step on this leading share of each batch")
parser.add_argument("--mode", choices=["delta", "centered", "stn"], default=None,
                    help="DeltaSTNOptimizer(mode=...) (library default delta)")
parser.add_argument("--antithetic", action="store_true", help="DeltaSTNOptimizer(antithetic=True)")
parser.add_argument("--eval-every", type=int, default=50, help="score every this many steps")
args = parser.parse_args()
torch.set_num_threads(1)
data = load_image_classification(args.dataset, args.data_root, val_fraction=0.15, seed=0)
data["train"] = tuple(t[: args.train_subset] for t in data["train"])
options = {k: v for k, v in {"hyper_lr": args.hyper_lr, "response_lr": args.response_lr,
                             "response_every": args.response_every, "response_fraction": args.response_fraction,
                             "mode": args.mode, "antithetic": args.antithetic or None}.items() if v is not None}
run_args = argparse.Namespace(lr=0.01, batch_size=128, warmup_steps=args.warmup_steps, epochs=args.epochs,
                              eval_every=args.eval_every, seed=args.seed)
out = oracle_gap.tuned_run(args.dataset, args.start, data, run_args, init_scale=args.init_scale, options=options)
print(json.dumps({"settings": {k: v for k, v in vars(args).items() if k != "data_root"},
                  **{k: out[k] for k in ("best_val_loss", "test_loss", "final_hparams", "trace", "steps",
                                         "cpu_seconds")}}))
