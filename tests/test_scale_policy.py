"""The perturbation-scale policy and Θ's cadence at the defaults: σ held at σ₀ unless tuned, a
tuned σ kept inside [low, high]·σ₀ without sticking to a bound, Θ stepped every third train step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune.hyperparameters import SCALE_RANGE, HyperParameters
from hypertune.kinds.dropout import RATE_INIT_SCALE
from hypertune.optim.delta_stn import DEFAULT_RESPONSE_EVERY


def _model(seed: int = 0) -> ht.HyperModel:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    return ht.HyperModel.wrap(
        net, {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3, init_scale=0.5)}
    )


def _batch(seed: int, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_sigma_is_held_at_sigma0_by_default():
    model = _model()
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05))
    for i in range(12):
        opt.train_step(*_batch(i), F.cross_entropy)
        assert opt.val_step(*_batch(100 + i), F.cross_entropy).updated
    assert opt.scales() == {"drop": RATE_INIT_SCALE, "wd": 0.5}
    tuned = {id(p) for g in opt.hyper_optimizer.param_groups for p in g["params"]}
    assert id(model.hparams.raw_scale) not in tuned
    assert all(r.scales == {"drop": RATE_INIT_SCALE, "wd": 0.5} for r in opt.history)


def test_theta_steps_on_every_third_train_step_by_default():
    assert DEFAULT_RESPONSE_EVERY == 3
    model = _model()
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05))
    assert opt.response_every == 3
    theta = model.response_parameters()
    moved = []
    for i in range(7):
        before = [p.detach().clone() for p in theta]
        r = opt.train_step(*_batch(i), F.cross_entropy)
        moved.append(any(not torch.equal(b, p) for b, p in zip(before, theta)))
        assert (r.response_loss is not None) == (i % 3 == 0)
    assert moved == [True, False, False, True, False, False, True]


def _grad_of_scale(hp: HyperParameters, sign: float) -> torch.Tensor:
    hp.raw_scale.grad = None
    (sign * hp.scale.sum()).backward()
    return hp.raw_scale.grad.clone()


def test_tuned_sigma_is_clamped_and_only_outward_gradients_are_blocked():
    hp = HyperParameters({"a": ht.HParam(init=0.0), "b": ht.HParam(init=0.0, init_scale=2.0)},
                         dtype=torch.float64)
    low, high = SCALE_RANGE
    inside = torch.sigmoid(hp.raw_scale.detach())  # d softplus / d raw
    torch.testing.assert_close(_grad_of_scale(hp, 1.0), inside, rtol=0, atol=0)
    with torch.no_grad():
        hp.raw_scale.copy_(torch.tensor([50.0, -50.0], dtype=torch.float64))
    assert hp.scales() == {"a": high * 1.0, "b": low * 2.0}
    # Loss +σ: a descent step lowers σ, inward for "a" (at its ceiling), outward for "b" (floor).
    g = _grad_of_scale(hp, 1.0)
    assert g[0] > 0 and g[1] == 0
    # Loss -σ: a descent step raises σ, outward for "a", inward for "b".
    g = _grad_of_scale(hp, -1.0)
    assert g[0] == 0 and g[1] < 0


def test_tuned_sigma_stays_bounded_when_nothing_opposes_the_entropy_bonus():
    """Θ held at zero makes the validation loss blind to ε: only the entropy bonus acts on σ, which
    grew without limit before the bound (the linear toy's optimum-on-a-bound runs reached σ ≈ 20)."""
    model = _model()
    opt = ht.DeltaSTNOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.05), tune_scales=True,
        response_optimizer=torch.optim.SGD(model.response_parameters(), lr=0.0),
        entropy_weight=1.0, hyper_lr=0.5,
    )
    for i in range(60):
        opt.train_step(*_batch(i), F.cross_entropy)
        opt.val_step(*_batch(100 + i), F.cross_entropy)
    high = SCALE_RANGE[1]
    assert opt.scales() == pytest.approx({"drop": high * RATE_INIT_SCALE, "wd": high * 0.5}, rel=0, abs=0)
    # The raw value overshoots the bound by at most the steps taken after reaching it: the next
    # inward gradient moves σ again (tested above), so σ cannot stick at its ceiling for good.
    assert torch.all(F.softplus(model.hparams.raw_scale.detach()) < 10 * high)


def test_tuned_sigma_can_shrink_to_its_floor_and_no_further():
    model = _model()
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), tune_scales=True,
                               entropy_weight=0.0, hyper_lr=0.5)
    # A validation loss that only grows with σ: the σ step alone lowers it.
    for _ in range(40):
        opt.hyper_optimizer.zero_grad()
        model.hparams.scale.sum().backward()
        opt.hyper_optimizer.step()
    low = SCALE_RANGE[0]
    assert opt.scales() == pytest.approx({"drop": low * RATE_INIT_SCALE, "wd": low * 0.5}, rel=1e-6)  # float32


def test_scale_range_is_overridable_and_validated():
    hp = HyperParameters({"a": ht.HParam(init=0.0, init_scale=2.0)})
    hp.scale_range = (0.5, 2.0)
    with torch.no_grad():
        hp.raw_scale.fill_(100.0)
    assert hp.scales() == {"a": 4.0}
    for bad in [(0.0, 2.0), (1.5, 2.0), (0.5, 0.9), (0.5, float("inf")), "ab", (1.0,)]:
        with pytest.raises(ht.HyperTuneError, match="scale_range"):
            hp.scale_range = bad
    assert hp.scale_range == (0.5, 2.0)
