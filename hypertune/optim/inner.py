"""The inner optimizers DeltaSTNOptimizer builds for Θ and λ/σ, and how it takes Θ/λ/σ out of the
user's optimizer (after every check has passed: see ``arguments.py``)."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import HyperTuneError
from ..model import HyperModel

#: Θ's default learning rate in the centered modes (Adam; benchmarks/RESULTS.md, compare.py).
DEFAULT_RESPONSE_LR = 1e-3


def response_optimizer_for(
    choice: torch.optim.Optimizer | str | None, mode: str, optimizer: torch.optim.Optimizer, params: list[nn.Parameter], lr: float | None
) -> torch.optim.Optimizer:
    """Θ's optimizer: the user's, or Adam (centered modes' default), or a clone (``stn``'s)."""
    if isinstance(choice, torch.optim.Optimizer):
        return choice
    if (choice or ("clone" if mode == "stn" else "adam")) == "clone":
        return clone_for_response(optimizer, params)
    return adam(params, DEFAULT_RESPONSE_LR if lr is None else float(lr))


def hyper_optimizer_for(hm: HyperModel, choice: torch.optim.Optimizer | None, lr: float, tune_scales: bool) -> torch.optim.Optimizer:
    """λ and σ's optimizer: the user's, or RMSprop as in the paper."""
    if choice is not None:
        return choice
    groups: list[dict[str, Any]] = [{"params": [hm.hparams.unconstrained]}]
    if tune_scales:
        groups.append({"params": [hm.hparams.raw_scale]})
    return torch.optim.RMSprop(groups, lr=lr, eps=rmsprop_eps(hm.hparams.unconstrained.dtype))


def adam(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """Adam with its fused kernel where there is one: Θ is as large as w₀, and on CPU the
    per-tensor loop costs 8× the fused step (benchmarks/response_optimizer_step.py)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError, TypeError):  # no fused kernel for this device or torch
        return torch.optim.Adam(params, lr=lr)


def rmsprop_eps(dtype: torch.dtype) -> float:
    """RMSprop's ε for the hyper-state's dtype. torch's 1e-8 rounds to 0 in float16, and a
    hypergradient below 2e-3 squares to 0 there, so the first λ step divided 0 by 0 and wrote
    NaN into λ and inf into σ; float16's machine epsilon (1e-3) keeps the step finite and small.
    Every other dtype keeps torch's default."""
    return float(torch.finfo(torch.float16).eps) if dtype == torch.float16 else 1e-8


def float16_notice(hm: HyperModel) -> str | None:
    """A model converted with ``.half()`` keeps λ and its RMSprop state in float16, where a
    hypergradient's square (about 1e-9 on a small MLP) is below the smallest subnormal (6e-8): the
    running average stays 0 and each λ step is lr·g/ε, there about 30× smaller than in float32,
    so λ barely moves, silently. bfloat16 has float32's range and tunes normally."""
    if hm.hparams.unconstrained.dtype != torch.float16:
        return None
    return (
        "hypertune: the model is float16 (.half()), so λ and its RMSprop state are float16 too, "
        "where the squared hypergradient underflows to 0 and λ barely moves. Keep the model in "
        "float32 and pass autocast=torch.float16, grad_scaler=torch.amp.GradScaler('cuda') to "
        "DeltaSTNOptimizer (mixed precision), or convert it with .bfloat16() instead"
    )


def reference_lr(group: Mapping[str, Any], fallback: float | None = None) -> float:
    """The learning rate Θ's follows relative to, read each step so that a scheduler attached
    before or after the DeltaSTNOptimizer gives the same run: OneCycleLR's ``max_lr`` (its
    nominal rate: ``initial_lr`` is max_lr / div_factor, which would push Θ's rate 25× above
    ``response_lr`` at the peak), else a scheduler's ``initial_lr`` (a warm-up that starts at
    lr 0 leaves ``lr`` 0), else ``fallback`` (the lr when the optimizer was built), else ``lr``."""
    for key in ("max_lr", "initial_lr"):
        value = group.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    return float(group["lr"] if fallback is None else fallback)


def take_over(optimizer: torch.optim.Optimizer, special: list[nn.Parameter]) -> None:
    """Move Θ/λ/σ out of the user's optimizer (checked by take_over_problems first)."""
    ids = {id(p) for p in special}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    for p in special:
        optimizer.state.pop(p, None)


def clone_for_response(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    settings = dict(optimizer.defaults)
    # ``defaults`` can hold more than the constructor takes (torch's AdamW records
    # ``decoupled_weight_decay``, which only Adam accepts): keep what the signature names.
    accepted = inspect.signature(type(optimizer).__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values()):
        settings = {k: v for k, v in settings.items() if k in accepted}
    settings["lr"] = optimizer.param_groups[0]["lr"]
    if "weight_decay" in settings:
        settings["weight_decay"] = 0.0
    try:
        return type(optimizer)(params, **settings)
    except (TypeError, ValueError) as err:
        raise HyperTuneError(
            f"could not build a {type(optimizer).__name__} for the response parameters ({err}); "
            "pass response_optimizer=... built over model.response_parameters(); your optimizer "
            "was not changed"
        ) from err


def doubled_decay_notice(optimizer: Any, decayed: list[nn.Parameter]) -> str | None:
    """The notice for an optimizer that applies its own weight decay to weights a tuned
    WeightDecay also penalizes: the tuned coefficient would act on top of a fixed one."""
    ids = {id(p) for p in decayed}
    rates: set[float] = set()
    count = 0
    for group in getattr(optimizer, "param_groups", []):
        rate = group.get("weight_decay", 0.0)
        if isinstance(rate, (int, float)) and rate > 0:
            hit = sum(1 for p in group["params"] if id(p) in ids)
            if hit:
                count += hit
                rates.add(float(rate))
    if not count:
        return None
    return (
        f"hypertune: {type(optimizer).__name__}'s own weight_decay ({', '.join(f'{r:g}' for r in sorted(rates))}) "
        f"also applies to {count} parameter(s) the tuned WeightDecay penalizes, so the tuned coefficient acts "
        "on top of a fixed decay; give those parameters weight_decay=0 in your optimizer to let hypertune "
        "own the decay"
    )
