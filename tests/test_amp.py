"""Mixed precision: bf16 autocast on CPU (``autocast=`` or the caller's own autocast region) and a
GradScaler applied to every inner optimizer."""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

import hypertune as ht

BF16 = torch.bfloat16


def _build(seed: int = 0, dropout: bool = True) -> ht.HyperModel:
    torch.manual_seed(seed)
    drop = [nn.Dropout(0.1)] if dropout else []
    net = nn.Sequential(nn.Linear(8, 32), nn.BatchNorm1d(32), nn.ReLU(), *drop, nn.Linear(32, 4))
    specs = {"drop": ht.DropoutRate(init=0.2)} if dropout else {}
    hm = ht.HyperModel.wrap(net, {**specs, "wd": ht.WeightDecay(init=1e-3)})
    with torch.no_grad():  # a non-zero response, so the tangent J Θ δλ is not trivially zero
        for layer in hm.hyper_layers().values():
            layer.hyper_projection.weight.normal_(0, 0.5)
    return hm


def _run(steps: int = 4, wrap_in_autocast: bool = False, seed: int = 5, **kwargs):
    hm = _build()
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05, momentum=0.9), **kwargs)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
        with torch.autocast("cpu", dtype=BF16, enabled=wrap_in_autocast):
            opt.train_step(x, y, F.cross_entropy)
            opt.val_step(x, y, F.cross_entropy)
    return {k: v.detach().clone() for k, v in hm.state_dict().items()}, opt


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("train", [False, True])
def test_forward_ad_tangent_under_bf16_autocast_matches_float32(train):
    # No dropout: its masks are drawn in the activations' dtype, so bf16 and float32 draw differently.
    hm = _build(dropout=False)
    hm.train(train)
    hp = hm.hparams
    x = torch.randn(64, 8)
    eps = torch.randn(64, len(hp))
    point = ht.Perturbation(hp, hp.unconstrained.detach() + eps, eps, linearize=True)

    def primal_and_tangent(enabled: bool):
        with hm.evaluated_at(point), fwAD.dual_level(), torch.autocast("cpu", dtype=BF16, enabled=enabled):
            primal, tangent = fwAD.unpack_dual(hm(x))
        return primal.float(), tangent.float()

    p32, t32 = primal_and_tangent(False)
    p16, t16 = primal_and_tangent(True)
    assert t32.abs().sum() > 0
    assert _rel(t16, t32) < 2e-2  # bf16 keeps 8 bits: ~0.4 % per rounding
    assert _rel(p16, p32) < 2e-2


def test_bf16_steps_track_float32_steps():
    # Four steps of a noisy run: a single seed's deviation ranges from 0 to 0.2 (the dropout masks
    # are drawn in the activations' dtype), so the median of three seeds is compared.
    start = _build().state_dict()
    # σ tuned too (held at σ₀ by default), so its bf16 path is compared with float32 as well.
    deviations: dict[str, list[float]] = {}
    for seed in (5, 105, 205):
        full, _ = _run(seed=seed, tune_scales=True)
        half, opt = _run(autocast=BF16, seed=seed, tune_scales=True)
        assert opt.skipped_steps == 0
        for k in ("module.0.weight", "module.0.response_weight", "module.4.hyper_projection.weight",
                  "hparams.unconstrained", "hparams.raw_scale"):
            assert half[k].dtype == torch.float32  # weights and hyper-state stay in full precision
            moved = full[k] - start[k]
            assert moved.norm() > 0
            deviations.setdefault(k, []).append(_rel(half[k] - start[k], moved))
    for k, values in deviations.items():
        assert sorted(values)[1] < 0.15, (k, values)


def test_callers_autocast_region_equals_the_option():
    """Wrapping the step calls in torch.autocast gives the same bits as autocast=: the optimizer
    takes backward (and the weight-decay penalty) out of the region either way."""
    option, _ = _run(steps=2, autocast=BF16)
    wrapped, _ = _run(steps=2, wrap_in_autocast=True)
    assert all(torch.equal(option[k], wrapped[k]) for k in option)


def test_grad_scaler_with_power_of_two_scale_changes_nothing():
    plain, _ = _run(steps=3)
    scaled, opt = _run(steps=3, grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2))
    assert all(torch.equal(plain[k], scaled[k]) for k in plain)
    assert opt.grad_scaler.get_scale() > 2.0**10  # it grew after clean steps, shared by all optimizers


def test_grad_scaler_skips_overflowing_steps_without_raising():
    hm = _build()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=1e-6), grad_scaler=scaler)  # nonfinite="raise"
    before = {k: v.clone() for k, v in hm.state_dict().items()}
    x, y = torch.randn(32, 8), torch.randint(0, 4, (32,))

    def loss_fn(out, target):  # finite, but 1e4 · 2¹²⁰ overflows float32 in backward
        return F.cross_entropy(out, target) * 1e4

    result = opt.train_step(x, y, loss_fn)
    assert result.skipped and opt.skipped_steps >= 1
    assert scaler.get_scale() < 2.0**120
    # Nothing moved, BatchNorm's running statistics included.
    assert all(torch.equal(before[k], v) for k, v in hm.state_dict().items())
    for _ in range(60):  # the scale backs off until steps go through
        if not opt.train_step(x, y, loss_fn).skipped:
            break
    else:  # pragma: no cover
        pytest.fail("the scale never came down")
    assert not torch.equal(before["module.0.weight"], hm.state_dict()["module.0.weight"])


def test_a_non_finite_loss_still_raises_with_a_scaler():
    hm = _build()
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05), grad_scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ht.NonFiniteLossError):
        opt.train_step(torch.randn(8, 8), torch.randint(0, 4, (8,)), lambda o, y: F.cross_entropy(o, y) * float("nan"))


def test_fp16_autocast_with_scaler_runs():
    _, opt = _run(steps=2, autocast=torch.float16, grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))
    assert opt.train_steps == 2


def test_bad_amp_arguments_are_refused():
    hm = _build()
    with pytest.raises(ht.HyperTuneError, match="autocast"):
        ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1), autocast=torch.float64)
    with pytest.raises(ht.HyperTuneError, match="GradScaler"):
        ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1), grad_scaler=object())


def test_a_step_refused_after_its_write_check_does_not_count_as_a_good_scaler_step():
    """The scaler's update runs before the write; a val step whose λ update is then found
    non-finite used to advance the scaler's growth counter as if it had been taken."""
    torch.manual_seed(0)
    hm = ht.HyperModel.wrap(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3)), {"wd": ht.WeightDecay(init=1e-3)})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=1000)
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05), grad_scaler=scaler, hyper_lr=1e38)
    x, y = torch.randn(16, 5), torch.randint(0, 3, (16,))
    opt.train_step(x, y, F.cross_entropy)
    before = scaler.state_dict()
    with pytest.raises(ht.NonFiniteLossError, match="λ step's update left a non-finite value"):
        opt.val_step(x, y, F.cross_entropy)  # RMSprop at lr 1e38 overflows λ
    assert scaler.state_dict() == before
