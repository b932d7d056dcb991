#!/usr/bin/env python
"""Tables of linreg_toy.py's error over data sets × seeds for one or more run directories.

Each directory holds ``<set>_<hparam>_delta_s<seed>.json`` files written by ``linreg_toy.py
--json``. For each hyperparameter it prints the error per data set and seed in every directory,
and how many runs meet the issue's target (input dropout |p − p*| ≤ 0.02; weight decay
|ln c − ln c*| ≤ 0.05, counted over interior optima only: an optimum on the lower bound is
scored by where the run ends, not in ln c).

    python benchmarks/linreg_grid_table.py benchmarks/linreg_toy_runs/independent benchmarks/linreg_toy_runs/antithetic
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DATASETS = ("bostonHousing", "concrete", "energy", "kin8nm")
TARGET = {"input_dropout": 0.02, "weight_decay": 0.05}
SEEDS = (0, 1, 2)


def load(directory: Path, dataset: str, hparam: str, seed: int) -> dict | None:
    path = directory / f"{dataset}_{hparam}_delta_s{seed}.json"
    return json.loads(path.read_text()) if path.exists() else None


def on_bound(run: dict) -> bool:
    return bool(run.get("lambda_exact_on_bound")) or (run["hparam"] == "weight_decay" and run["lambda_exact"] <= 1.001e-8)


def cell(run: dict | None) -> str:
    if run is None:
        return "–"
    if run["hparam"] == "weight_decay" and on_bound(run):
        return f"bound: c = {run['lambda']:.2g}"
    mark = "" if run["error"] <= TARGET[run["hparam"]] else " ✗"
    return f"{run['error']:.4f}{mark}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS), help="seeds to tabulate (default 0 1 2)")
    args = parser.parse_args()
    seeds = args.seeds
    for hparam in ("input_dropout", "weight_decay"):
        print(f"\n{hparam} (target {TARGET[hparam]})\n")
        header = "| data set | " + " | ".join(f"{d.name} s{s}" for d in args.dirs for s in seeds) + " |"
        print(header)
        print("|---|" + "---:|" * (len(args.dirs) * len(seeds)))
        for dataset in DATASETS:
            cells = [cell(load(d, dataset, hparam, s)) for d in args.dirs for s in seeds]
            print(f"| {dataset} | " + " | ".join(cells) + " |")
        for d in args.dirs:
            runs = [r for r in (load(d, ds, hparam, s) for ds in DATASETS for s in seeds) if r is not None]
            scored = [r for r in runs if not (hparam == "weight_decay" and on_bound(r))]
            met = sum(r["error"] <= TARGET[hparam] for r in scored)
            print(f"\n{d.name}: {met} of {len(scored)} within {TARGET[hparam]}"
                  + ("" if len(runs) == len(scored) else f" ({len(runs) - len(scored)} optimum on the bound not counted)"))


if __name__ == "__main__":
    main()
