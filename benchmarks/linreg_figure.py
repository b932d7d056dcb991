#!/usr/bin/env python
"""Plot λ trajectories of the linreg_toy runs: one panel per data set × hyperparameter.

Reads the ``--trace`` files that ``benchmarks/linreg_all.py`` (or ``linreg_toy.py --trace``)
wrote, named ``<dataset>_<hparam>_<method>_s<seed>.trace.json``, and draws each method's λ
against the step with the exact optimum λ* as a dashed horizontal line.

    python benchmarks/linreg_figure.py --runs /tmp/linreg_toy_runs --out benchmarks/linreg_toy.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DATASETS = ("bostonHousing", "concrete", "energy", "kin8nm")
HPARAMS = ("weight_decay", "input_dropout")
METHODS = ("delta", "centered", "stn")
STYLE = {"delta": dict(color="C0", lw=1.4), "centered": dict(color="C2", lw=1.0, ls="-."), "stn": dict(color="C3", lw=1.0)}
LABEL = {"delta": "Δ-STN", "centered": "centered STN", "stn": "STN"}


def plot(runs: Path, out: Path, seed: int = 0) -> None:
    fig, axes = plt.subplots(len(HPARAMS), len(DATASETS), figsize=(4 * len(DATASETS), 3.3 * len(HPARAMS)), squeeze=False)
    for i, hparam in enumerate(HPARAMS):
        for j, dataset in enumerate(DATASETS):
            ax = axes[i, j]
            lam_star = None
            for method in METHODS:
                path = runs / f"{dataset}_{hparam}_{method}_s{seed}.trace.json"
                if not path.exists():
                    continue
                run = json.loads(path.read_text())
                trace = np.asarray(run["trace"])
                lam_star = run["lambda_exact"]
                ax.plot(np.arange(len(trace)), trace, label=f"{LABEL[method]} (err {run['error']:.3f})", **STYLE[method])
            if lam_star is None:
                ax.set_visible(False)
                continue
            ax.axhline(lam_star, color="k", ls="--", lw=1, label=f"λ* = {lam_star:.3g}")
            if hparam == "weight_decay":
                ax.set_yscale("log")
            ax.set_title(f"{dataset}: {'weight decay c' if hparam == 'weight_decay' else 'input dropout p'}", fontsize=10)
            ax.set_xlabel("train step")
            ax.legend(fontsize=7)
    fig.suptitle(
        f"Linear regression on UCI data (seed {seed}): tuned λ vs the exact bilevel optimum λ*. "
        "Δ-STN and centered STN coincide: for a linear model the linearization is exact."
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="/tmp/linreg_toy_runs", help="directory holding the *.trace.json files")
    parser.add_argument("--out", default=str(Path(__file__).with_name("linreg_toy.png")))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    plot(Path(args.runs), Path(args.out), args.seed)


if __name__ == "__main__":
    main()
