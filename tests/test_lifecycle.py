"""A run's life cycle around the steps: resuming only into the specs the run used, schedules and
plots that skip what skipped steps did not do, the global best-response's inputs, and the
command lines of the demo and the examples refusing bad arguments before any work.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune import checkpoint
from hypertune.logging import progress_summary
from hypertune.plotting import _moving_average
from hypertune.schedule import Schedule

ROOT = Path(__file__).resolve().parents[1]


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 3))


def _batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def _run(spec: ht.HParam, steps: int = 3) -> tuple[ht.HyperModel, ht.DeltaSTNOptimizer]:
    hm = ht.HyperModel.wrap(_net(), {"drop": spec})
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05))
    for i in range(steps):
        opt.train_step(*_batch(i), F.cross_entropy)
        opt.val_step(*_batch(100 + i), F.cross_entropy)
    return hm, opt


# ---- resuming into other specs -------------------------------------------------------------------
@pytest.mark.parametrize(
    "other, message",
    [
        (ht.DropoutRate(init=0.2, high=0.5), r"another spec \(high: 0.95 vs 0.5\)"),
        (ht.InputDropout(init=0.2), r"saved as a 'dropout' spec and is a 'input_dropout' one"),
    ],
)
def test_a_checkpoint_or_state_of_other_specs_is_refused(tmp_path, other, message):
    """λ is saved on the tuning scale: with other bounds it would resume at another rate (0.105
    instead of 0.2 for high 0.95 -> 0.5), silently."""
    hm, opt = _run(ht.DropoutRate(init=0.2))
    path = tmp_path / "run.pt"
    checkpoint.save(path, model=hm, optimizer=opt)
    state = opt.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hm2 = ht.HyperModel.wrap(_net(), {"drop": other})
    opt2 = ht.DeltaSTNOptimizer(hm2, torch.optim.SGD(hm2.parameters(), lr=0.05))
    before = hm2.hparams.unconstrained.detach().clone()
    with pytest.raises(ht.StateDictError, match=message):
        checkpoint.load(path, model=hm2, optimizer=opt2)
    with pytest.raises(ht.StateDictError, match=message):
        opt2.load_state_dict(state)
    assert torch.equal(hm2.hparams.unconstrained, before)


def test_another_init_resumes_since_the_saved_value_replaces_it(tmp_path):
    hm, opt = _run(ht.DropoutRate(init=0.2))
    path = tmp_path / "run.pt"
    checkpoint.save(path, model=hm, optimizer=opt)
    hm2 = ht.HyperModel.wrap(_net(), {"drop": ht.DropoutRate(init=0.3)})
    opt2 = ht.DeltaSTNOptimizer(hm2, torch.optim.SGD(hm2.parameters(), lr=0.05))
    checkpoint.load(path, model=hm2, optimizer=opt2)
    assert torch.equal(hm2.hparams.unconstrained, hm.hparams.unconstrained)


def test_a_checkpoint_is_refused_for_a_model_still_on_the_meta_device(tmp_path):
    hm, opt = _run(ht.DropoutRate(init=0.2))
    path = tmp_path / "run.pt"
    checkpoint.save(path, model=hm, optimizer=opt)
    with torch.device("meta"):
        net = _net()
    meta = ht.HyperModel.wrap(net, {"drop": ht.DropoutRate(init=0.2)})
    with pytest.raises(ht.StateDictError, match=r"meta device.*to_empty"):
        checkpoint.load(path, model=meta)


# ---- skipped steps in schedules, plots and progress ----------------------------------------------
def test_a_schedule_holds_the_values_each_taken_step_ran_at_around_skipped_steps():
    hm = ht.HyperModel.wrap(_net(), {"drop": ht.DropoutRate(init=0.2)})
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05), nonfinite="skip", hyper_lr=0.5)
    used = {}
    for i in range(6):
        x, y = _batch(i)
        if i in (2, 3):
            x[0, 0] = float("nan")  # skipped train steps, right after a val step
        before = hm.hparam_values()["drop"]
        if not opt.train_step(x, y, F.cross_entropy).skipped:
            used[opt.train_steps - 1] = before
        opt.val_step(*_batch(100 + i), F.cross_entropy)
    assert opt.skipped_steps == 2
    schedule = Schedule.from_optimizer(opt)
    assert {k: schedule.at(k)["drop"] for k in used} == used


def test_moving_averages_and_progress_leave_out_a_skipped_steps_nan_loss():
    values = [1.0, 2.0, float("nan"), 3.0, float("inf"), 4.0, 5.0]
    assert _moving_average(values, 3) == pytest.approx([1.0, 1.5, 1.5, 2.5, 3.0, 3.5, 4.5])
    assert math.isnan(_moving_average([float("nan")], 3)[0])
    hm = ht.HyperModel.wrap(_net(), {"drop": ht.DropoutRate(init=0.2)})
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05), nonfinite="skip")
    losses = []
    for i in range(4):
        x, y = _batch(i)
        if i == 1:
            x[0, 0] = float("nan")
        r = opt.train_step(x, y, F.cross_entropy)
        if not r.skipped:
            losses.append(r.loss)
    shown = float(progress_summary(opt, window=10)["loss"])
    assert shown == pytest.approx(sum(losses) / len(losses), rel=1e-2)


# ---- the global best-response's inputs -----------------------------------------------------------
def _global() -> ht.GlobalBestResponse:
    torch.manual_seed(0)
    return ht.GlobalBestResponse.wrap(
        _net(), {"drop": ht.DropoutRate(0.2), "wd": ht.WeightDecay(1e-3)}, prior={"drop": (0.05, 0.8), "wd": (1e-5, 1e-1)}
    )


def test_the_global_best_response_refuses_bad_values_and_use_after_unwrap():
    g = _global()
    val = [_batch(0)]
    with pytest.raises(ht.HyperTuneError, match="no validation batches"):
        g.optimize([], F.cross_entropy, steps=3)
    for values, message in (({"drop": 1.5, "wd": 1e-3}, "drop=1.5 lies outside"), ({"drop": 0.1, "wd": -1.0}, "wd=-1.0 lies outside")):
        with pytest.raises(ht.HyperTuneError, match=message):
            g.evaluate(values, val, F.cross_entropy)
    weights = [p.detach().clone() for p in g.parameters()]
    with pytest.raises(ht.HyperTuneError, match="drop=nan"):
        g.unwrap_at({"drop": float("nan"), "wd": 1e-3})
    assert all(torch.equal(a, b) for a, b in zip(weights, g.parameters()))  # nothing baked
    sgd = torch.optim.SGD(g.parameters(), lr=0.1)
    g.unwrap_at({"drop": 0.1, "wd": 1e-3})
    with pytest.raises(ht.HyperTuneError, match="was unwrapped"):
        g.train_step(*val[0], F.cross_entropy, sgd)
    with pytest.raises(ht.HyperTuneError, match="was unwrapped"):
        g.parameters()


# ---- schedule files --------------------------------------------------------------------------------
def test_malformed_schedule_files_are_refused_with_the_file_named(tmp_path):
    bad_json = tmp_path / "s.json"
    bad_json.write_text('{"format": "hypertune.Schedule", "version": 1, "values": {}}')
    with pytest.raises(ht.HyperTuneError, match=r"s\.json.*lacks its 'steps'"):
        Schedule.from_json(bad_json)
    short = tmp_path / "short.csv"
    short.write_text("step,wd\n0,0.1\n5\n")
    with pytest.raises(ht.HyperTuneError, match=r"line 3: 1 fields"):
        Schedule.from_csv(short)
    words = tmp_path / "words.csv"
    words.write_text("step,wd\n0,high\n")
    with pytest.raises(ht.HyperTuneError, match="not a number"):
        Schedule.from_csv(words)
    with pytest.raises(ht.HyperTuneError, match="not finite at step"):
        Schedule([0, 2], {"wd": [1e-3, float("nan")]})


# ---- command lines -------------------------------------------------------------------------------
@pytest.mark.parametrize("flag", ["--batch-size", "--print-every", "--epochs"])
def test_the_demo_refuses_non_positive_counts(flag, capsys):
    from hypertune import demo

    with pytest.raises(SystemExit) as info:
        demo.main([flag, "0"])
    assert info.value.code == 2 and "must be at least 1" in capsys.readouterr().err


def test_an_example_checks_its_output_folder_before_training(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import _common
    finally:
        sys.path.pop(0)
    parser = _common.base_parser("x", epochs=1, batch_size=8, lr=0.1, warmup_epochs=0)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit):
        parser.parse_args(["--out", str(blocker / "sub")])
    assert "cannot write to" in capsys.readouterr().err
    made = parser.parse_args(["--out", str(tmp_path / "new" / "dir")]).out
    assert made.is_dir() and not any(made.iterdir())


def test_a_checkpoint_with_accumulated_micro_batches_pending_is_refused(tmp_path):
    """The accumulated sum lives outside the optimizer's state: saved mid-accumulation, a resumed
    run silently lost those micro-batches (its weights differed by 1e-2 from the uninterrupted run)."""
    from hypertune.integrations.accumulation import GradientAccumulation

    hm = ht.HyperModel.wrap(_net(), {"drop": ht.DropoutRate(init=0.2)})
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05))
    with GradientAccumulation(opt) as accumulation:
        opt.train_step(*_batch(0), F.cross_entropy)
        with pytest.raises(ht.HyperTuneError, match=r"1 accumulated micro-batch.*flush\(\) before"):
            checkpoint.save(tmp_path / "run.pt", model=hm, optimizer=opt)
        assert not (tmp_path / "run.pt").exists()
        accumulation.flush()
        checkpoint.save(tmp_path / "run.pt", model=hm, optimizer=opt)  # between updates: fine


class _RaisingSGD(torch.optim.SGD):
    """Writes half its parameters, then raises (as an optimizer meeting an unsupported case would)."""

    def step(self, closure=None):  # type: ignore[override]
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        with torch.no_grad():
            for p in params[: len(params) // 2]:
                p.add_(1.0)
        raise RuntimeError("inner step failed")


class _NaNAdam(torch.optim.Adam):
    """An Adam whose first update leaves NaN in its state (a running square that overflowed)."""

    def step(self, closure=None):  # type: ignore[override]
        super().step(closure)
        for s in self.state.values():
            s["exp_avg_sq"].fill_(float("nan"))


@pytest.mark.parametrize("inner", [_RaisingSGD, _NaNAdam])
def test_the_first_accumulated_flush_is_all_or_nothing(inner):
    """train_step's first step is snapshotted and checked after writing; a flush under gradient
    accumulation is that first write, and it was neither: a raising inner optimizer left half the
    weights moved and the micro-batches dropped, and a NaN in Adam's state went through."""
    from hypertune.integrations.accumulation import GradientAccumulation

    torch.manual_seed(0)
    hm = ht.HyperModel.wrap(_net(), {"drop": ht.DropoutRate(init=0.2)})
    opt = ht.DeltaSTNOptimizer(hm, inner(hm.parameters(), lr=0.05), response_every=1)
    before = {k: v.clone() for k, v in hm.state_dict().items()}
    with GradientAccumulation(opt) as accumulation:
        opt.train_step(*_batch(0), F.cross_entropy)
        opt.train_step(*_batch(1), F.cross_entropy)
        theta = accumulation.response.optimizer  # Θ's real optimizer
        theta_state = {k: v.clone() for k, v in _flat(theta.state).items()}
        with pytest.raises((RuntimeError, ht.NonFiniteLossError)) as caught:
            accumulation.flush()
        if inner is _NaNAdam:
            assert "put back" in str(caught.value) and "2 micro-batch(es) stay pending" in str(caught.value)
        for k, v in hm.state_dict().items():
            assert torch.equal(v, before[k]), k
        assert not opt.optimizer.state  # the weights' optimizer state is as before: empty
        after = _flat(theta.state)
        assert after.keys() == theta_state.keys() and all(torch.equal(after[k], v) for k, v in theta_state.items())
        assert accumulation.pending == 2  # nothing dropped: the user can lower the rate and flush again
        for group in opt.optimizer.param_groups:
            assert all(p.grad is None for p in group["params"])


def _flat(state: dict) -> dict:
    return {(id(p), k): v for p, s in state.items() for k, v in s.items() if torch.is_tensor(v)}
