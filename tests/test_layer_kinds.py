"""Layer kinds as registered classes: a user's own kind, subclasses, transformers' Conv1D, timm's
convolutions, weight-normed convolutions, functional weight users, tied weights, coverage.

Every kind is checked the same way: at δλ = 0 the wrapped model equals the plain one exactly, and
the linearized tangent (J_yw Θ δλ, what Δ-STN trains on) equals the finite-difference derivative
of the centered outputs along δλ.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations

import hypertune as ht
from hypertune import HParam, HyperModel, WeightDecay
from hypertune.context import Perturbation
from hypertune.layers import registry, row_view
from hypertune.notices import WrapNotice


def _point(hm: HyperModel, delta: torch.Tensor, linearize: bool = False) -> Perturbation:
    lam = hm.hparams.unconstrained.detach().unsqueeze(0)
    return Perturbation(hm.hparams, (lam + delta).detach(), delta, linearize=linearize)


def _randomize(hm: HyperModel, scale: float = 0.5) -> None:
    with torch.no_grad():
        for layer in hm.hyper_layers().values():
            layer.hyper_projection.weight.normal_(0.0, scale)


def _out(y):
    return y.logits if hasattr(y, "logits") else y


def _by_definition(hm: HyperModel, x, d: torch.Tensor):
    """Example i evaluated by the *plain* model with its weights set to w(δλ_i) = w₀ + s_i ⊙ W_resp
    (s_i = P δλ_i), the definition of the response, independent of any kind's ``response``."""
    plain = copy.deepcopy(hm).unwrap().eval()
    rows = []
    for i in range(d.shape[0]):
        values: dict[str, torch.Tensor] = {}
        done: set[int] = set()
        for path, layer in hm.hyper_layers().items():
            prefix = f"{path}." if path else ""
            s = d[i : i + 1] @ layer.hyper_projection.weight.T
            n = layer.weight.shape[layer.modulated_dim]
            if id(layer.hyper_projection) not in done:
                done.add(id(layer.hyper_projection))
                shape = [1] * layer.weight.dim()
                shape[layer.modulated_dim] = n
                values[prefix + "weight"] = layer.weight + s[0, :n].reshape(shape) * layer.response_weight
            if layer.response_bias is not None:
                values[prefix + "bias"] = layer.bias + s[0, n:] * layer.response_bias
        rows.append(_out(torch.func.functional_call(plain, values, (x[i : i + 1],))))
    return torch.cat(rows)


def check_kind(
    model: nn.Module, x, expected_layers: int | None = None, definition: bool = True, **wrap
) -> HyperModel:
    """Exact at δλ = 0; each example's output at its own δλ equals the plain model with weights
    w(δλ) (``definition``); linearized tangent == central finite difference along δλ."""
    torch.manual_seed(0)
    model = model.double().eval()
    with torch.no_grad():
        ref = _out(model(x))
    hm = HyperModel.wrap(model, {"a": HParam(init=0.0), "wd": WeightDecay()}, **wrap)
    hm.eval()
    if expected_layers is not None:
        assert len(hm.hyper_layers()) == expected_layers, list(hm.hyper_layers())
    with torch.no_grad():
        assert torch.equal(_out(hm(x)), ref)
    _randomize(hm)
    batch = x.shape[0]
    d = torch.randn(batch, len(hm.hparams), dtype=torch.float64)
    h = 1e-6
    with torch.no_grad():
        with hm.evaluated_at(_point(hm, h * d)):
            up = _out(hm(x))
        with hm.evaluated_at(_point(hm, -h * d)):
            down = _out(hm(x))
        with hm.evaluated_at(_point(hm, torch.zeros_like(d))):
            assert torch.equal(_out(hm(x)), ref)  # δλ = 0 with a response path: still w₀
    if definition:
        with torch.no_grad():
            with hm.evaluated_at(_point(hm, d)):
                at_d = _out(hm(x))
            torch.testing.assert_close(at_d, _by_definition(hm, x, d), rtol=1e-9, atol=1e-10)
    fd = (up - down) / (2 * h)
    assert fd.abs().max() > 1e-6  # the response really moves the output
    with torch.no_grad(), fwAD.dual_level(), hm.evaluated_at(_point(hm, d, linearize=True)):
        primal, tangent = fwAD.unpack_dual(_out(hm(x)))
    torch.testing.assert_close(primal, ref, rtol=0, atol=0)
    torch.testing.assert_close(tangent, fd, rtol=1e-6, atol=1e-7)
    return hm


# ---- a kind a user registers for their own module --------------------------------------------------
class ScaledLinear(nn.Module):
    """A linear layer with a learned per-output gain: y = x (g ⊙ W)ᵀ + b."""

    def __init__(self, fin: int, fout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fout, fin) / math.sqrt(fin))
        self.bias = nn.Parameter(torch.zeros(fout))
        self.gain = nn.Parameter(1.0 + 0.1 * torch.randn(fout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.gain[:, None], self.bias)


@ht.register_layer_kind
class HyperScaledLinear(ht.HyperLayer, ScaledLinear):
    base_class = ScaledLinear

    def base_forward(self, x, weight, bias):
        return F.linear(x, weight * self.gain[:, None], bias)

    def response(self, x, s_w, s_b, weight, bias):
        rows = lambda s: row_view(s, x.dim(), -1, x.dim() >= 2, x.shape[0], self.hyper_path)  # noqa: E731
        out = F.linear(x, weight * self.gain[:, None]) * rows(s_w)
        return out + rows(s_b) * bias if s_b is not None else out


def test_user_registered_kind_is_exact_and_its_response_jacobian_matches_finite_differences():
    model = nn.Sequential(ScaledLinear(5, 7), nn.Tanh(), ScaledLinear(7, 3))
    hm = check_kind(model, torch.randn(4, 5, dtype=torch.float64), expected_layers=2)
    layer = hm.module[0]
    assert isinstance(layer, HyperScaledLinear) and isinstance(layer, ScaledLinear)
    assert "gain" in dict(layer.named_parameters(recurse=False))  # the module's own state stays
    plain = hm.unwrap()
    assert type(plain[0]) is ScaledLinear and not hasattr(plain[0], "response_weight")


def test_user_kind_trains_in_every_mode():
    for mode in ("delta", "centered", "stn"):
        torch.manual_seed(0)
        model = nn.Sequential(ScaledLinear(5, 8), nn.ReLU(), nn.Dropout(0.1), ScaledLinear(8, 3))
        hm = HyperModel.wrap(model, {"drop": ht.DropoutRate(), "wd": WeightDecay()})
        opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1), mode=mode, warmup_steps=0)
        x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
        before = hm.hparam_values()
        for _ in range(3):
            opt.train_step(x, y, F.cross_entropy)
            opt.val_step(x, y, F.cross_entropy)
        assert hm.hparam_values() != before


def test_register_layer_kind_refuses_what_is_not_a_kind():
    with pytest.raises(TypeError, match="HyperLayer subclass"):
        ht.register_layer_kind(nn.Linear)
    with pytest.raises(TypeError, match="base_forward and response"):

        @ht.register_layer_kind(handles=ScaledLinear)
        class Incomplete(ht.HyperLayer, ScaledLinear):
            pass


# ---- subclasses ---------------------------------------------------------------------------------
class PlainSubclass(nn.Linear):
    """A subclass that only adds a method: nn.Linear's math still holds."""

    def describe(self) -> str:
        return "mine"


class OwnForward(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 2


def test_subclass_without_own_forward_is_its_base_kind_and_unwraps_to_itself():
    model = nn.Sequential(PlainSubclass(4, 6), nn.ReLU(), nn.Linear(6, 2))
    hm = check_kind(model, torch.randn(3, 4, dtype=torch.float64), expected_layers=2)
    layer = hm.module[0]
    assert isinstance(layer, PlainSubclass) and layer.describe() == "mine"
    assert layer.original_class is PlainSubclass
    assert type(hm.unwrap()[0]) is PlainSubclass


def test_subclass_with_own_forward_stays_w0_and_is_named_once():
    model = nn.Sequential(OwnForward(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.warns(ht.WrapNotice) as caught:
        hm = HyperModel.wrap(model, {"wd": WeightDecay()})
    assert len(caught) == 1
    assert "'0'" in str(caught[0].message) and "own forward" in str(caught[0].message)
    assert list(hm.hyper_layers()) == ["2"]
    cov = hm.coverage()
    assert "own forward" in cov.untuned["0"]
    tuned = 6 * 2 + 2
    assert cov.tuned_fraction == pytest.approx(tuned / (4 * 6 + 6 + tuned))


def test_subclass_with_own_forward_named_in_targets_is_refused():
    model = nn.Sequential(OwnForward(4, 6), nn.ReLU(), nn.Linear(6, 2))
    with pytest.raises(ht.WrapError, match="own forward"):
        HyperModel.wrap(model, {"wd": WeightDecay()}, targets=["0", "2"])


def test_torchvision_conv3dsimple_is_tuned():
    tv = pytest.importorskip("torchvision.models.video.resnet")
    model = nn.Sequential(tv.Conv3DSimple(2, 3), nn.ReLU(), tv.Conv3DSimple(3, 2, stride=2))
    hm = check_kind(model, torch.randn(2, 2, 3, 5, 5, dtype=torch.float64), expected_layers=2)
    assert hm.coverage().tuned_fraction == 1.0
    assert type(hm.unwrap()[0]) is tv.Conv3DSimple


# ---- transformers' Conv1D -----------------------------------------------------------------------
def test_transformers_conv1d_is_a_kind():
    pu = pytest.importorskip("transformers.pytorch_utils")
    model = nn.Sequential(pu.Conv1D(6, 4), nn.GELU(), pu.Conv1D(3, 6))
    hm = check_kind(model, torch.randn(2, 5, 4, dtype=torch.float64), expected_layers=2)
    assert type(hm.unwrap()[0]) is pu.Conv1D


def test_hypertune_import_does_not_import_transformers_or_timm():
    import subprocess
    import sys

    code = "import sys, hypertune; print('transformers' in sys.modules, 'timm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_gpt2_projections_are_tuned_and_tied_embeddings_share_one_response():
    tr = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = tr.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=8, attn_implementation="eager")
    model = tr.GPT2LMHeadModel(cfg)
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 40, (3, 6))
    hm = check_kind(model, ids, exclude=["transformer.wpe"])
    layers = hm.hyper_layers()
    assert type(layers["transformer.h.0.attn.c_attn"]).__name__ == "HyperConv1D"
    wte, head = layers["transformer.wte"], layers["lm_head"]
    assert wte.response_weight is head.response_weight and wte.hyper_projection is head.hyper_projection
    assert wte.modulated_dim == 1 and head.modulated_dim == 1  # the embedding features: the smaller side
    assert hm.coverage().untuned == {"transformer.wpe": "excluded"}


# ---- timm's convolutions ------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Conv2dSame", "StdConv2d", "ScaledStdConv2d", "StdConv2dSame", "ScaledStdConv2dSame"])
def test_timm_convolutions_are_kinds(name):
    layers = pytest.importorskip("timm.layers")
    cls = getattr(layers, name)
    kwargs = {"stride": 2} if "Same" in name else {"padding": 1}
    model = nn.Sequential(cls(3, 4, 3, **kwargs), nn.ReLU(), cls(4, 2, 3, **kwargs))
    # Std convs respond in the standardized weight's space (checked in the next test)
    check_kind(model, torch.randn(2, 3, 7, 6, dtype=torch.float64), expected_layers=2,
               definition="Std" not in name)


@pytest.mark.parametrize("name", ["StdConv2d", "ScaledStdConv2dSame"])
def test_std_conv_response_is_added_to_the_standardized_weight(name):
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    conv = getattr(layers, name)(3, 4, 3, stride=2, bias=True).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    hm = HyperModel.wrap(nn.Sequential(conv), {"wd": WeightDecay()})
    _randomize(hm)
    layer = hm.module[0]
    d = torch.randn(2, 1, dtype=torch.float64)
    with torch.no_grad(), hm.evaluated_at(_point(hm, d)):
        out = hm(x)
        for i in range(2):
            s = d[i] @ layer.hyper_projection.weight.T
            w = layer.standardized(layer.weight) + s[:4].reshape(4, 1, 1, 1) * layer.response_weight
            b = layer.bias + s[4:] * layer.response_bias
            plain = getattr(layers, name)(3, 4, 3, stride=2).double()
            xi = layers.padding.pad_same(x[i : i + 1], [3, 3], [2, 2], [1, 1]) if "Same" in name else x[i : i + 1]
            ref = F.conv2d(xi, w, b, plain.stride, plain.padding, plain.dilation, plain.groups)
            torch.testing.assert_close(out[i : i + 1], ref, rtol=1e-10, atol=1e-12)


def test_timm_linear_is_a_kind():
    layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(layers.Linear(4, 5), nn.ReLU(), layers.Linear(5, 2))
    hm = check_kind(model, torch.randn(3, 4, dtype=torch.float64), expected_layers=2)
    assert type(hm.unwrap()[2]) is layers.Linear


def test_std_conv_refuses_stn_unwrap_with_the_fix_and_changes_nothing():
    layers = pytest.importorskip("timm.layers")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 3, 1), layers.StdConv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(1, 3, 5, 5))
    hm = HyperModel.wrap(model, {"wd": WeightDecay()})
    hm.centered = False
    _randomize(hm)
    before = {k: v.clone() for k, v in hm.state_dict().items()}
    with pytest.raises(ht.HyperTuneError, match="'delta' or 'centered'.*not changed"):
        hm.unwrap()
    # checked before anything was folded: the conv ahead of the StdConv2d kept its w₀
    after = hm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


# ---- weight-normed convolutions -------------------------------------------------------------------
def test_weight_norm_conv_is_tuned_with_its_computed_weight_as_w0():
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv1d(3, 4, 3)), nn.ReLU(), nn.Conv1d(4, 2, 1))
    originals = {n: p for n, p in model.named_parameters()}
    hm = check_kind(model, torch.randn(2, 3, 8, dtype=torch.float64), expected_layers=2)
    assert {n: p for n, p in hm.module.named_parameters() if "response" not in n and "hyper" not in n} == originals
    plain = hm.unwrap()
    assert type(plain[0]).__name__ == "ParametrizedConv1d"


def test_weight_norm_stn_unwrap_folds_theta_through_the_parametrization():
    torch.manual_seed(0)
    model = nn.Sequential(parametrizations.weight_norm(nn.Conv1d(3, 4, 3)), nn.ReLU(), nn.Conv1d(4, 2, 1)).double()
    hm = HyperModel.wrap(model, {"wd": WeightDecay()})
    hm.centered = False
    _randomize(hm)
    hm.eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        expected = hm(x)
    plain = hm.unwrap().eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), expected, rtol=1e-10, atol=1e-10)


def test_constraining_parametrizations_are_still_refused():
    model = nn.Sequential(parametrizations.orthogonal(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ht.WrapError, match="constrains its weight"):
        HyperModel.wrap(model, {"wd": WeightDecay()})


# ---- functional weight users ------------------------------------------------------------------------
class AttentionNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.att = nn.MultiheadAttention(8, 2, batch_first=True)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        return self.out(self.att(h, h, h)[0].mean(1))


def test_multihead_attention_stays_w0_with_a_notice_and_steps_run():
    model = AttentionNet()
    with pytest.warns(ht.WrapNotice, match="att.out_proj"):
        hm = HyperModel.wrap(model, {"wd": WeightDecay()})
    assert set(hm.hyper_layers()) == {"inp", "out"}
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1))
    x, y = torch.randn(4, 5, 4), torch.randint(0, 3, (4,))
    assert opt.train_step(x, y, F.cross_entropy).updated


def test_swin3d_window_attention_stays_w0():
    sw = pytest.importorskip("torchvision.models.video.swin_transformer")

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = sw.ShiftedWindowAttention3d(8, [2, 2, 2], [0, 0, 0], 2)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.attn(x).mean((1, 2, 3)))

    with pytest.warns(ht.WrapNotice, match="attn.qkv"):
        hm = HyperModel.wrap(Net(), {"wd": WeightDecay()})
    assert list(hm.hyper_layers()) == ["head"]
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1))
    assert opt.train_step(torch.randn(2, 2, 4, 4, 8), torch.randint(0, 2, (2,)), F.cross_entropy).updated


# ---- tied weights ------------------------------------------------------------------------------------
class TiedLM(nn.Module):
    """T5's layout: ``shared`` is never called; ``embed`` and ``head`` hold its weight."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.shared = nn.Embedding(vocab, dim)
        self.embed = nn.Embedding(vocab, dim)
        self.embed.weight = self.shared.weight
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.shared.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_tied_weights_share_one_response_and_are_exact():
    hm = check_kind(TiedLM(), torch.randint(0, 11, (3, 4)), expected_layers=4)
    layers = hm.hyper_layers()
    assert layers["shared"].response_weight is layers["embed"].response_weight is layers["head"].response_weight
    theta = hm.response_parameters()
    assert len(theta) == len({id(p) for p in theta})
    assert sum(p is layers["shared"].response_weight for p in theta) == 1


def test_tied_weight_is_decayed_once():
    model = TiedLM().double()
    hm = HyperModel.wrap(model, {"wd": WeightDecay(init=0.3)})
    _randomize(hm)
    w = model.shared.weight
    d = torch.randn(2, 1, dtype=torch.float64)
    point = _point(hm, d)
    penalty = hm.training_penalty(point)
    layer = hm.hyper_layers()["embed"]
    s = (d @ layer.hyper_projection.weight.T)[:, : w.shape[1]]
    tied = torch.stack([(w + si * layer.response_weight).pow(2).sum() for si in s])
    mix = hm.hyper_layers()["mix"].weight_sq_norm(d)
    coef = point.value("wd")  # the coefficient at λ₀ + δλ, per row
    torch.testing.assert_close(penalty, 0.5 * coef * (tied + mix), rtol=1e-10, atol=1e-10)
    # counted twice it would be 0.5·c·(2·tied + mix): the test above tells them apart
    assert not torch.allclose(penalty, 0.5 * coef * (2 * tied + mix))


def test_uncalled_module_sharing_a_called_weight_is_not_an_error():
    hm = HyperModel.wrap(TiedLM(), {"wd": WeightDecay()})
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1), warmup_steps=0)
    ids = torch.randint(0, 11, (4, 5))
    loss = lambda out, y: F.cross_entropy(out.reshape(-1, 11), y.reshape(-1))  # noqa: E731
    assert opt.train_step(ids, ids, loss).updated
    assert hm.unreached_layers(set()) == list(hm.hyper_layers())
    assert hm.unreached_layers({"embed", "mix", "head"}) == []


def test_stn_unwrap_bakes_a_tied_weight_once():
    torch.manual_seed(0)
    model = TiedLM().double()
    hm = HyperModel.wrap(model, {"wd": WeightDecay()})
    hm.centered = False
    _randomize(hm)
    hm.eval()
    ids = torch.randint(0, 11, (3, 4))
    with torch.no_grad():
        expected = hm(ids)
    plain = hm.unwrap().eval()
    assert plain.shared.weight is plain.embed.weight is plain.head.weight
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), expected, rtol=1e-10, atol=1e-10)


class ScaledEmbedding(nn.Embedding):
    """Gemma's and BART's word embedding: a subclass with its own forward, which stays w₀."""

    def forward(self, ids):
        return super().forward(ids) * 2.0


class HalfTiedLM(nn.Module):
    """A tuned head tied to an embedding that is not tuned (Gemma, BART, M2M100)."""

    def __init__(self, vocab: int = 11, dim: int = 6) -> None:
        super().__init__()
        self.embed = ScaledEmbedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def test_stn_unwrap_unties_a_weight_an_untuned_module_shares():
    torch.manual_seed(0)
    model = HalfTiedLM().double()
    w0 = model.embed.weight.detach().clone()
    with pytest.warns(WrapNotice):  # the embedding stays w₀
        hm = HyperModel.wrap(model, {"wd": WeightDecay()})
    assert set(hm.hyper_layers()) == {"mix", "head"}
    hm.centered = False
    _randomize(hm)
    hm.eval()
    ids = torch.randint(0, 11, (3, 4))
    with torch.no_grad():
        expected = hm(ids)
    with pytest.warns(WrapNotice, match=r"untied.*tie_weights"):
        plain = hm.unwrap().eval()
    # the embedding computed with w₀ in the wrapped model and still does; the head has the fold
    assert torch.equal(plain.embed.weight, w0)
    assert plain.head.weight is not plain.embed.weight
    assert not torch.equal(plain.head.weight, w0)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), expected, rtol=1e-10, atol=1e-10)


def test_centered_unwrap_keeps_a_half_tied_weight_tied():
    model = HalfTiedLM()
    with pytest.warns(WrapNotice):
        hm = HyperModel.wrap(model, {"wd": WeightDecay()})
    _randomize(hm)
    plain = hm.unwrap()
    assert plain.head.weight is plain.embed.weight


def test_tied_kinds_that_cannot_share_a_response_are_refused():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv1d(4, 4, 1)
            self.b = nn.Conv1d(4, 4, 1)
            self.b.weight = self.a.weight
            self.c = nn.Embedding(3, 4)

    registry_dims = ht.layers.HyperConv1d.modulated_dims
    assert registry_dims == (0,)
    hm = HyperModel.wrap(Odd(), {"wd": WeightDecay()})  # same kind: one response
    assert hm.hyper_layers()["a"].response_weight is hm.hyper_layers()["b"].response_weight


def test_layer_kind_registry_lists_the_builtin_kinds():
    kinds = registry.kinds()
    for name in ("torch.nn.modules.linear.Linear", "transformers.pytorch_utils.Conv1D",
                 "timm.layers.conv2d_same.Conv2dSame", "torch.nn.modules.rnn.LSTM"):
        assert name in kinds


class TiedPair(nn.Module):
    """An embedding and a linear layer holding one weight, in either order, either side smaller."""

    def __init__(self, rows: int, cols: int, linear_first: bool, bias: bool) -> None:
        super().__init__()
        if linear_first:
            self.lin = nn.Linear(cols, rows, bias=bias)  # weight (rows, cols)
            self.emb = nn.Embedding(rows, cols)
            self.emb.weight = self.lin.weight
        else:
            self.emb = nn.Embedding(rows, cols)
            self.lin = nn.Linear(cols, rows, bias=bias)
            self.lin.weight = self.emb.weight

    def forward(self, ids):
        return self.lin(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("rows, cols", [(5, 9), (9, 5)])
@pytest.mark.parametrize("linear_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_tied_embedding_and_linear_in_every_layout(rows, cols, linear_first, bias):
    model = TiedPair(rows, cols, linear_first, bias)
    hm = check_kind(model, torch.randint(0, rows, (3, 4)), expected_layers=2)
    emb, lin = hm.hyper_layers()["emb"], hm.hyper_layers()["lin"]
    dim = 0 if rows < cols else 1  # the smaller side is modulated
    assert emb.modulated_dim == lin.modulated_dim == dim
    assert emb.response_weight is lin.response_weight
    owner, follower = (lin, emb) if linear_first else (emb, lin)
    assert follower.response_bias is None
    assert (owner.response_bias is not None) == (bias and linear_first)


def test_a_wrapped_subclass_pickles_into_a_fresh_process(tmp_path):
    import subprocess
    import sys

    model = nn.Sequential(PlainSubclass(3, 4), nn.ReLU(), nn.Linear(4, 2))
    hm = HyperModel.wrap(model, {"wd": WeightDecay()})
    path = tmp_path / "hm.pt"
    torch.save(hm, path)
    x = torch.randn(2, 3)
    hm.eval()
    expected = hm(x)
    torch.save({"x": x, "y": expected}, tmp_path / "io.pt")
    code = (
        "import sys, torch; sys.path[:0] = [%r, %r]\n"
        "hm = torch.load(%r, weights_only=False).eval(); io = torch.load(%r)\n"
        "assert torch.equal(hm(io['x']), io['y'])\n"
        "assert type(hm.unwrap()[0]).__name__ == 'PlainSubclass'\n"
        % (str(Path(__file__).parent), str(Path(__file__).parents[1]), str(path), str(tmp_path / "io.pt"))
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).parent))
