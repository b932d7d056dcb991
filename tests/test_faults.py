"""Fault injection: a process killed inside checkpoint.save, a long run with NaN injected into
batches, losses and gradients, and a training thread next to an evaluating one.

Each has a fast variant in the default suite and a long one marked ``slow``.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht

ROOT = Path(__file__).resolve().parents[1]


# ---- SIGKILL inside checkpoint.save ----------------------------------------------------------------
def _model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))
    model = ht.HyperModel.wrap(net, {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3)})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    return model, opt


def _steps(opt: ht.DeltaSTNOptimizer, start: int, n: int) -> None:
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)
        opt.train_step(x, y, F.cross_entropy)
        opt.val_step(x, y, F.cross_entropy)


def _save_and_hang(path: str, marker: str) -> None:
    """Child process: train further, then save over ``path`` with a torch.save that writes half
    the bytes, announces it, and hangs, so the parent's SIGKILL lands inside the write."""
    import io

    real_save = torch.save

    def half_then_hang(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        Path(marker).write_text(str(len(data)))
        time.sleep(120)

    model, opt = _model_and_optimizer(0)
    _steps(opt, 0, 5)
    torch.save = half_then_hang  # type: ignore[assignment]
    ht.checkpoint.save(path, model=model, optimizer=opt, extra={"step": 5})


def test_sigkill_inside_checkpoint_save_leaves_the_previous_checkpoint_loadable(tmp_path):
    path, marker = tmp_path / "run.pt", tmp_path / "writing"
    model, opt = _model_and_optimizer(0)
    _steps(opt, 0, 2)
    ht.checkpoint.save(path, model=model, optimizer=opt, extra={"step": 2})
    previous = path.read_bytes()

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen(
        [sys.executable, __file__, "save-and-hang", str(path), str(marker)], env=env, cwd=str(ROOT)
    )
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert child.poll() is None, "the child exited before it started writing"
            assert time.time() < deadline, "the child never started writing"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == -signal.SIGKILL
    # The kill landed inside the write: a partial temporary file is left next to the checkpoint.
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".run.pt.") and p.name.endswith(".tmp")]
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < int(marker.read_text())
    assert path.read_bytes() == previous

    fresh, fresh_opt = _model_and_optimizer(1)
    extra = ht.checkpoint.load(path, model=fresh, optimizer=fresh_opt)
    assert extra == {"step": 2}
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    assert fresh_opt.train_steps == 2


# ---- NaN soak ---------------------------------------------------------------------------------------
def _tiny(seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.1), nn.Linear(8, 2))
    model = ht.HyperModel.wrap(net, {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3)})
    with torch.no_grad():
        for layer in model.hyper_layers().values():
            layer.hyper_projection.weight.normal_(0, 0.5)
    opt = ht.DeltaSTNOptimizer(
        model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), nonfinite="skip",
        response_every=1, tune_scales=True,  # every step has a Θ part and moves σ: faults can land anywhere
    )
    return model, opt


def _clean_batch(i: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)


class _GradPoison:
    """Gradient hooks that turn one parameter's gradient into NaN while armed."""

    def __init__(self, params: list[nn.Parameter]) -> None:
        self.armed: set[int] = set()
        for p in params:
            p.register_hook(lambda g, key=id(p): g * float("nan") if key in self.armed else g)


def _soak(steps: int, inject: bool, seed: int = 0) -> tuple[ht.HyperModel, ht.DeltaSTNOptimizer, int]:
    model, opt = _tiny()
    base, response = model.base_parameters(), model.response_parameters()
    poison = _GradPoison([base[0], response[0]])
    rng = random.Random(seed)
    injected = 0
    torch.manual_seed(1234)
    for i in range(steps):
        x, y = _clean_batch(i)
        if inject and rng.random() < 0.2:
            kind = rng.choice(["batch", "loss", "w0_grad", "theta_grad", "val_loss", "val_batch"])
            bad_x, loss = x.clone(), F.cross_entropy
            if kind in ("batch", "val_batch"):
                bad_x[rng.randrange(16), rng.randrange(4)] = float(rng.choice(["nan", "inf"]))
            if kind in ("loss", "val_loss"):
                def loss(o, t):  # noqa: E306 - a NaN loss
                    return F.cross_entropy(o, t) * float("nan")
            if kind == "w0_grad":
                poison.armed = {id(base[0])}
            if kind == "theta_grad":
                poison.armed = {id(response[0])}
            step = opt.val_step if kind.startswith("val") else opt.train_step
            result = step(bad_x, y, loss)
            poison.armed = set()
            assert result.skipped, (i, kind)
            injected += 1
        opt.train_step(x, y, F.cross_entropy)
        if i % 5 == 4:
            opt.val_step(*_clean_batch(10_000 + i), F.cross_entropy)
    return model, opt, injected


def _assert_runs_equal(a: tuple, b: tuple) -> None:
    (ma, oa, _), (mb, ob, injected) = a, b
    for k, v in ma.state_dict().items():
        w = mb.state_dict()[k]
        assert torch.equal(v, w), k
        assert not v.is_floating_point() or torch.isfinite(v).all(), k
    sa, sb = oa.state_dict(), ob.state_dict()
    for key in ("optimizer", "response_optimizer", "hyper_optimizer", "hparams"):
        _assert_tree_equal(sa[key], sb[key], key)
    assert (oa.train_steps, oa.val_steps) == (ob.train_steps, ob.val_steps)
    assert ob.skipped_steps == injected > 0 and oa.skipped_steps == 0
    assert [r for r in ob.history if not r.skipped] == list(oa.history)


def _assert_tree_equal(a: Any, b: Any, where: str) -> None:
    if torch.is_tensor(a):
        assert torch.equal(a, b), where
        assert not a.is_floating_point() or torch.isfinite(a).all(), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_tree_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_tree_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_nan_soak_equals_a_run_that_never_saw_the_bad_steps():
    _assert_runs_equal(_soak(100, inject=False), _soak(100, inject=True))


@pytest.mark.slow
def test_nan_soak_thousands_of_steps():
    _assert_runs_equal(_soak(3000, inject=False), _soak(3000, inject=True, seed=7))


# ---- a training thread and an evaluating thread ------------------------------------------------------
def _train_and_evaluate(steps: int) -> None:
    model, opt = _tiny()
    model.eval()
    torch.manual_seed(3)
    alone_model, alone_opt = _tiny()
    alone_model.eval()

    def train(o: ht.DeltaSTNOptimizer) -> None:
        for i in range(steps):
            o.train_step(*_clean_batch(i), F.cross_entropy)
            if i % 5 == 4:
                o.val_step(*_clean_batch(10_000 + i), F.cross_entropy)

    torch.manual_seed(3)
    train(alone_opt)

    errors: list[BaseException] = []
    seen: list[tuple[torch.Tensor, dict[str, torch.Tensor]]] = []
    calls = 0
    stop = threading.Event()
    x = _clean_batch(-1)[0]

    def evaluate() -> None:
        nonlocal calls
        try:
            while not stop.is_set():
                with model.exclusive(), torch.no_grad():
                    out = model(x)
                    if calls % 25 == 0:
                        seen.append((out, {k: v.clone() for k, v in model.state_dict().items()}))
                assert out.shape == (16, 2) and torch.isfinite(out).all()
                calls += 1
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    t = threading.Thread(target=evaluate)
    t.start()
    torch.manual_seed(3)
    try:
        train(opt)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert calls >= 10  # the evaluating thread got turns between steps
    for k, v in alone_model.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    check, _ = _tiny()
    check.eval()
    for out, weights in seen:
        check.load_state_dict(weights)
        with torch.no_grad():
            assert torch.equal(out, check(x))


def test_training_thread_and_evaluating_thread():
    _train_and_evaluate(60)


@pytest.mark.slow
def test_training_thread_and_evaluating_thread_thousands_of_calls():
    _train_and_evaluate(2000)


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "save-and-hang":
    _save_and_hang(sys.argv[2], sys.argv[3])
