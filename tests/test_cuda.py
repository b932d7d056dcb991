"""The library's properties on a CUDA device; skipped where there is none (CI has none).

The CPU suite proves these on CPU. On CUDA other kernels run (cuDNN convolutions, fused
optimizer paths, the device RNG), so the same properties are asserted again there:
forward-AD tangents against central differences, eval equal to the plain model, refused steps
that change nothing (CUDA RNG state included), a GradScaler that skips overflowing fp16 steps
without moving anything, a checkpoint that round-trips between CUDA and CPU, per-example stochastic
depth on the CUDA RNG, and an encoder layer whose fused inference kernel stays off.

    python -m pytest tests/test_cuda.py      # on a machine with a GPU
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import hypertune as ht
from hypertune import checkpoint
from test_linearize import _check_tangent, _cnn, _mlp  # the CPU suite's own checks, run on CUDA here
from test_reliability import _assert_identical, _freeze

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
CUDA = torch.device("cuda")


@settings(max_examples=10, deadline=None)
@given(widths=st.lists(st.integers(1, 9), min_size=1, max_size=3), residual=st.booleans(), train=st.booleans(),
       batch=st.integers(2, 6), seed=st.integers(0, 2**16))
def test_mlp_tangent_matches_central_differences_on_cuda(widths, residual, train, batch, seed):
    torch.manual_seed(seed)
    _check_tangent(_mlp([4, *widths], residual), torch.randn(batch, 4, dtype=torch.float64), train, seed, CUDA)


@settings(max_examples=6, deadline=None)
@given(channels=st.integers(1, 3), groups=st.sampled_from([1, 2]), train=st.booleans(), seed=st.integers(0, 2**16))
def test_cnn_tangent_matches_central_differences_on_cuda(channels, groups, train, seed):
    torch.manual_seed(seed)
    _check_tangent(_cnn(channels, groups, (3, 3), 1), torch.randn(3, 2, 9, 8, dtype=torch.float64), train, seed, CUDA)


def _resnet() -> nn.Module:
    import torchvision

    return torchvision.models.resnet18(weights=None, num_classes=10)


def _cnn_with_dropout() -> nn.Module:
    net = _cnn(3, 2, (3, 3), 1)
    net.insert(3, nn.Dropout(0.2))
    return net


@pytest.mark.parametrize("name", ["cnn", "resnet18"])
def test_eval_of_the_wrapped_model_equals_the_plain_model_on_cuda(name):
    torch.manual_seed(0)
    plain = (_cnn_with_dropout() if name == "cnn" else _resnet()).to(CUDA).eval()
    hparams = {"wd": ht.WeightDecay(), "cutout": ht.Cutout()}
    if name == "cnn":
        hparams["drop"] = ht.DropoutRate()
    model = ht.HyperModel.wrap(copy.deepcopy(plain), hparams).eval()
    x = torch.randn(4, 2 if name == "cnn" else 3, 32, 32, device=CUDA)
    with torch.no_grad():
        assert torch.equal(plain(x), model(x))


# ---- all-or-nothing steps on CUDA ---------------------------------------------------------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.drop, self.b = nn.Linear(6, 16), nn.BatchNorm1d(16), nn.Dropout(0.1), nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.drop(torch.relu(self.bn(self.a(x)))))


def _setup(**kwargs: Any) -> tuple[ht.HyperModel, ht.DeltaSTNOptimizer]:
    torch.manual_seed(0)
    model = ht.HyperModel.wrap(_Net(), {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3)})
    with torch.no_grad():
        for layer in model.hyper_layers().values():
            layer.hyper_projection.weight.normal_(0, 0.5)
    model = model.to(CUDA)
    kwargs = {"response_every": 1, "tune_scales": True, **kwargs}
    return model, ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), **kwargs)


def _batch(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g).to(CUDA), torch.randint(0, 3, (n,), generator=g).to(CUDA)


def _snapshot(model: ht.HyperModel, opt: ht.DeltaSTNOptimizer) -> dict[str, Any]:
    return _freeze({"model": model.state_dict(), "optimizer": opt.state_dict(), "cpu_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state(), "grads": [p.grad for p in model.parameters()]})


def _nan_on_call(k: int):
    calls = []

    def loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        value = F.cross_entropy(out, y)
        return value * float("nan") if len(calls) == k + 1 else value

    return loss


@pytest.mark.parametrize("case", ["nan_in_w0_part", "nan_in_theta_part", "nan_in_val_step", "batch_sizes_differ"])
def test_a_refused_step_on_cuda_changes_nothing_cuda_rng_included(case):
    model, opt = _setup()
    for i in range(2):
        opt.train_step(*_batch(i), F.cross_entropy)
        opt.val_step(*_batch(50 + i), F.cross_entropy)
    before = _snapshot(model, opt)
    x, y = _batch(7)
    if case == "nan_in_w0_part":
        call, error = (lambda: opt.train_step(x, y, _nan_on_call(0))), ht.NonFiniteLossError
    elif case == "nan_in_theta_part":
        call, error = (lambda: opt.train_step(x, y, _nan_on_call(1))), ht.NonFiniteLossError
    elif case == "nan_in_val_step":
        call, error = (lambda: opt.val_step(x, y, _nan_on_call(0))), ht.NonFiniteLossError
    else:  # refused on the host; (labels out of range would be a device-side assert, fatal to the process)
        call, error = (lambda: opt.train_step(x, y[:-1], F.cross_entropy)), ValueError
    with pytest.raises(error):
        call()
    _assert_identical(before, _snapshot(model, opt))
    opt.train_step(*_batch(9), F.cross_entropy)  # and it still works afterwards


def test_grad_scaler_skips_an_overflowing_fp16_step_on_cuda_without_moving_anything():
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**40)
    model, opt = _setup(autocast=torch.float16, grad_scaler=scaler, tune_scales=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch(3, n=32)
    result = opt.train_step(x, y, F.cross_entropy)
    assert result.skipped and scaler.get_scale() < 2.0**40
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    for _ in range(80):
        if not opt.train_step(x, y, F.cross_entropy).skipped:
            break
    else:  # pragma: no cover
        pytest.fail("the scale never came down")
    opt.val_step(*_batch(4, n=32), F.cross_entropy)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_checkpoint_round_trips_between_cuda_and_cpu(tmp_path):
    model, opt = _setup()
    for i in range(3):
        opt.train_step(*_batch(i), F.cross_entropy)
        opt.val_step(*_batch(20 + i), F.cross_entropy)
    checkpoint.save(tmp_path / "c.pt", model=model, optimizer=opt, extra={"step": 3})
    saved = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

    torch.manual_seed(1)
    cpu_model = ht.HyperModel.wrap(_Net(), {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3)})
    cpu_opt = ht.DeltaSTNOptimizer(cpu_model, torch.optim.SGD(cpu_model.parameters(), lr=0.05, momentum=0.9),
                                   response_every=1, tune_scales=True)
    assert checkpoint.load(tmp_path / "c.pt", model=cpu_model, optimizer=cpu_opt) == {"step": 3}
    for k, v in cpu_model.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, saved[k]), k
    x, y = _batch(30)
    cpu_opt.train_step(x.cpu(), y.cpu(), F.cross_entropy)  # optimizer state landed on the right device

    back = copy.deepcopy(cpu_model).to(CUDA)
    assert all(torch.equal(v.cpu(), cpu_model.state_dict()[k]) for k, v in back.state_dict().items())


def test_stochastic_depth_and_the_encoder_fast_path_on_cuda():
    """DropPathRate draws its per-example masks with the CUDA RNG, and a TransformerEncoderLayer
    holding hyper-layers runs its ordinary path in eval (the fused kernel would skip them)."""
    from test_drop_path import Residual
    from test_layouts import EncoderOnly

    torch.manual_seed(0)
    model = ht.HyperModel.wrap(Residual(), {"depth": ht.DropPathRate(init=0.2)}).to(CUDA)
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), warmup_steps=0)
    x, y = torch.randn(32, 4, device=CUDA), torch.randint(0, 3, (32,), device=CUDA)
    before = model.hparam_values()["depth"]
    for _ in range(3):
        assert not opt.train_step(x, y, F.cross_entropy).skipped
    assert opt.val_step(x, y, F.cross_entropy).updated and model.hparam_values()["depth"] != before

    encoder = ht.HyperModel.wrap(EncoderOnly(), {"wd": ht.WeightDecay()}).to(CUDA)
    opt = ht.DeltaSTNOptimizer(encoder, torch.optim.SGD(encoder.parameters(), lr=0.05), warmup_steps=0)
    x, y = torch.randn(4, 5, 8, device=CUDA), torch.tensor([0, 1, 1, 0], device=CUDA)
    opt.train_step(x, y, F.cross_entropy)
    assert opt.val_step(x, y, F.cross_entropy).updated  # λ's gradient reached the encoder's layers
