"""Global best-response (hyper-training, Algorithm 2): one hypernetwork, a whole validation curve."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune.global_response import GlobalBestResponse, log_grid


def _mse(out, target):
    return F.mse_loss(out.squeeze(-1), target)


def _ridge_problem(seed: int = 0, d: int = 8, n: int = 32):
    """Orthogonal design (XᵀX = nI), so the exact best response w*(c) = w_ols / (1 + c/2) is one
    line in weight space, which a single-output hyper-layer can represent."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d, generator=g))
    x = q * math.sqrt(n)
    w = 0.5 * torch.randn(d, generator=g)
    y = x @ w + torch.randn(n, generator=g)
    xv = torch.randn(400, d, generator=g)
    yv = xv @ w + torch.randn(400, generator=g)

    def exact(c: float) -> float:  # argmin (1/n)||Xw - y||² + c/2 ||w||²
        w_c = torch.linalg.solve(x.T @ x + c * n / 2 * torch.eye(d), x.T @ y)
        return F.mse_loss(xv @ w_c, yv).item()

    return x, y, xv, yv, exact


def _trained(degree: int, steps: int = 400, seed: int = 0):
    x, y, xv, yv, exact = _ridge_problem(seed)
    torch.manual_seed(seed)
    gbr = GlobalBestResponse.wrap(
        nn.Linear(x.shape[1], 1, bias=False), {"wd": ht.WeightDecay(init=1e-2)},
        prior={"wd": (1e-2, 10.0)}, degree=degree,
    )
    opt = torch.optim.Adam(gbr.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        gbr.train_step(x, y, _mse, opt)
        sched.step()
    return gbr, (xv, yv), exact


def test_estimated_curve_matches_exact_ridge_curve():
    gbr, val, exact = _trained(degree=3)
    grid = log_grid(1e-2, 10.0, 21)
    curve = gbr.validation_curve({"wd": grid}, [val], _mse)
    est = [loss for _, loss in curve]
    true = [exact(c) for c in grid]
    assert [p["wd"] for p, _ in curve] == pytest.approx(grid)
    assert max(abs(a - b) / b for a, b in zip(est, true)) < 0.08
    best_est = grid[min(range(len(grid)), key=est.__getitem__)]
    best_true = grid[min(range(len(grid)), key=true.__getitem__)]
    assert abs(math.log(best_est / best_true)) < math.log(3)
    # Algorithm 2's second loop: gradient descent on λ through the hypernetwork.
    found = gbr.optimize([val], _mse, steps=100)["wd"]
    assert abs(math.log(found / best_true)) < math.log(3)
    assert 1e-2 <= found <= 10.0
    # The model at λ is an ordinary module computing the same function.
    xv, _ = val
    with torch.no_grad():
        expected = gbr.evaluate({"wd": found}, [val], _mse)
    plain = gbr.unwrap_at({"wd": found})
    assert type(plain) is nn.Linear
    assert _mse(plain(xv), val[1]).item() == pytest.approx(expected, rel=1e-5)


def test_training_samples_lambda_per_example_inside_the_prior():
    torch.manual_seed(0)
    gbr = GlobalBestResponse.wrap(
        nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.1), nn.Linear(8, 2)),
        {"drop": ht.DropoutRate(init=0.1), "wd": ht.WeightDecay(init=1e-3)},
        prior={"drop": (0.05, 0.8), "wd": (1e-5, 1e-1)}, degree=2,
    )
    assert gbr.model.centered is False
    assert gbr.space.names == ["drop", "wd", "drop^2", "wd^2"]
    u = gbr.sample(1000)
    point = gbr._points(u)
    drop, wd = point.value("drop"), point.value("wd")
    assert drop.shape == (1000,) and 0.05 <= drop.min() and drop.max() <= 0.8
    assert 1e-5 * 0.999 <= wd.min() and wd.max() <= 1e-1 * 1.001
    assert drop.std() > 0.1  # one draw per example, spread over the prior
    z = point.response_input
    assert z[:, :2].abs().max() <= 1 + 1e-6
    torch.testing.assert_close(z[:, 2], 2 * z[:, 0] ** 2 - 1)  # Chebyshev T2 column
    # λ and σ are not trained; w₀ and Θ are.
    lam = gbr.space.unconstrained.detach().clone()
    theta = [p.detach().clone() for p in gbr.model.response_parameters()]
    opt = torch.optim.SGD(gbr.parameters(), lr=0.1)
    gbr.train_step(torch.randn(16, 4), torch.randint(0, 2, (16,)), F.cross_entropy, opt)
    assert torch.equal(lam, gbr.space.unconstrained.detach())
    assert any(not torch.equal(a, b) for a, b in zip(theta, gbr.model.response_parameters()))


def test_refusals():
    model = ht.HyperModel.wrap(nn.Linear(3, 1), {"wd": ht.WeightDecay()})
    with pytest.raises(ht.HyperTuneError, match="does not tune"):
        GlobalBestResponse(model, {"other": (0.1, 1.0)})
    with pytest.raises(ht.HyperTuneError, match="must satisfy"):
        GlobalBestResponse(model, {"wd": (-1.0, 1.0)})
    with pytest.raises(ht.HyperTuneError, match="feature column"):
        GlobalBestResponse(model, {"wd": (1e-3, 1.0)}, degree=2)
    with pytest.raises(ht.HyperTuneError, match="HyperModel"):
        GlobalBestResponse(nn.Linear(3, 1), {"wd": (1e-3, 1.0)})


@pytest.mark.slow
def test_global_response_benchmark_runs_on_mnist(tmp_path):
    """benchmarks/global_response.py end to end at a tiny budget (real data)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = root.parent / "shared" / "datasets"
    if not (data / "MNIST").exists():
        pytest.skip(f"MNIST not under {data}")
    spec = importlib.util.spec_from_file_location("global_response_bench", root / "benchmarks" / "global_response.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main([
        "--data-root", str(data), "--train-size", "500", "--val-size", "1000", "--epochs", "3",
        "--hyper-epochs-factor", "2", "--grid", "4", "--fine-grid", "8", "--degrees", "3",
        "--json", str(tmp_path / "g.json"),
    ])
    assert len(out["scratch"]["curve"]) == 4 and len(out["hypernet"]["3"]["fine_curve"]) == 8
    low, high = bench.PRIORS["weight_decay"]
    assert low <= out["hypernet"]["3"]["optimized"] <= high
    assert "| argmin on the grid" in bench.markdown(out)
