"""Per-example dropout, HyperDropout, and per-example perturbations against reshaped batches."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from hypertune import (
    DeltaSTNOptimizer,
    DropoutRate,
    HParam,
    HyperModel,
    Perturbation,
    PerturbationError,
    WeightDecay,
)
from hypertune.context import active
from hypertune.layers import HyperDropout, dropout_per_example


def binomial_bound(p: float, n: int, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


def assert_rows_drop_at_rate(out: torch.Tensor, x: torch.Tensor, rate: torch.Tensor, sigmas: float = 4.0) -> None:
    """Per row: dropped fraction within the binomial bound, kept entries exactly x · (1 / (1 - p)),
    the scale rounded once in x's dtype, as torch's own dropout computes it."""
    rows = out.shape[0]
    flat_out, flat_x = out.reshape(rows, -1), x.reshape(rows, -1)
    keep = 1.0 - rate.to(x.dtype)
    for i in range(rows):
        p = float(rate[i])
        dropped = flat_out[i] == 0
        n = flat_out[i].numel()
        frac = dropped.double().mean().item()
        assert abs(frac - p) <= binomial_bound(p, n, sigmas), (i, p, frac)
        kept = ~dropped
        scale = torch.ones((), dtype=x.dtype) / keep[i]
        assert torch.equal(flat_out[i][kept], flat_x[i][kept] * scale)
    if (rate == 0).any():
        zero_rows = rate == 0
        assert torch.equal(out[zero_rows], x[zero_rows])


def nonzero_input(*shape: int, dtype=torch.float32) -> torch.Tensor:
    x = torch.rand(*shape, dtype=dtype) + 0.5
    return x * torch.where(torch.rand(*shape) < 0.5, -1.0, 1.0).to(dtype)


# ---- dropout_per_example --------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rates_zero_to_point_nine(dtype):
    torch.manual_seed(0)
    rate = torch.linspace(0.0, 0.9, 10)
    x = nonzero_input(10, 20000, dtype=dtype)
    out = dropout_per_example(x, rate)
    assert out.dtype == dtype and out.shape == x.shape
    assert_rows_drop_at_rate(out, x, rate)


@given(st.lists(st.floats(0.0, 0.9), min_size=1, max_size=6), st.integers(0, 2**16))
def test_hypothesis_rates(rates, seed):
    torch.manual_seed(seed)
    rate = torch.tensor(rates)
    x = nonzero_input(len(rates), 4000)
    out = dropout_per_example(x, rate)
    # 4.5 sigma: hypothesis tries many rows, keep the false-alarm rate negligible
    assert_rows_drop_at_rate(out, x, rate, sigmas=4.5)


def test_single_rate_row_applies_to_whole_batch():
    torch.manual_seed(1)
    x = nonzero_input(8, 3000)
    out = dropout_per_example(x, torch.tensor([0.3]))
    assert_rows_drop_at_rate(out, x, torch.full((8,), 0.3))


def test_rate_carries_no_gradient_and_input_does():
    torch.manual_seed(2)
    rate = torch.tensor([0.2, 0.6], requires_grad=True)
    x = nonzero_input(2, 50).requires_grad_(True)
    out = dropout_per_example(x, rate)
    out.sum().backward()
    assert rate.grad is None
    expected = (out != 0).float() / (1 - rate.detach()).unsqueeze(1)
    assert torch.equal(x.grad, expected)


def test_higher_rank_inputs_use_leading_rows():
    torch.manual_seed(3)
    rate = torch.tensor([0.0, 0.5, 0.8])
    x = nonzero_input(3, 40, 50)
    out = dropout_per_example(x, rate)
    assert_rows_drop_at_rate(out, x, rate)


@pytest.mark.parametrize("shared", [1, 2, 3])
def test_channel_dropout_drops_whole_channels(shared):
    torch.manual_seed(4)
    batch, channels = 4, 3000
    spatial = (3, 2, 2)[:shared]
    rate = torch.tensor([0.0, 0.25, 0.5, 0.75])
    x = nonzero_input(batch, channels, *spatial)
    out = dropout_per_example(x, rate, shared)
    per_channel = out.reshape(batch, channels, -1)
    zeros = (per_channel == 0).all(-1)
    nonzero = (per_channel != 0).all(-1)
    assert torch.equal(zeros | nonzero, torch.ones_like(zeros))  # never a partly dropped channel
    for i in range(batch):
        p = float(rate[i])
        frac = zeros[i].double().mean().item()
        assert abs(frac - p) <= binomial_bound(p, channels), (i, p, frac)
    keep = (1 - rate).reshape(batch, *[1] * (x.dim() - 1))
    kept = out != 0
    assert torch.equal(out[kept], (x * (1 / keep))[kept])


@pytest.mark.parametrize("shared", [1, 2, 3])
def test_unbatched_channel_dropout(shared):
    torch.manual_seed(5)
    x = nonzero_input(2000, *(3, 2, 2)[:shared])  # (C, *spatial): no batch dimension
    out = dropout_per_example(x, torch.tensor([0.4]), shared)
    per_channel = out.reshape(2000, -1)
    zeros = (per_channel == 0).all(-1)
    assert torch.equal(zeros | (per_channel != 0).all(-1), torch.ones_like(zeros))
    assert abs(zeros.double().mean().item() - 0.4) <= binomial_bound(0.4, 2000)


@pytest.mark.parametrize(
    "shape, rows, shared",
    [((7, 4), 3, 0), ((6, 4), 12, 0), ((2, 3, 5), 4, 1), ((5, 2, 3, 3), 2, 2), ((3, 2, 2, 2, 2), 2, 3)],
)
def test_mismatched_rows_raise(shape, rows, shared):
    x = torch.ones(shape)
    with pytest.raises(PerturbationError, match="perturb='batch'") as info:
        dropout_per_example(x, torch.full((rows,), 0.5), shared, "my-site")
    msg = str(info.value)
    assert "my-site" in msg and str(shape[0]) in msg and str(rows) in msg


def test_unbatched_input_with_per_example_rows_raises():
    with pytest.raises(PerturbationError, match="perturb='batch'"):
        dropout_per_example(torch.ones(7), torch.full((7,), 0.5))


# ---- HyperDropout -----------------------------------------------------------------------------


@pytest.mark.parametrize("cls, shared", [(nn.Dropout, 0), (nn.Dropout1d, 1), (nn.Dropout2d, 2), (nn.Dropout3d, 3)])
def test_hyper_dropout_is_identity_in_eval(cls, shared):
    drop = HyperDropout("d", cls, shared, "site").eval()
    x = torch.randn(2, 3, 4, 4, 4)
    assert drop(x) is x  # even outside a HyperModel forward


def test_hyper_dropout_outside_model_in_training_raises():
    drop = HyperDropout("d", nn.Dropout, 0, "site")
    with pytest.raises(PerturbationError, match="'site'"):
        drop(torch.ones(2, 2))


def test_hyper_dropout_reads_rate_from_perturbation():
    torch.manual_seed(6)
    from hypertune import HyperParameters

    hp = HyperParameters({"d": DropoutRate(init=0.5)})
    drop = HyperDropout("d", nn.Dropout, 0, "site")
    # per-example rates: rows at three different unconstrained values
    u = torch.tensor([[-4.0], [0.0], [2.0]])
    rate = hp.constrain(u, "d")
    x = nonzero_input(3, 20000)
    with active(Perturbation(hp, u)):
        out = drop(x)
    assert_rows_drop_at_rate(out, x, rate)


def test_wrapped_model_dropout_eval_and_train():
    torch.manual_seed(7)
    lin = nn.Linear(200, 200, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(200))
    model = nn.Sequential(lin, nn.Dropout(0.9))
    wrapped = HyperModel.wrap(model, {"d": DropoutRate(init=0.3)})
    x = nonzero_input(30, 200)
    wrapped.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), x)
    wrapped.train()
    with torch.no_grad():
        out = wrapped(x)
    rate = wrapped.hparam_values()["d"]
    assert_rows_drop_at_rate(out, x, torch.full((30,), rate, dtype=torch.float32))


# ---- layers that see reshaped batches ----------------------------------------------------------


class Reshaping(nn.Module):
    """Folds time into the batch before its Linear: (B, T, F) -> (B*T, F)."""

    def __init__(self, f: int = 4, out: int = 3, dropout: bool = True) -> None:
        super().__init__()
        self.fc = nn.Linear(f, out)
        self.drop = nn.Dropout(0.1) if dropout else nn.Identity()
        self.head = nn.Linear(out, 2)

    def forward(self, x):
        b, t, f = x.shape
        h = self.drop(self.fc(x.reshape(b * t, f)))
        return self.head(h.reshape(b, t, -1).mean(1))


def _point(model: HyperModel, rows: int, scale: float = 0.5) -> Perturbation:
    lam = model.hparams.unconstrained.detach().unsqueeze(0)
    delta = scale * torch.randn(rows, len(model.hparams))
    return Perturbation(model.hparams, lam + delta, delta)


@pytest.mark.parametrize("training", [False, True])
def test_reshaped_batch_is_perturbed_per_example(training):
    """(B, T, F) folded to (B·T, F) before fc: each example's T rows carry its own perturbation,
    so example i's output is the model's output on example i alone at row i (exact in eval)."""
    torch.manual_seed(8)
    model = HyperModel.wrap(Reshaping(), {"d": DropoutRate(), "wd": WeightDecay()})
    with torch.no_grad():
        for layer in model.hyper_layers().values():
            layer.hyper_projection.weight.normal_()
    model.train(training)
    x = torch.randn(5, 2, 4)
    point = _point(model, rows=5)
    with torch.no_grad(), model.evaluated_at(point):
        out = model(x)
    assert model.perturbed_per_batch is None
    if not training:
        for i in range(5):
            one = Perturbation(model.hparams, point.hparams[i : i + 1], point.response_input[i : i + 1])
            with torch.no_grad(), model.evaluated_at(one):
                torch.testing.assert_close(out[i : i + 1], model(x[i : i + 1]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [False, True])
def test_reshaped_batch_works_with_one_row(training):
    torch.manual_seed(9)
    model = HyperModel.wrap(Reshaping(), {"d": DropoutRate(), "wd": WeightDecay()})
    model.train(training)
    with torch.no_grad():
        for layer in model.hyper_layers().values():
            layer.hyper_projection.weight.normal_()
    x = torch.randn(5, 2, 4)
    point = _point(model, rows=1)
    with torch.no_grad(), model.evaluated_at(point):
        out = model(x)
    assert out.shape == (5, 2)
    assert torch.isfinite(out).all()
    if not training:
        with torch.no_grad():
            base = model(x)  # λ₀: w₀'s output
        assert not torch.allclose(out, base)
        # a shared row acts like w(δλ) = w₀ + Θ δλ on every folded example: compare with fc alone
        fc = model.module.fc
        with torch.no_grad(), active(point):
            folded = fc(x.reshape(10, 4))
            s = point.response_input @ fc.hyper_projection.weight.T
            expect = F.linear(x.reshape(10, 4), fc.weight, fc.bias) + s[:, :3] * F.linear(
                x.reshape(10, 4), fc.response_weight
            ) + s[:, 3:] * fc.response_bias
        torch.testing.assert_close(folded, expect)


def test_reshaped_batch_dropout_site_drops_per_example():
    # fc excluded: the first module to see the folded batch is the dropout
    torch.manual_seed(12)
    model = HyperModel.wrap(Reshaping(f=4, out=4), {"d": DropoutRate()}, exclude=["fc"])
    model.train()
    drop = model.module.drop
    seen = {}
    drop.register_forward_hook(lambda m, i, o: seen.update(x=i[0], y=o))
    rates = torch.tensor([0.1, 0.5, 0.9])
    u = torch.tensor([[model.hparams.specs["d"].transform.inverse(r)] for r in rates.tolist()])
    with torch.no_grad(), model.evaluated_at(Perturbation(model.hparams, u, u * 0)):
        model(torch.randn(3, 4000, 4) + 5)
    # rows i·T … i·T+T-1 of the folded (B·T, F) tensor belong to example i, at its own rate
    dropped = (seen["y"] == 0).reshape(3, -1).double().mean(1)
    for got, rate in zip(dropped.tolist(), rates.tolist()):
        assert abs(got - rate) <= binomial_bound(rate, 16000)


def test_reshaped_batch_excluding_layers_avoids_the_error():
    model = HyperModel.wrap(Reshaping(dropout=False), {"wd": WeightDecay()}, exclude=["fc"])
    with torch.no_grad(), model.evaluated_at(_point(model, rows=5)):
        out = model(torch.randn(5, 2, 4))
    assert out.shape == (5, 2)


@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_all_batch_perturb_trains_a_reshaping_model(mode):
    """The PerturbationError tells users to give every hyperparameter perturb='batch';
    doing so must let the optimizer train a model that folds its batch."""
    torch.manual_seed(10)
    model = HyperModel.wrap(
        Reshaping(), {"d": DropoutRate(perturb="batch"), "wd": WeightDecay(perturb="batch")}
    )
    opt = DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), mode=mode)
    x, y = torch.randn(6, 3, 4), torch.randn(6, 2)
    result = opt.train_step(x, y, F.mse_loss)
    assert math.isfinite(result.loss)
    result = opt.val_step(x, y, F.mse_loss)
    assert math.isfinite(result.loss)


def test_unbatched_inputs_take_one_row_only():
    torch.manual_seed(11)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    model = HyperModel.wrap(nn.Sequential(conv, nn.Flatten(0), nn.Linear(3 * 4 * 4, 2)), {"a": HParam(init=0.0)})
    x = torch.randn(2, 4, 4)  # (C, H, W): no batch dimension
    with torch.no_grad(), model.evaluated_at(_point(model, rows=1)):
        assert model(x).shape == (2,)
    # per-example rows cannot be placed on an unbatched input: the model falls back to one
    # perturbation per batch, with one notice naming the site
    with pytest.warns(UserWarning, match="HyperConv2d '0' cannot take one perturbation per example"):
        with torch.no_grad(), model.evaluated_at(_point(model, rows=2)):
            assert model(x).shape == (2,)
    assert model.perturbed_per_batch == "HyperConv2d '0'"
