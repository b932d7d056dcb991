"""HyperLSTM: nn.LSTM at δλ = 0, tangent = directional derivative, regularizer masks, undoing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hypertune as ht
from hypertune import context
from hypertune.context import Perturbation
from hypertune.errors import HyperTuneError, PerturbationError
from hypertune.hyperparameters import HyperParameters
from hypertune.layers import lstm as lstm_mod
from hypertune.layers.lstm import HyperLSTM

F64 = torch.float64


def _space(**specs: ht.HParam) -> HyperParameters:
    specs = specs or {"a": ht.HParam(init=0.0), "b": ht.HParam(init=0.0)}
    return HyperParameters(specs, dtype=F64)


def _randomize(layer: HyperLSTM, gen: torch.Generator, scale: float = 0.5) -> None:
    with torch.no_grad():
        for p in layer.response_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)


def _build(layers, batch_first, bias, bidirectional, seed, **regs):
    torch.manual_seed(seed)
    lstm = nn.LSTM(3, 4, layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional).double()
    ref = copy.deepcopy(lstm)
    space = _space(**regs.pop("specs", {}))
    layer = HyperLSTM.from_module(lstm, len(space), "rnn", **regs)
    return ref, layer, space


def _inputs(ref: nn.LSTM, batch: int, steps: int, gen: torch.Generator, with_state: bool):
    shape = (batch, steps, 3) if ref.batch_first else (steps, batch, 3)
    x = torch.randn(shape, generator=gen, dtype=F64)
    if not with_state:
        return x, None
    d = ref.num_layers * (2 if ref.bidirectional else 1)
    h0 = torch.randn(d, batch, 4, generator=gen, dtype=F64)
    return x, (h0, torch.randn(d, batch, 4, generator=gen, dtype=F64))


def _flat(out) -> torch.Tensor:
    y, (h, c) = out
    return torch.cat([y.reshape(-1), h.reshape(-1), c.reshape(-1)])


def _run(layer, space, x, hx, response_input, linearize=False, rows=None):
    rows = rows or (x.shape[0] if layer.batch_first else x.shape[1])
    lam = space.unconstrained.detach().unsqueeze(0).expand(rows, -1)
    with context.active(Perturbation(space, lam, response_input, linearize=linearize)):
        return layer(x, hx)


configs = dict(
    layers=st.integers(1, 2),
    batch_first=st.booleans(),
    bias=st.booleans(),
    bidirectional=st.booleans(),
    with_state=st.booleans(),
    seed=st.integers(0, 2**16),
)


@settings(max_examples=12, deadline=None)
@given(**configs)
def test_equals_nn_lstm_at_zero(layers, batch_first, bias, bidirectional, with_state, seed):
    ref, layer, space = _build(layers, batch_first, bias, bidirectional, seed)
    gen = torch.Generator().manual_seed(seed)
    x, hx = _inputs(ref, 3, 5, gen, with_state)
    expected = _flat(ref(x, hx))
    # the bare w₀ pass is nn.LSTM's own forward
    assert torch.equal(_flat(_run(layer, space, x, hx, None)), expected)
    _randomize(layer, gen)
    zero = torch.zeros(3, len(space), dtype=F64)
    # the custom recurrence at δλ = 0 (Θ random), and the linearized pass's primal (fused, one
    # call per layer) with its tangent
    torch.testing.assert_close(_flat(_run(layer, space, x, hx, zero)), expected, rtol=1e-12, atol=1e-12)
    with torch.no_grad(), fwAD.dual_level():
        y, (h, c) = _run(layer, space, x, hx, zero, linearize=True)
        primal = torch.cat([fwAD.unpack_dual(t).primal.reshape(-1) for t in (y, h, c)])
        tangent = torch.cat([fwAD.unpack_dual(t).tangent.reshape(-1) for t in (y, h, c)])
    torch.testing.assert_close(primal, expected, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(tangent) == 0
    # gradients through the custom recurrence match nn.LSTM's too
    out = _run(layer, space, x.clone().requires_grad_(), hx, zero)
    grads = torch.autograd.grad(_flat(out).pow(2).sum(), [layer.weight_ih_l0, layer.weight_hh_l0])
    ref_grads = torch.autograd.grad(_flat(ref(x, hx)).pow(2).sum(), [ref.weight_ih_l0, ref.weight_hh_l0])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)


def test_unbatched_input_matches_nn_lstm():
    ref, layer, space = _build(2, True, True, False, 0)
    x = torch.randn(5, 3, dtype=F64)
    _randomize(layer, torch.Generator().manual_seed(0))
    zero = torch.zeros(1, len(space), dtype=F64)
    torch.testing.assert_close(_flat(_run(layer, space, x, None, zero, rows=1)), _flat(ref(x)), rtol=1e-12, atol=1e-12)


@settings(max_examples=8, deadline=None)
@given(**configs, train=st.booleans(), input_tangent=st.booleans())
def test_tangent_matches_central_differences(
    layers, batch_first, bias, bidirectional, with_state, seed, train, input_tangent
):
    """Δ-STN: the tangent of the linearized pass is d/dh of the centered forward at δλ = h·ε,
    regularizers (DropConnect, variational input/hidden dropout) on, with the same masks."""
    regs = {}
    if train:
        regs = dict(
            dropconnect="wdrop",
            input_dropout="dropi",
            hidden_dropout="droph" if layers > 1 else None,
            specs={
                "wdrop": ht.HParam(init=0.3, low=0.0, high=0.95, perturb="batch"),
                "dropi": ht.HParam(init=0.2, low=0.0, high=0.95),
                "droph": ht.HParam(init=0.2, low=0.0, high=0.95),
            },
        )
    ref, layer, space = _build(layers, batch_first, bias, bidirectional, seed, **regs)
    layer.train(train)
    gen = torch.Generator().manual_seed(seed)
    _randomize(layer, gen)
    batch = 3
    x, hx = _inputs(ref, batch, 4, gen, with_state)
    eps = torch.randn(batch, len(space), generator=gen, dtype=F64)
    eps[:, 0] = eps[0, 0]  # a per-batch column where DropConnect reads its rate
    dx = torch.randn(x.shape, generator=gen, dtype=F64) if input_tangent else None
    state_tangent = None if hx is None else tuple(torch.randn(t.shape, generator=gen, dtype=F64) for t in hx)

    def centered(h: float) -> torch.Tensor:
        torch.manual_seed(seed)  # the same masks in every pass
        xh = x if dx is None else x + h * dx
        hxh = hx if hx is None else tuple(t + h * d for t, d in zip(hx, state_tangent))
        with torch.no_grad():
            return _flat(_run(layer, space, xh, hxh, h * eps))

    torch.manual_seed(seed)
    with torch.no_grad(), fwAD.dual_level():
        xd = x if dx is None else fwAD.make_dual(x, dx)
        hxd = hx if hx is None else tuple(fwAD.make_dual(t, d) for t, d in zip(hx, state_tangent))
        y, (h, c) = _run(layer, space, xd, hxd, eps, linearize=True)
        primal = torch.cat([fwAD.unpack_dual(t).primal.reshape(-1) for t in (y, h, c)])
        tangent = torch.cat([fwAD.unpack_dual(t).tangent.reshape(-1) for t in (y, h, c)])
    step = 1e-6
    fd = (centered(step) - centered(-step)) / (2 * step)
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(primal, centered(0.0), rtol=1e-12, atol=1e-12)


def test_linearized_gradients_reach_theta_only():
    """Δ-STN's Θ step (w₀ frozen) takes the fast tangent Function; with w₀ trainable the tangent
    goes through autograd instead: Θ's gradients are the same either way."""
    ref, layer, space = _build(2, True, True, True, 1)
    _randomize(layer, torch.Generator().manual_seed(1))
    x = torch.randn(3, 4, 3, dtype=F64)
    eps = torch.randn(3, len(space), dtype=F64)
    grads = []
    for frozen in (True, False):
        for name in layer._flat_weights_names:
            getattr(layer, name).requires_grad_(not frozen)
        with fwAD.dual_level():
            y, _ = _run(layer, space, x, None, eps, linearize=True)
            primal, tangent = fwAD.unpack_dual(y)
            loss = (primal + tangent).pow(2).sum()
        theta = layer.response_parameters()
        base = [getattr(layer, n) for n in layer._flat_weights_names]
        grads.append(torch.autograd.grad(loss, theta + ([] if frozen else base)))
        assert all(g.abs().sum() > 0 for g in grads[-1])
    for g_fast, g_ref in zip(grads[0], grads[1]):
        torch.testing.assert_close(g_fast, g_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rows", [1, 3])
def test_recurrence_functions_match_autograd_reference(rows):
    """The hand-written backward passes (adjoint scans) against autograd through plain loops."""
    gen = torch.Generator().manual_seed(rows)

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=F64).requires_grad_(grad)

    steps, batch, n = 4, 3, 2
    args = (t(steps, batch, 4 * n), t(4 * n, n), t(4 * n, n), t(rows, 4 * n), t(batch, n), t(batch, n))
    assert torch.autograd.gradcheck(lambda *a: lstm_mod._ModulatedLSTM.apply(*a), args)
    for a, b in zip(lstm_mod._ModulatedLSTM.apply(*args), lstm_mod._modulated_reference(*args)):
        torch.testing.assert_close(a, b)
    k, f, od, w = t(steps, batch, 4 * n, grad=False), t(steps, batch, n, grad=False), t(steps, batch, n, grad=False), t(4 * n, n, grad=False)
    u, dh0, dc0 = t(steps, batch, 4 * n), t(batch, n), t(batch, n)
    assert torch.autograd.gradcheck(lambda u, a, b: lstm_mod._TangentLSTM.apply(u, k, f, od, w, a, b), (u, dh0, dc0))
    for a, b in zip(
        lstm_mod._TangentLSTM.apply(u, k, f, od, w, None, None),
        lstm_mod._tangent_reference(u, k, f, od, w, None, None),
    ):
        torch.testing.assert_close(a, b)


def test_float32_fast_products_match_float64():
    """On CPU float32 the scans use oneDNN products (where available): same values and grads."""
    gen = torch.Generator().manual_seed(0)
    steps, batch, n = 6, 5, 8
    args64 = [
        torch.randn(s, generator=gen, dtype=F64).requires_grad_()
        for s in ((steps, batch, 4 * n), (4 * n, n), (4 * n, n), (batch, 4 * n), (batch, n), (batch, n))
    ]
    args32 = [a.detach().float().requires_grad_() for a in args64]
    for args in (args64, args32):
        sum(o.sum() for o in lstm_mod._ModulatedLSTM.apply(*args)).backward()
    for a, b in zip(args32, args64):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-3, atol=1e-3)
    x = torch.randn(7, 9, generator=gen)
    w = torch.randn(5, 9, generator=gen)
    torch.testing.assert_close(lstm_mod._mm_t(x, w), x @ w.t(), rtol=1e-5, atol=1e-5)


# ---- regularizers -------------------------------------------------------------------------------
def _record(monkeypatch, name):
    seen = []
    original = getattr(lstm_mod, name)

    def recording(*args):
        mask = original(*args)
        seen.append(mask)
        return mask

    monkeypatch.setattr(lstm_mod, name, recording)
    return seen


def test_dropconnect_mask_rate_and_scale():
    torch.manual_seed(0)
    w = torch.ones(400, 100, dtype=F64)
    for rate in (0.1, 0.5, 0.8):
        m = lstm_mod._dropconnect_mask(w, torch.tensor([rate], dtype=F64))
        dropped = (m == 0).double().mean().item()
        assert abs(dropped - rate) < 0.01  # 40 000 draws: std ≤ 0.0025
        assert torch.all((m == 0) | torch.isclose(m, torch.tensor(1 / (1 - rate), dtype=F64)))


def test_dropconnect_is_one_mask_on_w_hh_per_batch(monkeypatch):
    """Training with DropConnect equals nn.LSTM whose W_hh carries the recorded mask, for every
    example and step of the batch (AWD-LSTM's WeightDrop)."""
    specs = {"wdrop": ht.HParam(init=0.4, low=0.0, high=0.95, perturb="batch")}
    ref, layer, space = _build(2, True, True, False, 0, dropconnect="wdrop", specs=specs)
    layer.train()
    masks = _record(monkeypatch, "_dropconnect_mask")
    x = torch.randn(4, 6, 3, dtype=F64)
    out = _run(layer, space, x, None, None)
    assert len(masks) == 2 and all(m.shape == (16, 4) for m in masks)
    with torch.no_grad():
        ref.weight_hh_l0.mul_(masks[0])
        ref.weight_hh_l1.mul_(masks[1])
    torch.testing.assert_close(_flat(out), _flat(ref(x)), rtol=1e-12, atol=1e-12)


def _explicit_lstm(layer: HyperLSTM, delta: torch.Tensor, hh_masks=None) -> nn.LSTM:
    """nn.LSTM holding W(δλ) = W₀ + diag(s) R (one δλ row), W_hh(δλ) times its DropConnect mask."""
    plain = copy.deepcopy(layer.to_module())
    scales = layer._scales(delta.reshape(1, -1))
    with torch.no_grad():
        for k, sfx in enumerate(layer._suffixes()):
            for name, which in layer._pairs(sfx, True):
                w = getattr(plain, name)
                s = scales[k][which].reshape(-1, *([1] * (w.dim() - 1)))
                w.add_(s * getattr(layer, f"response_{name}"))
                if hh_masks is not None and name.startswith("weight_hh"):
                    w.mul_(hh_masks[k])
    return plain


@pytest.mark.parametrize("bidirectional", [False, True])
def test_perturbed_forward_is_each_examples_own_lstm(monkeypatch, bidirectional):
    """Example i runs the LSTM with weights W₀ + diag(P δλ_i) R; DropConnect drops the same
    entries of W_hh(δλ) = W_hh + diag(s_hh) R_hh for the whole batch."""
    specs = {"a": ht.HParam(init=0.0), "wdrop": ht.HParam(init=0.4, low=0.0, high=0.95, perturb="batch")}
    ref, layer, space = _build(2, True, True, bidirectional, 3, dropconnect="wdrop", specs=specs)
    _randomize(layer, torch.Generator().manual_seed(3))
    x = torch.randn(3, 5, 3, dtype=F64)
    delta = torch.randn(3, 2, dtype=F64)
    for train in (False, True):
        layer.train(train)
        masks = _record(monkeypatch, "_dropconnect_mask")
        y, (h, c) = _run(layer, space, x, None, delta)
        for i in range(3):
            plain = _explicit_lstm(layer, delta[i], masks if train else None)
            yi, (hi, ci) = plain(x[i : i + 1])
            torch.testing.assert_close(y[i : i + 1], yi, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(h[:, i : i + 1], hi, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(c[:, i : i + 1], ci, rtol=1e-12, atol=1e-12)


def test_dropconnect_refuses_per_example_rates():
    specs = {"wdrop": ht.HParam(init=0.4, low=0.0, high=0.95)}
    _, layer, space = _build(1, True, True, False, 0, dropconnect="wdrop", specs=specs)
    layer.train()
    with pytest.raises(PerturbationError, match="perturb='batch'"):
        _run(layer, space, torch.randn(3, 2, 3, dtype=F64), None, torch.randn(3, 1, dtype=F64))


def test_variational_masks_are_constant_over_time_at_per_example_rates(monkeypatch):
    specs = {"dropi": ht.HParam(init=0.5, low=0.0, high=0.95), "droph": ht.HParam(init=0.5, low=0.0, high=0.95)}
    ref, layer, space = _build(2, False, True, True, 0, input_dropout="dropi", hidden_dropout="droph", specs=specs)
    layer.train()
    masks = _record(monkeypatch, "_locked_mask")
    x = torch.randn(6, 4, 3, dtype=F64)  # time-major
    out = _run(layer, space, x, None, None)
    # one mask per layer input, (1, B, F): broadcast over every step
    assert [tuple(m.shape) for m in masks] == [(1, 4, 3), (1, 4, 8)]
    # the same computation with nn.LSTM layers and the recorded masks
    first = nn.LSTM(3, 4, bidirectional=True).double()
    second = nn.LSTM(8, 4, bidirectional=True).double()
    for plain, k in ((first, 0), (second, 1)):
        for sfx in ("", "_reverse"):
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(plain, f"{kind}_l0{sfx}").data.copy_(getattr(ref, f"{kind}_l{k}{sfx}"))
    y1, (h1, c1) = first(x * masks[0])
    y2, (h2, c2) = second(y1 * masks[1])
    expected = _flat((y2, (torch.cat([h1, h2]), torch.cat([c1, c2]))))
    torch.testing.assert_close(_flat(out), expected, rtol=1e-12, atol=1e-12)


def test_variational_mask_statistics_follow_each_examples_rate():
    torch.manual_seed(0)
    rate = torch.tensor([0.1, 0.5, 0.8], dtype=F64)
    like = torch.empty(0, dtype=F64)
    m = lstm_mod._locked_mask(3, 20000, rate, like)[0]
    for i in range(3):
        assert abs((m[i] == 0).double().mean().item() - rate[i].item()) < 0.015
        assert torch.allclose(m[i][m[i] > 0], 1 / (1 - rate[i]))


def test_regularizers_are_off_in_eval_and_refused_outside_a_model():
    specs = {"dropi": ht.HParam(init=0.5, low=0.0, high=0.95)}
    ref, layer, space = _build(1, True, True, False, 0, input_dropout="dropi", specs=specs)
    x = torch.randn(2, 3, 3, dtype=F64)
    layer.eval()
    assert torch.equal(_flat(layer(x)), _flat(ref(x)))
    layer.train()
    with pytest.raises(PerturbationError, match="outside a HyperModel"):
        layer(x)


# ---- construction, state, undoing ---------------------------------------------------------------
def test_state_dict_keys_and_parameters_are_kept():
    lstm = nn.LSTM(3, 4, 2, bidirectional=True)
    keys = list(lstm.state_dict())
    params = {n: p for n, p in lstm.named_parameters()}
    layer = HyperLSTM.from_module(lstm, 2, "rnn")
    state = layer.state_dict()
    assert keys == [k for k in state if not k.startswith(("response_", "hyper_projection"))]
    for name, p in params.items():
        assert getattr(layer, name) is p
    assert isinstance(lstm, nn.LSTM) and not isinstance(lstm, HyperLSTM)  # the original is intact
    assert set(lstm.state_dict()) == set(keys)
    # Θ: response weights per matrix, one projection, all zero-initialized in P
    theta = {id(p) for p in layer.response_parameters()}
    assert len(theta) == 4 * 4 + 1 and not theta & {id(p) for p in params.values()}
    assert torch.count_nonzero(layer.hyper_projection.weight) == 0
    # a checkpoint of the plain LSTM loads into the hyper-layer (strict=False: Θ is new)
    missing, unexpected = layer.load_state_dict(nn.LSTM(3, 4, 2, bidirectional=True).state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("response_", "hyper_projection")) for k in missing)


def test_to_module_round_trip():
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 4, 2, batch_first=True)
    x = torch.randn(2, 5, 3)
    expected = lstm(x)[0]
    layer = HyperLSTM.from_module(lstm, 2, "rnn", dropconnect="w")
    plain = layer.to_module()
    assert type(plain) is nn.LSTM
    assert list(plain.state_dict()) == list(lstm.state_dict())
    assert all(getattr(plain, n) is getattr(lstm, n) for n in lstm._flat_weights_names)
    assert not hasattr(plain, "hyper_projection") and not hasattr(plain, "dropconnect")
    torch.testing.assert_close(plain(x)[0], expected)
    plain = plain.double()  # _apply keeps the flat-weight list in sync
    assert plain(x.double())[0].dtype == F64
    again = HyperLSTM.from_module(plain, 1).double()
    assert again(x.double())[0].shape == (2, 5, 4)


def test_weight_sq_norm_and_bake_match_the_explicit_weights():
    torch.manual_seed(0)
    layer = HyperLSTM.from_module(nn.LSTM(3, 4, 2).double(), 2, "rnn")
    _randomize(layer, torch.Generator().manual_seed(0))
    delta = torch.randn(3, 2, dtype=F64)
    scales = layer._scales(delta)
    explicit = torch.zeros(3, dtype=F64)
    for k, sfx in enumerate(layer._suffixes()):
        for name, which in layer._pairs(sfx, True):
            w = getattr(layer, name) + scales[k][which].reshape(3, -1, *([1] * (getattr(layer, name).dim() - 1))) * getattr(layer, f"response_{name}")
            explicit += w.pow(2).reshape(3, -1).sum(1)
    torch.testing.assert_close(layer.weight_sq_norm(delta, include_bias=True), explicit)
    assert layer.weight_sq_norm(None).shape == (1,)
    # baking one point into w₀ reproduces the modulated forward there
    space = _space()
    x = torch.randn(5, 2, 3, dtype=F64)
    point = delta[:1]
    expected = _run(layer, space, x, None, point, rows=1)
    layer.bake(point[0])
    torch.testing.assert_close(_flat(layer(x)), _flat(expected), rtol=1e-10, atol=1e-12)


def test_refusals():
    with pytest.raises(HyperTuneError, match="proj_size"):
        HyperLSTM.from_module(nn.LSTM(3, 4, proj_size=2), 1)
    with pytest.raises(HyperTuneError, match="one layer"):
        HyperLSTM.from_module(nn.LSTM(3, 4), 1, hidden_dropout="h")
    with pytest.raises(HyperTuneError, match="dropout=0"):
        HyperLSTM.from_module(nn.LSTM(3, 4, 2, dropout=0.3), 1, hidden_dropout="h")
    with pytest.raises(HyperTuneError, match="needs an nn.LSTM"):
        HyperLSTM.from_module(nn.GRU(3, 4), 1)
    _, layer, space = _build(1, False, True, False, 0)
    packed = nn.utils.rnn.pack_sequence([torch.randn(3, 3, dtype=F64), torch.randn(2, 3, dtype=F64)])
    assert isinstance(_run(layer, space, packed, None, None, rows=2)[0], nn.utils.rnn.PackedSequence)
    with pytest.raises(HyperTuneError, match="PackedSequence"):
        _run(layer, space, packed, None, torch.zeros(2, 2, dtype=F64), rows=2)
    # time-major input whose perturbation rows were counted along time
    with pytest.raises(PerturbationError, match="leading dimension"):
        _run(layer, space, torch.randn(5, 2, 3, dtype=F64), None, torch.zeros(5, 2, dtype=F64), rows=5)


# ---- end to end -------------------------------------------------------------------------------------
class TinyLM(nn.Module):
    def __init__(self, vocab: int = 13, width: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.rnn = nn.LSTM(width, width, 2, batch_first=True)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(self.drop(out))


def _lm_batch(gen: torch.Generator, batch: int = 4, steps: int = 6):
    tokens = torch.randint(0, 13, (batch, steps + 1), generator=gen)
    return tokens[:, :-1], tokens[:, 1:]


def _lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _train_and_validate(model: ht.HyperModel, mode: str) -> None:
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), mode=mode)
    gen = torch.Generator().manual_seed(0)
    rnn = model.module.rnn
    assert isinstance(rnn, HyperLSTM)
    before = {id(p): p.detach().clone() for p in rnn.response_parameters()}
    lam0 = model.hparams.unconstrained.detach().clone()
    for _ in range(3):
        result = opt.train_step(*_lm_batch(gen), _lm_loss)
        assert not result.skipped
        opt.val_step(*_lm_batch(gen), _lm_loss)
    assert any(not torch.equal(p, before[id(p)]) for p in rnn.response_parameters())
    assert not torch.equal(model.hparams.unconstrained, lam0)
    plain = model.unwrap()
    assert type(plain.rnn) is nn.LSTM


@pytest.mark.parametrize("mode", ["delta", "centered"])
def test_tiny_language_model_trains_with_a_manually_swapped_lstm(mode):
    """Wrap the rest of the model, swap the LSTM by hand (what surgery registration will do)."""
    from hypertune import surgery
    from hypertune.model import HyperModel

    torch.manual_seed(0)
    net = TinyLM()
    specs = {
        "dropout": ht.DropoutRate(),
        "wdrop": ht.HParam(init=0.2, low=0.0, high=0.95, perturb="batch"),
        "dropi": ht.HParam(init=0.1, low=0.0, high=0.95),
        "droph": ht.HParam(init=0.1, low=0.0, high=0.95),
    }
    plan = surgery.plan(net, specs, exclude=[nn.LSTM])
    space = HyperParameters(plan.specs)
    net.rnn = HyperLSTM.from_module(
        net.rnn, len(space), "rnn", dropconnect="wdrop", input_dropout="dropi", hidden_dropout="droph"
    )
    installed = surgery.apply(net, plan, len(space))
    model = HyperModel(installed.root, space, plan, installed)
    assert "rnn" in model.hyper_layers()
    _train_and_validate(model, mode)


# ---- through HyperModel.wrap (runs once nn.LSTM is registered in surgery.HYPER_LAYERS) ------------
def _registered() -> bool:
    from hypertune import surgery

    from hypertune.layers import registry

    found = registry.match(nn.LSTM(1, 1))
    return found is not None and found.kind is not None and hasattr(ht, "VariationalDropout")


needs_registration = pytest.mark.skipif(not _registered(), reason="nn.LSTM not registered in surgery yet")


@needs_registration
@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_wrapped_language_model_tunes_lstm_regularizers(mode):
    torch.manual_seed(0)
    net = TinyLM()
    keys = list(net.state_dict())
    model = ht.HyperModel.wrap(
        net,
        {
            "dropout": ht.DropoutRate(),
            "wdrop": ht.DropConnect(init=0.2, targets=[nn.LSTM]),
            "dropi": ht.VariationalDropout(init=0.1, on="input"),
            "droph": ht.VariationalDropout(init=0.1, on="hidden"),
            "wd": ht.WeightDecay(init=1e-4, targets=["rnn"]),
        },
    )
    rnn = model.module.rnn
    assert isinstance(rnn, HyperLSTM)
    assert (rnn.dropconnect, rnn.input_dropout, rnn.hidden_dropout) == ("wdrop", "dropi", "droph")
    assert [k for k in model.module.state_dict() if k in keys] == keys
    from hypertune.schedule import describe_hparams

    assert "rnn.weight_hh_l1" in describe_hparams(model)["wd"]["params"]
    _train_and_validate(model, mode)


@needs_registration
def test_wrap_refuses_lstm_configurations_it_cannot_tune():
    class Two(nn.Module):
        def __init__(self, **kw):
            super().__init__()
            self.rnn = nn.LSTM(3, 4, **kw)

        def forward(self, x):
            return self.rnn(x)[0]

    with pytest.raises(ht.WrapError, match="proj_size"):
        ht.HyperModel.wrap(Two(proj_size=2), {"a": ht.HParam(init=0.0)})
    with pytest.raises(ht.WrapError, match="one layer"):
        ht.HyperModel.wrap(Two(), {"h": ht.VariationalDropout(on="hidden", targets=["rnn"])})
    with pytest.raises(ht.WrapError, match="dropout=0"):
        ht.HyperModel.wrap(Two(num_layers=2, dropout=0.2), {"h": ht.VariationalDropout(on="hidden")})
    with pytest.raises(ht.WrapError, match="matches no nn.LSTM"):
        ht.HyperModel.wrap(Two(), {"h": ht.VariationalDropout(on="hidden")})
    # the plain LSTM comes back after unwrap, with the same Parameters
    net = Two(num_layers=2)
    w = net.rnn.weight_hh_l1
    plain = ht.HyperModel.wrap(net, {"i": ht.VariationalDropout(on="input")}).unwrap()
    assert type(plain.rnn) is nn.LSTM and plain.rnn.weight_hh_l1 is w
