"""The example scripts end to end (``--smoke``: a few batches of real data), and their models.

MNIST, FashionMNIST and PTB runs are skipped when ``../shared/datasets`` lacks them; the CIFAR-10
run uses random tensors of CIFAR-10's shape when CIFAR-10 is absent. The whole file takes well
under 90 s on 2 CPU cores.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import hypertune as ht
from hypertune import surgery
from hypertune.layers import registry
from hypertune.layers import HyperDropout, HyperLayer

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DATA = ROOT.parent / "shared" / "datasets"


def load(name: str):
    """Import examples/<name>.py as a module (examples/ is not a package)."""
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def needs(*parts: str):
    path = DATA.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"{path} is missing")


def run_smoke(name: str, out: Path, *extra: str) -> dict:
    argv = ["--smoke", "--data-root", str(DATA), "--out", str(out), "--device", "cpu", "--no-progress", *extra]
    return load(name).main(argv)


def check_outputs(metrics: dict, out: Path, n_hparams: int | None, tuned: bool = True) -> None:
    for split in ("val", "test"):
        assert math.isfinite(metrics[split]["loss"]), metrics[split]
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["val"] == pytest.approx(metrics["val"])
    assert saved["tuned"] is tuned
    assert (out / "epochs.csv").is_file()
    if not tuned:
        assert not (out / "schedule.csv").exists()
        return
    assert len(metrics["final_hparams"]) == n_hparams
    with (out / "schedule.csv").open() as f:
        rows = list(csv.DictReader(f))
    kinds = {r["kind"] for r in rows}
    assert kinds == {"train", "val"}, "the smoke run should take val (λ) steps too"
    assert sum(c.startswith("lambda/") for c in rows[0]) == n_hparams
    png = (out / "schedule.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


@needs("MNIST", "raw")
def test_mnist_mlp_smoke(tmp_path):
    metrics = run_smoke("mnist_mlp", tmp_path)
    check_outputs(metrics, tmp_path, 3)
    assert metrics["mode"] == "delta"


@needs("FashionMNIST", "raw")
def test_fmnist_cnn_smoke_tuned_and_untuned(tmp_path):
    metrics = run_smoke("fmnist_cnn", tmp_path / "tuned")
    check_outputs(metrics, tmp_path / "tuned", 6)
    assert {"cutout:holes", "cutout:length"} <= set(metrics["final_hparams"])
    plain = run_smoke("fmnist_cnn", tmp_path / "untuned", "--untuned")
    check_outputs(plain, tmp_path / "untuned", None, tuned=False)
    assert plain["train_steps"] == metrics["train_steps"]  # the same budget


def test_cifar10_smoke(tmp_path):
    # Random tensors of CIFAR-10's shape when the data set is absent (as on the project's machines).
    metrics = run_smoke("cifar10", tmp_path, "--arch", "alexnet")
    check_outputs(metrics, tmp_path, 18)


@needs("ptb", "ptb.train.txt")
def test_ptb_lstm_smoke(tmp_path):
    example = load("ptb_lstm")
    metrics = run_smoke("ptb_lstm", tmp_path)
    n = 7 if example.lstm_is_hyper_layer() else 6
    check_outputs(metrics, tmp_path, n)
    assert metrics["test"]["ppl"] == pytest.approx(math.exp(metrics["test"]["loss"]))
    assert metrics["mode"] == ("delta" if example.lstm_is_hyper_layer() else "centered")


# ---- the examples' building blocks -------------------------------------------------------------
@pytest.mark.parametrize("arch, sites", [("alexnet", 8), ("vgg16", 16), ("resnet18", 10)])
def test_cifar_models_wrap_with_paper_hparams(arch, sites):
    from hypertune.experiments.cifar import cifar_model

    cifar = load("cifar10")
    torch.manual_seed(0)
    model = cifar_model(arch)
    n_dropouts = sum(type(m) in surgery.DROPOUTS for m in model.modules())
    assert n_dropouts == sites
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    hm = ht.HyperModel.wrap(model, cifar.hparams())
    assert len(hm.hparams) == sites + 10  # + cutout 2, jitter 4, affine 4
    assert not any(type(m) in surgery.DROPOUTS for m in hm.modules())
    assert sum(isinstance(m, HyperDropout) for m in hm.modules()) == sites
    hm.eval()
    with torch.no_grad():
        assert torch.equal(hm(x), expected)


def test_ptb_batching_and_model():
    from hypertune.experiments.ptb import BPTTLoader, LSTMLanguageModel, batchify, lm_loss

    data = torch.arange(103)
    src = batchify(data, 4)
    assert src.shape == (4, 25) and torch.equal(src[1], torch.arange(25, 50))
    batches = list(BPTTLoader(src, 10))
    assert [tuple(x.shape) for x, _ in batches] == [(4, 10), (4, 10), (4, 4)]
    for x, y in batches:
        assert torch.equal(y, x + 1)  # targets are the next tokens
    model = LSTMLanguageModel(50, 8, 8)
    assert model.decoder.weight is model.encoder.weight
    out = model(batches[0][0] % 50)
    assert out.shape == (4, 10, 50)
    assert lm_loss(out, batches[0][1] % 50).dim() == 0


def test_ptb_hparams_follow_lstm_support():
    example = load("ptb_lstm")
    assert "dropconnect" in example.hparams(dropconnect=True)
    specs = example.hparams()
    assert ("dropconnect" in specs) == example.lstm_is_hyper_layer()
    from hypertune.experiments.ptb import LSTMLanguageModel

    hm = ht.HyperModel.wrap(LSTMLanguageModel(30, 8, 8), specs)
    assert len(hm.hparams) == len(specs) + 2  # three dropout sites
    assert isinstance(hm.module.encoder, HyperLayer) and isinstance(hm.module.decoder, HyperLayer)


def test_untuned_regularizers_use_the_starting_values():
    common = load("_common")
    example = load("ptb_lstm")
    from hypertune.experiments.ptb import LSTMLanguageModel

    torch.manual_seed(0)
    model = LSTMLanguageModel(30, 8, 8, dropout=0.5)
    fixed = common.FixedRegularizers(model, example.hparams(dropconnect=False))
    tokens = torch.randint(0, 30, (3, 7))
    model.train()
    fixed.collecting = True
    model(tokens)
    fixed.collecting = False
    # AR and TAR each recorded the pass: their penalties are positive, and consumed once read
    ar_tar = [f for f in fixed.forms if type(f).__name__ == "FixedActivationPenalty"]
    assert len(ar_tar) == 2 and all(len(f.outputs) == 1 for f in ar_tar)
    assert float(fixed.penalty().detach()) > 0
    # Locked dropout: one mask per example and feature, shared along time.
    x = torch.ones(2, 50, 16)
    y = model.drop_in(x)
    assert torch.equal(y[:, :1].expand_as(y), y)
    # Augmentations and input dropout at their init, in HyperModel's order.
    from hypertune.experiments.models import SimpleCNN, mnist_mlp

    mlp = load("mnist_mlp")
    net = mnist_mlp(hidden=8, dropout=0.05)
    f = common.FixedRegularizers(net, mlp.hparams())
    hooks = [h for h in net._forward_pre_hooks.values() if type(h).__name__ == "InputDropoutHook"]
    assert len(hooks) == 1 and hooks[0].rate == pytest.approx(0.05)
    fm = load("fmnist_cnn")
    g = common.FixedRegularizers(SimpleCNN(in_channels=1, num_classes=10, dropout=0.05), fm.hparams())
    img = torch.ones(4, 1, 28, 28)
    assert (g.transform(img) == 0).any()  # one 4×4 hole per image
