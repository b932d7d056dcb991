"""Tuned dropout where attention code reads the rate (``.p``) instead of calling the module.

The rate reaches ``F.scaled_dot_product_attention(dropout_p=...)`` (timm, Hugging Face's SDPA
interface) or ``F.dropout(probs, p=...)`` (Hugging Face's eager interface). Properties: eval
passes equal the plain model exactly; a batch that shares one rate runs exactly like
``nn.Dropout(p)``; per-example rates drop each example at its own rate (binomial bound); the
SDPA rewrite is the math formula with the same mask; anything else falls back to per-batch
perturbation with one notice, never an AttributeError.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune.attention import TunedRate, TunedRateCalls, math_attention, softmax
from hypertune.context import Perturbation
from hypertune.layers import HyperDropout
from hypertune.linearize import linearized_call


def binomial_bound(p: float, n: int, sigmas: float = 4.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n) + 1e-12


class SelfAttention(nn.Module):
    """timm's pattern: ``dropout_p=self.attn_drop.p if self.training else 0.``"""

    def __init__(self, dim: int = 8, heads: int = 2, kernel: str = "sdpa") -> None:
        super().__init__()
        self.heads, self.kernel = heads, kernel
        self.qkv = nn.Linear(dim, 3 * dim)
        self.attn_drop = nn.Dropout(0.2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.kernel == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:  # Hugging Face's eager interface
            probs = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(c // self.heads), -1)
            probs = F.dropout(probs, p=self.attn_drop.p, training=self.training)
            out = probs @ v
        return self.proj(out.transpose(1, 2).reshape(b, t, c))


class Classifier(nn.Module):
    def __init__(self, kernel: str = "sdpa") -> None:
        super().__init__()
        self.attn = SelfAttention(kernel=kernel)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.attn(x)).mean(1))


def _unconstrained(model: ht.HyperModel, name: str, rates: list[float]) -> torch.Tensor:
    transform = model.hparams.specs[name].transform
    return torch.tensor([[transform.inverse(r)] for r in rates])


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_eval_pass_equals_the_plain_model_exactly(kernel):
    torch.manual_seed(0)
    net = Classifier(kernel)
    plain = copy.deepcopy(net).eval()
    model = ht.HyperModel.wrap(net, {"dropout": ht.DropoutRate(init=0.1), "wd": ht.WeightDecay()}).eval()
    x = torch.randn(4, 5, 8)
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_a_shared_rate_runs_exactly_like_nn_dropout(kernel):
    """Unperturbed training pass: ``.p`` is the current rate as a float, so the kernel (fused
    SDPA included) draws the very mask nn.Dropout(p=current rate) would."""
    torch.manual_seed(1)
    net = Classifier(kernel)
    model = ht.HyperModel.wrap(net, {"dropout": ht.DropoutRate(init=0.3, targets=["attn.attn_drop"])},)
    rate = model.hparam_values()["dropout"]
    plain = copy.deepcopy(net)
    plain.attn = copy.deepcopy(net.attn)
    plain.attn.attn_drop = nn.Dropout(rate)
    plain.drop = nn.Dropout(0.1)
    x = torch.randn(4, 5, 8)
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    expected = plain(x)
    assert torch.equal(out, expected)


def test_rate_reads_as_a_tagged_float_and_refuses_assignment():
    model = ht.HyperModel.wrap(Classifier(), {"dropout": ht.DropoutRate(init=0.25)})
    site = model.module.attn.attn_drop
    assert isinstance(site, HyperDropout)
    rate = site.p  # outside a forward: the current value
    assert isinstance(rate, TunedRate) and rate.site is site
    assert rate == pytest.approx(model.hparam_values()["dropout"])
    with pytest.raises(ht.HyperTuneError, match="tuned by hypertune"):
        site.p = 0.5


class ProbeAttention(nn.Module):
    """Uniform attention (q = k = 0) over values v = I: the output is the dropped attention
    probabilities themselves, 1/L where kept (scaled by 1/(1-rate)) and 0 where dropped."""

    def __init__(self, kernel: str, length: int = 40, heads: int = 2) -> None:
        super().__init__()
        self.kernel, self.length, self.heads = kernel, length, heads
        self.fc = nn.Linear(4, 4)
        self.attn_drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n = x.shape[0], self.length
        q = torch.zeros(b, self.heads, n, 4) * self.fc(x).sum()
        v = torch.eye(n).expand(b, self.heads, n, n)
        if self.kernel == "sdpa":
            return F.scaled_dot_product_attention(q, q, v, dropout_p=self.attn_drop.p)
        probs = torch.softmax(q @ q.transpose(-2, -1), -1)
        return F.dropout(probs, p=self.attn_drop.p, training=self.training) @ v


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_per_example_rates_drop_each_example_at_its_rate(kernel):
    """A perturbed pass carries one rate per example; the attention probabilities of example i
    are dropped at rate i (binomial bound) and the kept ones scaled by exactly 1/(1-rate_i)."""
    torch.manual_seed(2)
    model = ht.HyperModel.wrap(ProbeAttention(kernel), {"dropout": ht.DropoutRate()}).train()
    rates = [0.1, 0.5, 0.8]
    u = _unconstrained(model, "dropout", rates)
    with torch.no_grad(), model.evaluated_at(Perturbation(model.hparams, u, u * 0)):
        out = model(torch.randn(3, 4))
    assert out.shape == (3, 2, 40, 40) and model.perturbed_per_batch is None
    for i, rate in enumerate(rates):
        dropped = (out[i] == 0).double().mean().item()
        assert abs(dropped - rate) <= binomial_bound(rate, out[i].numel())
        kept = out[i][out[i] != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / 40 / (1 - rate)))


def test_sdpa_with_a_tuned_rate_is_the_math_formula_with_the_same_mask():
    torch.manual_seed(3)
    model = ht.HyperModel.wrap(Classifier(), {"dropout": ht.DropoutRate(targets=["attn.attn_drop"])}).train()
    site = model.module.attn.attn_drop
    rates = torch.tensor([0.2, 0.6])
    u = _unconstrained(model, "dropout", rates.tolist())
    q, k, v = (torch.randn(2, 2, 6, 4) for _ in range(3))
    mask = torch.rand(6, 6) > 0.3
    mask.fill_diagonal_(True)
    point = Perturbation(model.hparams, u, u * 0)
    with ht.context.active(point), TunedRateCalls():
        rate = site.p
        torch.manual_seed(11)
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=rate)
    torch.manual_seed(11)
    keep = (1 - point.value("dropout")).reshape(2, 1, 1, 1)
    drop_mask = torch.rand(2, 2, 6, 6) < keep
    scores = (q @ k.transpose(-2, -1)) / 2.0
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    expected = (probs * drop_mask / keep) @ v
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
@pytest.mark.parametrize("gqa", [False, True])
def test_math_attention_equals_torch_sdpa_without_dropout(causal, mask_kind, gqa):
    torch.manual_seed(4)
    q = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    k = torch.randn(2, 2 if gqa else 4, 7, 8, dtype=torch.float64)
    v = torch.randn(2, 2 if gqa else 4, 7, 3, dtype=torch.float64)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(5, 7) > 0.4
        mask[0] = False  # a query that may attend to nothing
    elif mask_kind == "float":
        mask = torch.randn(2, 1, 5, 7, dtype=torch.float64)
    kwargs = {"attn_mask": mask, "is_causal": causal and mask is None, "scale": 0.3, "enable_gqa": gqa}
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    got = math_attention(q, k, v, kwargs["attn_mask"], None, kwargs["is_causal"], 0.3, gqa)
    torch.testing.assert_close(got, expected)


def test_softmax_rewrite_is_exact_and_backpropagates_through_its_tangent():
    """torch's softmax tangent cannot be backpropagated when the primal needs a gradient
    ("modified by an inplace operation"); the rewrite can, and computes the same values."""
    torch.manual_seed(5)
    x = torch.randn(3, 6, dtype=torch.float64)
    x[0, 2] = float("-inf")
    torch.testing.assert_close(softmax(x, -1), torch.softmax(x, -1))
    torch.testing.assert_close(softmax(x, 0, log=True), torch.log_softmax(x, 0))
    primal = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    tangent = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    with fwAD.dual_level():
        out = softmax(fwAD.make_dual(primal * 1, tangent * 1), -1)
        p, t = fwAD.unpack_dual(out)
    (p.sum() + t.pow(2).sum()).backward()
    s = torch.softmax(primal.detach(), -1)
    expected_t = s * (tangent.detach() - (s * tangent.detach()).sum(-1, keepdim=True))
    torch.testing.assert_close(t.detach(), expected_t)
    assert torch.isfinite(tangent.grad).all() and torch.isfinite(primal.grad).all()


class InputNeedsGrad(nn.Module):
    """wav2vec2's feature encoder marks its input as requiring grad; the attention after it then
    has a primal that needs a gradient in the linearized Θ step."""

    def __init__(self) -> None:
        super().__init__()
        self.net = Classifier()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        if self.training:
            x.requires_grad_(True)
        return self.net(x)


@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_attention_after_an_input_that_needs_grad_trains(mode):
    torch.manual_seed(6)
    model = ht.HyperModel.wrap(InputNeedsGrad(), {"dropout": ht.DropoutRate(), "wd": ht.WeightDecay()})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), mode=mode, warmup_steps=0)
    x, y = torch.randn(4, 5, 8), torch.tensor([0, 1, 2, 0])
    before = model.hparams.unconstrained.detach().clone()
    for _ in range(3):
        result = opt.train_step(x, y, F.cross_entropy)
        assert not result.skipped and math.isfinite(result.loss)
        assert opt.val_step(x, y, F.cross_entropy).updated
    assert not torch.equal(model.hparams.unconstrained.detach(), before)
    assert model.perturbed_per_batch is None


class ReadsRateForArithmetic(nn.Module):
    def __init__(self, use: str) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.drop = nn.Dropout(0.1)
        self.use = use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        if self.use == "alpha":  # a rate consumer that takes one rate for the whole batch
            return F.alpha_dropout(h, p=self.drop.p, training=self.training)
        return h * (1 - self.drop.p)  # the float used, no call to catch


@pytest.mark.parametrize("use", ["alpha", "arithmetic"])
@pytest.mark.parametrize("mode", ["delta", "stn"])
def test_a_rate_used_elsewhere_falls_back_to_per_batch_with_one_notice(use, mode):
    torch.manual_seed(7)
    model = ht.HyperModel.wrap(ReadsRateForArithmetic(use), {"dropout": ht.DropoutRate()})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), mode=mode, warmup_steps=0)
    x, y = torch.randn(6, 4), torch.randn(6, 4)
    with pytest.warns(UserWarning, match="tuned dropout 'drop' cannot take one perturbation per example") as record:
        opt.train_step(x, y, F.mse_loss)
        opt.train_step(x, y, F.mse_loss)
        opt.val_step(x, y, F.mse_loss)
    assert sum("once per batch" in str(w.message) for w in record) == 1
    assert model.perturbed_per_batch == "tuned dropout 'drop'"


def test_unwrap_gives_back_a_plain_dropout_that_attention_reads():
    torch.manual_seed(8)
    model = ht.HyperModel.wrap(Classifier(), {"dropout": ht.DropoutRate(init=0.2)})
    rate = model.hparam_values()["dropout"]
    plain = model.unwrap()
    assert type(plain.attn.attn_drop) is nn.Dropout and plain.attn.attn_drop.p == pytest.approx(rate)
    plain.train()
    assert torch.isfinite(plain(torch.randn(2, 5, 8))).all()


def test_linearized_pass_with_tuned_attention_rate_keeps_w0_primal():
    """Δ-STN: the primal of the linearized pass is w₀'s output at the perturbed rates; with
    every rate equal the per-example SDPA rewrite draws the same masks as a shared one."""
    torch.manual_seed(9)
    model = ht.HyperModel.wrap(Classifier(), {"dropout": ht.DropoutRate(targets=["attn.attn_drop"])}).eval()
    lam = model.hparams.unconstrained.detach().unsqueeze(0).expand(3, -1)
    x = torch.randn(3, 5, 8)
    point = Perturbation(model.hparams, lam, torch.zeros_like(lam), linearize=True)
    with torch.no_grad():
        base = model(x)
        with model.evaluated_at(point):
            out = linearized_call(lambda: model(x))
    torch.testing.assert_close(out, base)
