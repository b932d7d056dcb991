"""The forward-AD tangent is the directional derivative of the centered forward in δλ."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hypertune as ht
from hypertune.context import Perturbation
from hypertune.linearize import linearized_call


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.norm(self.fc(x)))


def _mlp(widths: list[int], residual: bool) -> nn.Module:
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b), nn.GELU()]
    if residual:
        layers.append(Residual(widths[-1]))
    layers.append(nn.Linear(widths[-1], 3))
    return nn.Sequential(*layers)


def _cnn(channels: int, groups: int, kernel: tuple[int, int], stride: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, channels * groups, kernel, stride=stride, padding=1),
        nn.BatchNorm2d(channels * groups),
        nn.Tanh(),
        nn.Conv2d(channels * groups, channels * groups, (3, 2), groups=groups, dilation=(1, 2)),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * groups * 4, 3),
    )


def _randomize_response(model: ht.HyperModel, gen: torch.Generator) -> None:
    with torch.no_grad():
        for p in model.response_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5)


def _check_tangent(net: nn.Module, x: torch.Tensor, train: bool, seed: int, device: str | torch.device = "cpu") -> None:
    """The draws come from a CPU generator, so a seed checks the same case on every device."""
    gen = torch.Generator().manual_seed(seed)
    net = net.double()
    model = ht.HyperModel.wrap(net, hparams={"a": ht.HParam(init=0.0), "b": ht.WeightDecay(init=0.1)})
    _randomize_response(model, gen)
    model = model.to(device).train(train)
    x = x.to(device)
    space = model.hparams
    eps = torch.randn(x.shape[0], len(space), generator=gen, dtype=torch.float64).to(device)
    lam = space.unconstrained.detach().unsqueeze(0).expand(x.shape[0], -1)

    def centered(delta: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), model.evaluated_at(Perturbation(space, lam, delta)):
            return model(x)

    with torch.no_grad(), model.evaluated_at(Perturbation(space, lam, eps, linearize=True)):
        import torch.autograd.forward_ad as fwAD

        with fwAD.dual_level():
            out = model(x)
            primal, tangent = fwAD.unpack_dual(out)
            primal, tangent = primal.clone(), tangent.clone()
    h = 1e-6
    fd = (centered(h * eps) - centered(-h * eps)) / (2 * h)
    assert tangent.device == x.device
    torch.testing.assert_close(tangent, fd, rtol=1e-5, atol=1e-7)
    # The primal is exactly w₀'s output.
    with torch.no_grad():
        assert torch.equal(primal, model(x))


@settings(max_examples=12, deadline=None)
@given(
    widths=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    residual=st.booleans(),
    train=st.booleans(),
    batch=st.integers(2, 6),
    seed=st.integers(0, 2**16),
)
def test_mlp_tangent_matches_central_differences(widths, residual, train, batch, seed):
    torch.manual_seed(seed)
    net = _mlp([4, *widths], residual)
    x = torch.randn(batch, 4, dtype=torch.float64)
    _check_tangent(net, x, train, seed)


@settings(max_examples=8, deadline=None)
@given(
    channels=st.integers(1, 3),
    groups=st.sampled_from([1, 2]),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.integers(1, 2),
    train=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cnn_tangent_matches_central_differences(channels, groups, kernel, stride, train, seed):
    torch.manual_seed(seed)
    net = _cnn(channels, groups, kernel, stride)
    x = torch.randn(3, 2, 9, 8, dtype=torch.float64)
    _check_tangent(net, x, train, seed)


def test_embedding_tangent_matches_central_differences():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(11, 5, padding_idx=0), nn.Flatten(), nn.Linear(15, 2))
    x = torch.randint(0, 11, (4, 3))
    _check_tangent(net, x, False, 0)


def test_linearized_call_returns_primal_plus_tangent_and_grads_reach_theta_only():
    torch.manual_seed(0)
    model = ht.HyperModel.wrap(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1)), {"a": ht.HParam(init=0.0)})
    _randomize_response(model, torch.Generator().manual_seed(1))
    x = torch.randn(5, 3)
    eps = torch.randn(5, 1)
    lam = model.hparams.unconstrained.detach().unsqueeze(0).expand(5, -1)
    for p in model.base_parameters():
        p.requires_grad_(False)
    with model.evaluated_at(Perturbation(model.hparams, lam, eps, linearize=True)):
        y = linearized_call(lambda: model(x))
    y.sum().backward()
    assert all(p.grad is not None for p in model.response_parameters())
    assert all(p.grad is None for p in model.base_parameters())


def test_first_linearized_step_emits_no_torch_deprecation_warning():
    # torch loads its forward-AD decompositions via torch.jit.script on first use, which warns
    # (FutureWarning in torch 2.14, DeprecationWarning in 2.11);
    # a fresh process is needed because that load happens once per process.
    import subprocess
    import sys

    code = (
        "import torch, torch.nn.functional as F, hypertune as ht\n"
        "m = ht.HyperModel.wrap(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Dropout(0.1),"
        " torch.nn.Linear(4, 2)), {'dropout': ht.DropoutRate(init=0.1)})\n"
        "opt = ht.DeltaSTNOptimizer(m, torch.optim.SGD(m.parameters(), lr=0.1))\n"
        "x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))\n"
        "opt.train_step(x, y, F.cross_entropy); opt.val_step(x, y, F.cross_entropy)\n"
    )
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-W", "error::DeprecationWarning", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---- ops rewritten in the linearized pass: the same dual as torch's own forward AD ------------
_AFFINE_CALLS = {
    "mul": lambda a, b: a * b,
    "rmul": lambda a, b: b * a,
    "torch.mul": lambda a, b: torch.mul(a, b),
    "add": lambda a, b: a + b,
    "radd": lambda a, b: b + a,
    "add alpha": lambda a, b: torch.add(b, a, alpha=-2.5),
    "sub": lambda a, b: a - b,
    "rsub": lambda a, b: b - a,
    "sub alpha": lambda a, b: torch.sub(b, a, alpha=0.5),
    "div": lambda a, b: a / b,
    "div by dual": lambda a, b: b / a,  # not affine in a: left to forward AD
}


def _dual_call(call, x_p, x_t, other, rewrite: bool):
    """(primal, tangent, d sum(tangent) / d x_t) of ``call(dual x, other)``."""
    import torch.autograd.forward_ad as fwAD

    from hypertune.linearize import _LinearizableOps

    x_t = x_t.clone().requires_grad_(True)
    with fwAD.dual_level():
        mode = _LinearizableOps(hardsigmoid=False) if rewrite else contextlib.nullcontext()
        with mode:
            out = call(fwAD.make_dual(x_p, x_t), other)
        primal, tangent = fwAD.unpack_dual(out)
        (grad,) = torch.autograd.grad(tangent.sum(), x_t)
    return primal.detach(), tangent.detach(), grad


@settings(max_examples=60, deadline=None)
@given(
    st.sampled_from(sorted(_AFFINE_CALLS)),
    st.lists(st.integers(1, 4), min_size=1, max_size=3),
    st.sampled_from(["full", "suffix", "ones", "scalar tensor", "float", "int", "grows"]),
    st.integers(0, 2**16),
)
def test_affine_rewrite_gives_torchs_dual_exactly(name, shape, other_kind, seed):
    g = torch.Generator().manual_seed(seed)
    x_p, x_t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    if other_kind == "full":
        other = torch.rand(shape, generator=g) + 0.5
    elif other_kind == "suffix":
        other = torch.rand(shape[1:], generator=g) + 0.5
    elif other_kind == "ones":
        other = torch.rand([1] * len(shape), generator=g) + 0.5
    elif other_kind == "scalar tensor":
        other = torch.tensor(1.7, dtype=torch.float64)  # 0-dim: x's dtype wins
    elif other_kind == "float":
        other = 0.37
    elif other_kind == "int":
        other = 3
    else:  # broadcasting grows the result: left to forward AD
        other = torch.rand([2, *shape], generator=g) + 0.5
    call = _AFFINE_CALLS[name]
    want = _dual_call(call, x_p, x_t, other, rewrite=False)
    got = _dual_call(call, x_p, x_t, other, rewrite=True)
    for w, h in zip(want, got):
        assert w.dtype == h.dtype and w.shape == h.shape
        assert torch.equal(w, h)


def test_affine_rewrite_keeps_type_promotion_to_forward_ad():
    x_p, x_t = torch.randn(3, 4, dtype=torch.float16), torch.randn(3, 4, dtype=torch.float16)
    other = torch.rand(3, 4)  # float32: the result is float32, so forward AD does it
    want = _dual_call(_AFFINE_CALLS["mul"], x_p, x_t, other, rewrite=False)
    got = _dual_call(_AFFINE_CALLS["mul"], x_p, x_t, other, rewrite=True)
    assert got[1].dtype == torch.float32
    for w, h in zip(want, got):
        assert torch.equal(w, h)


_NORM_CALLS = {
    "layer_norm": lambda x, w, b: torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, 1e-5),
    "layer_norm kw": lambda x, w, b: torch.nn.functional.layer_norm(x, (x.shape[-1],), weight=w, bias=b),
    "batch_norm train": lambda x, w, b: torch.nn.functional.batch_norm(
        x.transpose(1, 2), None, None, w, b, training=True
    ),
    "batch_norm eval": lambda x, w, b: torch.nn.functional.batch_norm(
        x.transpose(1, 2), torch.linspace(-1, 1, x.shape[-1]), torch.linspace(0.5, 2, x.shape[-1]), w, b, False
    ),
    "group_norm": lambda x, w, b: torch.nn.functional.group_norm(x.transpose(1, 2), 1, w, b),
}


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(sorted(_NORM_CALLS)), st.integers(2, 3), st.integers(2, 6), st.booleans(), st.integers(0, 2**16))
def test_norm_rewrites_match_forward_ad(name, rows, width, affine, seed):
    g = torch.Generator().manual_seed(seed)
    x_p, x_t = torch.randn(rows, 3, width, generator=g), torch.randn(rows, 3, width, generator=g)
    weight = torch.randn(width, generator=g) if affine else None
    bias = torch.randn(width, generator=g) if affine else None

    def call(x, _):
        return _NORM_CALLS[name](x, weight, bias)

    want = _dual_call(call, x_p, x_t, None, rewrite=False)
    got = _dual_call(call, x_p, x_t, None, rewrite=True)
    for w, h in zip(want, got):
        torch.testing.assert_close(h, w, rtol=1e-6, atol=1e-6)


def test_in_place_op_after_a_rewritten_add_leaves_the_input_dual_alone():
    import torch.autograd.forward_ad as fwAD

    from hypertune.linearize import _LinearizableOps

    x_p, x_t, bias = torch.randn(4, 5), torch.randn(4, 5), torch.randn(5)
    with fwAD.dual_level(), _LinearizableOps(hardsigmoid=False):
        x = fwAD.make_dual(x_p, x_t.clone())
        y = x + bias
        y.relu_()
        assert torch.equal(fwAD.unpack_dual(x).tangent, x_t)
        assert torch.equal(fwAD.unpack_dual(y).tangent, x_t * (x_p + bias > 0))


@pytest.mark.skipif(not hasattr(torch.nn.functional, "grouped_mm"), reason="torch without F.grouped_mm")
@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=4),  # rows per group (0: an expert no token chose)
    st.integers(0, 2),  # rows past the last offset
    st.sampled_from([4, 8]),  # the op's kernel wants 16-byte strides
    st.sampled_from([4, 12]),
    st.sampled_from(["input", "weight", "both"]),
    st.integers(0, 2**16),
)
def test_grouped_mm_runs_per_group_with_the_exact_tangent(sizes, tail, k, n, dual, seed):
    """MoE layers' grouped matmul has no forward-AD formula; in the linearized pass it runs as one
    matmul per group. Its primal is the op's, and since the op is bilinear its tangent is exactly
    grouped_mm(ȧ, B) + grouped_mm(A, Ḃ), and the tangent's gradient reaches the input's tangent."""
    from hypertune.linearize import _LinearizableOps

    grouped_mm = torch.nn.functional.grouped_mm
    g = torch.Generator().manual_seed(seed)
    rows = sum(sizes) + tail
    offs = torch.tensor(sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    a, a_t = torch.randn(rows, k, generator=g), torch.randn(rows, k, generator=g).requires_grad_(True)
    b, b_t = torch.randn(len(sizes), k, n, generator=g), torch.randn(len(sizes), k, n, generator=g)
    a_t_used = a_t if dual in ("input", "both") else None
    b_t_used = b_t if dual in ("weight", "both") else None
    with fwAD.dual_level(), _LinearizableOps(hardsigmoid=False):
        a_in = a if a_t_used is None else fwAD.make_dual(a, a_t_used)
        b_in = b if b_t_used is None else fwAD.make_dual(b, b_t_used)
        primal, tangent = fwAD.unpack_dual(grouped_mm(a_in, b_in, offs=offs))
    used = slice(0, sum(sizes))
    want = grouped_mm(a, b, offs=offs)
    torch.testing.assert_close(primal[used], want[used], rtol=1e-5, atol=1e-5)
    assert torch.equal(primal[sum(sizes):], torch.zeros(tail, n))
    want_t = torch.zeros(rows, n)
    if a_t_used is not None:
        want_t = want_t + grouped_mm(a_t.detach(), b, offs=offs)
    if b_t_used is not None:
        want_t = want_t + grouped_mm(a, b_t, offs=offs)
    torch.testing.assert_close(tangent[used], want_t[used], rtol=1e-5, atol=1e-5)
    if a_t_used is not None and sum(sizes):
        (grad,) = torch.autograd.grad(tangent[used].sum(), a_t)
        torch.testing.assert_close(grad[used], grouped_mm(torch.ones(sum(sizes), n), b.transpose(1, 2), offs=offs), rtol=1e-5, atol=1e-5)


def test_grouped_mm_of_three_d_operands_and_bias():
    from hypertune.linearize import _grouped_mm_in_dual

    g = torch.Generator().manual_seed(0)
    a, a_t = torch.randn(3, 4, 5, generator=g), torch.randn(3, 4, 5, generator=g)
    b, bias = torch.randn(3, 5, 2, generator=g), torch.randn(3, 2, generator=g)
    with fwAD.dual_level():
        out = _grouped_mm_in_dual(fwAD.make_dual(a, a_t), b, bias=bias, out_dtype=torch.float64)
        primal, tangent = fwAD.unpack_dual(out)
    assert primal.dtype == torch.float64
    torch.testing.assert_close(primal, (torch.bmm(a, b) + bias.unsqueeze(1)).double())
    torch.testing.assert_close(tangent, torch.bmm(a_t, b).double())
    assert _grouped_mm_in_dual(a, b) is None  # no tangent: the op itself runs


class _LossInside(nn.Module):
    """A model that computes its own loss when given labels, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))

    def forward(self, x, labels=None):
        logits = self.net(x)
        loss = None if labels is None else nn.CrossEntropyLoss()(logits, labels)
        return {"logits": logits, "loss": loss}


def _theta_grads(inside: bool, seed: int = 0) -> tuple[torch.Tensor, float]:
    torch.manual_seed(seed)
    model = ht.HyperModel.wrap(_LossInside(), {"wd": ht.WeightDecay(init=1e-2, init_scale=1.0)})
    with torch.no_grad():  # a Θ well away from 0, so the curvature term matters
        for p in model.response_parameters():
            p.normal_(0, 0.5)
    grads: list[torch.Tensor] = []

    class Recording(torch.optim.SGD):
        def step(self, closure=None):
            grads.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]))
            return super().step(closure)

    opt = ht.DeltaSTNOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.0), response_optimizer=Recording(model.response_parameters(), lr=0.0)
    )
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randint(0, 4, (16,), generator=g)
    torch.manual_seed(2)
    if inside:
        r = opt.train_step({"x": x, "labels": y}, y, lambda out, _: out["loss"])
    else:
        r = opt.train_step({"x": x}, y, lambda out, t: F.cross_entropy(out["logits"], t))
    return grads[0], r.response_loss


def test_a_loss_computed_inside_the_forward_is_the_loss_of_the_linearized_output(monkeypatch):
    """Δ-STN's Θ objective is L(f + JΘε). A loss the model computes itself runs under forward AD;
    it must be that same loss, not forward AD's first-order expansion L(f) + ∇L·JΘε."""
    inside, inside_loss = _theta_grads(inside=True)
    outside, outside_loss = _theta_grads(inside=False)
    assert inside_loss == outside_loss
    assert torch.equal(inside, outside)
    # The expansion is what forward AD alone gives: a different gradient (this test can fail).
    import hypertune.linearize as linearize

    monkeypatch.setattr(linearize, "_LOSSES", set())
    expanded, _ = _theta_grads(inside=True)
    assert not torch.allclose(expanded, outside, rtol=1e-3, atol=1e-6)


class _TanhGelu(torch.autograd.Function):
    """A custom activation with a hand-written backward and no jvp (BLOOM's training GELU)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * x**3)))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        t = torch.tanh(0.79788456 * (x + 0.044715 * x**3))
        return g * (0.5 * (1 + t) + 0.5 * x * (1 - t**2) * 0.79788456 * (1 + 3 * 0.044715 * x**2))


class _RoundStraightThrough(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, g):
        return g


class _OnceDifferentiable(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.exp()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * x.exp()


class _Act(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def _mlp_with(act: nn.Module, seed: int = 0) -> ht.HyperModel:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 12), act, nn.Linear(12, 3))
    model = ht.HyperModel.wrap(net, {"wd": ht.WeightDecay(init=1e-2)})
    with torch.no_grad():
        for p in model.response_parameters():
            p.normal_(0, 0.3)
    return model


def _linearized_theta_grad(model: ht.HyperModel, x: torch.Tensor, seed: int = 1):
    hp = model.hparams
    torch.manual_seed(seed)
    eps = hp.sample_noise(x.shape[0])
    point = Perturbation(hp, hp.unconstrained.detach() + eps, eps, linearize=True)
    with model.evaluated_at(point):
        out = linearized_call(lambda: model(x))
    theta = list(model.response_parameters())
    return out, torch.autograd.grad(out.square().sum(), theta)


def test_a_custom_function_without_jvp_is_linearized_through_its_backward():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(3))
    custom = _mlp_with(_Act(lambda x: _TanhGelu.apply(x)))
    plain = _mlp_with(nn.GELU(approximate="tanh"))
    out_c, grads_c = _linearized_theta_grad(custom, x)
    out_p, grads_p = _linearized_theta_grad(plain, x)
    torch.testing.assert_close(out_c, out_p, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_c, grads_p):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert torch.autograd.Function.__dict__["apply"] is _ORIGINAL_APPLY  # the patch is gone


_ORIGINAL_APPLY = torch.autograd.Function.__dict__["apply"]


def test_a_straight_through_function_keeps_its_backwards_meaning():
    """J comes from the backward, as in training: rounding's surrogate Jacobian is the identity."""
    x = torch.randn(4, 3)
    t = torch.randn(4, 3)
    with fwAD.dual_level():
        from hypertune.linearize import _custom_functions_linearized

        with _custom_functions_linearized():
            primal, tangent = fwAD.unpack_dual(_RoundStraightThrough.apply(fwAD.make_dual(x, t)))
    assert torch.equal(primal, torch.round(x)) and torch.equal(tangent, t)


def test_a_function_whose_backward_cannot_be_differentiated_is_refused_with_the_fix():
    model = _mlp_with(_Act(lambda x: _OnceDifferentiable.apply(x)))
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01), response_every=1)
    x, y = torch.randn(8, 5) * 0.1, torch.randint(0, 3, (8,))
    with pytest.raises(ht.HyperTuneError, match="mode='centered'"):
        opt.train_step(x, y, F.cross_entropy)
    assert opt.train_steps == 0
    opt2 = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01), mode="centered")
    assert opt2.train_step(x, y, F.cross_entropy).response_loss is not None


def test_an_apply_stored_before_the_step_is_refused_with_both_fixes():
    model = _mlp_with(_Act(_TanhGelu.apply))  # bound when the model was built
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01))
    with pytest.raises(ht.HyperTuneError, match=r"call apply in the forward\). Use mode='centered'"):
        opt.train_step(torch.randn(4, 5), torch.randint(0, 3, (4,)), F.cross_entropy)
    assert opt.train_steps == 0


class _GatedConv(nn.Module):
    """Speech2Text's subsampler: a convolution whose channels are halved by F.glu."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.glu(self.conv(x), dim=1).mean(-1))


def test_glu_is_linearized_exactly_and_its_tangent_can_be_backpropagated():
    """torch's glu tangent (glu_jvp) has no derivative, so Δ-STN's Θ step failed on it."""
    from hypertune.linearize import _LinearizableOps

    torch.manual_seed(0)
    x = torch.randn(4, 10, 3, dtype=torch.float64)
    t = torch.randn(4, 10, 3, dtype=torch.float64, requires_grad=True)
    with fwAD.dual_level():
        ours = fwAD.unpack_dual(_call_under(_LinearizableOps(hardsigmoid=False), F.glu, fwAD.make_dual(x, t), 1))
        theirs = fwAD.unpack_dual(F.glu(fwAD.make_dual(x, t.detach()), 1))
    torch.testing.assert_close(ours.primal, theirs.primal, rtol=0, atol=1e-15)
    torch.testing.assert_close(ours.tangent, theirs.tangent, rtol=1e-12, atol=1e-15)
    ours.tangent.sum().backward()  # torch's own raises "derivative for aten::glu_jvp is not implemented"
    assert t.grad is not None and torch.isfinite(t.grad).all()
    model = ht.HyperModel.wrap(_GatedConv().double(), {"wd": ht.WeightDecay()})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0)
    xs, y = torch.randn(6, 3, 5, dtype=torch.float64), torch.randint(0, 2, (6,))
    assert opt.train_step(xs, y, F.cross_entropy).response_loss is not None
    assert opt.val_step(xs, y, F.cross_entropy).updated


def _call_under(mode, fn, *args):
    with mode:
        return fn(*args)


class _MatchedInNoGrad(nn.Module):
    """A loss that, like DETR's Hungarian matcher, computes a cost with cdist under no_grad."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.proj(x)
        with torch.no_grad():
            cost = torch.cdist(out, out.flip(0))  # forward AD has no formula for _cdist_forward
            order = cost.argmin(-1)
        return out[order]


def test_an_op_without_forward_ad_inside_no_grad_runs_on_the_primal():
    torch.manual_seed(0)
    model = ht.HyperModel.wrap(_MatchedInNoGrad().double(), {"wd": ht.WeightDecay()})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0)
    x = torch.randn(5, 4, dtype=torch.float64)
    result = opt.train_step(x, x, F.mse_loss)
    assert result.response_loss is not None and not result.skipped
    # outside no_grad the same op is still refused, with the fix
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(NotImplementedError):
            torch.cdist(dual, dual)
