"""hypertune.checkpoint: one-call save/load, bit-exact resume in a fresh process, refusals that
change nothing, atomic writes.

Run as a script (``python tests/test_checkpoint.py resume CKPT OUT STEPS THREADS``) it is the
fresh process of the resume test.
"""

from __future__ import annotations

import copy
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune import checkpoint

REPO = Path(__file__).resolve().parents[1]
STEPS, SPLIT = 6, 3


# ---- a small run that uses every RNG -------------------------------------------------------------
def _setup(seed: int = 0, hidden: int = 16, mode: str = "delta", specs: dict | None = None):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(0.1), nn.Linear(hidden, 3))
    specs = specs if specs is not None else {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3)}
    model = ht.HyperModel.wrap(net, specs)
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), mode=mode)
    sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=2, gamma=0.5)
    return model, opt, sched


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


def _step(i: int, opt, sched) -> None:
    # The batch depends on Python's and numpy's RNG, the noise and dropout on torch's.
    g = torch.Generator().manual_seed(random.randrange(10**6) + int(np.random.randint(1000)))
    x, y = torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)
    opt.train_step(x, y, F.cross_entropy)
    if i % 2 == 1:
        opt.val_step(x + 0.1 * torch.randn_like(x), y, F.cross_entropy)
    sched.step()


def _final(model, opt, sched) -> dict[str, Any]:
    return {
        "model": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "optimizer": copy.deepcopy(opt.state_dict()),
        "scheduler": sched.state_dict(),
        "rng": (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()),
    }


def _assert_equal(a: Any, b: Any, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _resume_in_this_process(path: str, out: str, steps: int) -> None:
    _seed_everything(12345)  # a different state everywhere: load must restore all of it
    model, opt, sched = _setup(seed=7)
    extra = checkpoint.load(path, model=model, optimizer=opt, schedulers=[sched])
    for i in range(extra["step"], steps):
        _step(i, opt, sched)
    torch.save(_final(model, opt, sched), out)


# ---- resume --------------------------------------------------------------------------------------
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path):
    _seed_everything(0)
    model, opt, sched = _setup()
    for i in range(STEPS):
        _step(i, opt, sched)
    straight = _final(model, opt, sched)

    _seed_everything(0)
    model, opt, sched = _setup()
    for i in range(SPLIT):
        _step(i, opt, sched)
    ckpt = tmp_path / "run.pt"
    checkpoint.save(ckpt, model=model, optimizer=opt, schedulers=[sched], extra={"step": SPLIT})
    del model, opt, sched

    out = tmp_path / "resumed.pt"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, __file__, "resume", str(ckpt), str(out), str(STEPS), str(torch.get_num_threads())],
        check=True, env=env, timeout=300,
    )
    resumed = torch.load(out, weights_only=False)
    _assert_equal(straight, resumed)
    assert resumed["optimizer"]["counters"]["train_steps"] == STEPS
    assert len(resumed["optimizer"]["history"]["records"]) == STEPS + STEPS // 2


def test_checkpoint_holds_everything(tmp_path):
    model, opt, sched = _setup()
    _step(1, opt, sched)
    checkpoint.save(tmp_path / "c.pt", model=torch.compile(model), optimizer=opt, schedulers=[sched], extra={"epoch": 3})
    ck = torch.load(tmp_path / "c.pt", weights_only=True)  # plain data: safe to load
    assert ck["format"] == checkpoint.FORMAT and ck["version"] == checkpoint.VERSION
    assert ck["fingerprint"]["hparams"] == ["drop", "wd"]
    assert "hparams.unconstrained" in ck["model"] and "module.0.response_weight" in ck["model"]  # no _orig_mod.
    assert set(ck["optimizer"]) >= {"optimizer", "response_optimizer", "hyper_optimizer", "counters", "history"}
    assert set(ck["rng"][0]) >= {"torch", "numpy", "python"}
    assert ck["extra"] == {"epoch": 3} and ck["scheduler_classes"] == ["StepLR"]
    assert not [p for p in os.listdir(tmp_path) if p != "c.pt"]  # no temporary file left


# ---- refusals ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    model, opt, sched = _setup()
    _step(1, opt, sched)
    path = tmp_path_factory.mktemp("good") / "good.pt"
    checkpoint.save(path, model=model, optimizer=opt, schedulers=[sched])
    return path.read_bytes()


@pytest.fixture
def saved(good_checkpoint, tmp_path):
    path = tmp_path / "good.pt"
    path.write_bytes(good_checkpoint)
    return path, torch.load(path, weights_only=True)


def _everything(model, opt, sched):
    return copy.deepcopy((_final(model, opt, sched), opt.train_steps))


@pytest.mark.parametrize(
    "case,match",
    [
        ("not_a_checkpoint", "not a hypertune checkpoint"),
        ("bare_optimizer_state", "bare DeltaSTNOptimizer.state_dict"),
        ("older_layout", "layout version 0"),
        ("other_width", "different model.*shape"),
        ("other_hparams", "different model.*tunes"),
        ("other_mode", "mode="),
        ("other_schedulers", "schedulers"),
        ("other_groups", "parameter groups"),
    ],
)
def test_mismatched_checkpoints_are_refused_before_anything_changes(saved, tmp_path, case, match):
    path, ck = saved
    kwargs: dict[str, Any] = {}
    if case == "not_a_checkpoint":
        model, opt, sched = _setup(seed=3)
        torch.save({"model": model.state_dict()}, path)
    elif case == "bare_optimizer_state":
        model, opt, sched = _setup(seed=3)
        torch.save(ck["optimizer"], path)
    elif case == "older_layout":
        model, opt, sched = _setup(seed=3)
        torch.save({**ck, "version": 0}, path)
    elif case == "other_width":
        model, opt, sched = _setup(seed=3, hidden=8)
    elif case == "other_hparams":
        model, opt, sched = _setup(seed=3, specs={"dropout": ht.DropoutRate(), "decay": ht.WeightDecay()})
    elif case == "other_mode":
        model, opt, sched = _setup(seed=3, mode="centered")
    elif case == "other_schedulers":
        model, opt, sched = _setup(seed=3)
        kwargs["schedulers"] = []
    else:
        model, opt, sched = _setup(seed=3)
        groups = [{"params": [p]} for p in model.base_parameters()]
        opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(groups, lr=0.05))
        sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=2)
    kwargs.setdefault("schedulers", [sched])
    _step(0, opt, sched)
    before = _everything(model, opt, sched)
    with pytest.raises(ht.StateDictError, match=match) as err:
        checkpoint.load(path, model=model, optimizer=opt, **kwargs)
    assert "nothing was loaded" in str(err.value) or "hypertune checkpoint" in str(err.value)
    _assert_equal(before, _everything(model, opt, sched))


def test_a_failure_while_applying_puts_everything_back(saved, monkeypatch):
    path, _ = saved
    model, opt, sched = _setup(seed=3)
    _step(0, opt, sched)
    before = _everything(model, opt, sched)

    # Patched on the class: some torch versions put every instance attribute in state_dict.
    cls = type(sched)
    real = cls.load_state_dict

    def broken(self, state):
        monkeypatch.setattr(cls, "load_state_dict", real)  # fail once, not while putting back
        raise RuntimeError("disk gremlin")

    monkeypatch.setattr(cls, "load_state_dict", broken)  # fails after model and optimizer loaded
    with pytest.raises(ht.StateDictError, match="put back"):
        checkpoint.load(path, model=model, optimizer=opt, schedulers=[sched])
    monkeypatch.undo()
    _assert_equal(before, _everything(model, opt, sched))


def test_a_failed_save_leaves_the_previous_checkpoint_intact(saved):
    path, ck = saved
    model, opt, sched = _setup()
    with pytest.raises(Exception):
        checkpoint.save(path, model=model, optimizer=opt, schedulers=[sched], extra={"f": lambda: 0})
    _assert_equal(ck, torch.load(path, weights_only=True))
    assert os.listdir(path.parent) == [path.name]


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "resume":
    torch.set_num_threads(int(sys.argv[5]))
    _resume_in_this_process(sys.argv[2], sys.argv[3], int(sys.argv[4]))
