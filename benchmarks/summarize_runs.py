"""A markdown table of example runs (``examples/*.py --out DIR``), tuned against untuned.

One epoch's validation loss moves by a few hundredths at small training sets, so next to the
final losses the table gives the mean over the last ``--last`` epochs, which is what decides
whether tuning helped.

    python benchmarks/summarize_runs.py runs/s0_tuned runs/s0_untuned runs/s1_tuned runs/s1_untuned
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path


def summarize(run: Path, last: int) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    with open(run / "epochs.csv", newline="") as f:
        val = [float(row["val_loss"]) for row in csv.DictReader(f)]
    if not val:
        raise SystemExit(f"{run}/epochs.csv has no epochs: did the run finish?")
    return {
        "run": run.name,
        "budget": f"{metrics['args'].get('train_subset') or 'all'} images × {metrics['epochs']} epochs",
        "seed": metrics["args"]["seed"],
        "tuned": metrics["tuned"],
        "val_loss": metrics["val"]["loss"],
        f"val_loss_last{last}": statistics.fmean(val[-last:]),
        "min_val_loss": min(val),
        "test_loss": metrics["test"]["loss"],
        "test_acc": metrics["test"]["acc"],
        "wall_s": metrics["wall_time_s"],
        "final_hparams": metrics.get("final_hparams", {}),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="--out directories of example runs")
    parser.add_argument("--last", type=int, default=5, help="average the validation loss of this many last epochs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = sorted((summarize(r, args.last) for r in args.runs), key=lambda r: (r["budget"], r["seed"], not r["tuned"]))
    print(f"| budget | seed | run | final val loss | val loss, mean of last {args.last} epochs | best epoch's val loss "
          "| test loss | test acc | wall s |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['budget']} | {r['seed']} | {'tuned' if r['tuned'] else 'untuned'} | {r['val_loss']:.4f} "
              f"| {r[f'val_loss_last{args.last}']:.4f} | {r['min_val_loss']:.4f} | {r['test_loss']:.4f} "
              f"| {100 * r['test_acc']:.2f}% | {r['wall_s']:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
