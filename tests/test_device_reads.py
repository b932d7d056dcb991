"""How often a step reads values back from the device (each read waits for a GPU to drain).

On a GPU every ``tolist``/``item``/``bool(tensor)`` is a host-device synchronization; the first
CUDA run measured 5.3 per step at the defaults, from separate reads of the step's check, its
losses and the λ/σ it records. The check must read (it decides commit or rollback); the rest rides
along with it, and a train step, which does not move λ or σ, reuses the last read of them.
Counted on CPU by tracing the Python calls that read a tensor, from hypertune's own frames
(``host_reads`` of benchmarks/step_profile.py).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht

# The tracer benchmarks/step_profile.py counts with, so the test and the benchmark agree on a read.
_spec = importlib.util.spec_from_file_location(
    "bench_step_profile", Path(__file__).resolve().parents[1] / "benchmarks" / "step_profile.py"
)
_step_profile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_step_profile)  # type: ignore[union-attr]
_reads = _step_profile.host_reads


def _setup(**kwargs) -> tuple[ht.HyperModel, ht.DeltaSTNOptimizer]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    model = ht.HyperModel.wrap(net, {"drop": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3)})
    return model, ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), **kwargs)


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)


def test_each_step_reads_the_device_once_and_a_train_step_reuses_the_last_lambda_read():
    model, opt = _setup(warmup_steps=2)
    for i in range(6):  # past the warm-up and the first (fully checked) steps of each kind
        opt.train_step(*_batch(i), F.cross_entropy)
        opt.val_step(*_batch(50 + i), F.cross_entropy)
    for i in range(2 * opt.response_every):  # with and without a Θ part
        reads = _reads(lambda: opt.train_step(*_batch(10 + i), F.cross_entropy))
        assert len(reads) == 1, reads
    reads = _reads(lambda: opt.val_step(*_batch(99), F.cross_entropy))
    # the check, and λ/σ after the λ step moved them (the check's write-verification may add one)
    assert 2 <= len(reads) <= 3, reads


def test_a_reused_read_follows_every_change_of_lambda_and_sigma():
    model, opt = _setup()
    hp = model.hparams
    first = hp.values_and_scales()
    assert hp.values_and_scales() == first
    with torch.no_grad():
        hp.unconstrained.add_(0.5)  # in place: the version counter moves
    moved = hp.values_and_scales()
    assert moved[0] != first[0] and moved == (hp.values(), hp.scales())
    with torch.no_grad():
        hp.raw_scale.data = hp.raw_scale.data + 1.0  # a new storage, version counter untouched
    assert hp.values_and_scales() == (hp.values(), hp.scales()) and hp.values_and_scales()[1] != moved[1]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt.val_step(*_batch(1), F.cross_entropy)  # during the warm-up: reports only
    model.load_state_dict(state)
    assert hp.values_and_scales() == (hp.values(), hp.scales())
    hp.scale_range = (0.5, 1.0)  # σ's bounds: σ itself is clamped into them
    assert hp.values_and_scales() == (hp.values(), hp.scales())


def test_the_losses_read_with_the_check_are_the_step_losses():
    model, opt = _setup(warmup_steps=0, response_every=1)
    x, y = _batch(3)
    result = opt.train_step(x, y, F.cross_entropy)
    assert result.response_loss is not None and result.loss != result.response_loss
    assert (result.loss, result.response_loss) == (opt.history.records[-1].loss, opt.history.records[-1].response_loss)
    model.eval()
    with torch.no_grad():
        expected = F.cross_entropy(model(x), y).float().item()  # the λ step's loss: eval mode, at λ
    val = opt.val_step(x, y, F.cross_entropy)
    assert val.loss == expected == opt.history.records[-1].loss
