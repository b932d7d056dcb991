"""The λ step at δλ = 0 (σ held) keeps the layers' inputs out of Θ's term: same λ gradient, exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import hypertune as ht
from hypertune.optim import steps


class TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 8)
        self.drop = nn.Dropout(0.1)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.drop(self.emb(tokens))))).mean(1)


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4))


def _cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(2, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout2d(0.1),
        nn.Conv2d(6, 6, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 4 * 4, 4),
    )


CASES = {
    "mlp": (_mlp, lambda g: torch.randn(12, 6, generator=g), 4),
    "cnn": (_cnn, lambda g: torch.randn(12, 2, 6, 6, generator=g), 4),
    "tied": (TiedLM, lambda g: torch.randint(0, 20, (12, 5), generator=g), 20),
}


def _wrapped(case: str) -> ht.HyperModel:
    torch.manual_seed(0)
    return ht.HyperModel.wrap(CASES[case][0](), {"dropout": ht.DropoutRate(per_site=True), "wd": ht.WeightDecay(init=1e-3)})


def _lambda_after_steps(case: str, mode: str, keep_center_shortcut: bool, monkeypatch) -> torch.Tensor:
    _, inputs, classes = CASES[case]
    if not keep_center_shortcut:
        real = steps.Perturbation
        monkeypatch.setattr(steps, "Perturbation", lambda *a, **k: real(*a, **{**k, "at_center": False}))
    g = torch.Generator().manual_seed(0)
    hm = _wrapped(case)
    opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05, momentum=0.9), mode=mode,
                               response_every=1)
    for _ in range(4):  # Θ moves off zero, so the λ gradient runs through it
        x, y = inputs(g), torch.randint(0, classes, (12,), generator=g)
        opt.train_step(x, y, F.cross_entropy)
        opt.val_step(inputs(g), torch.randint(0, classes, (12,), generator=g), F.cross_entropy)
    monkeypatch.undo()
    return hm.hparams.unconstrained.detach().clone()


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ["delta", "centered"])
def test_lambda_steps_are_exactly_those_of_the_full_graph(case, mode, monkeypatch):
    shortcut = _lambda_after_steps(case, mode, True, monkeypatch)
    full = _lambda_after_steps(case, mode, False, monkeypatch)
    initial = _wrapped(case).hparams.unconstrained.detach()
    assert not torch.equal(shortcut, initial)  # λ moved: the comparison means something
    assert torch.equal(shortcut, full)


def test_only_the_held_scale_lambda_step_is_at_the_center(monkeypatch):
    seen = []
    real = steps.Perturbation

    def spy(*a, **k):
        point = real(*a, **k)
        seen.append(point.at_center)
        return point

    monkeypatch.setattr(steps, "Perturbation", spy)
    for tune_scales, want in [(False, True), (True, False)]:
        seen.clear()
        torch.manual_seed(0)
        hm = ht.HyperModel.wrap(_mlp(), {"dropout": ht.DropoutRate()})
        opt = ht.DeltaSTNOptimizer(hm, torch.optim.SGD(hm.parameters(), lr=0.05), tune_scales=tune_scales)
        opt.val_step(torch.randn(4, 6), torch.randint(0, 4, (4,)), F.cross_entropy)
        assert seen == [want]
