"""A step writes hypertune's own state and nothing else, and a refused step puts back all of it.

Cases a plain training loop handles without thought: an input batch that requires grad, a target
that still carries a graph (a teacher's logits), a buffer the forward replaces instead of writing
in place, a buffer that starts being written late, a loss function that is wrong for a val step,
inputs whose first tensor is not the batch, a scheduler attached after the optimizer, and a layer
frozen after the optimizer was built.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3))


def _tuned(net: nn.Module, **kwargs) -> tuple[ht.HyperModel, ht.DeltaSTNOptimizer]:
    hm = ht.HyperModel.wrap(net, {"drop": ht.DropoutRate(init=0.1), "wd": ht.WeightDecay(init=1e-3)})
    return hm, ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1), **kwargs)


def _nan_loss(out: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, t) * float("nan")


# ---- gradients land on hypertune's parameters only ------------------------------------------------
@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_an_input_that_requires_grad_gets_no_gradient_from_any_step(mode):
    hm, opt = _tuned(_net(), mode=mode)
    x, y = torch.randn(8, 4, requires_grad=True), torch.randint(0, 3, (8,))
    opt.train_step(x, y, F.cross_entropy)
    opt.val_step(x, y, F.cross_entropy)
    with pytest.raises(ht.NonFiniteLossError):
        opt.train_step(x, y, _nan_loss)
    assert x.grad is None
    assert all(p.grad is None for p in hm.parameters())


def test_a_target_with_a_graph_trains_like_a_detached_one_and_its_graph_is_left_alone():
    """Distillation from a teacher's logits computed without no_grad: train_step runs two
    backward passes (w₀, Θ); neither may walk (and free) the teacher's graph or write its .grad."""
    kd = lambda out, t: F.kl_div(F.log_softmax(out, -1), F.softmax(t, -1), reduction="batchmean")
    x = torch.randn(8, 4)
    results = []
    for detach in (False, True):
        torch.manual_seed(1)
        teacher = nn.Linear(4, 3)
        hm, opt = _tuned(_net())
        soft = teacher(x)
        for _ in range(3):
            opt.train_step(x, soft.detach() if detach else soft, kd)
        assert teacher.weight.grad is None
        results.append([p.detach().clone() for p in hm.parameters()])
        if not detach:
            soft.sum().backward()  # the graph is intact: the user can still use it
            assert teacher.weight.grad is not None
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_backward_that_raises_leaves_no_partial_gradients():
    hm, opt = _tuned(_net())

    class Boom(torch.autograd.Function):
        @staticmethod
        def forward(ctx, t):
            return t.clone()

        @staticmethod
        def backward(ctx, g):
            raise RuntimeError("boom in backward")

    loss = lambda out, t: F.cross_entropy(out, t) + Boom.apply(out).sum() * 0
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = [p.detach().clone() for p in hm.parameters()]
    for step in (lambda: opt.train_step(x, y, loss), lambda: opt.val_step(x, y, loss)):
        with pytest.raises(RuntimeError, match="boom in backward"):
            step()
        assert all(p.grad is None for p in hm.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, hm.parameters()))


# ---- buffers --------------------------------------------------------------------------------------
class _Reassigns(nn.Module):
    """Keeps a running mean by reassignment, as functional code does."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _net()
        self.register_buffer("ema", torch.zeros(3))

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.ema = 0.9 * self.ema + 0.1 * out.detach().mean(0)
        return out


class _WritesLate(nn.Module):
    """Starts writing its buffer in place after ``after`` training forwards."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.net = _net()
        self.register_buffer("ema", torch.zeros(3))
        self.after = after
        self.calls = 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                self.ema.mul_(0.9).add_(0.1 * out.detach().mean(0))
        return out


@pytest.mark.parametrize("warm", [0, 3])
def test_a_refused_step_puts_back_a_buffer_the_forward_reassigned(warm):
    hm, opt = _tuned(_Reassigns())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    for _ in range(warm):
        opt.train_step(x, y, F.cross_entropy)
    before = hm.module.ema
    snapshot = before.clone()
    with pytest.raises(ht.NonFiniteLossError) as info:
        opt.train_step(x, y, _nan_loss)
    assert hm.module.ema is before and torch.equal(hm.module.ema, snapshot)
    assert not getattr(info.value, "__notes__", None)
    opt.train_step(x, y, F.cross_entropy)  # and a taken step still updates it
    assert not torch.equal(hm.module.ema, snapshot)


def test_a_buffer_first_written_on_a_refused_step_is_named_then_snapshotted():
    # Steps 1-2: a Θ step on step 1 (response_every=3) makes 3 training forwards before step 3.
    hm, opt = _tuned(_WritesLate(after=3))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt.train_step(x, y, F.cross_entropy)
    opt.train_step(x, y, F.cross_entropy)
    assert torch.equal(hm.module.ema, torch.zeros(3))
    with pytest.raises(ht.NonFiniteLossError) as info:
        opt.train_step(x, y, _nan_loss)  # the 4th forward: the buffer's first write
    assert any("module.ema" in note for note in info.value.__notes__)
    assert not torch.equal(hm.module.ema, torch.zeros(3))  # said, not hidden
    written = hm.module.ema.clone()
    with pytest.raises(ht.NonFiniteLossError) as again:
        opt.train_step(x, y, _nan_loss)
    assert torch.equal(hm.module.ema, written)  # known now: put back
    assert not getattr(again.value, "__notes__", None)


def test_a_skipped_step_says_which_buffer_it_could_not_put_back():
    hm, opt = _tuned(_WritesLate(after=3), nonfinite="skip")
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt.train_step(x, y, F.cross_entropy)
    opt.train_step(x, y, F.cross_entropy)
    with pytest.warns(ht.WrapNotice, match="module.ema"):
        r = opt.train_step(x, y, _nan_loss)
    assert r.skipped


# ---- the val step checks its loss as the train step does ------------------------------------------
@pytest.mark.parametrize("warmup", [0, 5])
@pytest.mark.parametrize(
    "loss_fn, message",
    [
        (lambda out, t: F.cross_entropy(out, t, reduction="none"), "scalar tensor"),
        (lambda out, t: None, "scalar tensor"),
    ],
)
def test_val_step_refuses_a_loss_that_is_not_a_scalar_tensor(loss_fn, message, warmup):
    hm, opt = _tuned(_net(), warmup_steps=warmup)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(ht.HyperTuneError, match=message):
        opt.val_step(x, y, loss_fn)


def test_val_step_refuses_a_detached_loss_and_changes_nothing():
    hm, opt = _tuned(_net())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    lam = hm.hparams.unconstrained.detach().clone()
    with pytest.raises(ht.HyperTuneError, match="does not depend on the model's output.*hyperparameters"):
        opt.val_step(x, y, lambda out, t: F.cross_entropy(out.detach(), t))
    assert torch.equal(hm.hparams.unconstrained, lam) and opt.val_steps == 0


# ---- which input is the batch ---------------------------------------------------------------------
class _Keyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x, table=None, temperature=None):
        out = self.net(x)
        return out if temperature is None else out / temperature


def test_a_scalar_or_a_small_table_before_the_batch_does_not_set_the_batch_size():
    hm, opt = _tuned(_Keyword())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fall-back to per-batch perturbation
        opt.train_step({"temperature": torch.tensor(2.0), "x": x}, y, F.cross_entropy)
        opt.train_step({"table": torch.randn(5, 3), "x": x}, y, F.cross_entropy)
    assert hm.perturbed_per_batch is None
    assert hm.batch_rows((), {"table": torch.randn(5, 3), "x": x}, y) == 8
    # without a target that says otherwise, the first batched tensor decides, as before
    assert hm.batch_rows((), {"table": torch.randn(5, 3), "x": x}) == 5
    assert hm.batch_rows((torch.randn(6, 4), torch.randn(2, 6, 4)), None, torch.zeros(6 * 4)) == 6


# ---- learning rates follow the user's schedule, whatever the construction order -------------------
@pytest.mark.parametrize("scheduler", ["onecycle", "linear_warmup"])
def test_theta_follows_a_scheduler_built_before_or_after_the_optimizer_alike(scheduler):
    def build(order: str) -> list[float]:
        hm = ht.HyperModel.wrap(_net(), {"drop": ht.DropoutRate(init=0.1)})
        base = torch.optim.SGD(hm.parameters(), lr=0.1)

        def attach(opt):
            if scheduler == "onecycle":
                return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=20)
            return torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=5)

        sched = attach(base) if order == "before" else None
        opt = ht.DeltaSTNOptimizer(hm, base)
        sched = sched or attach(opt.optimizer)
        lrs = []
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        for _ in range(8):
            opt.train_step(x, y, F.cross_entropy)
            lrs.append(opt.response_optimizer.param_groups[0]["lr"])
            sched.step()
        return lrs

    before, after = build("before"), build("after")
    assert before == after
    assert max(before) <= ht.optim.delta_stn.DEFAULT_RESPONSE_LR * (1 + 1e-9)  # never above response_lr


# ---- a layer frozen after the optimizer was built --------------------------------------------------
def test_a_hyper_layer_frozen_after_the_optimizer_was_built_is_refused_at_the_next_step():
    hm, opt = _tuned(_net())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    opt.train_step(x, y, F.cross_entropy)
    hm.module[0].weight.requires_grad_(False)
    state = [p.detach().clone() for p in hm.parameters()]
    for step in (opt.train_step, opt.val_step):
        with pytest.raises(ht.HyperTuneError, match=r"hyper-layer\(s\) \['0'\] were frozen.*unwrap"):
            step(x, y, F.cross_entropy)
    assert all(torch.equal(a, p) for a, p in zip(state, hm.parameters()))


def test_the_fix_for_an_optimizer_over_part_of_the_model_is_one_that_is_accepted():
    hm = ht.HyperModel.wrap(_net(), {"drop": ht.DropoutRate(init=0.1)})
    with pytest.raises(ht.HyperTuneError, match="freeze the rest before wrapping") as info:
        ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.module[3].parameters(), lr=0.1))
    assert "plain = model.unwrap()" in str(info.value)
    # what it says: unwrap, freeze, wrap again; the frozen layer stays w₀ and the head trains
    plain = hm.unwrap()
    plain[0].requires_grad_(False)
    hm = ht.HyperModel.wrap(plain, {"drop": ht.DropoutRate(init=0.1)})
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD([p for p in hm.parameters() if p.requires_grad], lr=0.1))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    frozen = hm.module[0].weight.detach().clone()
    opt.train_step(x, y, F.cross_entropy)
    opt.val_step(x, y, F.cross_entropy)
    assert torch.equal(hm.module[0].weight, frozen)


# ---- float16 -------------------------------------------------------------------------------------
def test_a_float16_model_is_told_that_lambda_will_barely_move():
    hm = ht.HyperModel.wrap(_net().half(), {"drop": ht.DropoutRate(init=0.1)})
    with pytest.warns(ht.WrapNotice, match="float16.*autocast=torch.float16"):
        ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1))
    hm = ht.HyperModel.wrap(_net().bfloat16(), {"drop": ht.DropoutRate(init=0.1)})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1))


def test_response_fraction_refuses_a_bool():
    hm = ht.HyperModel.wrap(_net(), {"drop": ht.DropoutRate(init=0.1)})
    with pytest.raises(ht.HyperTuneError, match="response_fraction=True"):
        ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1), response_fraction=True)


def test_a_list_given_as_the_inputs_gets_a_hint_when_the_model_rejects_it():
    hm, opt = _tuned(_net())
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    with pytest.raises(TypeError) as info:
        opt.train_step([x], y, F.cross_entropy)
    assert any("pass several positional arguments as a tuple" in n for n in info.value.__notes__)


def test_a_refused_first_step_puts_back_a_wrapped_optimizers_state():
    """timm's Lookahead keeps its state in the SGD it wraps: the first step's snapshot saw none,
    so momentum buffers and the lookahead counter written by a refused step stayed."""
    timm_optim = pytest.importorskip("timm.optim")
    hm = ht.HyperModel.wrap(_net(), {"drop": ht.DropoutRate(init=0.1)})
    sgd = torch.optim.SGD(hm.parameters(), lr=1e38, momentum=0.9)  # the update overflows to inf
    opt = ht.DeltaSTNOptimizer(hm, timm_optim.Lookahead(sgd, k=2))
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    before = {k: v.clone() for k, v in hm.state_dict().items()}
    with pytest.raises(ht.NonFiniteLossError, match="left a non-finite value"):
        opt.train_step(x, y, lambda o, t: 1e3 * F.cross_entropy(o, t))
    assert all(torch.equal(before[k], v) for k, v in hm.state_dict().items())
    assert len(sgd.state) == 0 and sgd.param_groups[0]["lookahead_step"] == 0
    assert opt.optimizer.param_groups is sgd.param_groups  # still linked


class _Adapter(nn.Module):
    """What peft's LoRA does to a Linear: a new module holding the old one as base_layer."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base_layer = base
        self.lora = nn.Linear(base.in_features, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora(x)


def test_modules_replaced_after_wrapping_are_refused_with_the_order_that_works():
    hm = ht.HyperModel.wrap(_net(), {"drop": ht.DropoutRate(init=0.1)})
    hm.module[0] = _Adapter(nn.Linear(4, 8))  # an adapter added to the wrapped model
    with pytest.raises(ht.HyperTuneError, match=r"hyper-layer '0' is no longer where wrap put it .*then wrap"):
        ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1))
    outer = nn.Sequential(ht.HyperModel.wrap(_net(), {"drop": ht.DropoutRate(init=0.1)}))
    with pytest.raises(ht.HyperTuneError, match=r"sits inside Sequential \(at '0'\).*applied after HyperModel.wrap"):
        ht.DeltaSTNOptimizer(outer, torch.optim.SGD(outer.parameters(), lr=0.1))
