"""The accelerate recipe: ``integrations.accelerate.prepare`` in a hand-written loop, with
gradient accumulation and mixed precision, on two CPU processes (gloo) spawned from the test."""

from __future__ import annotations

import os
import socket
import warnings

import pytest

pytest.importorskip("accelerate")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import hypertune as ht  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not built")

WORLD = 2
STEPS = 4  # optimizer steps, each of ACCUMULATE micro-batches
ACCUMULATE = 2


def _data(seed: int, n: int = 128):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return torch.utils.data.TensorDataset(x, (x[:, 0] - x[:, 1] > 0).long())


def _build(seed: int) -> ht.HyperModel:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 2))
    return ht.HyperModel.wrap(net, {"dropout": ht.DropoutRate(init=0.1), "wd": ht.WeightDecay(init=1e-3)})


def _worker(rank: int, world: int, port: int, out: str, precision: str) -> None:
    # CPU processes even on a GPU machine: some accelerate versions put a barrier on cuda:<rank>
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), CUDA_VISIBLE_DEVICES="")
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    from accelerate import Accelerator

    from hypertune.integrations.accelerate import prepare
    from hypertune.integrations.accumulation import GradientAccumulation

    accelerator = Accelerator(cpu=True, mixed_precision=precision)
    torch.manual_seed(100 + rank)  # each rank its own dropout masks and ε
    hm = _build(seed=rank)  # different w₀, Θ, λ per rank: DDP and the optimizer broadcast rank 0's
    with torch.no_grad():
        hm.hparams.unconstrained.add_(0.1 * rank)
    opt = torch.optim.SGD(hm.parameters(), lr=0.05, momentum=0.9)
    train = torch.utils.data.DataLoader(_data(0), batch_size=8, shuffle=True)
    tune = torch.utils.data.DataLoader(_data(1), batch_size=16, shuffle=True)
    stn, model, train, tune = prepare(accelerator, hm, opt, train, tune, hyper_lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    start = dict(hm.hparam_values())
    tune_batches = iter(tune)
    with GradientAccumulation(stn) as accumulation:
        for i, (x, y) in enumerate(train):
            stn.train_step(x, y, F.cross_entropy)
            if (i + 1) % ACCUMULATE == 0:
                accumulation.flush()
                scheduler.step()
                stn.val_step(*next(tune_batches), F.cross_entropy)
            if (i + 1) == STEPS * ACCUMULATE:
                break
    state = {k: v.detach().clone() for k, v in hm.state_dict().items()}
    torch.save({"state": state, "start": start, "hparams": stn.hparams(), "val_steps": stn.val_steps,
                "train_steps": stn.train_steps, "ddp": type(model).__name__, "lr": opt.param_groups[0]["lr"]},
               os.path.join(out, f"rank{rank}.pt"))
    accelerator.wait_for_everyone()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("precision", ["no", pytest.param("bf16", marks=pytest.mark.slow)])
def test_two_processes_hold_identical_lambda_and_weights(tmp_path, precision):
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path), precision), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert all(r["ddp"] == "DistributedDataParallel" for r in ranks)
    assert all(r["train_steps"] == STEPS * ACCUMULATE and r["val_steps"] == STEPS for r in ranks)
    assert ranks[0]["hparams"] == ranks[1]["hparams"]  # identical λ on every rank
    assert ranks[0]["hparams"] != pytest.approx(ranks[0]["start"])  # and it moved
    for key, value in ranks[0]["state"].items():  # w₀, Θ, λ and σ
        assert torch.equal(value, ranks[1]["state"][key]), key
    assert ranks[0]["lr"] == pytest.approx(0.05 * 0.9**STEPS)


def test_prepare_refuses_what_it_cannot_run():
    from accelerate import Accelerator

    from hypertune.integrations.accelerate import prepare

    accelerator = Accelerator(cpu=True)
    hm = _build(0)
    opt = torch.optim.SGD(hm.parameters(), lr=0.1)
    with pytest.raises(ht.HyperTuneError, match="needs the HyperModel"):
        prepare(accelerator, hm.module, opt)
    with pytest.raises(ht.HyperTuneError, match="plain torch optimizer"):
        prepare(accelerator, hm, accelerator.prepare(opt))
    with pytest.raises(ht.HyperTuneError, match="mixed_precision"):
        prepare(accelerator, hm, opt, grad_scaler=torch.amp.GradScaler("cpu"))
    stn, model, loader = prepare(accelerator, hm, opt, torch.utils.data.DataLoader(_data(0), batch_size=8))
    x, y = next(iter(loader))
    assert stn.train_step(x, y, F.cross_entropy).loss > 0
