"""DeltaSTNOptimizer: who updates what, state round trips, refusals that change nothing."""

from __future__ import annotations

import copy
import math

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune.optim import DEFAULT_RESPONSE_LR


def _net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3)
    ).to(dtype)


def _setup(mode: str = "delta", seed: int = 0, **kwargs):
    model = ht.HyperModel.wrap(
        _net(seed), {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3)}
    )
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return model, ht.DeltaSTNOptimizer(model, base, mode=mode, **kwargs)


def _batch(seed: int, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_steps_run_and_move_lambda(mode):
    model, opt = _setup(mode)
    before = model.hparams.unconstrained.detach().clone()
    for i in range(10):
        r = opt.train_step(*_batch(i), F.cross_entropy)
        assert math.isfinite(r.loss) and set(r.hparams) == {"drop", "wd"}
        v = opt.val_step(*_batch(100 + i), F.cross_entropy)
        assert v.updated and not v.skipped
    assert not torch.equal(before, model.hparams.unconstrained.detach())
    assert opt.train_steps == 10 and opt.val_steps == 10
    # Every gradient is cleared after a step, so nothing leaks into the user's next step.
    assert all(p.grad is None for p in model.parameters())


def test_w0_step_leaves_theta_and_theta_step_leaves_w0():
    model = ht.HyperModel.wrap(_net(0), {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay()})
    opt = ht.DeltaSTNOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        response_optimizer=torch.optim.SGD(model.response_parameters(), lr=0.0),
    )
    theta = [p.detach().clone() for p in model.response_parameters()]
    opt.train_step(*_batch(0), F.cross_entropy)
    assert all(torch.equal(a, p) for a, p in zip(theta, model.response_parameters()))

    model = ht.HyperModel.wrap(_net(0), {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay()})
    opt = ht.DeltaSTNOptimizer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        response_optimizer=torch.optim.SGD(model.response_parameters(), lr=0.1),
    )
    w0 = [p.detach().clone() for p in model.base_parameters()]
    theta = [p.detach().clone() for p in model.response_parameters()]
    opt.train_step(*_batch(0), F.cross_entropy)
    assert all(torch.equal(a, p) for a, p in zip(w0, model.base_parameters()))
    assert any(not torch.equal(a, p) for a, p in zip(theta, model.response_parameters()))


def test_batchnorm_running_stats_come_from_unperturbed_pass_only():
    model, opt = _setup("delta")
    x, y = _batch(0)
    reference = copy.deepcopy(model)
    reference.train()
    with torch.no_grad():
        reference(x)  # one unperturbed pass at w₀ (dropout after BN does not affect its stats)
    opt.train_step(x, y, F.cross_entropy)
    bn, ref_bn = model.module[1], reference.module[1]
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var)
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_response_lr_follows_user_scheduler(mode):
    model, opt = _setup(mode, response_every=1)  # Θ's rate is set when a Θ step runs
    lr0 = opt.response_optimizer.param_groups[0]["lr"]
    sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=1, gamma=0.5)
    opt.train_step(*_batch(0), F.cross_entropy)
    sched.step()
    opt.train_step(*_batch(1), F.cross_entropy)
    assert opt.response_optimizer.param_groups[0]["lr"] == pytest.approx(lr0 * 0.5)


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam, torch.optim.RMSprop, torch.optim.Adagrad,
                                 torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax])
def test_the_stn_clone_is_built_for_every_torch_optimizer(cls):
    """``defaults`` can hold more than the constructor takes (AdamW's decoupled_weight_decay)."""
    model = ht.HyperModel.wrap(_net(0), {"wd": ht.WeightDecay()})
    base = cls(model.parameters(), lr=0.01, weight_decay=1e-2)
    opt = ht.DeltaSTNOptimizer(model, base, mode="stn", warmup_steps=0)
    clone = opt.response_optimizer
    assert type(clone) is cls and clone.param_groups[0]["weight_decay"] == 0.0
    assert clone.param_groups[0]["lr"] == 0.01
    assert not opt.train_step(*_batch(0), F.cross_entropy).skipped


def test_default_response_optimizer_is_adam_in_centered_modes_and_a_clone_in_stn():
    for mode in ("delta", "centered"):
        _, opt = _setup(mode)
        assert type(opt.response_optimizer) is torch.optim.Adam
        assert opt.response_optimizer.defaults["fused"]  # the per-tensor loop costs 4× on CPU
        assert opt.response_optimizer.param_groups[0]["lr"] == DEFAULT_RESPONSE_LR
        assert opt.response_optimizer.param_groups[0]["weight_decay"] == 0
        _, opt = _setup(mode, response_lr=3e-4)
        assert opt.response_optimizer.param_groups[0]["lr"] == 3e-4
        _, opt = _setup(mode, response_optimizer="clone")  # the reference code's choice
        assert type(opt.response_optimizer) is torch.optim.SGD
        assert opt.response_optimizer.param_groups[0]["lr"] == 0.05
    model = ht.HyperModel.wrap(_net(0), {"wd": ht.WeightDecay()})
    base = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    opt = ht.DeltaSTNOptimizer(model, base, mode="stn")
    group = opt.response_optimizer.param_groups[0]
    assert _setup("stn", response_optimizer="adam", response_lr=2e-3)[1].response_optimizer.defaults["lr"] == 2e-3
    assert type(opt.response_optimizer) is torch.optim.SGD
    assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.05, 0.9, 0.0)


def test_response_lr_refusals_leave_the_optimizer_alone():
    model = ht.HyperModel.wrap(_net(0), {"wd": ht.WeightDecay()})
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    groups = [list(g["params"]) for g in base.param_groups]
    theta = torch.optim.SGD(model.response_parameters(), lr=0.1)
    with pytest.raises(ht.HyperTuneError, match="drop response_lr"):
        ht.DeltaSTNOptimizer(model, base, response_optimizer=theta, response_lr=1e-3)
    with pytest.raises(ht.HyperTuneError, match="mode='stn'"):
        ht.DeltaSTNOptimizer(model, base, mode="stn", response_lr=1e-3)
    for bad in ("sgd", [theta]):
        with pytest.raises(ht.HyperTuneError, match="'adam' .* or 'clone'"):
            ht.DeltaSTNOptimizer(model, base, response_optimizer=bad)  # type: ignore[arg-type]
    for bad in (0.0, -1e-3, float("nan"), "1e-3"):
        with pytest.raises(ht.HyperTuneError, match="response_lr"):
            ht.DeltaSTNOptimizer(model, base, response_lr=bad)  # type: ignore[arg-type]
    assert [list(g["params"]) for g in base.param_groups] == groups


def test_user_optimizer_keeps_only_w0():
    model, opt = _setup("delta")
    held = {id(p) for g in opt.optimizer.param_groups for p in g["params"]}
    assert held == {id(p) for p in model.base_parameters()}
    assert {id(p) for g in opt.response_optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.response_parameters()
    }


@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_state_dict_round_trip_gives_identical_next_steps(mode):
    model_a, opt_a = _setup(mode, seed=0)
    for i in range(3):
        opt_a.train_step(*_batch(i), F.cross_entropy)
        opt_a.val_step(*_batch(50 + i), F.cross_entropy)
    model_b, opt_b = _setup(mode, seed=1)  # different initial weights, overwritten by the load
    model_b.load_state_dict(model_a.state_dict())
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    for i in range(3, 6):
        torch.manual_seed(1000 + i)
        ra = opt_a.train_step(*_batch(i), F.cross_entropy)
        va = opt_a.val_step(*_batch(50 + i), F.cross_entropy)
        torch.manual_seed(1000 + i)
        rb = opt_b.train_step(*_batch(i), F.cross_entropy)
        vb = opt_b.val_step(*_batch(50 + i), F.cross_entropy)
        assert ra.loss == rb.loss and va.loss == vb.loss and ra.hparams == rb.hparams
    _assert_same(_snapshot(model_a), _snapshot(model_b))
    assert opt_b.train_steps == opt_a.train_steps == 6


def test_load_state_dict_refuses_other_layouts_untouched():
    model, opt = _setup("delta")
    opt.train_step(*_batch(0), F.cross_entropy)
    good = opt.state_dict()
    before = _snapshot(model)
    for bad, msg in [
        ({}, "format"),
        ({**good, "version": 99}, "version"),
        ({**good, "mode": "stn"}, "mode"),
        ({**good, "hparam_names": ["x"]}, "tunes"),
    ]:
        with pytest.raises(ht.StateDictError, match=msg):
            opt.load_state_dict(bad)
    _assert_same(before, _snapshot(model))


@pytest.mark.parametrize("where", ["train", "val"])
def test_non_finite_loss_is_refused_and_changes_nothing(where):
    model, opt = _setup("delta")
    opt.train_step(*_batch(0), F.cross_entropy)
    before = _snapshot(model)
    state = copy.deepcopy(opt.optimizer.state_dict())

    def nan_loss(out, y):
        return F.cross_entropy(out, y) * float("nan")

    step = opt.train_step if where == "train" else opt.val_step
    with pytest.raises(ht.NonFiniteLossError, match="nonfinite='skip'"):
        step(*_batch(1), nan_loss)
    _assert_same(before, _snapshot(model))
    assert str(opt.optimizer.state_dict()) == str(state)


def test_non_finite_steps_can_be_skipped_and_counted():
    model, opt = _setup("delta", nonfinite="skip")
    before = _snapshot(model)
    r = opt.train_step(*_batch(1), lambda o, y: F.cross_entropy(o, y) * float("inf"))
    # One refused train_step is one skipped step, though both its parts were refused.
    assert r.skipped and not r.updated and opt.skipped_steps == 1 and opt.train_steps == 0
    # Running statistics are restored too: a refused step leaves the whole state as it was.
    _assert_same(before, _snapshot(model))


def test_float64_model_gets_float64_hyperstate():
    model = ht.HyperModel.wrap(_net(0, torch.float64), {"wd": ht.WeightDecay()})
    assert model.hparams.unconstrained.dtype == torch.float64
    opt = ht.DeltaSTNOptimizer(model, torch.optim.Adam(model.parameters(), lr=1e-3))
    x, y = _batch(0)
    opt.train_step(x.double(), y, F.cross_entropy)
    opt.val_step(x.double(), y, F.cross_entropy)
    assert all(p.dtype == torch.float64 for p in model.parameters())


def test_warmup_val_steps_do_not_move_lambda():
    model, opt = _setup("delta", warmup_steps=2)
    u = model.hparams.unconstrained.detach().clone()
    opt.train_step(*_batch(0), F.cross_entropy)
    v = opt.val_step(*_batch(1), F.cross_entropy)
    assert not v.updated and torch.equal(u, model.hparams.unconstrained.detach())
    opt.train_step(*_batch(2), F.cross_entropy)
    assert opt.val_step(*_batch(3), F.cross_entropy).updated


def test_inputs_as_tuple_and_dict():
    class TwoInputs(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(2, 3)

        def forward(self, x, z):
            return self.a(x) + self.b(z)

    model = ht.HyperModel.wrap(TwoInputs(), {"wd": ht.WeightDecay()})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x, z, y = torch.randn(8, 4), torch.randn(8, 2), torch.randint(0, 3, (8,))
    opt.train_step((x, z), y, F.cross_entropy)
    opt.train_step({"x": x, "z": z}, y, F.cross_entropy)
    opt.val_step((x, z), y, F.cross_entropy)


def test_bad_optimizer_arguments_are_refused_and_leave_optimizer_alone():
    model = ht.HyperModel.wrap(_net(0), {"wd": ht.WeightDecay()})
    with pytest.raises(ht.HyperTuneError, match="mode"):
        ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ht.HyperTuneError, match="LBFGS"):
        ht.DeltaSTNOptimizer(model, torch.optim.LBFGS(model.parameters()))
    with pytest.raises(ht.HyperTuneError, match="HyperModel.wrap"):
        ht.DeltaSTNOptimizer(_net(0), torch.optim.SGD(_net(0).parameters(), lr=0.1))
    stranger = nn.Parameter(torch.zeros(2))
    foreign = torch.optim.SGD([*model.parameters(), stranger], lr=0.1)
    groups = [list(g["params"]) for g in foreign.param_groups]
    with pytest.raises(ht.HyperTuneError, match="does not own"):
        ht.DeltaSTNOptimizer(model, foreign)
    assert [list(g["params"]) for g in foreign.param_groups] == groups
    partial = torch.optim.SGD(list(model.module[0].parameters()), lr=0.1)
    with pytest.raises(ht.HyperTuneError, match="never train"):
        ht.DeltaSTNOptimizer(model, partial)
    with pytest.raises(ht.HyperTuneError, match="nonfinite"):
        ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), nonfinite="ignore")  # type: ignore[arg-type]


def test_loss_fn_must_return_scalar():
    model, opt = _setup("delta")
    with pytest.raises(ht.HyperTuneError, match="scalar"):
        opt.train_step(*_batch(0), lambda o, y: F.cross_entropy(o, y, reduction="none"))


def test_model_mode_is_restored():
    model, opt = _setup("delta")
    model.eval()
    opt.train_step(*_batch(0), F.cross_entropy)
    assert not model.training and not any(m.training for m in model.modules())
    model.train()
    opt.val_step(*_batch(0), F.cross_entropy)
    assert model.training and all(m.training for m in model.modules())


def test_response_every_skips_theta_steps_and_fraction_takes_leading_rows():
    model = ht.HyperModel.wrap(_net(0), {"drop": ht.DropoutRate(init=0.2)})
    opt = ht.DeltaSTNOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.05), response_every=2, response_fraction=0.25
    )
    seen: list[tuple[int, int]] = []
    rows: list[int] = []
    model.module.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))

    def loss_fn(out, y):
        seen.append((out.shape[0], y.shape[0]))
        return F.cross_entropy(out, y)

    theta = [p.detach().clone() for p in model.response_parameters()]
    r0 = opt.train_step(*_batch(0, n=32), loss_fn)
    # The w₀ part sees the whole batch, the Θ part its leading quarter (the first perturbed pass
    # is preceded by the layout probes of hypertune.rows.LayoutGuide: the first example alone,
    # then the first two, no loss).
    assert seen == [(32, 32), (8, 8)] and rows == [32, 1, 2, 8] and r0.response_loss is not None
    theta1 = [p.detach().clone() for p in model.response_parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(theta, theta1))
    r1 = opt.train_step(*_batch(1, n=32), loss_fn)
    assert seen[2:] == [(32, 32)] and r1.response_loss is None
    assert all(torch.equal(a, p) for a, p in zip(theta1, model.response_parameters()))
    for bad in ({"response_every": 0}, {"response_fraction": 0.0}, {"response_fraction": 1.5}):
        with pytest.raises(ht.HyperTuneError):
            ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), **bad)


def test_hyper_layers_used_functionally_are_refused_on_the_first_step():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(6, 6)
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            return self.head(F.linear(x, self.proj.weight, self.proj.bias))

    model = ht.HyperModel.wrap(Functional(), {"wd": ht.WeightDecay()})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = _snapshot(model)
    with pytest.raises(ht.HyperTuneError, match=r"exclude=\['proj'\]"):
        opt.train_step(*_batch(0), F.cross_entropy)
    _assert_same(before, _snapshot(model))
    assert opt.train_steps == 0


def test_hyper_layers_a_step_does_not_use_are_not_an_error():
    """A branch the batch does not take (an expert no example is routed to, a head the forward
    skips) is not a weight read around the layer: the step runs, says so once, and that layer's
    Θ learns on the first step that calls it."""

    class Routed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = nn.Linear(6, 2)
            self.experts = nn.ModuleList([nn.Linear(6, 3), nn.Linear(6, 3)])
            self.unused_head = nn.Linear(6, 1)
            self.drop = nn.Dropout(0.1)

        def forward(self, x):
            choice = self.router(x).argmax(-1)
            out = x.new_zeros(x.shape[0], 3)
            for e, expert in enumerate(self.experts):
                rows = (choice == e).nonzero().flatten()
                if rows.numel():
                    out = out.index_add(0, rows, expert(self.drop(x[rows])))
            return out + 0 * self.router(x).sum(-1, keepdim=True)

    torch.manual_seed(0)
    net = Routed()
    with torch.no_grad():  # the router sends every example to expert 0
        net.router.weight.zero_()
        net.router.bias.copy_(torch.tensor([1.0, 0.0]))
    # (no weight decay: its penalty on w₀ + Θε would train every layer's Θ, called or not)
    model = ht.HyperModel.wrap(net, {"dropout": ht.DropoutRate()})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), response_every=1)
    theta = {path: [p.detach().clone() for p in layer.response_parameters()] for path, layer in model.hyper_layers().items()}
    with pytest.warns(ht.WrapNotice, match=r"did not call hyper-layer\(s\) experts\.1, unused_head"):
        result = opt.train_step(*_batch(0), F.cross_entropy)
    assert not result.skipped and opt.train_steps == 1
    layers = model.hyper_layers()
    for path in ("experts.1", "unused_head"):
        assert all(torch.equal(a, b) for a, b in zip(theta[path], layers[path].response_parameters())), path
    assert any(not torch.equal(a, b) for a, b in zip(theta["experts.0"], layers["experts.0"].response_parameters()))
    with torch.no_grad():  # now expert 1 takes every example
        net.router.bias.copy_(torch.tensor([0.0, 1.0]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ht.WrapNotice)  # the notice is for the first step only
        opt.train_step(*_batch(1), F.cross_entropy)
    assert any(not torch.equal(a, b) for a, b in zip(theta["experts.1"], layers["experts.1"].response_parameters()))


def test_an_eval_forward_that_breaks_its_own_backward_is_refused_with_the_fix():
    """val_step differentiates through eval mode; a model that overwrites, in eval mode only, a
    tensor its backward needs (a cache, as Hugging Face's RWKV keeps) gets one message naming
    the fix, and the step changes nothing."""

    class EvalInPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.drop, self.head = nn.Linear(6, 8), nn.Dropout(0.1), nn.Linear(8, 3)

        def forward(self, x):
            h = torch.sigmoid(self.fc(x))
            if not self.training:
                h.mul_(1.0)  # sigmoid's backward needs its output as it was
            return self.head(self.drop(h))

    model = ht.HyperModel.wrap(EvalInPlace(), {"dropout": ht.DropoutRate()})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    opt.train_step(*_batch(0), F.cross_entropy)
    before = _snapshot(model)
    with pytest.raises(ht.HyperTuneError, match="use_cache=False") as err:
        opt.val_step(*_batch(1), F.cross_entropy)
    assert "out of place" in str(err.value)
    _assert_same(before, _snapshot(model))
    assert opt.val_steps == 0


def test_an_optimizer_decaying_the_tuned_weights_itself_is_named():
    """AdamW decays every weight by 0.01 unless told otherwise: on top of a tuned WeightDecay
    that is a second, fixed decay, which a user switching optimizers should hear about once."""

    def wrapped():
        net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3))
        return ht.HyperModel.wrap(net, {"dropout": ht.DropoutRate(), "wd": ht.WeightDecay()})

    model = wrapped()
    with pytest.warns(ht.WrapNotice, match=r"AdamW's own weight_decay \(0\.01\) also applies to 2 parameter"):
        ht.DeltaSTNOptimizer(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    model = wrapped()
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    quiet = [  # no decay at all; decay only where WeightDecay does not reach (biases)
        torch.optim.SGD(model.parameters(), lr=0.1),
        torch.optim.AdamW([{"params": weights, "weight_decay": 0.0}, {"params": biases, "weight_decay": 0.1}], lr=1e-3),
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ht.WrapNotice)
        for opt in quiet:
            ht.DeltaSTNOptimizer(model, opt)


class _NoJvpReLU(torch.autograd.Function):
    """A user's custom op with a backward but no jvp, and a backward that cannot itself be
    differentiated: neither forward-mode AD nor hypertune's double-vjp can linearize it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(min=0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x > 0)


class _NoJvp(nn.Module):
    def forward(self, x):
        return _NoJvpReLU.apply(x)


def test_missing_forward_derivative_names_the_fix():
    net = nn.Sequential(nn.Linear(6, 8), _NoJvp(), nn.Linear(8, 3))
    model = ht.HyperModel.wrap(net, {"wd": ht.WeightDecay()})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    theta = [p.detach().clone() for p in model.response_parameters()]
    with pytest.raises(ht.HyperTuneError, match="mode='centered'"):
        opt.train_step(*_batch(0), F.cross_entropy)
    assert all(torch.equal(a, p) for a, p in zip(theta, model.response_parameters()))
    other = ht.HyperModel.wrap(nn.Sequential(nn.Linear(6, 8), _NoJvp(), nn.Linear(8, 3)), {"wd": ht.WeightDecay()})
    centered = ht.DeltaSTNOptimizer(other, torch.optim.SGD(other.parameters(), lr=0.1), mode="centered")
    assert math.isfinite(centered.train_step(*_batch(0), F.cross_entropy).loss)
