"""Hyperparameter kinds as classes: one class owns claim, install, act, fixed form and serial form.

A new kind written here (input noise) works end to end — wrap, train, schedule, replay, plot
panel, JSON — with no other file touched; old schedules (kind names only) still load.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune.kinds import Claim, FixedForm, HParam, Installation, kind_class
from hypertune.plotting import group_hparams
from hypertune.schedule import Schedule, ScheduleReplayer


# ---- a new kind: one class, one registration --------------------------------------------------------
@ht.register_hparam_kind
@dataclass(frozen=True)
class InputNoise(HParam):
    """Gaussian noise of std σ added to the model's input in training (per example)."""

    init: float = 0.1
    low: float = 0.0
    high: float = 2.0

    kind: ClassVar[str] = "input_noise"
    panel: ClassVar[str | None] = "Input noise"
    baked_by_unwrap: ClassVar[bool] = True
    read_in_forward: ClassVar[bool] = False

    def install(self, name: str, claim: Claim, into: Installation) -> None:
        def transform(inputs: Any, point: Any) -> Any:
            (x, *rest), kwargs = inputs
            std = point.value(name).detach().reshape(-1, *([1] * (x.dim() - 1)))
            return (x + std * torch.randn_like(x), *rest), kwargs

        into.input_transforms.append((0, transform))

    def fixed_form(self, model: nn.Module, where: Mapping[str, Any], value: float) -> FixedForm | None:
        return FixedInputNoise(model, value)


class FixedInputNoise(FixedForm):
    def __init__(self, model: nn.Module, value: float) -> None:
        self.handle = model.register_forward_pre_hook(self._hook)
        self.set_value(value)

    def _hook(self, module: nn.Module, args: tuple) -> tuple | None:
        if not module.training:
            return None
        return (args[0] + self.value * torch.randn_like(args[0]), *args[1:])

    def remove(self) -> None:
        self.handle.remove()


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def test_a_new_kind_works_end_to_end():
    torch.manual_seed(0)
    hm = ht.HyperModel.wrap(_net(), {"noise": InputNoise(), "drop": ht.DropoutRate(), "wd": ht.WeightDecay()})
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1), warmup_steps=0)
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    for _ in range(4):
        opt.train_step(x, y, F.cross_entropy)
        opt.val_step(x, y, F.cross_entropy)
    assert hm.hparam_values()["noise"] != pytest.approx(0.1)
    # training passes see noise, eval passes do not
    hm.eval()
    assert torch.equal(hm(x), hm(x))
    hm.train()
    assert not torch.equal(hm(x), hm(x))
    schedule = Schedule.from_optimizer(opt)
    assert schedule.meta["noise"]["kind"] == "input_noise"
    assert group_hparams(hm.hparams.names, hm.hparams.specs)["Input noise"] == ["noise"]
    # JSON round trip: the kind comes back from the saved spec, not from the name
    back = Schedule.from_state_dict(json.loads(json.dumps(schedule.state_dict())))
    assert ht.hparam_from_json(back.meta["noise"]["spec"]) == InputNoise()
    # replay applies its fixed form; unwrap bakes it into the plain model
    plain = _net()
    replayer = ScheduleReplayer(back, plain)
    assert "noise" in replayer.forms and "noise" not in replayer.unapplied
    replayer.apply(3)
    assert replayer.forms["noise"].value == back.at(3)["noise"]
    final = hm.hparam_values()["noise"]
    unwrapped = hm.unwrap()
    hooks = [h for h in unwrapped._forward_pre_hooks.values()]
    assert len(hooks) == 1 and hooks[0].__self__.value == pytest.approx(final)


def test_kind_registry_and_serial_form():
    assert kind_class("dropout") is ht.DropoutRate and kind_class("weight_decay") is ht.WeightDecay
    for spec in [ht.DropoutRate(targets=["drop*", nn.Dropout], per_site=True, locked_dim=1),
                 ht.WeightDecay(init=1e-3, include_bias=True), ht.InputDropout(),
                 ht.DropConnect(), ht.EmbeddingDropout(), ht.VariationalDropout(on="input"),
                 ht.ActivationRegularization(targets=["rnn"]),
                 ht.TemporalActivationRegularization(targets=["rnn"], time_dim=2),
                 ht.HParam(init=1.0, low=0.5, high=4.0, log=True)]:
        data = json.loads(json.dumps(spec.to_json()))
        assert ht.hparam_from_json(data) == spec, spec
    with pytest.raises(ht.SpecError, match="unknown hyperparameter kind"):
        ht.hparam_from_json({"kind": "nope", "init": 1.0})
    with pytest.raises(TypeError, match="own class attribute kind"):

        @ht.register_hparam_kind
        @dataclass(frozen=True)
        class NoKind(HParam):
            pass


def test_old_schedules_without_specs_still_load_and_replay():
    old = {  # the format before kinds were classes: kind names only
        "format": "hypertune.Schedule", "version": 1, "total_steps": 4,
        "hparams": {
            "drop": {"kind": "dropout", "modules": ["2"]},
            "input_dropout": {"kind": "input_dropout"},
            "wd": {"kind": "weight_decay", "log": True, "params": ["0.weight", "3.weight"]},
            "temperature": {"kind": "hparam"},
        },
        "steps": [0, 2],
        "values": {"drop": [0.1, 0.2], "input_dropout": [0.05, 0.06], "wd": [1e-4, 2e-4], "temperature": [1.0, 2.0]},
    }
    schedule = Schedule.from_state_dict(old)
    model = _net()
    replayer = ScheduleReplayer(schedule, model)
    optimizer = torch.optim.SGD(replayer.param_groups(), lr=0.1)
    replayer.apply(2, optimizer)
    assert model[2].p == 0.2
    assert replayer.unapplied == ["temperature"]
    group = next(g for g in optimizer.param_groups if g.get("hparam") == "wd")
    assert group["weight_decay"] == 2e-4 and {id(p) for p in group["params"]} == {id(model[0].weight), id(model[3].weight)}


# ---- the untuned baseline of the examples uses the same fixed forms -----------------------------------
def _common():
    path = Path(__file__).resolve().parents[1] / "examples" / "_common.py"
    spec = importlib.util.spec_from_file_location("_examples_common", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["_examples_common"] = module
    spec.loader.exec_module(module)
    return module


class LM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.rnn = nn.LSTM(6, 6, batch_first=True)
        self.drop = nn.Dropout(0.3)
        self.out = nn.Linear(6, 20)

    def forward(self, ids):
        h, _ = self.rnn(self.emb(ids))
        return self.out(self.drop(h))


def test_untuned_baseline_applies_each_kind_at_init():
    common = _common()
    model = LM()
    specs = {
        "drop": ht.DropoutRate(init=0.05),
        "word": ht.EmbeddingDropout(init=0.2),
        "wd": ht.WeightDecay(init=0.5),
        "ar": ht.ActivationRegularization(init=2.0, targets=["rnn"]),
        "dc": ht.DropConnect(),
    }
    fixed = common.FixedRegularizers(model, specs)
    assert model.drop.p == 0.05
    assert fixed.skipped == ["dc"]  # DropConnect has no plain form
    ids = torch.randint(0, 20, (4, 5))
    seen: list[torch.Tensor] = []
    model.rnn.register_forward_hook(lambda m, a, out: seen.append(out[0].detach()))
    model.train()
    fixed.collecting = True
    model(fixed.transform(ids))
    fixed.collecting = False
    weights = [model.emb.weight, model.rnn.weight_ih_l0, model.rnn.weight_hh_l0, model.out.weight]
    decay = 0.5 * 0.5 * sum(float(w.detach().pow(2).sum()) for w in weights)  # what Δ-STN decays
    ar = 2.0 * float(seen[0].pow(2).mean())
    assert float(fixed.penalty().detach()) == pytest.approx(decay + ar, rel=1e-6)
    assert float(fixed.penalty().detach()) == pytest.approx(decay, rel=1e-6)  # outputs are consumed
