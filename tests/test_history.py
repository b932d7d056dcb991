"""History writers: CSV round trip, TensorBoard scalars, progress-bar summaries."""

from __future__ import annotations

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune.history import History, Record
from hypertune.logging import (
    CSVWriter,
    TensorBoardWriter,
    format_summary,
    history_rows,
    progress_summary,
    read_csv,
    write_csv,
)


def _run(steps: int = 12, val_every: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))
    model = ht.HyperModel.wrap(net, {"dropout": ht.DropoutRate(init=0.2), "wd": ht.WeightDecay(init=1e-3)})
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), hyper_lr=0.05)
    g = torch.Generator().manual_seed(seed)
    for i in range(steps):
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.train_step(x, y, F.cross_entropy)
        if (i + 1) % val_every == 0:
            opt.val_step(x, y, F.cross_entropy)
    return model, opt


def test_history_holds_every_step_with_lambda_sigma_and_losses():
    model, opt = _run(12, 3)
    h = opt.history
    assert len(h.of_kind("train")) == 12 and len(h.of_kind("val")) == 4
    # Each val step moved λ; its record holds the moved values, the next train record uses them.
    vals = h.of_kind("val")
    assert vals[-1].hparams == model.hparam_values()
    assert vals[-1].scales == model.hparams.scales()
    # A Θ step (and its loss) on every response_every-th train step: records count steps from 1.
    trains = h.of_kind("train")
    assert [r.response_loss is not None for r in trains] == [(r.step - 1) % opt.response_every == 0 for r in trains]
    assert sum(r.response_loss is not None for r in trains) == 4  # steps 1, 4, 7, 10 of 12
    assert [r.step for r in vals] == [3, 6, 9, 12]


def test_csv_round_trip_is_exact(tmp_path):
    _, opt = _run()
    path = write_csv(opt, tmp_path / "h.csv")
    header = path.read_text().splitlines()[0].split(",")
    assert header[:5] == ["step", "kind", "loss", "response_loss", "skipped"]
    assert {"lambda/dropout", "lambda/wd", "sigma/dropout", "sigma/wd"} <= set(header)
    back = read_csv(path)
    assert back.records == opt.history.records  # floats written with repr: bit-exact
    assert history_rows(back)[0]["lambda/dropout"] == pytest.approx(0.2)


def test_csv_writer_is_incremental(tmp_path):
    model, opt = _run(6, 3)
    writer = CSVWriter(tmp_path / "h.csv")
    assert writer.update(opt) == len(opt.history)
    assert writer.update(opt) == 0
    g = torch.Generator().manual_seed(9)
    opt.train_step(torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g), F.cross_entropy)
    assert writer.update(opt) == 1
    assert read_csv(tmp_path / "h.csv").records == opt.history.records


def test_tensorboard_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, opt = _run(9, 3)
    with TensorBoardWriter(tmp_path / "tb") as tb:
        assert tb.update(opt) == len(opt.history)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/train", "loss/val", "loss/response", "hparam/dropout", "hparam/wd", "sigma/wd"} <= tags
    train = acc.Scalars("loss/train")
    assert [e.step for e in train] == list(range(1, 10))
    assert train[-1].value == pytest.approx(opt.history.of_kind("train")[-1].loss)
    assert acc.Scalars("hparam/wd")[-1].value == pytest.approx(opt.hparams()["wd"])


def test_tensorboard_missing_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.raises(ImportError, match=r"hypertune-stn\[tensorboard\]"):
        TensorBoardWriter(tmp_path / "tb")


def test_progress_summary_for_tqdm():
    _, opt = _run(12, 3)
    s = progress_summary(opt, window=4)
    train = opt.history.of_kind("train")[-4:]
    assert list(s)[:2] == ["loss", "val"]
    assert float(s["loss"]) == pytest.approx(sum(r.loss for r in train) / 4, rel=1e-2)
    assert float(s["val"]) == pytest.approx(opt.history.of_kind("val")[-1].loss, rel=1e-2)
    assert float(s["wd"]) == pytest.approx(opt.hparams()["wd"], rel=1e-2)
    assert all(isinstance(v, str) and len(v) <= 9 for v in s.values())
    line = format_summary(opt, scales=True)
    assert line.startswith("loss=") and "σ(wd)=" in line
    tqdm = pytest.importorskip("tqdm")
    with tqdm.tqdm(total=1, disable=True) as bar:
        bar.set_postfix(s)  # the intended use


def test_summary_shortens_long_per_site_names_and_handles_empty():
    h = History()
    assert progress_summary(h) == {}
    long = "dropout:encoder.layers.11.dropout"
    h.append(Record(1, "train", float("nan"), {long: 0.1, "wd": 1e-4}, {long: 1.0, "wd": 1.0}))
    s = progress_summary(h)
    assert s["loss"] == "nan" and "val" not in s
    key = next(k for k in s if k not in ("loss", "wd"))
    assert len(key) <= 16 and key.endswith("11.dropout")
    assert not math.isnan(float(s[key]))
