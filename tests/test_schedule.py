"""Schedule export and replay: step semantics, file round trips, and a plain model driven by it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune.history import History, Record
from hypertune.model import InputDropoutHook
from hypertune.schedule import Schedule, ScheduleReplayer


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 16)
        self.drop1 = nn.Dropout(0.1)
        self.fc2 = nn.Linear(16, 16)
        self.drop2 = nn.Dropout(0.1)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.drop1(torch.relu(self.fc1(x)))
        return self.head(self.drop2(torch.relu(self.fc2(x))))


SPECS = {
    "input_dropout": ht.InputDropout(init=0.1),
    "dropout": ht.DropoutRate(init=0.2, per_site=True),
    "wd": ht.WeightDecay(init=1e-3),
}


def _run(steps: int = 12, val_every: int = 3):
    torch.manual_seed(0)
    model = ht.HyperModel.wrap(Net(), SPECS)
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), hyper_lr=0.1)
    g = torch.Generator().manual_seed(0)
    used = []  # the values each train step ran at, read off the model before the step
    for i in range(steps):
        used.append(model.hparam_values())
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.train_step(x, y, F.cross_entropy)
        if (i + 1) % val_every == 0:
            opt.val_step(x, y, F.cross_entropy)
    return model, opt, used


@pytest.fixture(scope="module")
def run():
    """One short run shared by the tests that only read it."""
    return _run()


def test_schedule_gives_the_values_each_train_step_used(run):
    model, opt, used = run
    s = Schedule.from_optimizer(opt)
    assert s.total_steps == 12
    assert s.steps == [0, 3, 6, 9, 12]  # λ only changes at the val steps
    for i, values in enumerate(used):
        assert s.at(i) == values
    assert s.final() == model.hparam_values()  # includes the last val step, after train step 12
    assert s.at(10**6) == s.final() and s.at(-5) == s.initial()
    meta = s.meta["dropout:drop1"]
    assert {k: meta[k] for k in ("kind", "modules")} == {"kind": "dropout", "modules": ["drop1"]}
    # the spec itself is saved, so a reload never guesses the kind from the name
    assert ht.hparam_from_json(meta["spec"]) == model.hparams.specs["dropout:drop1"]
    assert s.meta["input_dropout"]["kind"] == "input_dropout"
    assert s.meta["wd"]["params"] == ["fc1.weight", "fc2.weight", "head.weight"]  # not biases


def test_json_and_csv_round_trips(tmp_path, run):
    _, opt, _ = run
    s = Schedule.from_optimizer(opt)
    assert Schedule.from_json(s.to_json(tmp_path / "s.json")) == s
    back = Schedule.from_csv(s.to_csv(tmp_path / "s.csv"), meta=s.meta, total_steps=s.total_steps)
    assert back == s
    with pytest.raises(ht.HyperTuneError, match="not a schedule CSV"):
        Schedule.from_csv(s.to_json(tmp_path / "bad.csv"))


def test_stretched_keeps_fractions():
    s = Schedule([0, 5, 10], {"d": [0.1, 0.2, 0.3]}, total_steps=20)
    t = s.stretched(40)
    assert t.steps == [0, 10, 20] and t.total_steps == 40
    assert t.at(19) == {"d": 0.2} and t.at(39) == {"d": 0.3}
    u = s.stretched(2)  # several changes on one step: the latest wins
    assert u.steps == [0, 1] and u.at(0) == {"d": 0.2} and u.at(1) == {"d": 0.3}
    with pytest.raises(ht.HyperTuneError):
        Schedule([1, 2], {"d": [0.1, 0.2]})


def test_replay_on_a_fresh_model_sets_dropout_input_dropout_and_weight_decay(run):
    _, opt, used = run
    s = Schedule.from_optimizer(opt)
    fresh = Net()
    replayer = ScheduleReplayer(s, fresh)
    optimizer = torch.optim.SGD(replayer.param_groups(), lr=0.1, momentum=0.9)
    decayed = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert decayed == {id(fresh.fc1.weight), id(fresh.fc2.weight), id(fresh.head.weight)}
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    hooks = [h for h in fresh._forward_pre_hooks.values() if isinstance(h, InputDropoutHook)]
    assert len(hooks) == 1  # a fresh model gets the input-dropout hook
    for i in (0, 4, 11):
        values = replayer.apply(i, optimizer)
        assert values == used[i]
        assert fresh.drop1.p == pytest.approx(used[i]["dropout:drop1"])
        assert fresh.drop2.p == pytest.approx(used[i]["dropout:drop2"])
        assert hooks[0].rate == pytest.approx(used[i]["input_dropout"])
        assert optimizer.param_groups[0]["weight_decay"] == pytest.approx(used[i]["wd"])
    assert replayer.unapplied == []


def test_replay_on_the_unwrapped_model_reuses_its_hook_and_penalty_matches_training():
    model, opt, _ = _run()
    s = Schedule.from_optimizer(opt)
    point = model.current_point()
    expected = float(model.training_penalty(point).mean().detach())
    plain = model.unwrap()
    replayer = ScheduleReplayer(s, plain)
    hooks = [h for h in plain._forward_pre_hooks.values() if isinstance(h, InputDropoutHook)]
    assert len(hooks) == 1
    replayer.apply(s.total_steps)
    assert float(replayer.penalty().detach()) == pytest.approx(expected, rel=1e-5)


def test_replay_with_sgd_weight_decay_equals_the_penalty_in_the_loss():
    """group weight_decay = c is the same update as adding c/2·||w||² to the loss."""
    s = Schedule.constant({"wd": 3e-2}, {"wd": {"kind": "weight_decay", "params": ["fc1.weight", "fc2.weight", "head.weight"]}})
    torch.manual_seed(1)
    a = Net().eval()
    b = copy.deepcopy(a)
    ra, rb = ScheduleReplayer(s, a), ScheduleReplayer(s, b)
    oa = torch.optim.SGD(ra.param_groups(), lr=0.1, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.1, momentum=0.9)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    for step in range(5):
        ra.apply(step, oa)
        rb.apply(step)
        oa.zero_grad(); F.cross_entropy(a(x), y).backward(); oa.step()
        ob.zero_grad(); (F.cross_entropy(b(x), y) + rb.penalty()).backward(); ob.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_replayer_refusals():
    _, opt, _ = _run(3)
    s = Schedule.from_optimizer(opt)
    model = ht.HyperModel.wrap(Net(), SPECS)
    with pytest.raises(ht.HyperTuneError, match="plain model"):
        ScheduleReplayer(s, model)
    other = nn.Sequential(nn.Linear(5, 3))
    with pytest.raises(ht.HyperTuneError) as err:
        ScheduleReplayer(s, other)
    assert "no module 'drop1'" in str(err.value) and "fc1.weight" in str(err.value)
    replayer = ScheduleReplayer(s, Net())
    untagged = torch.optim.SGD(Net().parameters(), lr=0.1)
    with pytest.raises(ht.HyperTuneError, match="param_groups"):
        replayer.apply(0, untagged)
    # A CSV schedule has no module information: say how to get it, or take it from modules=.
    bare = Schedule(s.steps, {"dropout:drop1": s.values["dropout:drop1"]})
    with pytest.raises(ht.HyperTuneError, match="which dropout modules"):
        ScheduleReplayer(bare, Net())
    net = Net()
    ScheduleReplayer(bare, net, modules={"dropout:drop1": ["drop1", "drop2"]}).apply(0)
    assert net.drop1.p == net.drop2.p == pytest.approx(s.values["dropout:drop1"][0])


def test_from_history_without_model_and_generic_values_are_returned():
    h = History()
    for step, v in ((1, 0.5), (2, 0.5), (3, 0.7)):
        h.append(Record(step, "train", 1.0, {"temperature": v}, {"temperature": 1.0}))
    s = Schedule.from_history(h)
    assert s.steps == [0, 2] and s.meta == {"temperature": {"kind": "hparam"}}
    r = ScheduleReplayer(s, Net())
    assert r.unapplied == ["temperature"] and r.apply(2) == {"temperature": 0.7}
    with pytest.raises(ht.HyperTuneError, match="empty"):
        Schedule.from_history(History())


@pytest.mark.slow
def test_replay_benchmark_runs_on_fashionmnist(tmp_path):
    """benchmarks/replay_schedule.py end to end at a tiny budget (real data, ~1 min)."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    data = root.parent / "shared" / "datasets"
    if not (data / "FashionMNIST").exists():
        pytest.skip(f"FashionMNIST not under {data}")
    spec = importlib.util.spec_from_file_location("replay_schedule", root / "benchmarks" / "replay_schedule.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main([
        "--data-root", str(data), "--train-size", "400", "--tune-size", "200", "--epochs", "2",
        "--batch-size", "50", "--warmup-steps", "4", "--replay-seeds", "0",
        "--json", str(tmp_path / "r.json"), "--schedule-out", str(tmp_path / "s.json"),
    ])
    schedule = Schedule.from_json(tmp_path / "s.json")
    assert schedule.total_steps == out["total_steps"] == 16
    assert set(out["summary"]) == {"schedule", "final", "untuned"}
    assert all(0 < s["test_loss_mean"] < 5 for s in out["summary"].values())
