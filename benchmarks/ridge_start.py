"""Weight decay on ridge regression from a start below and above the exact optimum.

A linear model (no bias) trained by full-batch SGD on mean squared error plus c/2·‖w‖², with
c tuned by Δ-STN on a held-out split. For each c on a fine grid the trained weights are known in
closed form, so the validation-optimal c* is exact. Each run starts from ``--starts`` and reports
where c ends, how far that is from c* on the tuning (log) scale, and the validation loss of the
closed-form weights at the final c. Two settings: the library's defaults, and the linear toy's
(``linreg_toy.py``: σ₀ = 0.25 on ln c, one ε per batch, antithetic draws, Θ on every step, a
warm-up of a quarter of the steps, a λ step after every train step).

    python benchmarks/ridge_start.py --seeds 0 1 2 --json benchmarks/ridge_start.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hypertune as ht  # noqa: E402


def problem(seed: int, d: int = 20, n: int = 40, n_val: int = 200, noise: float = 1.5):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=d) * 0.3
    x, xv = rng.normal(size=(n, d)), rng.normal(size=(n_val, d))
    return x, x @ w_true + rng.normal(size=n) * noise, xv, xv @ w_true + rng.normal(size=n_val) * noise


def solved(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """argmin_w mean((xw - y)²) + c/2·‖w‖² (the gradient of the mean carries 2/n)."""
    n, d = x.shape
    return np.linalg.solve(x.T @ x + c * n / 2 * np.eye(d), x.T @ y)


def run(seed: int, c0: float, toy: bool, steps: int) -> dict:
    x, y, xv, yv = problem(seed)

    def val(c: float) -> float:
        return float(np.mean((xv @ solved(x, y, c) - yv) ** 2))

    grid = np.exp(np.linspace(math.log(1e-8), math.log(1e3), 3001))
    c_star = float(grid[np.argmin([val(c) for c in grid])])
    as_t = lambda a: torch.tensor(a, dtype=torch.float64).reshape(a.shape[0], -1)  # noqa: E731
    xt, yt, xvt, yvt = as_t(x), as_t(y), as_t(xv), as_t(yv)
    torch.manual_seed(seed)
    linear = nn.Linear(x.shape[1], 1, bias=False).double()
    nn.init.zeros_(linear.weight)
    spec = ht.WeightDecay(init=c0, init_scale=0.25, perturb="batch") if toy else ht.WeightDecay(init=c0)
    options = {"response_every": 1, "antithetic": True, "warmup_steps": steps // 4} if toy else {}
    model = ht.HyperModel.wrap(linear, {"c": spec})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), **options)
    for step in range(steps):
        opt.train_step(xt, yt, F.mse_loss)
        if toy or step % 5 == 0:
            opt.val_step(xvt, yvt, F.mse_loss)
    c = float(model.hparam_values()["c"])
    return {
        "seed": seed, "start": c0, "settings": "toy" if toy else "defaults", "c_star": c_star, "final_c": c,
        "log_distance": abs(math.log(c / c_star)), "val_at_c_star": val(c_star), "val_at_final": val(c),
        "val_at_start": val(c0),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--starts", type=float, nargs="+", default=[1e-4, 10.0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [run(s, c0, toy, args.steps) for s in args.seeds for c0 in args.starts for toy in (False, True)]
    print(f"{'seed':>4} {'start':>8} {'settings':>9} {'c*':>8} {'final c':>10} {'|ln c/c*|':>9} {'val(c*)':>8} {'val(end)':>8}")
    for r in rows:
        print(f"{r['seed']:>4} {r['start']:>8.0e} {r['settings']:>9} {r['c_star']:>8.3g} {r['final_c']:>10.3g} "
              f"{r['log_distance']:>9.2f} {r['val_at_c_star']:>8.4f} {r['val_at_final']:>8.4f}")
    if args.json:
        args.json.write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
