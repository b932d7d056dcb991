"""All-or-nothing calls: a refused step, constructor or load leaves every byte as it was.

The tables pair a bad input with the error it must raise (type and a fragment of the message);
every row then checks that the model's state_dict, the optimizer's state_dict (inner optimizers,
λ, σ, counters, History) and the RNG states are exactly what they were before the call.
"""

from __future__ import annotations

import copy
import math
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht

# ---- fixtures ------------------------------------------------------------------------------------


class _Net(nn.Module):
    def __init__(self, hparam_name: str | None = None, fail_perturbed: bool = False) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.1)
        self.b = nn.Linear(16, 3)
        self.hparam_name = hparam_name
        self.fail_perturbed = fail_perturbed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.relu(self.bn(self.a(x))))
        if self.hparam_name is not None:
            h = h * (1 + 0 * ht.hparam(self.hparam_name)[:, None])
        if self.fail_perturbed and ht.hparam("drop").shape[0] > 1:
            # only the perturbed (Θ/STN) pass carries one row per example: it fails after w₀'s part
            raise ValueError("the model refuses perturbed batches")
        return self.b(h)


def _setup(mode: str = "delta", *, seed: int = 0, lr: float = 0.05, net: nn.Module | None = None, **kwargs: Any):
    torch.manual_seed(seed)
    model = ht.HyperModel.wrap(
        net if net is not None else _Net(),
        {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3)},
    )
    with torch.no_grad():  # a non-zero response, so λ's hypergradient is not trivially zero
        for layer in model.hyper_layers().values():
            layer.hyper_projection.weight.normal_(0, 0.5)
    # Every step has a Θ part and moves σ (both off by default), so each refusal is tested where it can bite.
    kwargs = {"response_every": 1, "tune_scales": True, **kwargs}
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9), mode=mode, **kwargs)
    return model, opt


def _batch(seed: int, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _warm(opt: ht.DeltaSTNOptimizer, steps: int = 2) -> None:
    for i in range(steps):
        opt.train_step(*_batch(i), F.cross_entropy)
        opt.val_step(*_batch(50 + i), F.cross_entropy)


def _freeze(x: Any) -> Any:
    """A deep copy of everything, tensors cloned, for exact comparison."""
    if torch.is_tensor(x):
        return x.detach().clone()
    if isinstance(x, dict):
        return {k: _freeze(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_freeze(v) for v in x)
    return copy.deepcopy(x)


def _everything(model: ht.HyperModel, opt: ht.DeltaSTNOptimizer) -> dict[str, Any]:
    return _freeze({
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "rng": torch.get_rng_state(),
        "grads": [p.grad for p in model.parameters()],
        "training": [m.training for m in model.modules()],
    })


def _assert_identical(a: Any, b: Any, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and a.device == b.device, where
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


# ---- steps: bad input -> error, nothing changed --------------------------------------------------
def _nan_on_call(k: int) -> Callable:
    """A loss that is NaN on its k-th call of the step (0: the w₀ part, 1: the Θ part)."""
    calls = []

    def loss(out, y):
        calls.append(1)
        value = F.cross_entropy(out, y)
        return value * float("nan") if len(calls) == k + 1 else value

    return loss


def _raise_on_call(k: int) -> Callable:
    """A loss that raises on its k-th call of the step, after the earlier parts ran."""
    calls = []

    def loss(out, y):
        calls.append(1)
        if len(calls) == k + 1:
            raise RuntimeError("user loss broke")
        return F.cross_entropy(out, y)

    return loss


def _train(loss=F.cross_entropy, batch=None):
    return lambda model, opt: opt.train_step(*(batch or _batch(7)), loss)


def _train_counting(make_loss: Callable[[int], Callable], k: int):
    """A train_step with a fresh call-counting loss (``make_loss(k)``) each time."""
    return lambda model, opt: opt.train_step(*_batch(7), make_loss(k))


def _val(loss=F.cross_entropy, batch=None):
    return lambda model, opt: opt.val_step(*(batch or _batch(8)), loss)


def _under(ctx_factory, step):
    def call(model, opt):
        with ctx_factory():
            return step(model, opt)

    return call


def _x_with_nan():
    x, y = _batch(7)
    x[3, 2] = float("nan")
    return x, y


STEP_CASES: dict[str, tuple[Callable, type[BaseException], str, tuple[str, ...]]] = {
    # name: (call, error, message fragment, modes)
    "nan_in_theta_loss": (_train_counting(_nan_on_call, 1), ht.NonFiniteLossError, "Θ step's loss is nan", ("delta", "centered")),
    "nan_in_w0_loss": (_train_counting(_nan_on_call, 0), ht.NonFiniteLossError, "w₀ step's loss is nan", ("delta", "centered")),
    "nan_in_stn_loss": (_train_counting(_nan_on_call, 0), ht.NonFiniteLossError, "STN step's loss is nan", ("stn",)),
    "nan_in_batch": (_train(batch=_x_with_nan()), ht.NonFiniteLossError, "Nothing was written", ("delta", "centered", "stn")),
    "inf_loss": (_train(lambda o, y: F.cross_entropy(o, y) * float("inf")), ht.NonFiniteLossError, "nonfinite='skip'", ("delta", "stn")),
    "batch_sizes_differ": (_train(batch=(_batch(7)[0], _batch(7)[1][:-1])), ValueError, "batch_size", ("delta", "centered", "stn")),
    "label_out_of_range": (_train(batch=(_batch(7)[0], torch.full((16,), 7))), IndexError, "out of bounds", ("delta", "stn")),
    "non_scalar_loss": (_train(lambda o, y: F.cross_entropy(o, y, reduction="none")), ht.HyperTuneError, "scalar", ("delta", "centered", "stn")),
    "loss_raises_in_theta_part": (_train_counting(_raise_on_call, 1), RuntimeError, "user loss broke", ("delta", "centered")),
    "detached_loss": (_train(lambda o, y: F.cross_entropy(o.detach(), y)), ht.HyperTuneError, "does not depend", ("delta", "stn")),
    "loss_not_a_tensor": (_train(lambda o, y: float(F.cross_entropy(o, y))), ht.HyperTuneError, "scalar tensor", ("delta",)),
    "empty_batch": (_train(batch=(torch.randn(0, 6), torch.zeros(0, dtype=torch.long))), ht.HyperTuneError, "empty", ("delta",)),
    "one_row_through_batchnorm": (_train(batch=_batch(7, n=1)), ValueError, "per channel", ("delta",)),
    "under_no_grad": (_under(torch.no_grad, _train()), ht.HyperTuneError, "torch.no_grad()", ("delta",)),
    "under_inference_mode": (_under(torch.inference_mode, _train()), ht.HyperTuneError, "inference_mode", ("delta",)),
    "no_batched_tensor": (lambda m, o: o.train_step(3.0, _batch(7)[1], F.cross_entropy), ht.HyperTuneError, "batched input", ("delta",)),
    "val_nan_loss": (_val(lambda o, y: F.cross_entropy(o, y) * float("nan")), ht.NonFiniteLossError, "λ step's loss is nan", ("delta", "centered", "stn")),
    "val_loss_raises": (_val(lambda o, y: F.cross_entropy(o, y[:-1])), ValueError, "batch_size", ("delta",)),
    "val_under_no_grad": (_under(torch.no_grad, _val()), ht.HyperTuneError, "val_step computes gradients", ("delta",)),
    # A hypergradient whose square overflows float32: RMSprop's running square becomes inf and
    # λ would silently stay put while val_step reported success.
    "val_rmsprop_overflow": (_val(lambda o, y: F.cross_entropy(o, y) * 1e30), ht.NonFiniteLossError, "overflowed", ("delta", "stn")),
}


@pytest.mark.parametrize(
    "name,mode", [(n, m) for n, case in STEP_CASES.items() for m in case[3]]
)
def test_a_refused_step_changes_nothing(name, mode):
    call, error, fragment, _ = STEP_CASES[name]
    model, opt = _setup(mode)
    _warm(opt)
    before = _everything(model, opt)
    with pytest.raises(error, match=fragment):
        call(model, opt)
    _assert_identical(before, _everything(model, opt))
    # ... and the optimizer still works afterwards.
    opt.train_step(*_batch(9), F.cross_entropy)


def _failing_perturbed_setup(mode):
    return _setup(mode, net=_Net(fail_perturbed=True))


def _typo_setup(mode):
    return _setup(mode, net=_Net(hparam_name="dorp"))


def _diverged_setup(mode):
    model, opt = _setup(mode, lr=1e30)
    opt.train_step(*_batch(0), F.cross_entropy)  # finite gradients, astronomically large weights
    return model, opt


SETUP_CASES: dict[str, tuple[Callable, type[BaseException], str, tuple[str, ...]]] = {
    # The w₀ part runs at λ₀ (one row), the Θ part per example: only the Θ part refuses the batch.
    "model_fails_in_the_perturbed_pass": (_failing_perturbed_setup, ValueError, "refuses perturbed", ("delta", "centered", "stn")),
    "hparam_name_typo": (_typo_setup, KeyError, "no hyperparameter named 'dorp'", ("delta", "stn")),
    "diverging_learning_rate": (_diverged_setup, ht.NonFiniteLossError, "Nothing was written", ("delta", "centered", "stn")),
}


@pytest.mark.parametrize("name,mode", [(n, m) for n, case in SETUP_CASES.items() for m in case[3]])
def test_a_step_refused_by_the_model_changes_nothing(name, mode):
    setup, error, fragment, _ = SETUP_CASES[name]
    model, opt = setup(mode)
    before = _everything(model, opt)
    with pytest.raises(error, match=fragment):
        opt.train_step(*_batch(7), F.cross_entropy)
    _assert_identical(before, _everything(model, opt))


def test_the_error_of_a_rolled_back_step_says_so():
    model, opt = _setup()
    with pytest.raises(ValueError) as err:
        opt.train_step(_batch(7)[0], _batch(7)[1][:-1], F.cross_entropy)
    if sys.version_info >= (3, 11):  # exception notes
        assert any("rolled back" in note for note in err.value.__notes__)


def test_an_optimizer_raising_inside_its_first_step_is_undone():
    class WritesThenRaises(torch.optim.SGD):
        def step(self, closure=None):
            super().step(closure)
            raise RuntimeError("optimizer broke after writing")

    torch.manual_seed(0)
    model = ht.HyperModel.wrap(_Net(), {"drop": ht.DropoutRate(init=0.2)})
    opt = ht.DeltaSTNOptimizer(model, WritesThenRaises(model.parameters(), lr=0.1, momentum=0.9))
    before = _everything(model, opt)
    with pytest.raises(RuntimeError, match="broke after writing"):
        opt.train_step(*_batch(0), F.cross_entropy)
    _assert_identical(before, _everything(model, opt))


@pytest.mark.parametrize("mode", ["delta", "stn"])
def test_skip_counts_one_refused_train_step_once_and_changes_nothing_else(mode):
    model, opt = _setup(mode, nonfinite="skip")
    _warm(opt)
    before = _everything(model, opt)
    records = len(opt.history)
    r = opt.train_step(*_batch(7), lambda o, y: F.cross_entropy(o, y) * float("inf"))
    assert r.skipped and not r.updated and opt.skipped_steps == 1
    after = _everything(model, opt)
    # Only the skip counter and History's record of the skip differ.
    assert len(opt.history) == records + 1 and opt.history.latest().skipped
    for key in ("counters", "history"):
        before["optimizer"].pop(key), after["optimizer"].pop(key)
    _assert_identical(before, after)


# ---- the constructor: every problem at once, the user's optimizer untouched ------------------------
CONSTRUCTOR_CASES = {
    "negative_hyper_lr": ({"hyper_lr": -0.01}, "hyper_lr=-0.01"),
    "nan_hyper_lr": ({"hyper_lr": float("nan")}, "hyper_lr=nan"),
    "bad_entropy_weight": ({"entropy_weight": float("inf")}, "entropy_weight"),
    "bad_response_lr": ({"response_lr": 0.0}, "response_lr=0.0"),
    "response_lr_with_clone": ({"response_lr": 1e-3, "response_optimizer": "clone"}, "drop response_lr"),
    "bool_warmup": ({"warmup_steps": True}, "warmup_steps"),
    "several_at_once": ({"hyper_lr": -1.0, "mode": "fast", "response_every": 0}, "3 problem"),
}


@pytest.mark.parametrize("name", list(CONSTRUCTOR_CASES))
def test_a_refused_constructor_leaves_the_users_optimizer_alone(name):
    kwargs, fragment = CONSTRUCTOR_CASES[name]
    model = ht.HyperModel.wrap(_Net(), {"drop": ht.DropoutRate(init=0.2)})
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    groups = [list(g["params"]) for g in base.param_groups]
    with pytest.raises(ht.HyperTuneError, match=fragment) as err:
        ht.DeltaSTNOptimizer(model, base, **kwargs)
    assert "not changed" in str(err.value)
    assert [list(g["params"]) for g in base.param_groups] == groups


def test_a_user_built_theta_optimizer_over_other_parameters_is_refused():
    model = ht.HyperModel.wrap(_Net(), {"drop": ht.DropoutRate(init=0.2)})
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ht.HyperTuneError, match="response_optimizer must hold only"):
        ht.DeltaSTNOptimizer(model, base, response_optimizer=torch.optim.SGD(model.base_parameters(), lr=0.1))


# ---- load_state_dict: every problem listed, nothing written ----------------------------------------
def _with(state, path, value):
    state = copy.deepcopy(state)
    *head, last = path
    d = state
    for k in head:
        d = d[k]
    if value is _DELETE:
        del d[last]
    else:
        d[last] = value(d[last]) if callable(value) else value
    return state


_DELETE = object()


def _nan_lambda(t):
    t = t.clone()
    t[0] = float("nan")
    return t


LOAD_CASES = {
    "missing_key": (("counters",), _DELETE, "lacks the key"),
    "nan_lambda": (("hparams", "unconstrained"), _nan_lambda, "non-finite"),
    "inf_sigma": (("hparams", "raw_scale"), lambda t: t * float("inf"), "non-finite"),
    "lambda_shape": (("hparams", "unconstrained"), lambda t: torch.zeros(5), "shape"),
    "other_group_layout": (("optimizer", "param_groups"), lambda g: g + g, "parameters per group"),
    "momentum_nan": (("optimizer", "state", 0, "momentum_buffer"), lambda t: t * float("nan"), "non-finite"),
    "negative_counter": (("counters", "train_steps"), -1, "non-negative"),
    "bad_history": (("history", "records"), [{"step": 0}], "History records"),
    "bad_lr_reference": (("lr_reference",), [0.1], "lr_reference"),
    "theta_state_for_other_param": (("response_optimizer", "state"), lambda s: {**s, 999: {}}, "#999"),
}


@pytest.mark.parametrize("name", list(LOAD_CASES))
def test_a_refused_load_writes_nothing(name):
    path, value, fragment = LOAD_CASES[name]
    model, opt = _setup()
    _warm(opt)
    good = _freeze(opt.state_dict())
    _warm(opt, 1)
    before = _everything(model, opt)
    with pytest.raises(ht.StateDictError, match=fragment) as err:
        opt.load_state_dict(_with(good, path, value))
    assert "nothing was loaded" in str(err.value)
    _assert_identical(before, _everything(model, opt))


def test_a_load_lists_every_problem_at_once():
    model, opt = _setup()
    _warm(opt)
    bad = _with(_with(opt.state_dict(), ("hparams", "unconstrained"), _nan_lambda), ("counters",), _DELETE)
    with pytest.raises(ht.StateDictError, match=r"2 problem\(s\)(?s:.*)lacks the key(?s:.*)non-finite"):
        opt.load_state_dict(bad)


def test_a_state_from_a_model_with_other_layer_sizes_is_refused():
    class Wider(_Net):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.b = nn.Linear(6, 24), nn.BatchNorm1d(24), nn.Linear(24, 3)

    _, other = _setup(net=Wider())
    other.train_step(*_batch(0), F.cross_entropy)
    model, opt = _setup()
    before = _everything(model, opt)
    with pytest.raises(ht.StateDictError, match="other shapes"):
        opt.load_state_dict(other.state_dict())
    _assert_identical(before, _everything(model, opt))
    # Without the saved shapes (older state dicts) the momentum buffers still give it away.
    state = other.state_dict()
    del state["param_shapes"]
    with pytest.raises(ht.StateDictError, match="other layer sizes"):
        opt.load_state_dict(state)


def test_load_round_trip_still_exact():
    model, opt = _setup()
    _warm(opt)
    state = _freeze(opt.state_dict())  # like torch's, it holds the live tensors
    weights = _freeze(model.state_dict())
    rng = torch.get_rng_state()
    after_one = (_warm(opt, 1), _everything(model, opt))[1]
    model.load_state_dict(weights)
    opt.load_state_dict(state)
    torch.set_rng_state(rng)
    _warm(opt, 1)
    _assert_identical(after_one, _everything(model, opt))


# ---- checkpoint.load ------------------------------------------------------------------------------
def test_checkpoint_with_nan_lambda_is_refused_before_anything_changes(tmp_path):
    model, opt = _setup()
    _warm(opt)
    path = tmp_path / "run.pt"
    ht.checkpoint.save(path, model=model, optimizer=opt)
    ck = torch.load(path, weights_only=True)
    ck["model"]["hparams.unconstrained"][0] = float("nan")
    ck["optimizer"]["hparams"]["unconstrained"][0] = float("nan")
    torch.save(ck, path)
    _warm(opt, 1)
    before = _everything(model, opt)
    with pytest.raises(ht.StateDictError, match=r"(?s)nothing was loaded.*non-finite.*hparams\.unconstrained"):
        ht.checkpoint.load(path, model=model, optimizer=opt)
    _assert_identical(before, _everything(model, opt))


def test_checkpoint_save_to_a_missing_folder_names_that_folder(tmp_path):
    model, opt = _setup()
    target = tmp_path / "missing" / "run.pt"
    with pytest.raises(FileNotFoundError) as err:
        ht.checkpoint.save(target, model=model, optimizer=opt)
    assert err.value.filename == str(target) and "does not exist" in str(err.value)
    assert not (tmp_path / "missing").exists()


def test_a_truncated_checkpoint_is_refused_before_anything_changes(tmp_path):
    model, opt = _setup()
    _warm(opt)
    path = tmp_path / "run.pt"
    ht.checkpoint.save(path, model=model, optimizer=opt)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _warm(opt, 1)
    before = _everything(model, opt)
    with pytest.raises(ht.StateDictError, match="could not read checkpoint"):
        ht.checkpoint.load(path, model=model, optimizer=opt)
    _assert_identical(before, _everything(model, opt))


# ---- the other classes of issue 14 -----------------------------------------------------------------
def test_float16_val_step_keeps_lambda_and_sigma_finite():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3)).half()
    model = ht.HyperModel.wrap(net, {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3)})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), tune_scales=True)
    x, y = torch.randn(32, 6).half(), torch.randint(0, 3, (32,))
    scale0 = model.hparams.raw_scale.detach().clone()
    for _ in range(3):
        # Θ's projection starts at 0, so λ's hypergradient is exactly 0: RMSprop divided 0 by
        # sqrt(0) + 1e-8, and 1e-8 is 0 in float16.
        r = opt.val_step(x, y, F.cross_entropy)
        assert r.updated and not r.skipped
    assert torch.isfinite(model.hparams.unconstrained).all() and torch.isfinite(model.hparams.raw_scale).all()
    assert not torch.equal(scale0, model.hparams.raw_scale.detach())  # σ moved (entropy bonus)


def test_a_model_wrapped_on_the_meta_device_gets_initial_hyper_state_after_to_empty():
    specs = {"drop": ht.DropoutRate(init=0.2, perturb="batch"), "wd": ht.WeightDecay(init=1e-3)}
    reference = ht.HyperModel.wrap(_Net(), specs)
    with torch.device("meta"):
        net = _Net()
    model = ht.HyperModel.wrap(net, specs)
    with pytest.raises(ht.HyperTuneError, match="meta device"):
        ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    model.to_empty(device="cpu")
    assert torch.equal(model.hparams.unconstrained, reference.hparams.unconstrained)
    assert torch.equal(model.hparams.raw_scale, reference.hparams.raw_scale)
    for (name, layer), (_, ref) in zip(model.hyper_layers().items(), reference.hyper_layers().items()):
        assert torch.equal(layer.hyper_projection.weight, torch.zeros_like(ref.hyper_projection.weight)), name
        bound = 1 / math.sqrt(layer.weight.shape[1])
        assert torch.isfinite(layer.response_weight).all() and layer.response_weight.abs().max() <= bound + 1e-6
    assert model.hparams.sample_noise(4)[:, 0].unique().numel() == 1  # per-batch column restored


def test_response_lr_follows_a_warm_up_that_starts_at_zero():
    model = ht.HyperModel.wrap(_Net(), {"drop": ht.DropoutRate(init=0.2)})
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(base, lambda step: min(1.0, step / 4))
    assert base.param_groups[0]["lr"] == 0.0
    opt = ht.DeltaSTNOptimizer(model, base, response_lr=1e-3)
    seen = []
    for i in range(6):
        opt.train_step(*_batch(i), F.cross_entropy)
        seen.append(opt.response_optimizer.param_groups[0]["lr"])
        sched.step()
    assert seen == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_lr_schedulers_attach_to_the_optimizer_object():
    model, opt = _setup(response_lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "lr_scheduler.step() before optimizer.step()" warning
        for i in range(4):
            opt.train_step(*_batch(i), F.cross_entropy)
            sched.step()
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25)
    assert opt.param_groups is opt.optimizer.param_groups
    opt.train_step(*_batch(5), F.cross_entropy)  # Θ's lr follows the schedule too
    assert opt.response_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.25)
    with pytest.raises(ht.HyperTuneError, match="train_step"):
        opt.step()
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0)
    plateau.step(1.0), plateau.step(2.0)
    assert opt.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.25 * 0.1)


def test_uncalled_layers_refusal_names_a_sequence_that_works():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.proj = nn.Linear(6, 16), nn.Linear(16, 3)

        def forward(self, x):
            return F.linear(torch.relu(self.a(x)), self.proj.weight, self.proj.bias)

    specs = {"wd": ht.WeightDecay(init=1e-3)}
    model = ht.HyperModel.wrap(Functional(), specs)
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    before = _everything(model, opt)
    with pytest.raises(ht.HyperTuneError, match=r"unwrap\(\)") as err:
        opt.train_step(*_batch(0), F.cross_entropy)
    _assert_identical(before, _everything(model, opt))
    assert "exclude=['proj']" in str(err.value)
    # The sequence the message gives works on the same object.
    plain = model.unwrap()
    model = ht.HyperModel.wrap(plain, specs, exclude=["proj"])
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert not opt.train_step(*_batch(0), F.cross_entropy).skipped
    assert list(model.hyper_layers()) == ["a"]


# ---- threads ----------------------------------------------------------------------------------------
def test_perturbation_context_is_per_thread():
    model, opt = _setup()
    hp = model.hparams
    point = ht.Perturbation(hp, hp.unconstrained.detach().unsqueeze(0) + 1.0, torch.ones(1, 2))
    seen: dict[str, Any] = {}
    inside = threading.Event()
    release = threading.Event()

    def hold():
        with model.evaluated_at(point), ht.context.active(point):
            inside.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    inside.wait(5)
    seen["current"] = ht.context.current()
    seen["pinned"] = ht.context.pinned_point(model)
    release.set()
    t.join()
    assert seen == {"current": None, "pinned": None}


@pytest.mark.parametrize("mode", ["delta", "stn"])
def test_training_and_evaluating_threads_do_not_interfere(mode):
    """One thread trains, another evaluates the same model: no error, no cross-talk. The training
    run equals a single-threaded run, and every evaluation equals a plain eval at the weights it
    saw (taken under the model's lock)."""
    steps = 60

    def train(model, opt):
        for i in range(steps):
            opt.train_step(*_batch(i), F.cross_entropy)
            if i % 5 == 4:
                opt.val_step(*_batch(1000 + i), F.cross_entropy)

    model, opt = _setup(mode)
    model.eval()
    torch.manual_seed(1)
    train(model, opt)
    alone = _freeze(model.state_dict())

    model, opt = _setup(mode)
    model.eval()
    torch.manual_seed(1)
    errors: list[BaseException] = []
    evaluations = []
    x = _batch(99)[0]
    stop = threading.Event()

    def evaluate():
        try:
            while not stop.is_set():
                with model.exclusive(), torch.no_grad():
                    out = model(x)
                    weights = _freeze(model.state_dict())
                evaluations.append((out, weights))
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    t = threading.Thread(target=evaluate)
    t.start()
    try:
        train(model, opt)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    _assert_identical(alone, _freeze(model.state_dict()))
    assert len(evaluations) > 5
    check = ht.HyperModel.wrap(_Net(), {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3)})
    check.centered = mode != "stn"
    check.eval()
    for out, weights in evaluations[:: max(1, len(evaluations) // 10)]:
        check.load_state_dict(weights)
        with torch.no_grad():
            assert torch.equal(out, check(x))


def test_unlocked_forwards_in_another_thread_never_fail():
    """A forward from another thread that does not hold ``exclusive()`` still waits for a running
    step (every forward takes the model's lock) and never sees the step's perturbation or its
    forward-AD level (it used to fail with "no dual level exists")."""
    model, opt = _setup("delta")
    model.eval()
    errors: list[BaseException] = []
    outs = []
    stop = threading.Event()
    x = _batch(99)[0]

    def evaluate():
        try:
            while not stop.is_set():
                with torch.no_grad():
                    outs.append(model(x))
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    t = threading.Thread(target=evaluate)
    t.start()
    try:
        for i in range(40):
            opt.train_step(*_batch(i), F.cross_entropy)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
    assert outs and all(o.shape == (16, 3) and torch.isfinite(o).all() for o in outs)


def test_a_model_moved_after_the_optimizer_was_built_is_put_back_whole(monkeypatch):
    # Module.to() replaces buffer tensors (the step must restore the live ones); Θ's optimizer
    # raising after SGD has written w₀ is undone, since the first step after a move is
    # snapshotted in full.
    model, opt = _setup()
    _warm(opt)
    model.to(torch.float64)
    opt.train_step(*(t.double() if t.is_floating_point() else t for t in _batch(6)), F.cross_entropy)
    model.to(torch.float32)  # moved again: the next step is a full one
    x, y = _batch(7)
    before = _everything(model, opt)

    def fails(*args, **kwargs):
        raise RuntimeError("Θ's optimizer failed")

    monkeypatch.setattr(opt.response_optimizer, "step", fails)
    with pytest.raises(RuntimeError, match="Θ's optimizer failed"):
        opt.train_step(x, y, F.cross_entropy)
    _assert_identical(before, _everything(model, opt))


def test_thetas_optimizer_state_follows_the_model_to_another_dtype():
    """Fused Adam refused a float32 moment for a float64 Θ ("expected scalar type Double but found
    Float") after model.double(); plain torch with SGD trains on, and so does a tuned model now."""
    model, opt = _setup()
    _warm(opt)
    model.double()
    x, y = _batch(7)
    result = opt.train_step(x.double(), y, F.cross_entropy)
    assert math.isfinite(result.loss)
    assert opt.val_step(x.double(), y, F.cross_entropy).updated
    for p, entry in opt.response_optimizer.state.items():
        assert all(v.dtype == torch.float64 for k, v in entry.items() if torch.is_tensor(v) and v.shape == p.shape)


def test_an_interrupt_while_waiting_for_the_model_lock_does_not_block_it_for_good():
    """Ctrl-C in a thread waiting for a HyperModel's lock used to leave its ticket unserved:
    every later forward, step and checkpoint.save of that model then waited forever."""
    from hypertune.context import FairLock

    lock = FairLock()
    held, release, waiting = threading.Event(), threading.Event(), threading.Event()

    def holder():
        with lock:
            held.set()
            release.wait()

    t = threading.Thread(target=holder, daemon=True)
    t.start()
    held.wait()
    real_wait = lock._cond.wait

    def interrupted_wait(*args, **kwargs):
        waiting.set()
        raise KeyboardInterrupt

    lock._cond.wait = interrupted_wait  # the signal lands while this thread waits for its turn
    with pytest.raises(KeyboardInterrupt):
        lock.acquire()
    lock._cond.wait = real_wait
    assert waiting.is_set()
    release.set()
    t.join()
    done = threading.Event()

    def later():
        with lock:
            done.set()

    threading.Thread(target=later, daemon=True).start()
    assert done.wait(5), "the lock stayed blocked by the abandoned ticket"
