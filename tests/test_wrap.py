"""HyperModel.wrap / unwrap on hypothesis-generated models, and every refusal of the surgery."""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

import hypertune
from hypertune import (
    DeltaSTNOptimizer,
    DropoutRate,
    HParam,
    HyperModel,
    HyperTuneError,
    InputDropout,
    Perturbation,
    WeightDecay,
    WrapError,
)
from hypertune.layers import HyperDropout, HyperLayer
from hypertune.notices import WrapNotice

DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
CHANNEL_DROPOUTS = {1: nn.Dropout1d, 2: nn.Dropout2d, 3: nn.Dropout3d}


# ---- helpers ----------------------------------------------------------------------------------


def tree(model: nn.Module) -> list[tuple[str, type]]:
    return [(p, type(m)) for p, m in model.named_modules(remove_duplicate=False)]


def _frozen(v: torch.Tensor) -> Any:
    if isinstance(v, nn.parameter.UninitializedTensorMixin):
        return v  # nothing to copy; compared by identity
    return v.detach().clone()


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "tree": tree(model),
        "ids": [(p, id(m)) for p, m in model.named_modules(remove_duplicate=False)],
        "params": [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)],
        "state": {k: _frozen(v) for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
    }


def assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert after["tree"] == before["tree"]
    assert after["ids"] == before["ids"]
    assert after["params"] == before["params"]
    assert after["state"].keys() == before["state"].keys()
    for k, v in before["state"].items():
        if isinstance(v, nn.parameter.UninitializedTensorMixin):
            assert after["state"][k] is v, k
        else:
            assert torch.equal(after["state"][k], v), k
    assert after["training"] == before["training"]


def refused(model: nn.Module, hparams, *words: str, n_problems: int | None = None, **kwargs) -> WrapError:
    """wrap refuses with one WrapError naming every word, and leaves the model exactly as it was."""
    before = snapshot(model)
    with pytest.raises(WrapError) as info:
        HyperModel.wrap(model, hparams, **kwargs)
    err = info.value
    msg = str(err)
    for w in words:
        assert w in msg, f"{w!r} not in:\n{msg}"
    assert f"found {len(err.problems)} problem(s)" in msg
    for p in err.problems:
        assert p in msg
    if n_problems is not None:
        assert len(err.problems) == n_problems, err.problems
    assert_unchanged(model, before)
    return err


def hparams_for(model: nn.Module) -> dict[str, hypertune.HParam]:
    specs: dict[str, hypertune.HParam] = {"wd": WeightDecay()}
    if any(type(m) in DROPOUT_TYPES for m in model.modules()):
        specs["drop"] = DropoutRate(init=0.2)
    return specs


def no_hyper_left(module: nn.Module) -> None:
    for path, m in module.named_modules(remove_duplicate=False):
        assert not isinstance(m, (HyperLayer, HyperDropout)), (path, type(m))
        assert "Hyper" not in type(m).__name__, (path, type(m))
        for name, _ in m.named_parameters(recurse=False):
            assert not name.startswith("response_"), (path, name)
        assert "hyper_projection" not in dict(m.named_children()), path


def wrap_and_check(model: nn.Module, x: Any, hparams=None, shared: tuple[tuple[str, ...], ...] = ()) -> tuple[HyperModel, torch.Tensor, list]:
    """Wrap ``model`` and check the invariants that hold for every model at δλ = 0."""
    model.eval()
    with torch.no_grad():
        ref = model(x)  # before wrapping: wrap is in place
    named = dict(model.named_parameters())
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = tree(model)
    hparams = hparams if hparams is not None else hparams_for(model)

    wrapped = HyperModel.wrap(model, hparams)
    wrapped.eval()
    with torch.no_grad():
        out = wrapped(x)
    assert torch.equal(out, ref)

    inner = dict(wrapped.module.named_parameters())
    for name, p in named.items():
        assert inner[name] is p, name
    wstate = wrapped.module.state_dict()
    for k, v in state.items():
        assert k in wstate, k
        assert torch.equal(wstate[k], v), k
    for group in shared:
        objs = [wrapped.module.get_submodule(p) for p in group]
        assert all(o is objs[0] for o in objs), group
    # every Linear/Conv/Embedding of exact type became a hyper-layer; nothing else did
    after = dict(wrapped.module.named_modules(remove_duplicate=False))
    for path, t in types:
        m = after[path]
        if t in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding):
            assert isinstance(m, HyperLayer) and isinstance(m, t) and m.base_class is t, path
        elif t in DROPOUT_TYPES:
            assert isinstance(m, HyperDropout) and m.base_class is t, path
        else:
            assert type(m) is t, path
    # parameter roles partition the model's parameters
    base = {id(p) for p in wrapped.base_parameters()}
    resp = {id(p) for p in wrapped.response_parameters()}
    hyp = {id(p) for p in wrapped.hyper_parameters()}
    assert not (base & resp) and not (base & hyp) and not (resp & hyp)
    assert base | resp | hyp == {id(p) for p in wrapped.parameters()}
    assert {id(p) for p in named.values()} == base
    return wrapped, ref, types


def randomize_projections(wrapped: HyperModel, scale: float = 0.5) -> None:
    with torch.no_grad():
        for layer in wrapped.hyper_layers().values():
            layer.hyper_projection.weight.normal_(0.0, scale)


def point(wrapped: HyperModel, delta: torch.Tensor) -> Perturbation:
    lam = wrapped.hparams.unconstrained.detach().unsqueeze(0)
    return Perturbation(wrapped.hparams, (lam + delta).detach(), delta)


def check_per_example(wrapped: HyperModel, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """A batch with one δλ per row equals each example evaluated alone at its own δλ (eval mode)."""
    wrapped.eval()
    with torch.no_grad(), wrapped.evaluated_at(point(wrapped, delta)):
        out = wrapped(x)
    for i in range(x.shape[0]):
        with torch.no_grad(), wrapped.evaluated_at(point(wrapped, delta[i : i + 1])):
            single = wrapped(x[i : i + 1])
        torch.testing.assert_close(out[i : i + 1], single, rtol=1e-10, atol=1e-10)
    return out


def check_unwrap(wrapped: HyperModel, x: Any, types: list, named: dict[str, nn.Parameter]) -> nn.Module:
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped(x)
    values = wrapped.hparam_values()
    drop_rates = {
        path: values[m.hparam]
        for path, m in wrapped.module.named_modules(remove_duplicate=False)
        if isinstance(m, HyperDropout)
    }
    plain = wrapped.unwrap()
    no_hyper_left(plain)
    assert tree(plain) == types  # exactly the original torch classes at every path
    params = dict(plain.named_parameters())
    assert set(params) == set(named)
    for name, p in named.items():
        assert params[name] is p, name
    for path, rate in drop_rates.items():
        m = plain.get_submodule(path)
        assert m.p == rate
    plain.eval()
    with torch.no_grad():
        out = plain(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(HyperTuneError, match="unwrapped"):
        wrapped(x)
    return plain


# ---- model strategies --------------------------------------------------------------------------


@st.composite
def mlps(draw):
    depth = draw(st.integers(1, 4))
    widths = draw(st.lists(st.integers(1, 10), min_size=depth + 1, max_size=depth + 1))
    biases = draw(st.lists(st.booleans(), min_size=depth, max_size=depth))
    act = draw(st.sampled_from([nn.ReLU, nn.Tanh, nn.GELU, nn.Identity]))
    dropout = draw(st.booleans())
    bare = depth == 1 and draw(st.booleans())
    batch = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=biases[i]))
        if i < depth - 1:
            layers.append(act())
            if dropout:
                layers.append(nn.Dropout(0.3))
    model = layers[0] if bare else nn.Sequential(*layers)
    return model.double(), torch.randn(batch, widths[0], dtype=torch.float64)


@st.composite
def cnns(draw):
    dim = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 2))
    cout = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    use_same = draw(st.booleans())
    stride = (1,) * dim if use_same else tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding: Any = "same" if use_same else tuple(draw(st.integers(0, 2)) for _ in range(dim))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    batchnorm = draw(st.booleans())
    dropout = draw(st.booleans())
    size = tuple(draw(st.integers(5, 7 if dim < 3 else 5)) for _ in range(dim))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    conv = CONVS[dim](
        cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
        bias=bias, padding_mode=padding_mode,
    )
    layers: list[nn.Module] = [conv]
    if batchnorm:
        bn = BATCHNORMS[dim](cout)
        with torch.no_grad():
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
        layers.append(bn)
    layers.append(nn.ReLU())
    if dropout:
        layers.append(CHANNEL_DROPOUTS[dim](0.2))
    x = torch.randn(batch, cin, *size, dtype=torch.float64)
    with torch.no_grad():
        feat = nn.Sequential(*layers).double().eval()(x)
    layers += [nn.Flatten(), nn.Linear(feat[0].numel(), 3)]
    return nn.Sequential(*layers).double(), x


class Residual(nn.Module):
    def __init__(self, d: int, bias: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d, bias=bias)
        self.bn = nn.BatchNorm1d(d)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(d, d, bias=bias)

    def forward(self, x):
        return x + self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


@st.composite
def resnets(draw):
    d = draw(st.integers(1, 8))
    blocks = draw(st.integers(1, 3))
    bias = draw(st.booleans())
    batch = draw(st.integers(2, 5))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = nn.Sequential(*[Residual(d, bias) for _ in range(blocks)], nn.Linear(d, 2))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.double(), torch.randn(batch, d, dtype=torch.float64)


class SharedNet(nn.Module):
    """One Linear reachable at three paths, one Dropout at two."""

    def __init__(self, d: int, out: int) -> None:
        super().__init__()
        self.a = nn.Linear(d, d)
        self.drop = nn.Dropout(0.1)
        self.enc = nn.Sequential(self.a, nn.Tanh(), self.drop)
        self.b = self.a
        self.head = nn.Linear(d, out)

    def forward(self, x):
        return self.head(self.drop(self.b(self.enc(x))))


SHARED_PATHS = (("a", "b", "enc.0"), ("drop", "enc.2"))


class EmbedNet(nn.Module):
    def __init__(self, vocab: int, d: int, padding_idx: int | None, out: int) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(d, out)

    def forward(self, tokens):
        return self.fc(self.drop(self.emb(tokens)).mean(1))


@st.composite
def embed_nets(draw):
    vocab = draw(st.integers(2, 12))
    d = draw(st.integers(1, 6))
    padding_idx = draw(st.one_of(st.none(), st.integers(0, vocab - 1)))
    out = draw(st.integers(1, 4))
    batch, length = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = EmbedNet(vocab, d, padding_idx, out).double()
    return model, torch.randint(0, vocab, (batch, length))


any_model = st.one_of(mlps(), cnns(), resnets(), embed_nets())


# ---- wrap invariants -----------------------------------------------------------------------------


@given(any_model)
def test_wrap_is_exact_at_zero_and_keeps_parameters(model_x):
    model, x = model_x
    wrap_and_check(model, x)


@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4))
def test_shared_modules_stay_shared(d, out, batch):
    torch.manual_seed(d * 100 + out)
    model = SharedNet(d, out).double()
    x = torch.randn(batch, d, dtype=torch.float64)
    named = dict(model.named_parameters())
    wrapped, ref, types = wrap_and_check(model, x, shared=SHARED_PATHS)
    assert list(wrapped.hyper_layers()) == ["a", "head"]  # one hyper-layer per shared object
    # state_dict still has the shared weight under every path
    keys = set(wrapped.module.state_dict())
    assert {"a.weight", "b.weight", "enc.0.weight", "head.weight"} <= keys
    randomize_projections(wrapped)
    check_per_example(wrapped, x, torch.randn(batch, len(wrapped.hparams), dtype=torch.float64))
    plain = check_unwrap(wrapped, x, types, named)
    assert plain.a is plain.b is plain.enc[0]
    assert plain.drop is plain.enc[2]
    assert type(plain.drop) is nn.Dropout


@given(any_model, st.data())
def test_per_example_perturbation_matches_single_examples(model_x, data):
    model, x = model_x
    wrapped, ref, _ = wrap_and_check(model, x)
    randomize_projections(wrapped)
    h = len(wrapped.hparams)
    seed = data.draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(x.shape[0], h, generator=g, dtype=torch.float64)
    check_per_example(wrapped, x, delta)
    # δλ = 0 as explicit rows is still w₀'s output
    with torch.no_grad(), wrapped.evaluated_at(point(wrapped, torch.zeros(x.shape[0], h, dtype=torch.float64))):
        zero = wrapped(x)
    torch.testing.assert_close(zero, ref, rtol=0, atol=0)


@given(any_model)
def test_unwrap_restores_plain_modules(model_x):
    model, x = model_x
    named = dict(model.named_parameters())
    wrapped, ref, types = wrap_and_check(model, x)
    plain = check_unwrap(wrapped, x, types, named)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), ref, rtol=0, atol=0)


@given(st.integers(1, 6), st.integers(1, 6), st.booleans(), st.integers(1, 5), st.integers(0, 1000))
def test_linear_response_is_the_documented_formula(fin, fout, bias, batch, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(fin, fout, bias=bias).double()
    w0 = lin.weight.detach().clone()
    b0 = lin.bias.detach().clone() if bias else None
    x = torch.randn(batch, fin, dtype=torch.float64)
    wrapped = HyperModel.wrap(nn.Sequential(lin), {"a": HParam(init=0.0), "wd": WeightDecay()})
    layer = wrapped.module[0]
    randomize_projections(wrapped)
    delta = torch.randn(batch, 2, dtype=torch.float64)
    with torch.no_grad(), wrapped.evaluated_at(point(wrapped, delta)):
        out = wrapped(x)
        base = F.linear(x, w0, b0)
        assert not torch.allclose(out, base)
        s = delta @ layer.hyper_projection.weight.T
        assert s.shape == (batch, fout * (2 if bias else 1))
        s_w = s[:, :fout]
        expect = base + s_w * (x @ layer.response_weight.T)
        if bias:
            expect = expect + s[:, fout:] * layer.response_bias
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


@given(st.integers(1, 3), st.integers(1, 4), st.booleans(), st.integers(1, 3), st.integers(0, 1000))
def test_conv_response_is_the_documented_formula(cin, cout, bias, batch, seed):
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, (2, 3), stride=(1, 2), padding=1, bias=bias).double()
    w0 = conv.weight.detach().clone()
    b0 = conv.bias.detach().clone() if bias else None
    x = torch.randn(batch, cin, 5, 6, dtype=torch.float64)
    wrapped = HyperModel.wrap(conv, {"a": HParam(init=0.0)})
    layer = wrapped.module
    assert isinstance(layer, HyperLayer)  # the root itself was swapped
    randomize_projections(wrapped)
    delta = torch.randn(batch, 1, dtype=torch.float64)
    with torch.no_grad(), wrapped.evaluated_at(point(wrapped, delta)):
        out = wrapped(x)
        s = delta @ layer.hyper_projection.weight.T
        # W(δλ) = W₀ + diag(s_w) W_resp, b(δλ) = b₀ + s_b ⊙ b_resp, per example
        expect = torch.cat(
            [
                F.conv2d(
                    x[i : i + 1],
                    w0 + s[i, :cout].reshape(-1, 1, 1, 1) * layer.response_weight,
                    None if not bias else b0 + s[i, cout:] * layer.response_bias,
                    stride=(1, 2),
                    padding=1,
                )
                for i in range(batch)
            ]
        )
    torch.testing.assert_close(out, expect, rtol=1e-10, atol=1e-10)


@st.composite
def single_layers(draw):
    """One Linear / Conv1d-3d / Embedding with a random configuration and a batch for it."""
    kind = draw(st.sampled_from(["linear", "conv", "embedding"]))
    batch = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**16))
    if kind == "linear":
        fin, fout = draw(st.integers(1, 6)), draw(st.integers(1, 6))
        extra = draw(st.lists(st.integers(1, 3), max_size=2))  # (B, *extra, F) inputs
        bias = draw(st.booleans())
        torch.manual_seed(seed)
        return nn.Linear(fin, fout, bias=bias).double(), torch.randn(batch, *extra, fin, dtype=torch.float64)
    if kind == "embedding":
        vocab, d = draw(st.integers(2, 8)), draw(st.integers(1, 5))
        padding_idx = draw(st.one_of(st.none(), st.integers(0, vocab - 1)))
        length = draw(st.lists(st.integers(1, 4), max_size=1))
        torch.manual_seed(seed)
        return nn.Embedding(vocab, d, padding_idx=padding_idx).double(), torch.randint(0, vocab, (batch, *length))
    dim = draw(st.sampled_from([1, 2, 3]))
    groups = draw(st.sampled_from([1, 2]))
    cin, cout = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3)) for _ in range(dim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(dim))
    use_same = draw(st.booleans())
    stride = (1,) * dim if use_same else tuple(draw(st.integers(1, 2)) for _ in range(dim))
    padding: Any = "same" if use_same else tuple(draw(st.integers(0, 2)) for _ in range(dim))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    bias = draw(st.booleans())
    size = tuple(draw(st.integers(5, 6)) for _ in range(dim))
    torch.manual_seed(seed)
    conv = CONVS[dim](
        cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
        bias=bias, padding_mode=padding_mode,
    ).double()
    return conv, torch.randn(batch, cin, *size, dtype=torch.float64)


@given(single_layers(), st.integers(1, 3), st.integers(0, 2**16))
def test_layer_at_delta_is_the_plain_layer_with_modulated_weights(layer_x, h, seed):
    """Per example i: W(δλ_i) = W₀ + diag(s_w) W_resp (columns for Embedding), b = b₀ + s_b ⊙ b_resp."""
    layer, x = layer_x
    reference = copy.deepcopy(layer)
    hparams = {f"h{j}": HParam(init=0.0) for j in range(h)}
    wrapped = HyperModel.wrap(layer, hparams)
    hl = wrapped.module
    assert isinstance(hl, HyperLayer)
    randomize_projections(wrapped)
    g = torch.Generator().manual_seed(seed)
    delta = torch.randn(x.shape[0], h, generator=g, dtype=torch.float64)
    wrapped.eval()
    with torch.no_grad(), wrapped.evaluated_at(point(wrapped, delta)):
        out = wrapped(x)
    with torch.no_grad():
        s = delta @ hl.hyper_projection.weight.T
        n = hl.weight.shape[hl.modulated_dim]
        for i in range(x.shape[0]):
            shape = [1] * hl.weight.dim()
            shape[hl.modulated_dim] = n
            reference.weight.copy_(hl.weight + s[i, :n].reshape(shape) * hl.response_weight)
            if getattr(reference, "bias", None) is not None:
                reference.bias.copy_(hl.bias + s[i, n:] * hl.response_bias)
            torch.testing.assert_close(out[i : i + 1], reference(x[i : i + 1]), rtol=1e-10, atol=1e-10)


def test_forward_hooks_survive_wrap_and_unwrap():
    calls: list[str] = []
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1), nn.Linear(3, 1))
    model[0].register_forward_hook(lambda m, i, o: calls.append("post"))
    model[0].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    wrapped = HyperModel.wrap(model, {"d": DropoutRate()})
    wrapped(torch.randn(2, 3))
    assert calls == ["pre", "post"]
    plain = wrapped.unwrap()
    plain(torch.randn(2, 3))
    assert calls == ["pre", "post", "pre", "post"]


def test_embedding_padding_row_does_not_respond():
    torch.manual_seed(0)
    model = EmbedNet(6, 4, padding_idx=2, out=3).double()
    wrapped = HyperModel.wrap(model, {"d": DropoutRate()})
    randomize_projections(wrapped)
    emb = wrapped.module.emb
    tokens = torch.tensor([[2, 2, 2], [2, 0, 1]])
    delta = torch.randn(2, 1, dtype=torch.float64)
    with torch.no_grad(), hypertune.context.active(point(wrapped, delta)):
        out = emb(tokens)
    assert torch.equal(out[0], emb.weight[2].expand(3, -1))
    assert not torch.allclose(out[1, 1:], emb.weight[[0, 1]])


# ---- plain STN: unwrap bakes Θ at λ₀ -----------------------------------------------------------


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.conv = nn.Conv1d(4, 6, 3, padding=1, groups=2)
        self.drop = nn.Dropout1d(0.2)
        self.fc = nn.Linear(6, 3)
        self.fc_nobias = nn.Linear(3, 2, bias=False)

    def forward(self, tokens):
        h = self.emb(tokens).transpose(1, 2)  # (B, 4, T)
        h = self.drop(torch.relu(self.conv(h))).mean(-1)
        return self.fc_nobias(torch.tanh(self.fc(h)))


@pytest.mark.parametrize("centered", [True, False])
def test_unwrap_bakes_response_in_stn_mode(centered):
    torch.manual_seed(0)
    model = Mixed().double()
    tokens = torch.randint(0, 7, (5, 4))
    named = dict(model.named_parameters())
    types = tree(model)
    wrapped = HyperModel.wrap(model, {"d": DropoutRate(init=0.3), "a": HParam(init=0.7), "wd": WeightDecay()})
    wrapped.centered = centered
    randomize_projections(wrapped)
    with torch.no_grad():
        # move λ away from anything special so the STN response is non-trivial
        wrapped.hparams.unconstrained.add_(torch.tensor([0.3, -0.2, 0.5], dtype=torch.float64))
    wrapped.eval()
    with torch.no_grad():
        expected = wrapped(tokens)
        base_weights = {n: p.detach().clone() for n, p in named.items()}
    values = wrapped.hparam_values()
    plain = wrapped.unwrap()
    no_hyper_left(plain)
    assert tree(plain) == types
    for n, p in named.items():
        assert dict(plain.named_parameters())[n] is p
    assert plain.drop.p == values["d"]
    plain.eval()
    with torch.no_grad():
        out = plain(tokens)
    if centered:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        for n, p in named.items():
            assert torch.equal(p, base_weights[n])
    else:
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        assert not torch.equal(plain.fc.weight, base_weights["fc.weight"])  # Θ was folded in
        assert torch.equal(plain.emb.weight[0], base_weights["emb.weight"][0])  # padding row fixed


def test_stn_mode_fresh_wrap_is_still_exact():
    torch.manual_seed(1)
    model = Mixed().double().eval()
    tokens = torch.randint(0, 7, (3, 5))
    with torch.no_grad():
        ref = model(tokens)
    wrapped = HyperModel.wrap(model, {"d": DropoutRate()})
    wrapped.centered = False
    with torch.no_grad():
        torch.testing.assert_close(wrapped(tokens), ref, rtol=0, atol=0)


@pytest.mark.parametrize("drop_cls", [nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d])
@pytest.mark.parametrize("training", [True, False])
def test_unwrap_dropout_keeps_class_rate_and_mode(drop_cls, training):
    model = nn.Sequential(nn.Linear(3, 3), drop_cls(0.5), nn.Linear(3, 1))
    model.train(training)
    wrapped = HyperModel.wrap(model, {"d": DropoutRate(init=0.37)})
    assert wrapped.module[1].training == training
    rate = wrapped.hparam_values()["d"]
    assert rate == pytest.approx(0.37, abs=1e-6)
    plain = wrapped.unwrap()
    assert type(plain[1]) is drop_cls
    assert plain[1].p == rate
    assert plain[1].training == training


@pytest.mark.parametrize("drop_cls", [nn.Dropout, nn.Dropout2d])
def test_unwrap_dropout_keeps_inplace_flag(drop_cls):
    model = nn.Sequential(nn.Linear(3, 3), drop_cls(0.5, inplace=True), nn.Linear(3, 1))
    plain = HyperModel.wrap(model, {"d": DropoutRate()}).unwrap()
    assert type(plain[1]) is drop_cls
    assert plain[1].inplace is True


def test_per_site_dropout_names_and_unwrap():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(), nn.Linear(3, 3), nn.Dropout2d(), nn.Linear(3, 1))
    wrapped = HyperModel.wrap(model, {"d": DropoutRate(per_site=True)})
    assert wrapped.hparams.names == ["d:1", "d:3"]
    with torch.no_grad():
        wrapped.hparams.unconstrained.copy_(torch.tensor([-1.0, 1.0]))
    values = wrapped.hparam_values()
    plain = wrapped.unwrap()
    assert type(plain[1]) is nn.Dropout and plain[1].p == values["d:1"]
    assert type(plain[3]) is nn.Dropout2d and plain[3].p == values["d:3"]
    assert plain[1].p != plain[3].p


def test_input_dropout_becomes_forward_pre_hook():
    torch.manual_seed(0)
    lin = nn.Linear(50, 50, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(50))
    wrapped = HyperModel.wrap(nn.Sequential(lin), {"inp": InputDropout(init=0.4)})
    rate = wrapped.hparam_values()["inp"]
    x = torch.ones(40, 50)
    wrapped.train()
    out = wrapped(x)
    kept = out[out != 0]
    assert 0 < kept.numel() < out.numel()
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - rate)))
    plain = wrapped.unwrap()
    hooks = list(plain._forward_pre_hooks.values())
    assert len(hooks) == 1 and getattr(hooks[0], "rate", None) == rate
    plain.train()
    out = plain(x)
    zeros = (out == 0).float().mean().item()
    assert abs(zeros - rate) < 4 * math.sqrt(rate * (1 - rate) / x.numel())
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - rate)))
    plain.eval()
    assert torch.equal(plain(x), x)


def test_wrap_keeps_the_models_training_flag():
    # wrap is in place and keeps every module's flag; the HyperModel should agree with them, or
    # InputDropout (which HyperModel.forward gates on its own flag) runs on an eval-mode model
    model = mlp_with_dropout().eval()
    wrapped = HyperModel.wrap(model, {"inp": InputDropout(init=0.5)})
    assert wrapped.training is False
    x = torch.ones(4, 4)
    with torch.no_grad():
        assert torch.equal(wrapped(x), wrapped.module(x))


def test_input_dropout_only_in_training():
    lin = nn.Linear(4, 4)
    wrapped = HyperModel.wrap(nn.Sequential(lin), {"inp": InputDropout(init=0.9, high=0.95)})
    x = torch.randn(8, 4)
    wrapped.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), lin(x))


# ---- selection by targets / exclude ----------------------------------------------------------------


class Named(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 8))
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        self.emb = nn.Embedding(5, 8)
        self.head = nn.Linear(16, 2)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        h = self.drop(torch.relu(self.enc(x)))  # (B, 8)
        c = self.conv(h.unsqueeze(1)).mean(1)  # (B, 8)
        return self.head(torch.cat([h, c + self.emb.weight[0]], -1))


@pytest.mark.parametrize(
    "kwargs, expected",
    [
        ({}, {"enc.0", "enc.1", "conv", "emb", "head"}),
        (dict(targets=["enc.*"]), {"enc.0", "enc.1"}),
        (dict(targets=["enc.0", "head"]), {"enc.0", "head"}),
        (dict(targets=[nn.Conv1d]), {"conv"}),
        (dict(targets=[nn.Embedding, "head"]), {"emb", "head"}),
        (dict(targets=["*"]), {"enc.0", "enc.1", "conv", "emb", "head"}),
        (dict(exclude=["head"]), {"enc.0", "enc.1", "conv", "emb"}),
        (dict(exclude=["enc*"]), {"conv", "emb", "head"}),
        (dict(exclude=[nn.Linear]), {"conv", "emb"}),
        (dict(exclude=[nn.Linear, nn.Embedding]), {"conv"}),
        (dict(targets=["enc.*"], exclude=["enc.1"]), {"enc.0"}),
        (dict(targets=[nn.Linear], exclude=["enc.0"]), {"enc.1", "head"}),
    ],
)
def test_targets_and_exclude_select_exactly(kwargs, expected):
    torch.manual_seed(0)
    model = Named()
    x = torch.randn(3, 4)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    types = dict(tree(model))
    wrapped = HyperModel.wrap(model, {"d": DropoutRate()}, **kwargs)
    assert set(wrapped.hyper_layers()) == expected
    for path, t in types.items():
        m = wrapped.module.get_submodule(path)
        if path in expected:
            assert isinstance(m, HyperLayer) and m.base_class is t
        elif path != "drop":
            assert type(m) is t, path
    wrapped.eval()
    with torch.no_grad():
        assert torch.equal(wrapped(x), ref)


def test_weight_decay_targets_select_modules():
    model = Named()
    wrapped = HyperModel.wrap(
        model, {"wd_head": WeightDecay(targets=["head"]), "wd_all": WeightDecay()}, targets=["enc.*", "head"]
    )
    pen = {p.hparam: p for p in wrapped._penalties}
    assert [l.hyper_path for l in pen["wd_head"].layers] == ["head"]
    assert {l.hyper_path for l in pen["wd_all"].layers} == {"enc.0", "enc.1", "head"}
    # penalty at δλ=0 is c/2 * ||w||^2 of the targeted weights
    p = wrapped.current_point()
    c = wrapped.hparam_values()["wd_head"]
    expect = 0.5 * c * model.head.weight.pow(2).sum()
    torch.testing.assert_close(pen["wd_head"](p), expect.reshape(1))


def test_weight_decay_can_target_unwrapped_modules():
    model = Named()
    wrapped = HyperModel.wrap(model, {"wd": WeightDecay(targets=["conv"], include_bias=True)}, targets=["enc.*"])
    (pen,) = wrapped._penalties
    assert pen.layers == []
    assert pen.plain == [model.conv.weight, model.conv.bias]


class WithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(8, 2)
        self.fc = nn.Linear(8, 3)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.fc(self.drop(self.att(x, x, x, need_weights=False)[0]))


def test_multihead_attention_is_skipped_by_default():
    torch.manual_seed(0)
    model = WithAttention().eval()
    x = torch.randn(5, 2, 8)
    with torch.no_grad():
        ref = model(x)
    out_proj = model.att.out_proj
    wrapped = HyperModel.wrap(model, {"d": DropoutRate()})
    assert list(wrapped.hyper_layers()) == ["fc"]
    assert wrapped.module.att.out_proj is out_proj
    assert not any(isinstance(m, HyperLayer) for m in wrapped.module.att.modules())
    with torch.no_grad():
        assert torch.equal(wrapped(x), ref)
    # attention weights still train as w₀
    base = {id(p) for p in wrapped.base_parameters()}
    assert all(id(p) in base for p in model.att.parameters())


def test_multihead_attention_dropout_is_named_as_fixed():
    """nn.MultiheadAttention passes its dropout as a float to F.multi_head_attention_forward, so
    no spec can tune it: wrap says so instead of letting a user believe it is tuned."""
    model = WithAttention()
    model.att.dropout = 0.1
    with pytest.warns(hypertune.WrapNotice, match=r"attention dropout fixed in att \(p=0\.1\)"):
        HyperModel.wrap(model, {"d": DropoutRate()})
    assert model.att.dropout == 0.1
    quiet = WithAttention()  # dropout=0: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error", hypertune.WrapNotice)
        warnings.filterwarnings("ignore", "hypertune: .*weights are tuned", hypertune.WrapNotice)
        HyperModel.wrap(quiet, {"d": DropoutRate()})
    alone = nn.MultiheadAttention(8, 2, dropout=0.2)
    with pytest.raises(hypertune.WrapError, match=r"dropout=0\.2 is a float argument"):
        HyperModel.wrap(_Holder(alone), {"d": DropoutRate()})


class _Holder(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.fc = inner, nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.inner(x, x, x)[0])


def test_batchnorm_params_are_base_parameters_and_train():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Dropout(0.2), nn.Linear(6, 1))
    bn = model[1]
    wrapped = HyperModel.wrap(model, {"d": DropoutRate(), "wd": WeightDecay()})
    base = {id(p) for p in wrapped.base_parameters()}
    assert id(bn.weight) in base and id(bn.bias) in base
    assert wrapped.module[1] is bn
    opt = DeltaSTNOptimizer(wrapped, torch.optim.SGD(wrapped.parameters(), lr=0.1))
    w, b, mean = bn.weight.detach().clone(), bn.bias.detach().clone(), bn.running_mean.clone()
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    opt.train_step(x, y, F.mse_loss)
    assert not torch.equal(bn.weight, w)
    assert not torch.equal(bn.bias, b)
    assert not torch.equal(bn.running_mean, mean)
    assert bn.num_batches_tracked.item() == 1  # only the w₀ pass updates running statistics


# ---- refusals ---------------------------------------------------------------------------------------


def mlp_with_dropout() -> nn.Sequential:
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Dropout(0.1), nn.Linear(4, 2))


def test_refuse_targets_matching_nothing():
    refused(
        mlp_with_dropout(), {"d": DropoutRate()}, "'nope*'", "matches no module", n_problems=1,
        targets=["0", "nope*"],
    )
    refused(mlp_with_dropout(), {"d": DropoutRate()}, "Conv2d", "matches no module", targets=[nn.Conv2d])


def test_refuse_dropout_rate_without_dropout_modules():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    refused(model, {"d": DropoutRate()}, "hparams['d']", "matches no dropout module", "none", n_problems=1)


def test_refuse_dropout_rate_targets_matching_no_dropout():
    refused(
        mlp_with_dropout(), {"d": DropoutRate(targets=["nope"])}, "hparams['d']", "matches no dropout module",
        "['2']",
    )


def test_refuse_dropout_rate_targeting_non_dropout_leaf():
    refused(
        mlp_with_dropout(), {"d": DropoutRate(targets=["0", "2"])}, "hparams['d']", "'0' (Linear)",
        "not a dropout module", n_problems=1,
    )
    refused(mlp_with_dropout(), {"d": DropoutRate(targets=[nn.ReLU])}, "'1' (ReLU)", "not a dropout module")


def test_refuse_two_default_dropout_rates():
    refused(mlp_with_dropout(), {"a": DropoutRate(), "b": DropoutRate()}, "['a', 'b']", "both claim", n_problems=1)


def test_refuse_dropout_claimed_twice():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 4), nn.Dropout(0.2), nn.Linear(4, 1))
    refused(
        model, {"a": DropoutRate(targets=["1", "3"]), "b": DropoutRate(targets=[nn.Dropout])},
        "'1' (Dropout)", "'3' (Dropout)", "hparams['a']", "hparams['b']", "claimed by both", n_problems=2,
    )


def test_default_dropout_rate_takes_only_unclaimed():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1), nn.Linear(4, 4), nn.Dropout(0.2), nn.Linear(4, 1))
    wrapped = HyperModel.wrap(model, {"rest": DropoutRate(), "first": DropoutRate(targets=["1"])})
    assert wrapped.module[1].hparam == "first"
    assert wrapped.module[3].hparam == "rest"


def test_refuse_weight_decay_targets_matching_nothing():
    refused(
        mlp_with_dropout(), {"wd": WeightDecay(targets=["nope", nn.Conv3d])}, "hparams['wd']", "(WeightDecay)",
        "'nope'", "match no module", n_problems=1,
    )


def test_refuse_uninitialized_lazy_linear():
    # an uninitialized LazyLinear is a Linear-to-be: wrapping now would silently leave it untuned
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    refused(model, {"wd": WeightDecay()}, "'0'", "lazy", "forward")


def test_refuse_uninitialized_lazy_linear_when_targeted():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    refused(model, {"wd": WeightDecay()}, "'0'", "lazy", targets=["0", "2"])


def test_initialized_lazy_linear_is_wrapped():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 5)
    model(x)  # materializes: LazyLinear becomes nn.Linear
    assert type(model[0]) is nn.Linear
    wrapped, _, _ = wrap_and_check(model, x, {"wd": WeightDecay()})
    assert set(wrapped.hyper_layers()) == {"0", "2"}


@pytest.mark.parametrize("parametrization", [parametrizations.orthogonal, parametrizations.spectral_norm])
def test_refuse_parametrized_linear(parametrization):
    model = nn.Sequential(parametrization(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2))
    refused(model, {"wd": WeightDecay()}, "'0'", "parametrization")


@pytest.mark.parametrize("parametrization", [parametrizations.orthogonal, parametrizations.spectral_norm])
def test_refuse_parametrized_linear_when_targeted(parametrization):
    model = nn.Sequential(parametrization(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2))
    refused(model, {"wd": WeightDecay()}, "'0'", "parametrization", targets=["0", "2"])


def test_parametrized_linear_can_be_excluded():
    model = nn.Sequential(parametrizations.orthogonal(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 2))
    wrapped = HyperModel.wrap(model, {"wd": WeightDecay()}, exclude=["0"])
    assert list(wrapped.hyper_layers()) == ["2"]


def test_refuse_embedding_max_norm():
    model = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Flatten(), nn.Linear(6, 2))
    refused(model, {"wd": WeightDecay()}, "'0' (Embedding)", "max_norm", n_problems=1)
    # excluding it is the documented remedy
    wrapped = HyperModel.wrap(model, {"wd": WeightDecay()}, exclude=["0"])
    assert list(wrapped.hyper_layers()) == ["2"]


@pytest.mark.parametrize("alpha", [nn.AlphaDropout, nn.FeatureAlphaDropout])
def test_refuse_alpha_dropout_targeted(alpha):
    model = nn.Sequential(nn.Linear(4, 4), alpha(0.1), nn.Linear(4, 2))
    refused(model, {"d": DropoutRate(targets=[alpha])}, "hparams['d']", f"'1' ({alpha.__name__})", "alpha dropout")
    refused(model, {"d": DropoutRate(targets=["1"])}, "alpha dropout")


def test_alpha_dropout_is_not_claimed_by_default():
    model = nn.Sequential(nn.Linear(4, 4), nn.AlphaDropout(0.1), nn.Linear(4, 2))
    refused(model, {"d": DropoutRate()}, "matches no dropout module")


def test_refuse_wrapping_twice():
    model = mlp_with_dropout()
    wrapped = HyperModel.wrap(model, {"d": DropoutRate()})
    err = refused(wrapped.module, {"d": DropoutRate()}, "already a hyper-module", "'0' (HyperLinear)")
    assert any("'2' (HyperDropout)" in p for p in err.problems)
    assert any("'3' (HyperLinear)" in p for p in err.problems)
    before = snapshot(wrapped)
    with pytest.raises(HyperTuneError, match="already a HyperModel"):
        HyperModel.wrap(wrapped, {"d": DropoutRate()})
    assert_unchanged(wrapped, before)


def test_refuse_data_parallel():
    model = mlp_with_dropout()
    dp = nn.DataParallel(model)
    refused(dp, {"d": DropoutRate()}, "DataParallel", "HyperModel.wrap on the plain module")
    assert type(model[0]) is nn.Linear


def test_refuse_model_without_layers():
    model = nn.Sequential(nn.ReLU(), nn.Dropout(0.1), nn.BatchNorm1d(3))
    refused(model, {"d": DropoutRate()}, "no module can become a hyper-layer", n_problems=1)


def test_refuse_everything_excluded():
    refused(mlp_with_dropout(), {"d": DropoutRate()}, "no module can become a hyper-layer", exclude=["*"])


def test_refuse_targeted_non_layer_leaf():
    refused(mlp_with_dropout(), {"d": DropoutRate()}, "'1' (ReLU)", "selected by targets", targets=["0", "1"])


def test_several_problems_listed_at_once():
    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3, max_norm=1.0)
            self.fc = nn.Linear(3, 3)
            self.act = nn.ReLU()
            self.d1 = nn.Dropout(0.1)
            self.alpha = nn.AlphaDropout(0.1)

    model = Bad()
    err = refused(
        model,
        {
            "a": DropoutRate(),
            "b": DropoutRate(),
            "c": DropoutRate(targets=["act", "alpha"]),
            "wd": WeightDecay(targets=["missing"]),
        },
        "'emb' (Embedding)", "max_norm",
        "'missing_too'", "matches no module",
        "both claim",
        "'act' (ReLU)", "not a dropout module",
        "alpha dropout",
        "hparams['wd']", "'missing'",
        targets=["emb", "fc", "missing_too"],
    )
    assert len(err.problems) >= 7, err.problems
    assert "found" in str(err) and "the model was not changed" in str(err)


def test_all_errors_share_the_base_class():
    assert issubclass(WrapError, HyperTuneError)
    assert issubclass(hypertune.SpecError, HyperTuneError)
    assert issubclass(hypertune.PerturbationError, HyperTuneError)


class _ScanMixer(nn.Module):
    """The layout of a Mamba mixer (transformers, mamba_ssm): in_proj is called, conv1d / x_proj /
    dt_proj / out_proj are handed to a scan kernel by weight, here a plain-torch stand-in."""

    def __init__(self, d: int = 8, inner: int = 16, rank: int = 4) -> None:
        super().__init__()
        self.in_proj = nn.Linear(d, inner)
        self.conv1d = nn.Conv1d(inner, inner, 3, groups=inner, padding=2)
        self.x_proj = nn.Linear(inner, rank, bias=False)
        self.dt_proj = nn.Linear(rank, inner)
        self.out_proj = nn.Linear(inner, d)

    def forward(self, x):
        h = self.in_proj(x).transpose(1, 2)
        h = F.conv1d(h, self.conv1d.weight, self.conv1d.bias, padding=2, groups=h.shape[1])[..., : x.shape[1]]
        h = h.transpose(1, 2)
        dt = F.softplus(F.linear(F.linear(h, self.x_proj.weight), self.dt_proj.weight, self.dt_proj.bias))
        return F.linear(h * torch.sigmoid(dt), self.out_proj.weight, self.out_proj.bias)


@pytest.mark.parametrize("name", ["MyMambaMixer", "SSMMixer"])
def test_state_space_mixers_keep_the_weights_their_kernel_reads_as_w0(name):
    mixer_cls = type(name, (_ScanMixer,), {})
    torch.manual_seed(0)
    net = nn.Sequential(mixer_cls(), nn.Linear(8, 3))
    x = torch.randn(4, 5, 8)
    with pytest.warns(WrapNotice, match="used functionally by '0'"):
        model = HyperModel.wrap(net, {"wd": WeightDecay(init=1e-3)})
    tuned = set(model.hyper_layers())
    assert tuned == {"0.in_proj", "1"}
    untuned = model.coverage().untuned
    assert all("used functionally by '0'" in untuned[f"0.{c}"] for c in ("conv1d", "x_proj", "dt_proj", "out_proj"))
    opt = DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01))
    target = torch.randint(0, 3, (4,))
    loss_fn = lambda out, y: F.cross_entropy(out.mean(1), y)  # noqa: E731
    assert math.isfinite(opt.train_step(x, target, loss_fn).loss)
    assert opt.val_step(x, target, loss_fn).updated


@pytest.mark.parametrize(
    "hooked, message",
    [
        (lambda m: torch.nn.utils.weight_norm(m), "deprecated torch.nn.utils.weight_norm.*parametrizations.weight_norm"),
        (lambda m: torch.nn.utils.spectral_norm(m), r"torch.nn.utils.spectral_norm\), a constraint"),
    ],
)
def test_a_weight_computed_by_a_legacy_hook_is_refused_with_its_cause(hooked, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation notice
        net = nn.Sequential(hooked(nn.Linear(3, 3)), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(hypertune.WrapError, match=message):
        hypertune.HyperModel.wrap(net, {"wd": hypertune.WeightDecay()}, targets=["0"])


def test_stn_mode_says_at_construction_when_unwrap_will_not_be_able_to_fold():
    pytest.importorskip("timm")
    from timm.layers import StdConv2d

    net = nn.Sequential(StdConv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    hm = hypertune.HyperModel.wrap(net, {"wd": hypertune.WeightDecay()})
    with pytest.warns(hypertune.WrapNotice, match="mode='stn' folds Θ.*standardizes its weight"):
        hypertune.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1), mode="stn")
