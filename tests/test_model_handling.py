"""What PyTorch users do with a model object around wrapping: load a pretrained checkpoint into
it, initialise it with ``apply``, run its inner module directly, freeze parts of it, checkpoint
activations. Each test failed before the fix it guards."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import hypertune as ht
from hypertune.errors import PerturbationError


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3))


def _batch(i: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _wrap(net: nn.Module) -> ht.HyperModel:
    return ht.HyperModel.wrap(net, {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3)})


# ---- a plain (pretrained) state dict ---------------------------------------------------------------
def test_a_plain_state_dict_loads_into_w0_and_leaves_theta_and_lambda():
    """The usual fine-tuning call, model.load_state_dict(pretrained), loaded nothing (strict=False)
    or refused (strict=True): the wrapped keys carry ``module.`` and Θ's keys."""
    pretrained = _net(1).state_dict()
    hm = _wrap(_net(2))
    with torch.no_grad():
        for layer in hm.hyper_layers().values():
            layer.hyper_projection.weight.normal_()
    theta = [p.clone() for p in hm.response_parameters()]
    lam = hm.hparams.unconstrained.clone()
    result = hm.load_state_dict(pretrained)
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in pretrained.items():
        assert torch.equal(hm.module.state_dict()[k], v), k
    assert all(torch.equal(a, b) for a, b in zip(theta, hm.response_parameters()))
    assert torch.equal(lam, hm.hparams.unconstrained)
    # and the model trains on from there
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05))
    opt.train_step(*_batch(), F.cross_entropy)


def test_a_partial_plain_state_dict_loads_what_matches_only_when_not_strict():
    backbone = {k: v for k, v in _net(1).state_dict().items() if k.startswith("0.")}
    backbone["extra.weight"] = torch.zeros(2)
    hm = _wrap(_net(2))
    before = {k: v.clone() for k, v in hm.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"missing key\(s\): \['3.bias', '3.weight'\].*unexpected key\(s\): \['extra.weight'\].*Nothing was loaded"):
        hm.load_state_dict(backbone)
    assert all(torch.equal(v, before[k]) for k, v in hm.state_dict().items())
    result = hm.load_state_dict(backbone, strict=False)
    assert result.missing_keys == ["3.bias", "3.weight"] and result.unexpected_keys == ["extra.weight"]
    assert torch.equal(hm.module[0].weight, backbone["0.weight"])
    assert torch.equal(hm.module[3].weight, before["module.3.weight"])


def test_wrapped_and_inner_module_state_dicts_load():
    a, b = _wrap(_net(1)), _wrap(_net(2))
    with torch.no_grad():
        a.hparams.unconstrained.add_(0.3)
        for layer in a.hyper_layers().values():
            layer.hyper_projection.weight.normal_()
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    c = _wrap(_net(3))
    c.load_state_dict(a.module.state_dict())  # the inner module's own, Θ included
    assert all(torch.equal(v, c.module.state_dict()[k]) for k, v in a.module.state_dict().items())
    with pytest.raises(RuntimeError, match="Unexpected key"):
        c.load_state_dict({"nothing.like.this": torch.zeros(1)})


# ---- init functions applied to the whole model -----------------------------------------------------
def test_apply_with_a_linear_init_leaves_the_projection_alone():
    """hyper_projection was an nn.Linear without bias: an init picking nn.Linear layers crashed on
    its bias halfway through, and HF-style normal_ inits made P non-zero."""
    hm = _wrap(_net())

    def init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    hm.apply(init)
    for layer in hm.hyper_layers().values():
        assert torch.count_nonzero(layer.hyper_projection.weight) == 0
        assert torch.count_nonzero(layer.bias) == 0 and layer.weight.std() < 0.05
    hm.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") and m is not hm else None)
    assert all(torch.count_nonzero(layer.hyper_projection.weight) == 0 for layer in hm.hyper_layers().values())


def test_the_projection_draws_what_nn_linear_drew():
    """Seeded runs recorded before the projection had its own class stay reproducible."""
    torch.manual_seed(0)
    _wrap(_net())
    after = torch.rand(3)
    torch.manual_seed(0)
    net = _net()
    for layer in (net[0], net[3]):  # what wrap drew per layer: W_resp, b_resp, then nn.Linear(2, n)
        nn.init.kaiming_uniform_(torch.empty_like(layer.weight), a=5**0.5)
        torch.empty_like(layer.bias).uniform_()
        nn.Linear(2, layer.weight.shape[0] + layer.bias.numel(), bias=False)
    assert torch.equal(after, torch.rand(3))


# ---- the inner module run directly --------------------------------------------------------------
@pytest.mark.parametrize("train", [False, True])
def test_stn_mode_refuses_the_inner_module_run_alone(train):
    """In STN mode w₀ alone is not the trained model: ``model.module(x)`` (and HF's
    ``model.module.generate``) silently gave its outputs, 3 off the model's own."""
    hm = _wrap(_net())
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05), mode="stn")
    with torch.no_grad():
        for layer in hm.hyper_layers().values():
            layer.hyper_projection.weight.normal_()
    opt.train_step(*_batch(), F.cross_entropy)
    hm.train(train)
    x = _batch(1)[0]
    with pytest.raises(PerturbationError, match="STN mode.*unwrap"):
        hm.module(x)
    hm.eval()
    expected = hm(x)
    torch.testing.assert_close(copy.deepcopy(hm).unwrap()(x), expected)


def test_the_inner_module_runs_alone_in_the_centered_modes():
    hm = _wrap(_net())
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05))
    opt.train_step(*_batch(), F.cross_entropy)
    hm.eval()
    x = _batch(1)[0]
    assert torch.equal(hm.module(x), hm(x))


# ---- frozen hypertune parameters, reentrant checkpointing --------------------------------------------
def test_frozen_lambda_or_theta_is_refused_with_the_fix():
    """After model.requires_grad_(False), unfreezing only model.module left λ frozen: val_step
    blamed coverage (which was 100%), and a frozen Θ was silently never stepped."""
    hm = _wrap(_net())
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05))
    before = {k: v.clone() for k, v in hm.state_dict().items()}
    hm.requires_grad_(False)
    hm.module.requires_grad_(True)
    with pytest.raises(ht.HyperTuneError, match=r"hparams.requires_grad_\(True\)"):
        opt.train_step(*_batch(), F.cross_entropy)
    hm.hparams.requires_grad_(True)
    hm.response_parameters()[0].requires_grad_(False)
    with pytest.raises(ht.HyperTuneError, match="λ or Θ"):
        opt.val_step(*_batch(), F.cross_entropy)
    assert all(torch.equal(v, before[k]) for k, v in hm.state_dict().items())
    hm.response_parameters()[0].requires_grad_(True)
    opt.train_step(*_batch(), F.cross_entropy)


def test_reentrant_checkpointing_is_refused_with_the_fix():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Linear(6, 8)
            self.block = nn.Sequential(nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 8), nn.ReLU())
            self.head = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(checkpoint(self.block, self.stem(x), use_reentrant=True))

    torch.manual_seed(0)
    hm = ht.HyperModel.wrap(Net(), {"drop": ht.DropoutRate(init=0.1)})
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05))
    before = {k: v.clone() for k, v in hm.state_dict().items()}
    with pytest.raises(ht.HyperTuneError, match="use_reentrant=True.*turn checkpointing off"):
        opt.train_step(*_batch(), F.cross_entropy)
    assert all(torch.equal(v, before[k]) for k, v in hm.state_dict().items())


# ---- the weights' schedule and the README's clipping pattern -----------------------------------------
def test_lambda_is_held_while_the_weights_learning_rate_is_zero():
    """At the end of a schedule (lr 0) w₀ and Θ stop, and λ kept moving at full speed along a
    hypergradient that no longer changes: weight decay drifted 18× while the model stood still."""
    hm = _wrap(_net())
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05, momentum=0.9), response_every=1)
    for i in range(4):
        opt.train_step(*_batch(i), F.cross_entropy)
        assert opt.val_step(*_batch(100 + i), F.cross_entropy).updated
    for g in opt.optimizer.param_groups:
        g["lr"] = 0.0
    state = {k: v.clone() for k, v in hm.state_dict().items()}
    for i in range(4):
        opt.train_step(*_batch(i), F.cross_entropy)
        result = opt.val_step(*_batch(100 + i), F.cross_entropy)
        assert not result.updated and result.loss > 0
    assert all(torch.equal(v, state[k]) for k, v in hm.state_dict().items())
    for g in opt.optimizer.param_groups:
        g["lr"] = 0.01
    opt.train_step(*_batch(0), F.cross_entropy)
    assert opt.val_step(*_batch(100), F.cross_entropy).updated


@pytest.mark.parametrize("mode", ["delta", "stn"])
def test_the_readme_clipping_hook_clips_what_each_optimizer_steps(mode):
    seen: list[float] = []

    def clip(optimizer, args, kwargs):  # the README's hook
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], 0.1)

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(q) for q in grads]))))

    hm = _wrap(_net())
    sgd = torch.optim.SGD(hm.parameters(), lr=0.05)
    opt = ht.DeltaSTNOptimizer(hm, sgd, mode=mode)
    for o in [sgd] + ([opt.response_optimizer] if mode == "stn" else []):
        o.register_step_pre_hook(clip)
        o.register_step_pre_hook(record)
    x, y = _batch()
    opt.train_step(x * 100, y, lambda out, t: 1000 * F.cross_entropy(out, t))
    assert len(seen) == (2 if mode == "stn" else 1) and max(seen) <= 0.1 + 1e-6


# ---- what loss_fn and the model's layout may do ----------------------------------------------------
@pytest.mark.parametrize("retain", [True, False])
def test_a_loss_fn_that_runs_its_own_backward_is_refused(retain):
    """With retain_graph=True the step's backward added to the user's: w₀'s SGD step was doubled."""
    hm = _wrap(_net())
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1))
    before = {k: v.clone() for k, v in hm.state_dict().items()}

    def loss_fn(out, y):
        loss = F.cross_entropy(out, y)
        loss.backward(retain_graph=retain)
        return loss

    with pytest.raises(ht.HyperTuneError, match=r"without calling \.backward\(\)"):
        opt.train_step(*_batch(), loss_fn)
    assert all(torch.equal(v, before[k]) for k, v in hm.state_dict().items())
    assert all(p.grad is None for p in hm.parameters())


def test_a_non_floating_loss_is_refused_for_what_it_is():
    hm = _wrap(_net())
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1))
    with pytest.raises(ht.HyperTuneError, match="floating-point loss, got a torch.int64"):
        opt.train_step(*_batch(), lambda out, y: (out.argmax(1) != y).sum())


def test_a_sequence_first_lstm_is_perturbed_per_batch_even_when_time_equals_batch():
    """(T, B, E) with T == B: the rows were taken from axis 0, so example i's rate went to time
    step i of every example, silently (shapes cannot tell the two axes apart)."""

    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.LSTM(5, 8)  # batch_first=False
            self.drop = nn.Dropout(0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.drop(self.rnn(x)[0])

    torch.manual_seed(0)
    hm = ht.HyperModel.wrap(Seq(), {"drop": ht.DropoutRate(init=0.1)})
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05), response_every=1)
    with pytest.warns(UserWarning, match="batch_first=False"):
        opt.train_step(torch.randn(4, 4, 5), None, lambda out, _: out.pow(2).mean())
    assert "batch_first=False" in hm.perturbed_per_batch
