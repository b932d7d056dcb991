"""DropPathRate: stochastic depth with a tuned rate, one draw per example.

Checks: the mask is exact (each example is zeroed or scaled by 1/(1 - its rate)) and carries a
forward-AD tangent the same way; the dropped share matches the rate; wrapping torchvision's,
timm's and Hugging Face's stochastic-depth modules leaves eval outputs exact, tunes the rate
in every mode and unwrap gives the original modules back at the tuned rate; bad specs and
unsupported modules are refused with the fix.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torchvision.ops import StochasticDepth

import hypertune as ht
from hypertune.kinds.drop_path import FixedDropPath
from hypertune.layers.drop_path import HyperDropPath, drop_path_per_example


def test_each_example_is_dropped_or_scaled_by_its_own_rate():
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    rate = torch.tensor([0.0, 0.2, 0.5, 0.7, 0.9, 0.3], dtype=torch.float64)
    out = drop_path_per_example(x, rate, "site")
    for i in range(6):
        dropped = torch.equal(out[i], torch.zeros_like(x[i]))
        assert dropped or torch.equal(out[i], x[i] * (1 / (1 - rate[i]))), i
    assert torch.equal(out[0], x[0])  # rate 0 keeps the example exactly
    unscaled = drop_path_per_example(x, rate, "site", scale_by_keep=False)
    assert all(torch.equal(unscaled[i], x[i]) or not unscaled[i].any() for i in range(6))


def test_the_dropped_share_matches_the_rate():
    torch.manual_seed(1)
    n = 20000
    rate = torch.tensor([0.3])
    out = drop_path_per_example(torch.ones(n, 2), rate, "site")
    share = (out[:, 0] == 0).double().mean().item()
    assert abs(share - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)  # four standard errors
    assert abs(out.mean().item() - 1.0) < 0.02  # inverted: the mean is kept


def test_the_tangent_is_scaled_by_the_same_mask():
    torch.manual_seed(2)
    x, t = torch.randn(5, 4), torch.randn(5, 4)
    rate = torch.full((5,), 0.4)
    torch.manual_seed(3)
    plain = drop_path_per_example(x, rate, "site")
    torch.manual_seed(3)
    with fwAD.dual_level():
        primal, tangent = fwAD.unpack_dual(drop_path_per_example(fwAD.make_dual(x, t), rate, "site"))
    assert torch.equal(primal, plain)
    scale = 1 / (1 - rate[0])  # the mask's scale, in the rate's precision
    assert torch.equal(tangent, torch.where(plain == 0, 0.0, t * scale))


def test_rows_that_are_not_the_batch_ask_for_per_batch_perturbation():
    from hypertune.rows import BatchPerturbationNeeded

    with pytest.raises(BatchPerturbationNeeded):
        drop_path_per_example(torch.randn(8, 3), torch.full((4,), 0.1), "site")


class Residual(nn.Module):
    """Two residual blocks with torchvision's StochasticDepth, one with a rate of 0 (Identity)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.f1, self.f2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.sd1, self.sd2 = StochasticDepth(0.1, "row"), StochasticDepth(0.2, "row")
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = h + self.sd1(torch.tanh(self.f1(h)))
        h = h + self.sd2(torch.tanh(self.f2(h)))
        return self.head(h)


@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_torchvision_stochastic_depth_is_tuned_and_given_back(mode):
    torch.manual_seed(4)
    net = Residual()
    plain = copy.deepcopy(net).eval()
    model = ht.HyperModel.wrap(net, {"depth": ht.DropPathRate(init=0.1, per_site=True), "wd": ht.WeightDecay()})
    assert sorted(model.hparams.names) == ["depth:sd1", "depth:sd2", "wd"]
    assert all(isinstance(m, HyperDropPath) for m in (net.sd1, net.sd2))
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), plain(x))
    model.train()
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), mode=mode, warmup_steps=0,
                               response_every=1)
    before = model.hparams.unconstrained.detach().clone()
    for _ in range(3):
        assert not opt.train_step(x, y, F.cross_entropy).skipped
    assert opt.val_step(x, y, F.cross_entropy).updated
    moved = model.hparams.unconstrained.detach() - before
    assert (moved[:2] != 0).all(), moved
    values = model.hparam_values()
    model.eval()
    with torch.no_grad():
        wrapped = model(x)
    back = model.unwrap()
    assert type(back.sd1) is StochasticDepth and back.sd1.mode == "row"
    assert back.sd1.p == pytest.approx(values["depth:sd1"]) and back.sd2.p == pytest.approx(values["depth:sd2"])
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), wrapped, rtol=1e-5, atol=1e-6)


def test_batch_mode_and_models_without_stochastic_depth_are_refused_with_the_fix():
    net = Residual()
    net.sd2 = StochasticDepth(0.2, "batch")
    with pytest.raises(ht.WrapError, match="mode='batch'.*needs mode='row'"):
        ht.HyperModel.wrap(net, {"depth": ht.DropPathRate()})
    assert type(net.sd1) is StochasticDepth  # nothing was swapped
    with pytest.raises(ht.WrapError, match="drop_path_rate=0.05"):
        ht.HyperModel.wrap(nn.Sequential(nn.Linear(2, 2)), {"depth": ht.DropPathRate()})
    with pytest.raises(ht.SpecError, match="must be < 1"):
        ht.DropPathRate(high=1.0)


def test_spec_round_trips_through_json_and_the_fixed_form_sets_the_rate():
    spec = ht.DropPathRate(init=0.2, per_site=True, targets=["blocks.*"])
    assert ht.hparam_from_json(spec.to_json()) == spec
    net = Residual()
    FixedDropPath(net, ["sd1", "sd2"], 0.35)
    assert net.sd1.p == net.sd2.p == 0.35


def test_timm_and_hugging_face_drop_path_are_tuned():
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(5)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=32, depth=2,
                            num_heads=2, num_classes=10, drop_path_rate=0.1)
    config = transformers.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=10,
                                         drop_path_rate=0.2)
    hf = transformers.ConvNextForImageClassification(config)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for net, logits in ((vit, lambda o: o), (hf, lambda o: o.logits)):
        original = {type(m) for m in net.modules() if type(m).__name__.endswith("DropPath")}
        model = ht.HyperModel.wrap(net, {"drop_path": ht.DropPathRate(init=0.1)})
        assert model.describe_hparams()["drop_path"]["modules"]
        opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01), warmup_steps=0)
        loss = lambda out, t: F.cross_entropy(logits(out), t)  # noqa: E731
        before = model.hparam_values()["drop_path"]
        opt.train_step(x, y, loss)
        assert opt.val_step(x, y, loss).updated
        assert model.hparam_values()["drop_path"] != before
        back = model.unwrap()
        assert {type(m) for m in back.modules() if type(m).__name__.endswith("DropPath")} == original


def test_checkpoint_and_schedule_replay_carry_the_rate(tmp_path):
    torch.manual_seed(6)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))

    def build():
        torch.manual_seed(7)
        model = ht.HyperModel.wrap(Residual(), {"depth": ht.DropPathRate(init=0.1)})
        opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), warmup_steps=0)
        return model, opt

    model, opt = build()
    for _ in range(2):
        opt.train_step(x, y, F.cross_entropy)
        opt.val_step(x, y, F.cross_entropy)
    ht.checkpoint.save(tmp_path / "ckpt.pt", model=model, optimizer=opt)
    again, opt2 = build()
    ht.checkpoint.load(tmp_path / "ckpt.pt", model=again, optimizer=opt2)
    assert again.hparam_values() == model.hparam_values()
    schedule = ht.Schedule.from_optimizer(opt)
    plain = Residual()
    replay = ht.ScheduleReplayer(schedule, plain, torch.optim.SGD(plain.parameters(), lr=0.05))
    values = replay.apply(schedule.steps[-1])
    assert plain.sd1.p == plain.sd2.p == pytest.approx(values["depth"])
