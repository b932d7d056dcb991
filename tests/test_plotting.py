"""plot_schedule: one panel per group of hyperparameters plus losses, saved as a PNG."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune.history import History, Record
from hypertune.plotting import group_hparams, plot_schedule
from hypertune.schedule import Schedule

pytest.importorskip("matplotlib")


def _run(steps: int = 10):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(5, 16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 16), nn.ReLU(), nn.Dropout(0.1),
        nn.Linear(16, 3),
    )
    model = ht.HyperModel.wrap(
        net,
        {
            "input_dropout": ht.InputDropout(init=0.1),
            "dropout": ht.DropoutRate(init=0.2, per_site=True),
            "weight_decay": ht.WeightDecay(init=1e-3),
        },
    )
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.05), hyper_lr=0.05)
    g = torch.Generator().manual_seed(0)
    for i in range(steps):
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.train_step(x, y, F.cross_entropy)
        if i % 2:
            opt.val_step(x, y, F.cross_entropy)
    return model, opt


def test_groups_by_spec_kind_and_by_name():
    model, _ = _run(1)
    names = model.hparams.names
    groups = group_hparams(names, model.hparams.specs)
    assert groups == {
        "Dropout rates": ["dropout:2", "dropout:5", "input_dropout"],
        "Weight decay": ["weight_decay"],
    }
    # The dropout family shares the dropout panel; AR/TAR coefficients get their own.
    family = {
        "out": ht.DropoutRate(), "weights": ht.DropConnect(), "words": ht.EmbeddingDropout(),
        "ar": ht.ActivationRegularization(targets=["rnn"]),
        "tar": ht.TemporalActivationRegularization(targets=["rnn"]),
    }
    assert group_hparams(list(family), family) == {
        "Dropout rates": ["out", "weights", "words"],
        "Activation regularization": ["ar", "tar"],
    }
    # Without specs, names decide: augmentation sub-values share a panel, others get their own.
    by_name = group_hparams(["drop_a", "wd", "cutout:size", "cutout:prob", "temperature"])
    assert by_name == {
        "Dropout rates": ["drop_a"],
        "Weight decay": ["wd"],
        "Augmentation: cutout": ["cutout:size", "cutout:prob"],
        "temperature": ["temperature"],
    }


def test_plot_schedule_writes_png_with_one_panel_per_group(tmp_path):
    model, opt = _run()
    path = tmp_path / "schedule.png"
    fig = plot_schedule(opt.history, path, model=model, steps_per_epoch=5, title="run")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    titles = [ax.get_title(loc="left") for ax in fig.axes]
    assert titles == ["Dropout rates", "Weight decay", "Losses"]
    dropout_ax, wd_ax, loss_ax = fig.axes
    assert len(dropout_ax.get_lines()) == 3
    assert wd_ax.get_yscale() == "log" and dropout_ax.get_yscale() == "linear"
    assert loss_ax.get_xlabel() == "epoch"
    # the weight-decay line ends at the current value
    assert wd_ax.get_lines()[0].get_ydata()[-1] == pytest.approx(opt.hparams()["weight_decay"])
    labels = {line.get_label() for line in loss_ax.get_lines()}
    assert any(label.startswith("train") for label in labels)
    assert any(label.startswith("validation") for label in labels)


def test_plot_custom_groups_and_schedule_input(tmp_path):
    model, opt = _run()
    fig = plot_schedule(opt, None, groups={"first layer": ["dropout:2"], "rest": ["dropout:5", "weight_decay"]})
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["first layer", "rest", "Losses"]
    with pytest.raises(ValueError, match="does not have"):
        plot_schedule(opt, None, groups={"x": ["nope"]})
    schedule = Schedule.from_optimizer(opt)
    fig = plot_schedule(schedule, tmp_path / "s.png")
    assert [ax.get_title(loc="left") for ax in fig.axes] == ["Dropout rates", "Weight decay"]


def test_empty_history_and_missing_matplotlib(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        plot_schedule(History(), tmp_path / "x.png")
    h = History()
    h.append(Record(1, "train", 1.0, {"wd": 1e-3}, {"wd": 1.0}))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"hypertune-stn\[plot\]"):
        plot_schedule(h, tmp_path / "x.png")
