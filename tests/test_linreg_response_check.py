"""Checks of benchmarks/linreg_response_check.py: its exact references and the probe hook."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import hypertune as ht

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return sys.modules[name]


lt = _load("linreg_toy")
rc = _load("linreg_response_check")


def _problem(seed=3, n=16, d=4, n_val=60):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=d)
    X, Xv = rng.normal(size=(n, d)), rng.normal(size=(n_val, d))
    y, yv = X @ w_true + rng.normal(size=n), Xv @ w_true + rng.normal(size=n_val)
    mu, sd = X.mean(0), X.std(0)
    return lt.Problem("synthetic", (X - mu) / sd, y - y.mean(), (Xv - mu) / sd, yv - y.mean(), split=0)


def _wrapped(p, hparam, init):
    linear = nn.Linear(p.d, 1, bias=False, dtype=torch.float64)
    spec = ht.WeightDecay(init=init) if hparam == "weight_decay" else ht.InputDropout(init=init)
    return ht.HyperModel.wrap(linear, hparams={"lam": spec})


@pytest.mark.parametrize("hparam,init", [("weight_decay", 0.3), ("input_dropout", 0.2)])
def test_a_model_holding_the_exact_response_scores_exactly(hparam, init):
    """w₀ = w*(λ) and Θ = dw*/du give cos 1, ratio 1, w0_err 0 and est = exact."""
    p = _problem()
    model = _wrapped(p, hparam, init)
    lam, w_star, jac = rc.exact_response(p, hparam, model)
    assert lam == pytest.approx(init)
    (layer,) = model.hyper_layers().values()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w_star).reshape(1, -1))
        layer.response_weight.copy_(torch.from_numpy(jac).reshape(1, -1))
        layer.hyper_projection.weight.fill_(1.0)
    row = rc.probe_row(0, p, hparam, model)
    assert row["w0_err"] == pytest.approx(0.0, abs=1e-12)
    assert row["cos"] == pytest.approx(1.0, abs=1e-12) and row["ratio"] == pytest.approx(1.0, rel=1e-12)
    assert row["est"] == pytest.approx(row["exact"], rel=1e-12) and row["agree"]


def test_the_exact_response_is_the_derivative_of_the_ridge_path():
    """dw*/du by central differences against RidgePath's analytic dw/dα · dα/du (u = ln c, α = c/2)."""
    p = _problem()
    model = _wrapped(p, "weight_decay", 0.3)
    _, _, jac = rc.exact_response(p, "weight_decay", model)
    path = lt.RidgePath(p.X, p.y, lt.penalty_diag(p.X, "weight_decay"))
    analytic = path.weights_derivative(0.15) * 0.15  # dα/d ln c = c/2
    np.testing.assert_allclose(jac, analytic, rtol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_theta_learns_the_exact_response_at_a_fixed_lambda():
    """With λ held (the warm-up outlasts the run), Δ-STN's Θ converges to dw*/du's direction."""
    p = _problem()
    settings = dict(lt.SETTINGS, steps=2000, warmup_steps=2001, init={"weight_decay": 0.3, "input_dropout": 0.1})
    rows = []
    out = lt.run_method(p, "weight_decay", "delta", 0, settings,
                        probe=lambda step, m: rows.append(rc.probe_row(step, p, "weight_decay", m)), probe_every=1000)
    assert [r["step"] for r in rows] == [0, 1000, 2000]
    assert out["lambda"] == pytest.approx(0.3)
    last = rows[-1]
    assert last["w0_err"] < 1e-3
    assert last["cos"] > 0.95 and 0.5 < last["ratio"] < 1.5, last
    assert last["agree"]


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_train_per_val_takes_a_lambda_step_only_every_kth_step():
    p = _problem()
    settings = dict(lt.SETTINGS, steps=60, warmup_steps=20, train_per_val=3)
    trace = lt.run_method(p, "weight_decay", "delta", 0, settings)["trace"]
    moved = [i for i in range(1, len(trace)) if trace[i] != trace[i - 1]]
    assert moved and all(i % 3 == 0 and i > 20 for i in moved)
