"""Checks of benchmarks/linreg_toy.py: the closed-form bilevel solver, and (slow) the CLI on real data."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "linreg_toy.py"
UCI = (REPO / ".." / "shared" / "datasets" / "uci").resolve()


def _load():
    spec = importlib.util.spec_from_file_location("linreg_toy", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("linreg_toy", module)
    spec.loader.exec_module(module)
    return module


lt = _load()


def _synthetic(n=12, d=4, n_val=40, noise=1.0, seed=2):
    rng = np.random.default_rng(seed)
    w_true = rng.normal(size=d)
    X = rng.normal(size=(n, d)) * np.array([1.0, 2.0, 0.5, 1.5])[:d]
    Xv = rng.normal(size=(n_val, d)) * np.array([1.0, 2.0, 0.5, 1.5])[:d]
    y = X @ w_true + noise * rng.normal(size=n)
    yv = Xv @ w_true + noise * rng.normal(size=n_val)
    return lt.Problem("synthetic", X, y, Xv, yv, split=0)


def _minimize(loss, d):
    """Plain gradient-based minimization (L-BFGS on autograd gradients) in float64."""
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=1000, tolerance_grad=1e-12, tolerance_change=0,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = loss(w)
        value.backward()
        return value

    opt.step(closure)
    return w.detach().numpy()


@pytest.mark.parametrize("c", [1e-3, 0.3, 5.0])
def test_ridge_closed_form_matches_gradient_minimization(c):
    p = _synthetic()
    X, y = torch.tensor(p.X), torch.tensor(p.y)
    w_gd = _minimize(lambda w: torch.mean((X @ w - y) ** 2) + c / 2 * w @ w, p.d)
    w_direct = lt.closed_form_weights(p.X, p.y, "weight_decay", c)
    w_path = lt.RidgePath(p.X, p.y, lt.penalty_diag(p.X, "weight_decay")).weights(lt.alpha_of("weight_decay", c))
    np.testing.assert_allclose(w_direct, w_gd, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(w_path, w_gd, rtol=1e-6, atol=1e-8)


def test_ridge_closed_form_matches_the_library_convention():
    """w*(c) minimizes the MSE plus hypertune's own WeightDecay penalty at value c."""
    p = _synthetic()
    c = 0.7
    model = ht.HyperModel.wrap(nn.Linear(p.d, 1, bias=False, dtype=torch.float64),
                               hparams={"wd": ht.WeightDecay(init=c)})
    assert model.hparam_values()["wd"] == pytest.approx(c)
    weight = model.module.weight
    with torch.no_grad():
        weight.zero_()
    X, y = torch.tensor(p.X), torch.tensor(p.y).unsqueeze(1)
    opt = torch.optim.LBFGS([weight], lr=1, max_iter=1000, tolerance_grad=1e-12,
                            tolerance_change=0, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(X), y) + model.training_penalty(model.current_point()).mean()
        loss.backward()
        return loss

    opt.step(closure)
    np.testing.assert_allclose(weight.detach().numpy()[0], lt.closed_form_weights(p.X, p.y, "weight_decay", c),
                               rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("rate", [0.1, 0.5, 0.8])
def test_dropout_expected_loss_matches_monte_carlo(rate):
    p = _synthetic(n=10, d=4, seed=1)
    rng = np.random.default_rng(2)
    w = rng.normal(size=p.d)
    exact = lt.expected_dropout_loss(p.X, p.y, w, rate)
    torch.manual_seed(0)
    X, y, wt = torch.tensor(p.X), torch.tensor(p.y), torch.tensor(w)
    samples = 50_000
    Xd = F.dropout(X.expand(samples, *X.shape), rate, training=True)  # inverted dropout
    per_draw = ((Xd @ wt - y) ** 2).mean(-1)
    mc, se = per_draw.mean().item(), per_draw.std().item() / math.sqrt(samples)
    assert abs(mc - exact) < 5 * se, (mc, exact, se)
    assert exact > lt.expected_dropout_loss(p.X, p.y, w, 0.0)


def test_dropout_expected_loss_matches_the_library_input_dropout():
    """hypertune's InputDropout in training mode has the expected loss the solver assumes."""
    p = _synthetic(n=10, d=4, seed=3)
    rate = 0.3
    lin = nn.Linear(p.d, 1, bias=False, dtype=torch.float64)
    w = np.random.default_rng(4).normal(size=p.d)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(w).unsqueeze(0))
    model = ht.HyperModel.wrap(lin, hparams={"p": ht.InputDropout(init=rate)})
    model.train()
    torch.manual_seed(0)
    X, y = torch.tensor(p.X), torch.tensor(p.y)
    reps = 10_000
    with torch.no_grad():
        out = model(X.repeat(reps, 1)).squeeze(1).reshape(reps, -1)
    per_draw = ((out - y) ** 2).mean(-1)
    mc, se = per_draw.mean().item(), per_draw.std().item() / math.sqrt(reps)
    exact = lt.expected_dropout_loss(p.X, p.y, w, rate)
    assert abs(mc - exact) < 5 * se, (mc, exact, se)


@pytest.mark.parametrize("rate", [0.05, 0.4, 0.9])
def test_dropout_best_response_minimizes_the_expected_loss(rate):
    p = _synthetic(seed=5)
    X, y = torch.tensor(p.X), torch.tensor(p.y)
    diag = torch.tensor(lt.penalty_diag(p.X, "input_dropout"))
    r = rate / (1 - rate)
    w_gd = _minimize(lambda w: torch.mean((X @ w - y) ** 2) + r * w @ (diag * w), p.d)
    w_path = lt.RidgePath(p.X, p.y, diag.numpy()).weights(lt.alpha_of("input_dropout", rate))
    np.testing.assert_allclose(lt.closed_form_weights(p.X, p.y, "input_dropout", rate), w_gd, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(w_path, w_gd, rtol=1e-6, atol=1e-8)


def test_golden_section():
    # a search on function values resolves a quadratic minimum to ~sqrt(machine eps)
    assert lt.golden_section(lambda t: (t - 0.3) ** 2 + 1, -2.0, 5.0) == pytest.approx(0.3, abs=1e-7)


@pytest.mark.parametrize("hparam", ["weight_decay", "input_dropout"])
def test_exact_optimum_is_the_minimum_of_the_validation_loss(hparam):
    p = _synthetic()
    opt = lt.exact_optimum(p, hparam)
    assert opt.on_bound is None
    # nothing on a much finer local grid around λ* (nor anywhere on the coarse grid) does better
    if hparam == "weight_decay":
        local = opt.lam * np.exp(np.linspace(-0.01, 0.01, 2001))
    else:
        local = np.clip(opt.lam + np.linspace(-1e-3, 1e-3, 2001), 0, 0.95)
    local_losses = [lt.exact_val_loss(p, hparam, float(v)) for v in local]
    assert opt.val_loss <= min(local_losses) + 1e-15
    assert opt.val_loss <= opt.grid_loss.min() + 1e-15
    # first-order condition in the tuning coordinate (central difference, O(h²) + O(eps/h))
    h = 1e-6
    if hparam == "weight_decay":
        up, down = opt.lam * math.exp(h), opt.lam * math.exp(-h)
    else:
        up, down = opt.lam + h, opt.lam - h
    slope = (lt.exact_val_loss(p, hparam, up) - lt.exact_val_loss(p, hparam, down)) / (2 * h)
    assert abs(slope) < 1e-8


@pytest.mark.parametrize("hparam", ["weight_decay", "input_dropout"])
def test_a_feature_constant_on_the_training_subset_gets_weight_zero(hparam):
    """A zero column (a binary feature that is constant in the subset) is undetermined; the
    exact solver takes the minimum-norm solution, the same optimum as without the column."""
    p = _synthetic()
    X = p.X.copy()
    X[:, 2] = 0.0
    with_zero = lt.Problem("zero column", X, p.y, p.Xv, p.yv, split=0)
    without = lt.Problem("dropped", np.delete(X, 2, axis=1), p.y, np.delete(p.Xv, 2, axis=1), p.yv, split=0)
    a, b = lt.exact_optimum(with_zero, hparam), lt.exact_optimum(without, hparam)
    assert math.isfinite(a.lam) and a.lam == pytest.approx(b.lam, rel=1e-9, abs=1e-12)
    assert a.val_loss == pytest.approx(b.val_loss, rel=1e-12)
    lam = a.lam if a.lam > 0 else 0.1
    w = lt.RidgePath(X, p.y, lt.penalty_diag(X, hparam)).weights(lt.alpha_of(hparam, lam))
    assert w[2] == 0.0 and np.isfinite(w).all()


def test_dropout_and_weight_decay_optima_agree_on_standardized_data():
    """With unit-variance features diag(XᵀX/N) = I, so p*/(1-p*) = c*/2."""
    p = _synthetic()
    p.X = (p.X - p.X.mean(0)) / p.X.std(0)
    c = lt.exact_optimum(p, "weight_decay").lam
    rate = lt.exact_optimum(p, "input_dropout").lam
    assert rate / (1 - rate) == pytest.approx(c / 2, rel=1e-6)


def test_optimum_on_a_bound_is_flagged():
    p = _synthetic(noise=0.0)
    p.Xv, p.yv = p.X.copy(), p.y.copy()  # validating on the training data: no regularization is best
    opt = lt.exact_optimum(p, "weight_decay")
    assert opt.on_bound == "lower"
    assert opt.lam == pytest.approx(1e-8)


def test_score():
    assert lt.score("weight_decay", math.e, 1.0) == pytest.approx(1.0)
    assert lt.score("input_dropout", 0.3, 0.25) == pytest.approx(0.05)
    # beyond a bound the exact solver sits on, every value is as good as the bound
    assert lt.score("weight_decay", 1e-12, 1e-8, "lower") == 0.0
    assert lt.score("weight_decay", 1e-7, 1e-8, "lower") == pytest.approx(math.log(10))
    assert lt.score("input_dropout", 0.0, 0.0, "lower") == 0.0


def test_load_problem_is_deterministic_and_standardized(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(size=(60, 4)) * [1, 10, 100, 5] + [3, -2, 50, 7]
    np.savetxt(tmp_path / "data.txt", data)
    (tmp_path / "index_features.txt").write_text("0\n1\n2\n")
    (tmp_path / "index_target.txt").write_text("3\n")
    perm = rng.permutation(60)
    for k in range(2):
        np.savetxt(tmp_path / f"index_train_{k}.txt", perm[: 50 - k], fmt="%d")
        np.savetxt(tmp_path / f"index_test_{k}.txt", perm[50 - k :], fmt="%d")
    a, b = lt.load_problem(tmp_path, seed=3), lt.load_problem(tmp_path, seed=3)
    np.testing.assert_array_equal(a.X, b.X)
    assert a.split == 1
    # split 3 % 2 = 1 holds 49 training rows: 2 per feature for training, the other 43 validate
    assert a.X.shape == (6, 3) and a.Xv.shape == (43, 3)
    np.testing.assert_allclose(a.X.mean(0), 0, atol=1e-12)
    np.testing.assert_allclose(a.X.std(0), 1, atol=1e-12)
    assert abs(a.y.mean()) < 1e-12 and a.y.std() == pytest.approx(1)
    c = lt.load_problem(tmp_path, seed=4)
    assert not np.array_equal(a.X, c.X)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("method", ["delta", "centered", "stn"])
@pytest.mark.parametrize("hparam", ["weight_decay", "input_dropout"])
def test_run_method_smoke(hparam, method):
    p = _synthetic()
    p.X, p.Xv = (p.X - p.X.mean(0)) / p.X.std(0), (p.Xv - p.X.mean(0)) / p.X.std(0)
    settings = dict(lt.SETTINGS, steps=60, warmup_steps=20)
    out = lt.run_method(p, hparam, method, seed=0, settings=settings)
    assert out["steps"] == 60 and out["diverged"] is None
    assert len(out["trace"]) == 61 and np.isfinite(out["trace"]).all()
    assert out["trace"][0] == pytest.approx(lt.SETTINGS["init"][hparam])
    assert out["trace"][19] == out["trace"][0] != out["trace"][20]  # λ holds still during warm-up
    assert np.isfinite(out["val_loss"]) and out["sigma"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("hparam,target", [("weight_decay", 0.05), ("input_dropout", 0.02)])
def test_cli_boston_delta(tmp_path, hparam, target):
    data = UCI / "bostonHousing"
    if not data.is_dir():
        pytest.skip(f"{data} is missing")
    out = tmp_path / "out.json"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--data-dir", str(data), "--hparam", hparam,
         "--method", "delta", "--seed", "0", "--json", str(out)],
        check=True, timeout=300,
    )
    result = json.loads(out.read_text())
    for key, kind in [("lambda", float), ("lambda_exact", float), ("error", float), ("val_loss", float),
                      ("val_loss_exact", float), ("steps", int)]:
        assert isinstance(result[key], kind), key
    assert result["error"] <= target, result
    # the trained w0 is (up to SGD and dropout noise) w*(λ) near λ*
    assert abs(result["val_loss"] / result["val_loss_exact"] - 1) < 0.05
    assert result["val_loss_at_lambda"] >= result["val_loss_exact"] * (1 - 1e-12)
    assert result["steps"] == lt.SETTINGS["steps"] and not result["diverged"]
