"""Wrap-side reliability (issue 14): bad input gets one clear error and leaves the model as it
was; numbers of any common type are numbers; hooks and unwrap behave.

The table rows are (case, call, error type, message fragment): each call gets a fresh model, must
raise exactly that error naming the problem, and the model must be byte-identical afterwards.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune import DropoutRate, HParam, HyperModel, InputDropout, WeightDecay
from hypertune.notices import WrapNotice


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.norm = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.norm(self.fc1(x)))))


class TokenNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.norm = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids):
        return self.fc(self.norm(self.emb(ids).mean(1)))


def _bytes(model: nn.Module) -> bytes:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.getvalue()


def _structure(model: nn.Module) -> list[tuple[str, type, int]]:
    return [(p, type(m), id(m)) for p, m in model.named_modules(remove_duplicate=False)]


def _first_step(hm: HyperModel, x: Any, y: torch.Tensor) -> None:
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1))
    opt.train_step(x, y, F.cross_entropy)


def _wrapped(factory: Callable[[], nn.Module], hparams: dict) -> Callable[[], HyperModel]:
    """A step case's subject: the wrapped model (the refused step must not change it)."""
    return lambda: HyperModel.wrap(factory(), hparams)


# (case, model factory, call, error type, fragment). Wrap calls are refused before any change;
# step calls are refused at the first train_step, before anything is written.
CASES: list[tuple[str, Callable[[], nn.Module], Callable[[nn.Module], Any], type, str]] = [
    ("targets=5", Net, lambda m: HyperModel.wrap(m, {"wd": WeightDecay()}, targets=5),
     ht.SpecError, "must be a sequence of module-path patterns"),
    ("targets with a number", Net, lambda m: HyperModel.wrap(m, {"wd": WeightDecay()}, targets=["fc1", 5]),
     ht.SpecError, "got an entry int 5"),
    ("exclude=3.5", Net, lambda m: HyperModel.wrap(m, {"wd": WeightDecay()}, exclude=3.5),
     ht.SpecError, "exclude must be a sequence"),
    ("targets naming a foreign module", Net,
     lambda m: HyperModel.wrap(m, {"wd": WeightDecay()}, targets=[nn.Linear(2, 2)]),
     ht.WrapError, "matches no module"),
    ("spec targets as a module object", Net,
     lambda m: HyperModel.wrap(m, {"d": DropoutRate(targets=m.drop)}),
     ht.SpecError, "give its path"),
    ("an HParam nobody reads", _wrapped(Net, {"t": HParam(init=1.0), "wd": WeightDecay()}),
     lambda hm: _first_step(hm, torch.randn(6, 4), torch.randint(0, 3, (6,))),
     ht.HyperTuneError, "no module read hyperparameter(s) ['t']"),
    ("InputDropout on token ids", _wrapped(TokenNet, {"in": InputDropout(), "wd": WeightDecay()}),
     lambda hm: _first_step(hm, torch.randint(0, 10, (6, 5)), torch.randint(0, 3, (6,))),
     ht.HyperTuneError, "EmbeddingDropout"),
    ("InputDropout on a dict of token ids", _wrapped(TokenNet, {"in": InputDropout(), "wd": WeightDecay()}),
     lambda hm: _first_step(hm, {"ids": torch.randint(0, 10, (6, 5))}, torch.randint(0, 3, (6,))),
     ht.HyperTuneError, "integer tensors"),
]


@pytest.mark.parametrize("case, factory, call, error, fragment", CASES, ids=[c[0] for c in CASES])
def test_refusals_are_clear_and_change_nothing(case, factory, call, error, fragment):
    torch.manual_seed(0)
    model = factory()
    before = _bytes(model)
    params = {n: p for n, p in model.named_parameters()}
    with pytest.raises(error) as info:
        call(model)
    assert type(info.value) is error, f"{case}: {type(info.value).__name__}: {info.value}"
    assert fragment in str(info.value), f"{case}: {info.value}"
    assert _bytes(model) == before, case
    assert all(dict(model.named_parameters())[n] is p for n, p in params.items()), case


# ---- numbers of any common type ----------------------------------------------------------------
@pytest.mark.parametrize("init", [np.float32(0.1), np.float64(0.1), torch.tensor(0.1), torch.tensor([0.1]),
                                  np.array(0.1), 0.1])
def test_numpy_and_tensor_numbers_are_numbers(init):
    spec = DropoutRate(init=init, high=np.float32(0.9))
    assert type(spec.init) is float and spec.init == pytest.approx(0.1)
    assert type(spec.high) is float
    hm = HyperModel.wrap(Net(), {"d": spec})
    assert hm.hparam_values()["d"] == pytest.approx(0.1, rel=1e-6)


def test_numpy_integers_and_json_round_trip():
    spec = HParam(init=np.int64(2), low=0, high=np.int32(5), discrete=True)
    assert spec.init == 2.0 and ht.hparam_from_json(spec.to_json()) == spec


# ---- module objects as selectors ----------------------------------------------------------------
def test_a_module_object_is_a_selector_in_wrap():
    model = Net()
    hm = HyperModel.wrap(model, {"wd": WeightDecay()}, targets=[model.fc1])
    assert list(hm.hyper_layers()) == ["fc1"]
    model = Net()
    hm = HyperModel.wrap(model, {"wd": WeightDecay()}, exclude=model.fc2)
    assert list(hm.hyper_layers()) == ["fc1"]


# ---- InputDropout on dict inputs ------------------------------------------------------------------
class DictNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(200, 3)
        self.seen: list[dict] = []

    def forward(self, pixels, mask):
        self.seen.append({"pixels": pixels, "mask": mask})
        return self.fc(pixels * mask)


@pytest.mark.parametrize("as_kwargs", [True, False])
def test_input_dropout_drops_the_floating_tensors_of_a_dict(as_kwargs):
    torch.manual_seed(0)
    net = DictNet()
    hm = HyperModel.wrap(net, {"in": InputDropout(init=0.5)})
    hm.train()
    pixels = torch.ones(8, 200)
    mask = torch.ones(8, 200, dtype=torch.long)
    if as_kwargs:
        hm(pixels=pixels, mask=mask)
    else:
        hm(pixels, mask)
    seen = net.seen[-1]
    kept = (seen["pixels"] != 0).float().mean().item()
    assert 0.4 < kept < 0.6 and set(seen["pixels"].unique().tolist()) <= {0.0, 2.0}
    assert torch.equal(seen["mask"], mask)  # integer tensors pass untouched
    hm.eval()
    hm(pixels=pixels, mask=mask)
    assert torch.equal(net.seen[-1]["pixels"], pixels)


def test_unwrapped_input_dropout_hook_handles_keywords():
    torch.manual_seed(0)
    net = DictNet()
    plain = HyperModel.wrap(net, {"in": InputDropout(init=0.5)}).unwrap()
    plain.train()
    plain(pixels=torch.ones(8, 200), mask=torch.ones(8, 200, dtype=torch.long))
    assert 0.4 < (net.seen[-1]["pixels"] != 0).float().mean().item() < 0.6


# ---- an HParam read by a custom module (the documented use) is accepted ---------------------------
class Tempered(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) / ht.hparam("temperature").unsqueeze(-1)


def test_an_hparam_read_with_hypertune_hparam_is_accepted():
    hm = HyperModel.wrap(Tempered(), {"temperature": HParam(init=1.0, low=0.1, high=10.0)})
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1), warmup_steps=0)
    assert opt.train_step(torch.randn(6, 4), torch.randint(0, 3, (6,)), F.cross_entropy).updated
    assert hm.unread_hparams() == []


# ---- hooks the user made before wrapping ------------------------------------------------------------
def test_hook_handles_made_before_wrap_still_remove_their_hooks():
    model = Net()
    calls: list[str] = []
    h_fc = model.fc1.register_forward_hook(lambda *a: calls.append("fc1"))
    h_drop = model.drop.register_forward_pre_hook(lambda *a: calls.append("drop"))
    h_kw = model.fc2.register_forward_hook(lambda *a, **k: calls.append("fc2"), with_kwargs=True)
    hm = HyperModel.wrap(model, {"d": DropoutRate(), "wd": WeightDecay()})
    hm.eval()
    hm(torch.randn(2, 4))
    assert calls == ["fc1", "drop", "fc2"]  # the hooks came along
    h_fc.remove()
    h_drop.remove()
    calls.clear()
    hm(torch.randn(2, 4))
    assert calls == ["fc2"]
    plain = hm.unwrap().eval()
    calls.clear()
    plain(torch.randn(2, 4))
    assert calls == ["fc2"]
    h_kw.remove()  # a handle made before wrap, removed after unwrap
    calls.clear()
    plain(torch.randn(2, 4))
    assert calls == []


def test_unwrap_twice_returns_the_same_module_and_stacks_no_hooks():
    hm = HyperModel.wrap(Net(), {"in": InputDropout(), "wd": WeightDecay()})
    first = hm.unwrap()
    hooks = dict(first._forward_pre_hooks)
    assert hm.unwrap() is first
    assert dict(first._forward_pre_hooks) == hooks and len(hooks) == 1


# ---- weight decay counts a tied weight once -------------------------------------------------------------
def test_weight_decay_counts_a_tied_weight_once():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, ids):
            return self.out(self.emb(ids))

    model = Tied()
    hm = HyperModel.wrap(model, {"wd": WeightDecay(init=0.5)})
    penalty = hm.training_penalty(hm.current_point())
    expected = 0.5 * 0.5 * model.emb.weight.detach().pow(2).sum()
    torch.testing.assert_close(penalty, expected.reshape(1), rtol=1e-6, atol=0)
    assert ht.Schedule.constant({"wd": 0.5}, hm.describe_hparams()).meta["wd"]["params"] == ["emb.weight"]


# ---- activation checkpointing is refused, with the fix --------------------------------------------------
class CheckpointedBlock(nn.Module):
    """A user forward that runs a block (with a dropout) under torch.utils.checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.utils.checkpoint.checkpoint(self.block, x, use_reentrant=False)
        return self.head(h)


def _snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(before: dict[str, torch.Tensor], module: nn.Module) -> None:
    after = module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_in_the_users_forward_is_refused_during_backward_with_the_fix():
    torch.manual_seed(0)
    model = HyperModel.wrap(CheckpointedBlock(), {"dropout": DropoutRate(init=0.2)})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0)
    before = _snapshot(model)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0])
    with pytest.raises(ht.HyperTuneError, match=r"during backward.*checkpointing.*turn checkpointing off"):
        opt.train_step(x, y, F.cross_entropy)
    _assert_same(before, model)
    assert opt.train_steps == 0


@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_checkpoint_recomputing_a_hyper_layer_is_refused_with_the_fix(mode):
    """Without a tuned dropout in it, the region recomputes without Θ or tangents: torch's
    CheckpointError, turned into one hypertune error with the fix."""
    torch.manual_seed(0)
    model = HyperModel.wrap(CheckpointedBlock(), {"wd": WeightDecay()})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0, mode=mode)
    before = _snapshot(model)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0])
    with pytest.raises(ht.HyperTuneError, match=r"recomputed a region under activation.*gradient_checkpointing_disable"):
        opt.train_step(x, y, F.cross_entropy)
    _assert_same(before, model)


def test_hugging_face_gradient_checkpointing_is_refused_before_the_step():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=16)
    net = transformers.GPT2LMHeadModel(config)
    net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = HyperModel.wrap(net, {"dropout": DropoutRate(init=0.1)})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), warmup_steps=0)
    ids = torch.randint(0, 50, (2, 6))
    loss = lambda out, t: F.cross_entropy(out.logits.flatten(0, 1), t.flatten())  # noqa: E731
    before = _snapshot(model)
    with pytest.raises(ht.HyperTuneError, match=r"checkpointing is on in .*gradient_checkpointing_disable\(\)"):
        opt.train_step({"input_ids": ids}, ids, loss)
    _assert_same(before, model)
    assert opt.val_step({"input_ids": ids}, ids, loss).updated  # evaluation recomputes nothing
    net.gradient_checkpointing_disable()
    assert not opt.train_step({"input_ids": ids}, ids, loss).skipped


# ---- a frozen backbone stays w₀ -------------------------------------------------------------------------
def _frozen_backbone() -> nn.Sequential:
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))
    for p in net[0].parameters():
        p.requires_grad_(False)
    return net


def test_frozen_layers_stay_w0_without_a_notice_and_never_move():
    """A response for weights that cannot train is never followed, and λ's gradient would count it."""
    torch.manual_seed(0)
    net = _frozen_backbone()
    frozen = net[0].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", WrapNotice)  # the user froze it: nothing to tell them
        model = HyperModel.wrap(net, {"dropout": DropoutRate(init=0.1), "wd": WeightDecay()})
    assert list(model.hyper_layers()) == ["3"]
    assert model.coverage().tuned_fraction == 1.0 and "frozen" in model.coverage().untuned["0"]
    assert model.describe_hparams()["wd"]["params"] == ["3.weight"]
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                               warmup_steps=0)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0])
    for _ in range(3):
        opt.train_step(x, y, F.cross_entropy)
    assert opt.val_step(x, y, F.cross_entropy).updated
    assert torch.equal(net[0].weight, frozen)


def test_a_frozen_layer_named_in_targets_is_refused():
    net = _frozen_backbone()
    with pytest.raises(ht.WrapError, match=r"'0' .*frozen \(requires_grad=False\).*unfreeze it"):
        HyperModel.wrap(net, {"wd": WeightDecay()}, targets=["0", "3"])
    assert type(net[0]) is nn.Linear


def test_layers_frozen_after_wrapping_are_refused_by_the_optimizer():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model = HyperModel.wrap(net, {"wd": WeightDecay()})
    for p in net[0].parameters():
        p.requires_grad_(False)
    with pytest.raises(ht.HyperTuneError, match=r"\['0'\] were frozen .*after wrapping.*Freeze before"):
        ht.DeltaSTNOptimizer(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
