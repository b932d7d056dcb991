"""How much of a compare.py result comes from the score taken when the budget ran out.

compare.py's one-run methods (the STN modes and untuned) score every ``--eval-every`` steps and
once more when the time budget ends; that last score falls at a step that depends on the
machine's speed, so two runs of one seed can end on different steps. (For random search and
Optuna the last entry is the last trial's score, so the split means nothing there.) This prints, per run, the best of the periodic scores, the end-of-budget score,
and the best of both (what compare.py reports), with per-method means of each.

    python benchmarks/curve_endpoints.py benchmarks/compare_runs/paired/compare_*.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from pathlib import Path


def endpoints(result: dict) -> dict:
    """Best periodic score, end-of-budget score and reported best of one compare.py result."""
    curve = [value for _, value in result["curve"]]
    # The curve holds the running best: its last entry before the end-of-budget score is the
    # best periodic score; the end score itself is only known when it improved the best.
    periodic = curve[-2] if len(curve) > 1 else float("nan")
    return {"method": result["method"], "seed": result.get("seed"), "steps": result.get("steps"),
            "best_periodic": periodic, "reported": result["best_val_loss"],
            "final_improved": result["best_val_loss"] < periodic}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("json", nargs="+")
    args = parser.parse_args(argv)
    rows = []
    for path in args.json:
        data = json.loads(Path(path).read_text())
        for result in data if isinstance(data, list) else data.get("results", [data]):
            rows.append({"file": Path(path).name, **endpoints(result)})
    print(f"{'file':<48} {'steps':>6} {'best periodic':>14} {'reported':>9}  end score improved it")
    for r in rows:
        print(f"{r['file']:<48} {r['steps'] or 0:>6} {r['best_periodic']:14.4f} {r['reported']:9.4f}  "
              f"{'yes' if r['final_improved'] else ''}")
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["file"].rsplit("_seed", 1)[0]].append(r)
    print(f"\n{'runs':<48} {'n':>3} {'mean periodic':>14} {'mean reported':>14}")
    for name, rs in groups.items():
        print(f"{name:<48} {len(rs):>3} {statistics.fmean(r['best_periodic'] for r in rs):14.4f} "
              f"{statistics.fmean(r['reported'] for r in rs):14.4f}")
    return rows


if __name__ == "__main__":
    main()
