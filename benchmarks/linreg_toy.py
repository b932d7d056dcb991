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

λ* minimizes the validation MSE of w*(λ): a dense grid over the search space, then bisection on
the sign of the analytic derivative in the bracket around the best grid point (machine
precision); a NOTICE is printed if λ* lies on a bound of the search space.

    python benchmarks/linreg_toy.py --data-dir ../shared/datasets/uci/bostonHousing \\
        --hparam weight_decay --method delta --seed 0 --json out.json

All method settings live in SETTINGS below; they are the same for every method and data set,
σ0 is set per hyperparameter kind, and nothing in a run ever looks at λ*.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht

# torch's forward-AD decompositions (first Δ-STN step) still call the deprecated torch.jit.script
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated")

HPARAMS = ("weight_decay", "input_dropout")
METHODS = ("delta", "centered", "stn")

# Method settings: one set for all methods, data sets and hyperparameters, fixed on principle
# (see RESULTS.md, "## linreg_toy", for the reasoning and what the alternatives did).
SETTINGS = {
    # Data: 2 training examples per weight, so that regularization matters; the validation
    # subset is the next 200 examples of the same seeded permutation of the official train split.
    "train_per_feature": 2,
    "n_val": 200,
    # Full-batch training: one train step (w0 step, then Θ step) and one val step (λ, σ) each.
    "steps": 20000,
    # w0 and Θ settle before λ moves. Energy's features are nearly collinear: along the slowest
    # direction w0's time constant is ~570 steps at c = 0.01, and after a 1000-step warm-up Θ
    # still pointed the wrong way (cos 0.25), so λ ran into the flat region c → 0 (RESULTS.md,
    # "what Θ and the hypergradient look like"). 3000 steps is five of those time constants.
    "warmup_steps": 3000,
    # w0: SGD with momentum, cosine-annealed after warm-up (Θ's LR follows the same schedule).
    "lr": 0.01,
    "lr_final": 0.001,
    "momentum": 0.9,
    # Θ: Adam. Θ estimates dw*/dλ, whose scale changes by orders of magnitude with λ
    # (∝ c for weight decay at small c), through the bilinear P·W_resp factorization that starts
    # at P = 0; SGD on it is scale-bound and crawls off that saddle, Adam is scale-free.
    "response_optimizer": "adam",  # the library default in the centered modes ("clone": a copy of w0's)
    "response_lr": 1e-3,
    # Θ steps per λ step. The library's default (a Θ step on every 3rd train step) assumes the
    # papers' loop, a λ step after every 5th train step: 5/3 Θ steps per λ step. Here λ steps after
    # every train step, so the same ratio ≥ 1 needs a Θ step on every one. With every 3rd, Θ lagged
    # λ and flipped sign: Boston seed 1's input dropout ran into p ≈ 0 (optimum 0.18).
    "response_every": 1,
    # Train steps per λ step. 1: a λ step after every train step (this toy's original loop).
    "train_per_val": 1,
    # λ, σ: the library's RMSprop, cosine-annealed to 0 after warm-up (stochastic approximation).
    "hyper_lr": 0.01,
    "hyper_lr_final": 0.0,
    "tune_scales": False,  # σ held at σ0: the library's default (RESULTS.md, "Defaults that tune")
    "entropy_weight": 1e-3,  # τ: acts only if σ is tuned (tune_scales=True)
    # σ0 on the unconstrained scale (ln c, logit p), held there (the library's default policy),
    # per kind in the library's ratio (dropout-type 2× the others). Θ fits a secant over ±σ, so
    # λ's fixed point is biased by O(σ²): weight decay's misses at σ0 = 0.5 shrank 0.054 → 0.030
    # → 0.016 at 0.5 / 0.35 / 0.25 (Boston seed 1). Dropout's masks add noise to Θ's signal that
    # a small σ0 cannot beat (σ0 = 0.1 gave 0.066 against 0.025 at 0.5).
    "init_scale": {"weight_decay": 0.25, "input_dropout": 0.5},
    # One ε per step ("batch"), not per example: with full-batch training, per-example ε adds
    # Θ-gradient noise Σ_i ε_i ∇ℓ_i(w0) that does not vanish at the optimum.
    "perturb": "batch",
    "init": {"weight_decay": 1e-2, "input_dropout": 0.1},  # λ at step 0
    "dtype": "float64",
    # ε, −ε on consecutive Θ steps (DeltaSTNOptimizer(antithetic=True); the library draws them
    # independently by default). With one ε per full batch a pair cancels the ε·∇L_train(w0) term
    # of Θ's gradient exactly; on this toy it brought input dropout from 10 to 12 of 12 runs
    # within 0.02 (RESULTS.md, "Antithetic perturbations"). --independent turns it off.
    "antithetic": True,
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
        # A feature constant on the training subset (Boston's binary CHAS at seed 3) is a zero
        # column with no dropout penalty: its weight is undetermined, and the minimum-norm
        # solution (the null-space rule below) sets it to 0. Scale it by 1 rather than 1/0.
        self.scale = 1 / np.sqrt(np.where(diag > 0, diag, 1.0))
        Z = X * self.scale  # X D^{-1/2}
        self.eig, self.Q = np.linalg.eigh(Z.T @ Z)
        self.b = self.Q.T @ (Z.T @ y)
        # Directions with eigenvalue at rounding level are exactly null (energy has an exact
        # linear relation among its features): zero them, as a pseudo-inverse would, so that a
        # tiny α does not blow rounding noise in b up into huge weights.
        null = self.eig <= 1e-10 * max(float(self.eig.max()), 1e-300)
        self.eig = np.where(null, 0.0, self.eig)
        self.b = np.where(null, 0.0, self.b)

    def _inverse(self, alpha: np.ndarray, power: int) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            inv = 1.0 / (self.eig + self.n * alpha[..., None]) ** power
        # α = 0 with a singular XᵀX: the limit α→0 is the minimum-norm least-squares solution
        # (b is zero in the null space, so those directions contribute nothing)
        return np.where(np.isfinite(inv), inv, 0.0)

    def weights(self, alpha: np.ndarray | float) -> np.ndarray:
        """Shape (..., d) for α of shape (...)."""
        alpha = np.asarray(alpha, dtype=np.float64)
        return ((self._inverse(alpha, 1) * self.b) @ self.Q.T) * self.scale

    def weights_derivative(self, alpha: np.ndarray | float) -> np.ndarray:
        """dw/dα = -(XᵀX + NαD)⁻¹ N D w(α), shape (..., d)."""
        alpha = np.asarray(alpha, dtype=np.float64)
        return ((-self.n * self._inverse(alpha, 2) * self.b) @ self.Q.T) * self.scale


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
    """λ* = argmin_λ validation MSE of w*(λ), in float64.

    A dense grid over the search space (uniform in ln c for weight decay, in p for dropout)
    brackets the global minimum; inside the bracket the minimum is located by bisection on the
    sign of the analytic derivative dV/dα (dα/dt > 0 on both scales), which resolves it to
    machine precision where a search on V alone stops at ~sqrt(eps). λ* is on a bound when V
    still decreases towards that bound.
    """
    path = RidgePath(problem.X, problem.y, penalty_diag(problem.X, hparam))
    Xv, yv = problem.Xv, problem.yv

    def val_loss(lam: np.ndarray | float) -> np.ndarray:
        r = path.weights(alpha_of(hparam, lam)) @ Xv.T - yv
        return (r * r).mean(-1)

    def slope(lam: float) -> float:  # dV/dα; same sign as dV/dt
        alpha = alpha_of(hparam, lam)
        r = Xv @ path.weights(alpha) - yv
        return float(2 * r @ (Xv @ path.weights_derivative(alpha)) / len(yv))

    if hparam == "weight_decay":
        lo, hi = WD_LOG_RANGE
        to_lam = np.exp
    else:
        lo, hi = DROPOUT_RANGE
        to_lam = np.asarray
    t = np.linspace(lo, hi, GRID_POINTS)
    losses = val_loss(to_lam(t))
    i = int(np.argmin(losses))
    on_bound = None
    if i == 0 and slope(float(to_lam(lo))) >= 0:
        t_star, on_bound = lo, "lower"
    elif i == len(t) - 1 and slope(float(to_lam(hi))) <= 0:
        t_star, on_bound = hi, "upper"
    else:
        a, b = float(t[max(i - 1, 0)]), float(t[min(i + 1, len(t) - 1)])
        if slope(float(to_lam(a))) < 0 < slope(float(to_lam(b))):
            for _ in range(200):  # bisection on the derivative's sign, to machine precision
                m = 0.5 * (a + b)
                if m in (a, b):
                    break
                if slope(float(to_lam(m))) < 0:
                    a = m
                else:
                    b = m
            t_star = 0.5 * (a + b)
        else:  # no clean sign change (flat to rounding): golden section on V itself
            t_star = golden_section(lambda s: float(val_loss(to_lam(s))), a, b)
    lam_star = float(to_lam(t_star))
    return Optimum(lam_star, float(val_loss(lam_star)), on_bound, to_lam(t), losses)


def exact_val_loss(problem: Problem, hparam: str, lam: float) -> float:
    path = RidgePath(problem.X, problem.y, penalty_diag(problem.X, hparam))
    w = path.weights(alpha_of(hparam, lam))
    return float(np.mean((problem.Xv @ w - problem.yv) ** 2))


def score(hparam: str, lam: float, lam_star: float, on_bound: str | None = None) -> float:
    """|ln λ − ln λ*| (weight decay) or |p − p*| (dropout).

    When λ* sits on a bound of the solver's search space, the validation loss still falls
    towards that bound, so every λ beyond it is as good: the error is the distance to that set.
    """
    if on_bound == "lower" and lam <= lam_star or on_bound == "upper" and lam >= lam_star:
        return 0.0
    if hparam == "weight_decay":
        return abs(math.log(lam) - math.log(lam_star))
    return abs(lam - lam_star)


# ---- the online run -------------------------------------------------------------------------
def run_method(
    problem: Problem,
    hparam: str,
    method: str,
    seed: int,
    settings: dict = SETTINGS,
    probe: Callable[[int, ht.HyperModel], None] | None = None,
    probe_every: int = 500,
) -> dict:
    """Train and tune online; returns the final λ, the trained model's val MSE and the λ trace.

    ``probe(step, model)``, if given, is called every ``probe_every`` steps (and at step 0) to
    inspect the run without changing it (linreg_response_check.py).
    """
    dtype = getattr(torch, settings["dtype"])
    torch.manual_seed(seed)
    X = torch.tensor(problem.X, dtype=dtype)
    y = torch.tensor(problem.y, dtype=dtype).unsqueeze(1)
    Xv = torch.tensor(problem.Xv, dtype=dtype)
    yv = torch.tensor(problem.yv, dtype=dtype).unsqueeze(1)

    linear = nn.Linear(problem.d, 1, bias=False, dtype=dtype)
    nn.init.zeros_(linear.weight)
    init, sigma0 = settings["init"][hparam], settings["init_scale"][hparam]
    spec = (
        ht.WeightDecay(init=init, init_scale=sigma0, perturb=settings["perturb"])
        if hparam == "weight_decay"
        else ht.InputDropout(init=init, init_scale=sigma0, perturb=settings["perturb"])
    )
    model = ht.HyperModel.wrap(linear, hparams={"lam": spec})
    response = None  # "clone": the library builds a copy of w0's optimizer for Θ
    if settings["response_optimizer"] == "adam":
        response = torch.optim.Adam(model.response_parameters(), lr=settings["response_lr"])
    elif settings["response_optimizer"] != "clone":
        raise ValueError(f"response_optimizer={settings['response_optimizer']!r}")
    opt = ht.DeltaSTNOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=settings["lr"], momentum=settings["momentum"]),
        response_optimizer=response,
        mode=method,
        hyper_lr=settings["hyper_lr"],
        entropy_weight=settings["entropy_weight"],
        warmup_steps=settings["warmup_steps"],
        response_every=settings["response_every"],
        tune_scales=settings["tune_scales"],
        antithetic=settings["antithetic"],
    )
    steps, warmup = settings["steps"], settings["warmup_steps"]
    horizon = max(1, steps - warmup)
    every = settings["train_per_val"]
    hyper_horizon = max(1, horizon // every)  # λ steps after the warm-up
    floor = settings["hyper_lr_final"] / settings["hyper_lr"]

    def cosine(k: int) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(k, hyper_horizon) / hyper_horizon))

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
    done, diverged = 0, None
    if probe is not None:
        probe(0, model)
    for k in range(steps):
        try:
            opt.train_step(X, y, F.mse_loss)
            r = opt.val_step(Xv, yv, F.mse_loss) if (k + 1) % every == 0 else None
        except ht.NonFiniteLossError as err:  # reported, not hidden: the run stops here
            diverged = str(err).split(";")[0]
            break
        if r is not None and r.updated:
            schedule.step()
        base_schedule.step()
        done = k + 1
        trace[done] = trace[done - 1] if r is None else r.hparams["lam"]  # no λ step: λ unchanged
        sigma[done] = opt.scales()["lam"]
        if probe is not None and done % probe_every == 0:
            probe(done, model)
    model.eval()
    with torch.no_grad():
        val_loss = float(F.mse_loss(model(Xv), yv))
    return {
        "lambda": float(model.hparam_values()["lam"]),
        "val_loss": val_loss,
        "sigma": float(sigma[done]),
        "steps": done,
        "diverged": diverged,
        "trace": trace[: done + 1],
        "sigma_trace": sigma[: done + 1],
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


def run_one(
    data_dir: str, hparam: str, method: str, seed: int, settings: dict = SETTINGS
) -> tuple[dict, dict, Optimum, Problem]:
    problem = load_problem(data_dir, seed, settings["train_per_feature"], settings["n_val"])
    optimum = exact_optimum(problem, hparam)
    start, cpu = time.perf_counter(), time.process_time()
    out = run_method(problem, hparam, method, seed, settings)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    result = {
        "lambda": out["lambda"],
        "lambda_exact": optimum.lam,
        "error": score(hparam, out["lambda"], optimum.lam, optimum.on_bound),
        "val_loss": out["val_loss"],
        "val_loss_exact": optimum.val_loss,
        "steps": out["steps"],
        # extras
        "val_loss_at_lambda": exact_val_loss(problem, hparam, out["lambda"]),
        # λ averaged over the last quarter of the run (geometric mean for weight decay): the
        # error of this average is the bias of λ's fixed point, without the end-of-run wander
        "error_tail_mean": score(hparam, tail_mean(out["trace"], hparam), optimum.lam, optimum.on_bound),
        "sigma": out["sigma"],
        "diverged": out["diverged"],
        "lambda_exact_on_bound": optimum.on_bound,
        "dataset": problem.name,
        "hparam": hparam,
        "method": method,
        "seed": seed,
        "split": problem.split,
        "n_train": problem.n,
        "n_val": int(problem.Xv.shape[0]),
        "seconds": seconds,
        "cpu_seconds": cpu,
    }
    return result, out, optimum, problem


def tail_mean(trace: np.ndarray, hparam: str, fraction: float = 0.25) -> float:
    """Mean of λ over the last ``fraction`` of the steps, in ln c for weight decay."""
    tail = trace[-max(1, int(len(trace) * fraction)):]
    return float(np.exp(np.mean(np.log(tail)))) if hparam == "weight_decay" else float(np.mean(tail))


def notice_bound(optimum: Optimum, hparam: str) -> None:
    if optimum.on_bound:
        lo, hi = (np.exp(WD_LOG_RANGE) if hparam == "weight_decay" else DROPOUT_RANGE)
        print(
            f"NOTICE: the exact optimum λ*={optimum.lam:.6g} lies on the {optimum.on_bound} bound of "
            f"the search space [{lo:.3g}, {hi:.3g}]: regularization {'does not help' if optimum.on_bound == 'lower' else 'cannot be too strong'} "
            "here, and the error is the distance to the bound (0 beyond it).",
            file=sys.stderr,
        )


def make_figure(data_dir: str, hparam: str, seed: int, png: str, settings: dict = SETTINGS) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        result, out, optimum, problem = run_one(data_dir, hparam, method, seed, settings)
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
    parser.add_argument("--steps", type=int, help=f"override the number of steps ({SETTINGS['steps']}; for quick checks)")
    parser.add_argument("--response-every", type=int, help=f"override Θ's cadence ({SETTINGS['response_every']})")
    parser.add_argument("--train-per-val", type=int, help=f"override train steps per λ step ({SETTINGS['train_per_val']})")
    parser.add_argument("--tune-scales", action="store_true", help="tune σ (entropy bonus) instead of holding it")
    parser.add_argument("--init-scale", type=float, help=f"override σ0 for either hyperparameter ({SETTINGS['init_scale']})")
    parser.add_argument("--hyper-lr", type=float, help=f"override λ's RMSprop rate ({SETTINGS['hyper_lr']})")
    parser.add_argument("--warmup-steps", type=int, help=f"override the warm-up before λ moves ({SETTINGS['warmup_steps']})")
    draws = parser.add_mutually_exclusive_group()
    draws.add_argument("--antithetic", action="store_true", help="ε, −ε on consecutive Θ steps (DeltaSTNOptimizer(antithetic=True))")
    draws.add_argument("--independent", action="store_true", help="independent ε on every Θ step (the library's default)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(SETTINGS)
    if args.steps is not None:
        settings["steps"] = args.steps
        settings["warmup_steps"] = min(settings["warmup_steps"], args.steps // 4)
    if args.response_every is not None:
        settings["response_every"] = args.response_every
    if args.train_per_val is not None:
        settings["train_per_val"] = args.train_per_val
    settings["tune_scales"] = settings["tune_scales"] or args.tune_scales
    if args.init_scale is not None:
        settings["init_scale"] = dict.fromkeys(HPARAMS, args.init_scale)
    if args.antithetic or args.independent:
        settings["antithetic"] = args.antithetic
    if args.warmup_steps is not None:
        settings["warmup_steps"] = args.warmup_steps
    if args.hyper_lr is not None:
        settings["hyper_lr"] = args.hyper_lr

    if args.figure:
        rows = make_figure(args.data_dir, args.hparam, args.seed, args.figure, settings)
        print_table(rows)
        return 0

    result, out, optimum, _ = run_one(args.data_dir, args.hparam, args.method, args.seed, settings)
    notice_bound(optimum, args.hparam)
    if result["diverged"]:
        print(f"WARNING: the run stopped after {result['steps']} steps: {result['diverged']}", file=sys.stderr)
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
