"""DeltaSTNOptimizer's constructor checks: every problem found before anything is built or changed."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from .. import distributed as _distributed
from ..model import HyperModel

Mode = Literal["delta", "centered", "stn"]
NonFinite = Literal["raise", "skip"]


def _positive_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def argument_problems(
    *,
    optimizer: Any,
    mode: Any,
    response_optimizer: Any,
    response_lr: Any,
    hyper_optimizer: Any,
    hyper_lr: Any,
    entropy_weight: Any,
    tune_scales: Any,
    warmup_steps: Any,
    nonfinite: Any,
    response_every: Any,
    response_fraction: Any,
    antithetic: Any,
    autocast: Any,
    grad_scaler: Any,
) -> list[str]:
    """What is wrong with the arguments on their own (the model's checks come after)."""
    problems = []
    if mode not in ("delta", "centered", "stn"):
        problems.append(f"mode={mode!r}: choose 'delta' (default), 'centered' or 'stn'")
    if nonfinite not in ("raise", "skip"):
        problems.append(f"nonfinite={nonfinite!r}: choose 'raise' or 'skip'")
    if not isinstance(optimizer, torch.optim.Optimizer):
        problems.append(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    elif isinstance(optimizer, torch.optim.LBFGS):
        problems.append(
            "LBFGS needs a closure that re-evaluates the loss, which train_step cannot give it: "
            "use a first-order optimizer such as SGD or Adam"
        )
    if not (isinstance(warmup_steps, int) and not isinstance(warmup_steps, bool) and warmup_steps >= 0):
        problems.append(f"warmup_steps={warmup_steps!r} must be a non-negative int")
    if not (isinstance(response_every, int) and not isinstance(response_every, bool) and response_every >= 1):
        problems.append(f"response_every={response_every!r} must be an int >= 1")
    if isinstance(response_fraction, bool) or not (isinstance(response_fraction, (int, float)) and 0 < response_fraction <= 1):
        problems.append(f"response_fraction={response_fraction!r} must lie in (0, 1]")
    if not isinstance(antithetic, bool):
        problems.append(f"antithetic={antithetic!r} must be True or False")
    built = isinstance(response_optimizer, str) and response_optimizer in ("adam", "clone")
    if not (built or response_optimizer is None or isinstance(response_optimizer, torch.optim.Optimizer)):
        problems.append(
            f"response_optimizer={response_optimizer!r}: pass a torch.optim.Optimizer over "
            "model.response_parameters(), 'adam' (default in the centered modes) or 'clone'"
        )
    if response_lr is not None:
        effective = response_optimizer if response_optimizer is not None else ("clone" if mode == "stn" else "adam")
        if effective != "adam":
            theirs = effective if isinstance(effective, str) else "yours"
            problems.append(
                f"response_lr sets the learning rate of the Adam hypertune builds for Θ, but Θ's "
                f"optimizer here is {theirs!r} (in mode='stn' the default is a clone of your "
                "optimizer): drop response_lr, or pass response_optimizer='adam'"
            )
        if not _positive_finite(response_lr):
            problems.append(f"response_lr={response_lr!r} must be a positive finite float")
    if hyper_optimizer is None:
        if not _positive_finite(hyper_lr):
            problems.append(f"hyper_lr={hyper_lr!r} must be a positive finite float")
    elif not isinstance(hyper_optimizer, torch.optim.Optimizer):
        problems.append(
            f"hyper_optimizer must be a torch.optim.Optimizer over model.hyper_parameters(), got "
            f"{type(hyper_optimizer).__name__}"
        )
    if not (isinstance(entropy_weight, (int, float)) and math.isfinite(entropy_weight) and entropy_weight >= 0):
        problems.append(f"entropy_weight={entropy_weight!r} must be a finite float >= 0")
    if not isinstance(tune_scales, bool):
        problems.append(f"tune_scales={tune_scales!r} must be True or False")
    if autocast is not None and autocast not in (torch.bfloat16, torch.float16):
        problems.append(f"autocast={autocast!r}: choose torch.bfloat16, torch.float16 or None")
    if grad_scaler is not None and not all(
        hasattr(grad_scaler, a) for a in ("scale", "unscale_", "update", "is_enabled")
    ):
        problems.append(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
    return problems


def _held(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def layer_weights(hm: HyperModel) -> list[tuple[str, list[nn.Parameter]]]:
    """Each hyper-layer's own w₀ weight matrices (not Θ, not biases)."""
    out = []
    for path, own in hm.hyper_layer_weights().items():
        matrices = [p for p in own if p.dim() >= 2]
        if matrices:
            out.append((path, matrices))
    return out


def frozen_layers(weights: list[tuple[str, list[nn.Parameter]]]) -> list[str]:
    return [path for path, own in weights if not any(p.requires_grad for p in own)]


def frozen_error(frozen: list[str]) -> str:
    return (
        f"hyper-layer(s) {frozen[:8]} were frozen (requires_grad=False) after wrapping: their "
        "weights cannot follow a response, yet λ's gradient would count it. Freeze before "
        "HyperModel.wrap (frozen modules then stay w₀: plain = model.unwrap(), freeze, "
        "HyperModel.wrap(plain, ...), then build the optimizers again), or wrap with exclude=[...] them"
    )


def take_over_problems(
    hm: HyperModel,
    optimizer: torch.optim.Optimizer,
    base: list[nn.Parameter],
    response: list[nn.Parameter],
    hyper: list[nn.Parameter],
    response_optimizer: Any,
    hyper_optimizer: Any,
) -> list[str]:
    """Whether ``optimizer`` covers w₀ exactly (Θ/λ/σ in it are moved out later), and whether
    optimizers the user built for Θ or λ/σ hold only those."""
    problems = []
    base_ids = {id(p) for p in base}
    special = {id(p) for p in response} | {id(p) for p in hyper}
    held = _held(optimizer)
    foreign = [p for p in held if id(p) not in base_ids and id(p) not in special]
    if foreign:
        shapes = ", ".join(str(tuple(p.shape)) for p in foreign[:5])
        problems.append(
            f"the optimizer holds {len(foreign)} parameter(s) the wrapped model does not own "
            f"(shapes {shapes}): build it after HyperModel.wrap, from the wrapped model's "
            "parameters (model.parameters() or model.base_parameters())"
        )
    held_ids = {id(p) for p in held}
    names = {id(p): n for n, p in hm.named_parameters()}
    missing = [p for p in base if p.requires_grad and id(p) not in held_ids]
    if missing:
        # A hyper-layer's weights cannot simply be frozen now (the check below refuses that):
        # its response would still count in λ's gradient.
        in_layers = {id(p) for own in hm.hyper_layer_weights().values() for p in own}
        wrapped = [names.get(id(p), "?") for p in missing if id(p) in in_layers]
        freeze = (
            "or, to train only part of the model, freeze the rest before wrapping: plain = "
            "model.unwrap(), requires_grad_(False) on the frozen modules, then HyperModel.wrap(plain, ...) "
            "(frozen modules stay w₀)"
            if wrapped
            else "or freeze them with requires_grad_(False)"
        )
        problems.append(
            f"{len(missing)} trainable parameter(s) of the model are in no optimizer and would "
            f"never train: {[names.get(id(p), '?') for p in missing][:8]}; build the optimizer from "
            f"model.parameters(), {freeze}"
        )
    frozen = frozen_layers(layer_weights(hm))
    if frozen:
        problems.append(frozen_error(frozen))
    for name, opt, allowed, hint in (
        ("response_optimizer", response_optimizer, response, "model.response_parameters()"),
        ("hyper_optimizer", hyper_optimizer, hyper, "model.hyper_parameters()"),
    ):
        if isinstance(opt, torch.optim.Optimizer):
            ok = {id(p) for p in allowed}
            if opt is optimizer or any(id(p) not in ok for p in _held(opt)):
                problems.append(f"{name} must hold only {hint}, built over them alone")
    for what, params in (("Θ", response), ("λ/σ", hyper)):
        on_meta = [p for p in params if p.is_meta]
        if on_meta:
            problems.append(
                f"the model's {what} is on the meta device (no values): materialize the model "
                "first with hyper_model.to_empty(device=...) and load or initialize its weights"
            )
            break
    return problems


BYPASSING_DDP = (
    "this HyperModel is used through DistributedDataParallel (it was prepared for DDP "
    "and this is one of several ranks) but DeltaSTNOptimizer was given the inner "
    "HyperModel, so w₀, Θ, λ and σ would drift apart across ranks: build the optimizer "
    "after DDP, from the DDP module: ddp = hypertune.distributed.prepare_ddp(hyper_model, "
    "...); opt = DeltaSTNOptimizer(ddp, ...)"
)


@dataclass
class Placement:
    """Where the steps run: through DDP (w₀ steps) and on this rank's module (Θ, λ steps)."""

    local_model: nn.Module
    ddp: nn.parallel.DistributedDataParallel | None = None
    compiled: bool = False
    problems: list[str] = field(default_factory=list)


def placement(model: nn.Module, hm: HyperModel, mode: Any) -> Placement:
    """Find DDP and torch.compile around the HyperModel, and what they rule out."""
    ddp = _distributed.find_ddp(model)
    problems = []
    if ddp is not None:
        _distributed.check_ddp(ddp)
    elif _distributed.prepared_for_ddp(hm):
        problems.append(BYPASSING_DDP)
    local_model: nn.Module = ddp.module if ddp is not None else model
    compiled = any(type(m).__name__ == "OptimizedModule" for m in (model, local_model)) or (
        getattr(hm, "_compiled_call_impl", None) is not None
    )
    if compiled and mode == "delta" and getattr(torch.compiler, "set_stance", None) is None:
        problems.append(
            "a compiled model in mode='delta' needs torch >= 2.6 (torch.compiler.set_stance) to "
            "run its linearized Θ step eagerly: upgrade torch, or use mode='centered'"
        )
    return Placement(local_model, ddp, compiled, problems)
