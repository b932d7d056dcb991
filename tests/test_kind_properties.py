"""Each hyperparameter kind computes what it says: penalties against their closed forms, masks
drawn per example, values that reach λ's gradient, replays and unwrapped models that regularize
as training did, and options refused with one clear message.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import hypertune as ht
from hypertune.augment import ColorJitter, Cutout, RandomAffine
from hypertune.context import Perturbation
from hypertune.schedule import Schedule, ScheduleReplayer


# ---- weight decay --------------------------------------------------------------------------------
class _TiedWithBiases(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight  # tied, each with its own bias

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def test_weight_decay_with_biases_counts_a_tied_weight_once_and_every_bias():
    torch.manual_seed(0)
    net = _TiedWithBiases()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hm = ht.HyperModel.wrap(net, {"wd": ht.WeightDecay(init=0.3, include_bias=True)})
    c = hm.hparam_values()["wd"]
    expected = 0.5 * c * (net.a.weight.pow(2).sum() + net.a.bias.pow(2).sum() + net.b.bias.pow(2).sum())
    torch.testing.assert_close(hm.training_penalty(hm.current_point()), expected.reshape(1), rtol=1e-6, atol=0)
    assert {id(p) for p in hm.decayed_parameters()} == {id(net.a.weight), id(net.a.bias), id(net.b.bias)}
    # and per perturbation row, the bias term follows the layer's own response: check against the
    # weights the layers compute at δλ (response parameters made non-zero)
    with torch.no_grad():
        for p in hm.response_parameters():
            p.normal_()
    delta = torch.tensor([[0.7], [-1.3]])
    lam = hm.hparams.unconstrained.detach().unsqueeze(0)
    point = Perturbation(hm.hparams, lam + delta, delta)
    rows = hm.training_penalty(point)
    for i in range(2):
        s_a = hm.module.a.split(hm.module.a.hyper_projection(delta[i : i + 1]))
        w = net.a.weight + s_a[0].reshape(-1, 1) * hm.module.a.response_weight
        ba = net.a.bias + s_a[1].reshape(-1) * hm.module.a.response_bias
        assert hm.module.b.response_bias is None  # the tied layer's bias has no response of its own
        bb = net.b.bias
        value = point.value("wd")[i]
        torch.testing.assert_close(rows[i], 0.5 * value * (w.pow(2).sum() + ba.pow(2).sum() + bb.pow(2).sum()))


def test_weight_decay_on_a_weight_norm_layer_replays_as_the_penalty_it_trained_with():
    torch.manual_seed(0)
    net = nn.Sequential(weight_norm(nn.Linear(4, 4)), nn.ReLU(), nn.Linear(4, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hm = ht.HyperModel.wrap(net, {"wd": ht.WeightDecay(init=0.1)})
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05))
    x = torch.randn(8, 4)
    opt.train_step(x, torch.randn(8, 1), F.mse_loss)
    c = hm.hparam_values()["wd"]
    trained = hm.training_penalty(hm.current_point())
    torch.testing.assert_close(trained, 0.5 * c * (net[0].weight.pow(2).sum() + net[2].weight.pow(2).sum()).reshape(1))
    schedule = Schedule.from_optimizer(opt)
    assert schedule.meta["wd"]["computed"] == ["0.weight"] and schedule.meta["wd"]["params"] == ["2.weight"]
    plain = hm.unwrap()
    replay = ScheduleReplayer(schedule, plain)
    replay.apply(0)
    torch.testing.assert_close(replay.penalty(), trained.reshape(()), rtol=1e-6, atol=0)
    with pytest.raises(ht.HyperTuneError, match="parametrization computes.*replayer.penalty"):
        replay.param_groups()


def test_weight_decay_targets_reach_a_weight_norm_module_that_stays_w0():
    torch.manual_seed(0)
    net = nn.Sequential(weight_norm(nn.Linear(3, 3)), nn.ReLU(), nn.Linear(3, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hm = ht.HyperModel.wrap(net, {"wd": ht.WeightDecay(init=0.1, targets=["0", "2"])}, exclude=["0"])
    c = hm.hparam_values()["wd"]
    expected = 0.5 * c * (net[0].weight.pow(2).sum() + net[2].weight.pow(2).sum())
    torch.testing.assert_close(hm.training_penalty(hm.current_point()), expected.reshape(1), rtol=1e-6, atol=0)


# ---- activation penalties ------------------------------------------------------------------------
class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(3, 4, batch_first=True)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


def test_tar_of_one_step_sequences_is_zero_not_nan():
    torch.manual_seed(0)
    hm = ht.HyperModel.wrap(_Recurrent(), {"tar": ht.TemporalActivationRegularization(init=1.0, targets=["rnn"])})
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05))
    x, y = torch.randn(4, 1, 3), torch.randint(0, 2, (4,))
    with torch.no_grad():
        data_loss = F.cross_entropy(hm(x), y)
    result = opt.train_step(x, y, F.cross_entropy)  # refused as a NaN loss before
    assert result.loss == pytest.approx(float(data_loss), rel=1e-6)


# ---- word dropout ---------------------------------------------------------------------------------
class _Words(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 4)
        self.fc = nn.Linear(4, 2)

    def forward(self, ids):
        return self.fc(self.emb(ids))


def test_word_dropout_draws_one_mask_per_example_in_the_w0_pass_too():
    torch.manual_seed(0)
    hm = ht.HyperModel.wrap(_Words(), {"ed": ht.EmbeddingDropout(init=0.5)}).train()
    outs = []
    hm.module.emb.register_forward_hook(lambda m, a, o: outs.append(o))
    ids = torch.arange(50).repeat(8, 1)  # every example holds every word once
    agree = []
    with torch.no_grad():
        for _ in range(60):
            hm(ids)  # the w₀ pass: one shared row (λ₀)
            dropped = outs[-1].abs().sum(-1) == 0
            agree.append((dropped[0] == dropped[1]).float().mean())
    # independent masks at rate 0.5 agree on half the words (3000 words: σ ≈ 0.009); one shared
    # mask, as before, agreed on all of them
    assert abs(float(torch.stack(agree).mean()) - 0.5) < 0.05


# ---- discrete values -----------------------------------------------------------------------------
class _Scaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x) * ht.hparam("t").view(-1, 1)


def test_a_discrete_value_is_an_integer_forward_and_passes_its_gradient_straight_through():
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    grads = {}
    for discrete in (False, True):
        torch.manual_seed(0)
        hm = ht.HyperModel.wrap(_Scaled(), {"t": ht.HParam(init=2.0, low=0.5, high=6.5, discrete=discrete)}).eval()
        lam = hm.hparams.unconstrained
        point = Perturbation(hm.hparams, lam.unsqueeze(0), (lam - lam.detach()).unsqueeze(0))
        value = point.value("t")
        if discrete:
            assert float(value) == 2.0 and float(value) == round(float(value))
        with hm.evaluated_at(Perturbation(hm.hparams, lam.unsqueeze(0), (lam - lam.detach()).unsqueeze(0))):
            loss = F.cross_entropy(hm(x), y)
        grads[discrete] = torch.autograd.grad(loss, lam)[0]
    assert float(grads[True].abs()) > 0  # round() alone gave exactly 0
    torch.testing.assert_close(grads[True], grads[False])  # at an integer value the two agree


# ---- unwrap keeps what it can and names what it cannot -------------------------------------------
class _LockedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 6)
        self.drop = nn.Dropout(0.1)
        self.rnn = nn.LSTM(6, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 30)

    def forward(self, ids):
        return self.head(self.rnn(self.drop(self.emb(ids)))[0])


def test_unwrap_keeps_word_dropout_and_locked_masks_and_names_what_nn_lstm_cannot_hold():
    torch.manual_seed(0)
    specs = {
        "word": ht.EmbeddingDropout(init=0.4),
        "locked": ht.DropoutRate(init=0.3, locked_dim=1),
        "hidden": ht.VariationalDropout(init=0.3, on="hidden"),
    }
    hm = ht.HyperModel.wrap(_LockedLM(), specs)
    with pytest.warns(ht.WrapNotice, match=r"'hidden' = 0\.3.*variational"):
        plain = hm.unwrap()
    plain.train()
    ids = torch.randint(0, 30, (64, 12))
    out = plain.emb(ids)
    dropped = out.abs().sum(-1) == 0
    assert abs(float(dropped.float().mean()) - 0.4) < 0.05  # word dropout at the tuned rate
    h = plain.drop(torch.ones(64, 12, 6))
    assert torch.equal(h, h[:, :1].expand_as(h))  # one mask per example and feature, shared over time
    assert abs(float((h[:, 0] == 0).float().mean()) - 0.3) < 0.07


# ---- options refused at construction --------------------------------------------------------------
@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: ht.HParam(init=1.0, low=0.1, high=3.0, log="no"), "log must be True or False"),
        (lambda: ht.HParam(init=1.0, low=0.0, high=3.0, discrete="yes"), "discrete must be True or False"),
        (lambda: ht.WeightDecay(include_bias="no"), "include_bias must be True or False"),
        (lambda: ht.DropoutRate(per_site=1), "per_site must be True or False"),
        (lambda: ht.DropoutRate(locked_dim=True), "locked_dim=True must be an axis"),
        (lambda: ht.TemporalActivationRegularization(init=1.0, targets=["x"], time_dim=True), "time_dim=True must be an axis"),
        (lambda: Cutout(fill="black"), "Cutout: fill must be"),
        (lambda: RandomAffine(fill=[0.0, float("nan")]), "RandomAffine: fill must be"),
        (lambda: ColorJitter(mean=[0.5], std="a"), "ColorJitter: std must be"),
    ],
)
def test_spec_options_are_refused_with_one_clear_message(build, message):
    with pytest.raises(ht.SpecError, match=message):
        build()


def test_numpy_flags_and_axes_are_accepted():
    assert ht.DropoutRate(locked_dim=np.int64(1)).locked_dim == 1
    assert ht.WeightDecay(include_bias=np.bool_(True)).include_bias is True


def test_integer_images_are_refused_with_the_conversion_to_make():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    hm = ht.HyperModel.wrap(net, {"cut": Cutout()})
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.1))
    images = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    with pytest.raises(ht.HyperTuneError, match=r"torch.uint8.*x.float\(\) / 255"):
        opt.train_step(images, torch.randint(0, 2, (4,)), F.cross_entropy)


def test_an_init_that_rounds_onto_a_bound_in_the_models_dtype_is_refused():
    """DropoutRate(init=1e-40) passes the spec's float64 check but is exactly 0 in float32, where
    the sigmoid is flat: its λ could never move."""
    net = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    with pytest.raises(ht.WrapError, match=r"init d=1e-40 \(it is 0 in torch.float32\)"):
        ht.HyperModel.wrap(net, {"d": ht.DropoutRate(init=1e-40)})
    assert isinstance(net[1], nn.Dropout)  # untouched
    ht.HyperModel.wrap(net.double(), {"d": ht.DropoutRate(init=1e-40)})  # representable in float64
