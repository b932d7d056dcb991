"""The Lightning integration: manual optimization with DeltaSTNOptimizer, λ through the logger."""

from __future__ import annotations

import csv
import warnings

import pytest

pl = pytest.importorskip("lightning.pytorch")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

import hypertune as ht  # noqa: E402
from hypertune.optim import DEFAULT_RESPONSE_LR  # noqa: E402
from hypertune.integrations.lightning import DeltaSTNModule, hparam_metrics  # noqa: E402


def _data(seed: int, n: int = 256):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, (x[:, 0] + 0.5 * x[:, 1] > 0).long())


class Net(DeltaSTNModule):
    def __init__(self, tune_from: str = "batch", **kwargs):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))
        model = ht.HyperModel.wrap(net, {"dropout": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3)})
        super().__init__(model, loss_fn=F.cross_entropy, tune_every=2, hyper_lr=0.05, **kwargs)
        self.tune_from = tune_from
        self.seen_before_step = 0

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)]

    def train_dataloader(self):
        train = DataLoader(_data(0), batch_size=32, shuffle=True)
        if self.tune_from == "batch":
            return {"train": train, "tune": DataLoader(_data(1), batch_size=64, shuffle=True)}
        return train

    def tune_dataloader(self):
        return DataLoader(_data(1), batch_size=64, shuffle=True) if self.tune_from == "method" else None

    def on_before_optimizer_step(self, optimizer):
        self.seen_before_step += 1


def _trainer(tmp_path, max_steps, logger=True):
    from lightning.pytorch.loggers import CSVLogger

    return pl.Trainer(
        max_steps=max_steps,
        logger=CSVLogger(str(tmp_path), name="logs") if logger else False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        accelerator="cpu",
        log_every_n_steps=1,
    )


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_fit_tunes_and_logs_lambda_through_the_logger(tmp_path):
    module = Net()
    trainer = _trainer(tmp_path, max_steps=16)
    trainer.fit(module)
    stn = module.stn
    # Every weight step went through Lightning: global_step and max_steps count them.
    assert trainer.global_step == 16 == stn.train_steps
    assert module.seen_before_step == 16
    assert stn.val_steps == 8
    assert stn.hparams() != {"dropout": pytest.approx(0.2), "wd": pytest.approx(1e-3)}
    # 8 batches an epoch (max of the two loaders): the epoch-interval StepLR stepped at the end
    # of each of the 2 epochs; Θ's learning rate follows it at each Θ step, so its last step ran
    # at the second epoch's rate.
    assert stn.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)
    assert stn.response_optimizer.param_groups[0]["lr"] == pytest.approx(DEFAULT_RESPONSE_LR * 0.5)
    rows = list(csv.DictReader(open(tmp_path / "logs" / "version_0" / "metrics.csv")))
    assert {"hparam/dropout", "hparam/wd", "sigma/wd", "train/loss", "tune/loss"} <= set(rows[0])
    logged = [float(r["hparam/wd"]) for r in rows if r["hparam/wd"]]
    assert len(logged) == 16
    assert logged[-1] == pytest.approx(stn.hparams()["wd"], rel=1e-6)
    # Lightning repeats a key's last value on steps that do not log it: tune/loss is the loss of
    # the latest λ step, and its distinct values are exactly the val steps' losses.
    tune = [float(r["tune/loss"]) for r in rows if r["tune/loss"]]
    distinct = [v for i, v in enumerate(tune) if i == 0 or v != tune[i - 1]]
    assert distinct == pytest.approx([r.loss for r in stn.history.of_kind("val")])
    assert hparam_metrics(stn)["hparam/wd"] == logged[-1]


def test_tune_batches_from_a_method_and_checkpoint_resume(tmp_path):
    module = Net(tune_from="method")
    trainer = _trainer(tmp_path, max_steps=6, logger=False)
    trainer.fit(module)
    assert module.stn.val_steps == 3
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(str(ckpt))
    saved = torch.load(str(ckpt), weights_only=False)["hypertune"]
    assert saved["counters"]["train_steps"] == 6

    resumed = Net(tune_from="method")
    trainer2 = _trainer(tmp_path, max_steps=10, logger=False)
    trainer2.fit(resumed, ckpt_path=str(ckpt))
    assert resumed.stn.train_steps == 10 and trainer2.global_step == 10
    assert len(resumed.stn.history.of_kind("train")) == 10  # history continued, not restarted
    head = resumed.stn.history.records[: len(module.stn.history)]
    assert head == module.stn.history.records


def test_misconfiguration_is_refused(tmp_path):
    with pytest.raises(ht.HyperTuneError, match="HyperModel"):
        DeltaSTNModule(nn.Linear(2, 2))
    module = Net(tune_from="none")
    with pytest.raises(ht.HyperTuneError, match="no tuning batches"):
        _trainer(tmp_path, max_steps=3, logger=False).fit(module)
