"""DropConnect, embedding (word) dropout, locked dropout, AR and TAR as tuned hyperparameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune.context import Perturbation


def _point(model: ht.HyperModel, rows: int, **values: float) -> Perturbation:
    """Evaluation point with the given constrained values (others at λ₀), no response."""
    space = model.hparams
    u = space.unconstrained.detach().clone()
    for name, v in values.items():
        u[space.index(name)] = space.specs[name].transform.inverse(v)
    return Perturbation(space, u.unsqueeze(0).expand(rows, -1).clone())


def _binomial_ok(kept: int, n: int, keep: float) -> bool:
    sd = math.sqrt(n * keep * (1 - keep)) + 1e-9
    return abs(kept - n * keep) <= 4 * sd + 1


def test_dropconnect_masks_weights_once_per_batch_at_its_rate():
    torch.manual_seed(0)
    lin = nn.Linear(400, 50, bias=False)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    model = ht.HyperModel.wrap(nn.Sequential(lin), {"wdrop": ht.DropConnect(init=0.3)})
    model.train()
    x = torch.ones(4, 400)
    with torch.no_grad(), model.evaluated_at(_point(model, 1, wdrop=0.3)):
        out = model(x)
    kept = out[0] * 0.7  # each output = (#kept weights in its row) / keep
    assert torch.allclose(kept, kept.round(), atol=1e-3)
    assert _binomial_ok(int(kept.sum().round()), 400 * 50, 0.7)
    # One mask for the batch: every example sees the same weights.
    assert torch.equal(out[0], out[3])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), torch.full((4, 50), 400.0))


def test_dropconnect_must_be_per_batch_and_match_a_layer():
    with pytest.raises(ht.SpecError, match="batch"):
        ht.DropConnect(perturb="example")
    with pytest.raises(ht.WrapError, match="matches no hyper-layer"):
        ht.HyperModel.wrap(nn.Sequential(nn.Linear(2, 2)), {"w": ht.DropConnect(targets=["nothing"])})


def test_embedding_dropout_drops_whole_words_per_example_at_its_rate():
    torch.manual_seed(0)
    emb = nn.Embedding(2000, 3)
    with torch.no_grad():
        emb.weight.fill_(1.0)
    model = ht.HyperModel.wrap(nn.Sequential(emb), {"edrop": ht.EmbeddingDropout(init=0.2)})
    model.train()
    # Each row lists every word twice, so both copies must share one fate.
    words = torch.arange(2000).repeat(2).unsqueeze(0).expand(2, -1)
    rates = torch.tensor([0.1, 0.6])
    point = _point(model, 2)
    point.hparams[:, model.hparams.index("edrop")] = torch.logit(rates / 0.95)
    with torch.no_grad(), model.evaluated_at(point):
        out = model(words)[..., 0]
    first, second = out[:, :2000], out[:, 2000:]
    assert torch.equal(first, second)
    for i, rate in enumerate(rates.tolist()):
        dropped = int((first[i] == 0).sum())
        assert _binomial_ok(2000 - dropped, 2000, 1 - rate)
        kept_values = first[i][first[i] != 0]
        torch.testing.assert_close(kept_values, torch.full_like(kept_values, 1 / (1 - rate)))


def test_locked_dropout_shares_its_mask_over_time():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 64), nn.Dropout(0.3))
    model = ht.HyperModel.wrap(net, {"vd": ht.DropoutRate(init=0.3, locked_dim=1)})
    model.train()
    with torch.no_grad(), model.evaluated_at(_point(model, 1)):
        out = model(torch.randn(3, 7, 5).abs() + 1)
    zero = out == 0
    assert zero.any()
    assert torch.equal(zero, zero[:, :1, :].expand_as(zero))
    with pytest.raises(ht.SpecError, match="locked_dim"):
        ht.DropoutRate(locked_dim=0)


class SeqModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.rnn = nn.Linear(8, 8)  # a per-step cell stand-in keeps this test independent of LSTM
        self.drop = nn.Dropout(0.1)
        self.out = nn.Linear(8, 50)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.rnn(self.emb(tokens)))
        return self.out(self.drop(h))


def _seq_model(ar: float = 2.0, tar: float = 1.0, ar_target: str = "drop", dropconnect: bool = True) -> ht.HyperModel:
    torch.manual_seed(0)
    specs = {
        "edrop": ht.EmbeddingDropout(init=0.1),
        "wdrop": ht.DropConnect(init=0.1, targets=["rnn"]),
        "vdrop": ht.DropoutRate(init=0.2, locked_dim=1),
        "ar": ht.ActivationRegularization(init=ar, targets=[ar_target]),
        "tar": ht.TemporalActivationRegularization(init=tar, targets=["rnn"]),
    }
    if not dropconnect:
        del specs["wdrop"]
    return ht.HyperModel.wrap(SeqModel(), specs)


def test_ar_and_tar_values_are_the_per_example_formulas():
    model = _seq_model(ar=2.0, tar=3.0, ar_target="rnn", dropconnect=False)
    model.eval()  # no dropout; the hooked layer alone in train mode so its hooks collect
    tokens = torch.randint(0, 50, (4, 6))
    model.module.rnn.train()
    with model.evaluated_at(_point(model, 1)), model.collecting_activations():
        model(tokens)
        penalty = model.training_penalty(_point(model, 1))
    with torch.no_grad():
        h = model.module.rnn(model.module.emb(tokens))  # the hooked module's own output
    ar = 2.0 * h.pow(2).mean(dim=(1, 2))
    tar = 3.0 * (h[:, 1:] - h[:, :-1]).pow(2).mean(dim=(1, 2))
    torch.testing.assert_close(penalty, ar + tar, rtol=1e-5, atol=1e-6)


def test_activation_penalties_stay_out_of_the_validation_loss():
    model = _seq_model(ar=1e4, tar=1e4)
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.0))
    tokens, target = torch.randint(0, 50, (4, 6)), torch.randint(0, 50, (4, 6))

    def loss_fn(out, y):
        return F.cross_entropy(out.reshape(-1, 50), y.reshape(-1))

    v = opt.val_step(tokens, target, loss_fn)
    assert v.loss < 10  # a penalty of order 1e4 would show
    r = opt.train_step(tokens, target, loss_fn)
    assert r.loss < 10  # StepResult.loss is the data loss; the penalty only enters the update


@pytest.mark.parametrize("mode", ["delta", "centered", "stn"])
def test_sequence_regularizers_train_end_to_end(mode):
    model = _seq_model()
    opt = ht.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), mode=mode)
    g = torch.Generator().manual_seed(0)

    def loss_fn(out, y):
        return F.cross_entropy(out.reshape(-1, 50), y.reshape(-1))

    before = dict(model.hparam_values())
    for _ in range(5):
        tokens = torch.randint(0, 50, (8, 6), generator=g)
        r = opt.train_step(tokens, tokens, loss_fn)
        v = opt.val_step(tokens, tokens, loss_fn)
        assert math.isfinite(r.loss) and math.isfinite(v.loss)
    assert model.hparam_values() != before
    with pytest.warns(ht.WrapNotice, match=r"does not apply 'wdrop' = .*DropConnect"):
        plain = model.unwrap()
    assert type(plain.rnn) is nn.Linear and "dropconnect" not in plain.rnn.__dict__
    assert not plain.rnn._forward_hooks  # AR/TAR collectors are gone: their terms live in the loss
    # what stays: the locked mask of vdrop and the word dropout of edrop, at their tuned rates
    assert len(plain.drop._forward_hooks) == 1 and len(plain.emb._forward_hooks) == 1
