#!/usr/bin/env python
"""Linear-regression toy of the Δ-STN paper (Bae & Grosse 2020, Fig. 3) on real UCI data.

A bias-free linear model is fit to a small, standardized training subset of a UCI regression
data set while one regularization hyperparameter (weight decay or input dropout) is tuned online
on a separate validation subset by Δ-STN (``delta``), centered STN (``centered``) or the original
STN (``stn``). For this model the bilevel problem has a closed-form inner solution, so the exact
optimum λ* is computed in float64 and the tuned value is scored against it:

* weight decay ``c`` (training loss ``(1/N)||Xw-y||² + (c/2)||w||²``):
  ``w*(c) = (XᵀX + (cN/2) I)⁻¹ Xᵀy``; error = |ln c − ln c*|.
* input dropout rate ``p`` (inverted dropout): the expected training loss is
  ``(1/N)||Xw-y||² + (p/(1-p)) wᵀ diag(XᵀX/N) w``, a diagonal ridge; error = |p − p*|.

λ* minimizes the validation MSE of w*(λ): a dense grid over the search space, then golden-section
search in the bracket around the best grid point.

    python benchmarks/linreg_toy.py --data-dir ../shared/datasets/uci/bostonHousing \\
        --hparam weight_decay --method delta --seed 0 --json out.json

All method settings live in SETTINGS below; they are the same for every method, data set and
hyperparameter, and nothing in a run ever looks at λ*.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht

HPARAMS = ("weight_decay", "input_dropout")
METHODS = ("delta", "centered", "stn")

# Method settings: one set for all methods, data sets and hyperparameters.
SETTINGS = {
    # data: the training subset has 2 examples per weight, so regularization matters; the
    # validation subset is the next 200 examples of the same (seeded) permutation of the
    # official training split.
    "train_per_feature": 2,
    "n_val": 200,
    # full-batch training; one train step (w0 step + Θ step) then one val step (λ, σ step)
    "steps": 4000,
    "warmup_steps": 200,  # w0 and Θ settle before λ moves
    "lr": 0.05,  # SGD with momentum for w0 (Θ gets a clone of it, as the library does)
    "lr_final": 0.05,  # w0's (and so Θ's) LR is cosine-annealed to this after warm-up
    "momentum": 0.9,
    "hyper_lr": 0.01,  # RMSprop over (λ, σ) ...
    "hyper_lr_final": 0.0,  # ... cosine-annealed to this over the post-warm-up steps
    "entropy_weight": 1e-3,  # τ
    "init_scale": 0.5,  # σ0 on the unconstrained scale
    "init": {"weight_decay": 1e-2, "input_dropout": 0.1},  # λ at step 0
    "dtype": "float64",
}

# Search space of the exact solver, in the tuning coordinate.
WD_LOG_RANGE = (math.log(1e-8), math.log(1e4))  # ln c
DROPOUT_RANGE = (0.0, 0.95)  # p: InputDropout's default bounds
GRID_POINTS = 4001


# ---- data ------------------------------------------------------------------------------------
@dataclass
class Problem:
    """Standardized, centered training and validation subsets (float64 numpy)."""

    name: str
    X: np.ndarray
    y: np.ndarray
    Xv: np.ndarray
    yv: np.ndarray
    split: int

    @property
    def n(self) -> int:
        return self.X.shape[0]

    @property
    def d(self) -> int:
        return self.X.shape[1]


def _read_ints(path: Path) -> np.ndarray:
    return np.atleast_1d(np.loadtxt(path, dtype=np.int64))


def load_problem(
    data_dir: str | os.PathLike,
    seed: int,
    train_per_feature: int = SETTINGS["train_per_feature"],
    n_val: int = SETTINGS["n_val"],
) -> Problem:
    """Training/validation subsets chosen deterministically from ``seed``.

    Split ``seed % n_splits`` of the data set's official train/test splits is used; its training
    indices are permuted with ``numpy.random.default_rng(seed)`` and cut into a training subset
    of ``train_per_feature * d`` examples and a validation subset of the next ``n_val``. Features
    and target are standardized with the training subset's mean and (population) std, so the
    data are centered and the model needs no bias.
    """
    root = Path(data_dir)
    data = np.loadtxt(root / "data.txt", dtype=np.float64, ndmin=2)
    features = _read_ints(root / "index_features.txt")
    target = int(_read_ints(root / "index_target.txt")[0])
    splits = sorted(
        int(p.stem.rsplit("_", 1)[1]) for p in root.glob("index_train_*.txt")
    )
    if not splits:
        raise FileNotFoundError(f"no index_train_K.txt in {root}")
    split = splits[seed % len(splits)]
    pool = _read_ints(root / f"index_train_{split}.txt")
    perm = np.random.default_rng(seed).permutation(pool)
    n_train = train_per_feature * len(features)
    n_val = min(n_val, len(perm) - n_train)
    if n_val < 1:
        raise ValueError(f"{root}: too few examples for {n_train} training examples plus validation")
    itr, iva = perm[:n_train], perm[n_train : n_train + n_val]
    X, y = data[np.ix_(itr, features)], data[itr, target]
    Xv, yv = data[np.ix_(iva, features)], data[iva, target]
    mu, sd = X.mean(0), X.std(0)
    sd = np.where(sd > 0, sd, 1.0)
    ym, ys = y.mean(), y.std()
    return Problem(
        name=root.name,
        X=(X - mu) / sd,
        y=(y - ym) / ys,
        Xv=(Xv - mu) / sd,
        yv=(yv - ym) / ys,
        split=split,
    )


# ---- the exact bilevel optimum --------------------------------------------------------------
def penalty_diag(X: np.ndarray, hparam: str) -> np.ndarray:
    """D in the training loss (1/N)||Xw-y||² + α wᵀDw: I for weight decay, diag(XᵀX/N) for dropout."""
    if hparam == "weight_decay":
        return np.ones(X.shape[1])
    if hparam == "input_dropout":
        return (X * X).mean(0)
    raise ValueError(f"unknown hparam {hparam!r}")


def alpha_of(hparam: str, lam: np.ndarray | float) -> np.ndarray:
    """α = c/2 for weight decay c, α = p/(1-p) for dropout rate p."""
    lam = np.asarray(lam, dtype=np.float64)
    if hparam == "weight_decay":
        return lam / 2
    return lam / (1 - lam)


def expected_dropout_loss(X: np.ndarray, y: np.ndarray, w: np.ndarray, p: float) -> float:
    """E_mask[(1/N)||(X⊙M/(1-p))w - y||²] in closed form."""
    n = X.shape[0]
    r = X @ w - y
    return float(r @ r / n + p / (1 - p) * w @ (penalty_diag(X, "input_dropout") * w))


class RidgePath:
    """w(α) = argmin (1/N)||Xw-y||² + α wᵀDw = (XᵀX + NαD)⁻¹Xᵀy for many α at once."""

    def __init__(self, X: np.ndarray, y: np.ndarray, diag: np.ndarray) -> None:
        self.n = X.shape[0]
        self.scale = 1 / np.sqrt(diag)
        Z = X * self.scale  # X D^{-1/2}
        self.eig, self.Q = np.linalg.eigh(Z.T @ Z)
        self.eig = np.clip(self.eig, 0.0, None)
        self.b = self.Q.T @ (Z.T @ y)

    def weights(self, alpha: np.ndarray | float) -> np.ndarray:
        """Shape (..., d) for α of shape (...)."""
        alpha = np.asarray(alpha, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = 1.0 / (self.eig + self.n * alpha[..., None])
        # α = 0 with a singular XᵀX: the limit α→0 is the minimum-norm least-squares solution
        inv = np.where(np.isfinite(inv), inv, 0.0)
        v = (inv * self.b) @ self.Q.T
        return v * self.scale


def closed_form_weights(X: np.ndarray, y: np.ndarray, hparam: str, lam: float) -> np.ndarray:
    """w*(λ) by a direct linear solve (reference for RidgePath)."""
    n = X.shape[0]
    A = X.T @ X + n * float(alpha_of(hparam, lam)) * np.diag(penalty_diag(X, hparam))
    return np.linalg.solve(A, X.T @ y)


def golden_section(f, a: float, b: float, tol: float = 1e-12, max_iter: int = 500) -> float:
    """Minimizer of a unimodal f on [a, b]."""
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(max_iter):
        if abs(b - a) <= tol * max(1.0, abs(a) + abs(b)):
            break
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return (a + b) / 2


@dataclass
class Optimum:
    lam: float
    val_loss: float
    on_bound: str | None  # "lower"/"upper" if λ* lies on a bound of the search space
    grid: np.ndarray  # λ values
    grid_loss: np.ndarray


def exact_optimum(problem: Problem, hparam: str) -> Optimum:
    """λ* = argmin_λ validation MSE of w*(λ), to ~1e-12 in the tuning coordinate."""
    path = RidgePath(problem.X, problem.y, penalty_diag(problem.X, hparam))

    def val_loss(lam: np.ndarray | float) -> np.ndarray:
        w = path.weights(alpha_of(hparam, lam))
        r = w @ problem.Xv.T - problem.yv
        return (r * r).mean(-1)

    if hparam == "weight_decay":
        lo, hi = WD_LOG_RANGE
        to_lam = np.exp
    else:
        lo, hi = DROPOUT_RANGE
        to_lam = np.asarray
    t = np.linspace(lo, hi, GRID_POINTS)
    losses = val_loss(to_lam(t))
    i = int(np.argmin(losses))
    a, b = t[max(i - 1, 0)], t[min(i + 1, len(t) - 1)]
    t_star = golden_section(lambda s: float(val_loss(to_lam(s))), float(a), float(b))
    # golden section never evaluates the end points; keep a bound if it is no worse
    for edge in (lo, hi):
        if float(val_loss(to_lam(edge))) <= float(val_loss(to_lam(t_star))):
            t_star = edge
    on_bound = None
    if abs(t_star - lo) <= 1e-9 * (hi - lo) or i == 0:
        on_bound = "lower"
    elif abs(t_star - hi) <= 1e-9 * (hi - lo) or i == len(t) - 1:
        on_bound = "upper"
    lam_star = float(to_lam(t_star))
    return Optimum(lam_star, float(val_loss(lam_star)), on_bound, to_lam(t), losses)


def exact_val_loss(problem: Problem, hparam: str, lam: float) -> float:
    path = RidgePath(problem.X, problem.y, penalty_diag(problem.X, hparam))
    w = path.weights(alpha_of(hparam, lam))
    return float(np.mean((problem.Xv @ w - problem.yv) ** 2))


def score(hparam: str, lam: float, lam_star: float) -> float:
    if hparam == "weight_decay":
        return abs(math.log(lam) - math.log(lam_star))
    return abs(lam - lam_star)


# ---- the online run -------------------------------------------------------------------------
def run_method(problem: Problem, hparam: str, method: str, seed: int, settings: dict = SETTINGS) -> dict:
    """Train and tune online; returns the final λ, the trained model's val MSE and the λ trace."""
    dtype = getattr(torch, settings["dtype"])
    torch.manual_seed(seed)
    X = torch.tensor(problem.X, dtype=dtype)
    y = torch.tensor(problem.y, dtype=dtype).unsqueeze(1)
    Xv = torch.tensor(problem.Xv, dtype=dtype)
    yv = torch.tensor(problem.yv, dtype=dtype).unsqueeze(1)

    linear = nn.Linear(problem.d, 1, bias=False, dtype=dtype)
    nn.init.zeros_(linear.weight)
    init, sigma0 = settings["init"][hparam], settings["init_scale"]
    spec = (
        ht.WeightDecay(init=init, init_scale=sigma0)
        if hparam == "weight_decay"
        else ht.InputDropout(init=init, init_scale=sigma0)
    )
    model = ht.HyperModel.wrap(linear, hparams={"lam": spec})
    opt = ht.DeltaSTNOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=settings["momentum"]),
        mode=method,
        hyper_lr=settings["hyper_lr"],
        entropy_weight=settings["entropy_weight"],
        warmup_steps=settings["warmup_steps"],
    )
    steps, warmup = settings["steps"], settings["warmup_steps"]
    horizon = max(1, steps - warmup)
    floor = settings["hyper_lr_final"] / settings["hyper_lr"]

    def cosine(k: int) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(k, horizon) / horizon))

    schedule = torch.optim.lr_scheduler.LambdaLR(opt.hyper_optimizer, cosine)
    base_floor = settings["lr_final"] / settings["lr"]

    def base_cosine(k: int) -> float:
        k = max(0, k - warmup)
        return base_floor + (1 - base_floor) * 0.5 * (1 + math.cos(math.pi * min(k, horizon) / horizon))

    base_schedule = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, base_cosine)

    trace = np.empty(steps + 1)
    sigma = np.empty(steps + 1)
    trace[0] = model.hparam_values()["lam"]
    sigma[0] = opt.scales()["lam"]
    for k in range(steps):
        opt.train_step(X, y, F.mse_loss)
        r = opt.val_step(Xv, yv, F.mse_loss)
        if r.updated:
            schedule.step()
        base_schedule.step()
        trace[k + 1] = r.hparams["lam"]
        sigma[k + 1] = opt.scales()["lam"]
    model.eval()
    with torch.no_grad():
        val_loss = float(F.mse_loss(model(Xv), yv))
    return {
        "lambda": float(model.hparam_values()["lam"]),
        "val_loss": val_loss,
        "sigma": float(sigma[-1]),
        "steps": steps,
        "trace": trace,
        "sigma_trace": sigma,
    }


# ---- CLI ------------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return f"{v:.5g}"


def print_table(rows: list[dict]) -> None:
    cols = ["dataset", "hparam", "method", "lambda", "lambda_exact", "error", "val_loss", "val_loss_exact", "steps", "seconds"]
    cells = [[r[c] if isinstance(r[c], str) else (str(r[c]) if isinstance(r[c], int) else _fmt(r[c])) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def run_one(data_dir: str, hparam: str, method: str, seed: int) -> tuple[dict, dict, Optimum, Problem]:
    problem = load_problem(data_dir, seed)
    optimum = exact_optimum(problem, hparam)
    start = time.perf_counter()
    out = run_method(problem, hparam, method, seed)
    seconds = time.perf_counter() - start
    result = {
        "lambda": out["lambda"],
        "lambda_exact": optimum.lam,
        "error": score(hparam, out["lambda"], optimum.lam),
        "val_loss": out["val_loss"],
        "val_loss_exact": optimum.val_loss,
        "steps": out["steps"],
        # extras
        "val_loss_at_lambda": exact_val_loss(problem, hparam, out["lambda"]),
        "sigma": out["sigma"],
        "lambda_exact_on_bound": optimum.on_bound,
        "dataset": problem.name,
        "hparam": hparam,
        "method": method,
        "seed": seed,
        "split": problem.split,
        "n_train": problem.n,
        "n_val": int(problem.Xv.shape[0]),
        "seconds": seconds,
    }
    return result, out, optimum, problem


def notice_bound(optimum: Optimum, hparam: str) -> None:
    if optimum.on_bound:
        lo, hi = (np.exp(WD_LOG_RANGE) if hparam == "weight_decay" else DROPOUT_RANGE)
        print(
            f"NOTICE: the exact optimum λ*={optimum.lam:.6g} lies on the {optimum.on_bound} bound of "
            f"the search space [{lo:.3g}, {hi:.3g}]; the error is measured against that bound value.",
            file=sys.stderr,
        )


def make_figure(data_dir: str, hparam: str, seed: int, png: str) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        result, out, optimum, problem = run_one(data_dir, hparam, method, seed)
        rows.append(result)
        ax.plot(np.arange(len(out["trace"])), out["trace"], label=method)
    ax.axhline(optimum.lam, color="k", ls="--", lw=1, label="λ* (exact)")
    if hparam == "weight_decay":
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("weight decay c" if hparam == "weight_decay" else "input dropout p")
    ax.set_title(f"{problem.name}: {hparam}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="a UCI data set directory (data.txt, index_*.txt)")
    parser.add_argument("--hparam", choices=HPARAMS, default="weight_decay")
    parser.add_argument("--method", choices=METHODS, default="delta")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the result here")
    parser.add_argument("--trace", help="also write the λ and σ trajectories here (JSON)")
    parser.add_argument("--figure", metavar="PNG", help="run all three methods and plot λ vs step")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny problem: 1 is fastest)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.figure:
        rows = make_figure(args.data_dir, args.hparam, args.seed, args.figure)
        print_table(rows)
        return 0

    result, out, optimum, _ = run_one(args.data_dir, args.hparam, args.method, args.seed)
    notice_bound(optimum, args.hparam)
    print_table([result])
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.trace:
        Path(args.trace).parent.mkdir(parents=True, exist_ok=True)
        with open(args.trace, "w") as f:
            json.dump(
                {
                    **result,
                    "trace": out["trace"].tolist(),
                    "sigma_trace": out["sigma_trace"].tolist(),
                },
                f,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
