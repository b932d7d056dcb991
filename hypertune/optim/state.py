"""DeltaSTNOptimizer's saved state: its layout, and every check a load makes before writing.

A load first lists every problem it can find against the live optimizer and model (format,
version, mode, tuned names, the shape and finiteness of every tensor, each inner optimizer's
group layout and per-parameter state shapes, counters, History), and refuses them all in one
StateDictError; only a state with no problem is written.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import StateDictError
from ..history import Record

FORMAT = "hypertune.DeltaSTNOptimizer"
VERSION = 1
INNER = ("optimizer", "response_optimizer", "hyper_optimizer")
# Per-element state of torch's optimizers: each has the shape of its parameter.
_PER_ELEMENT = {"momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "grad_avg", "acc_delta", "sum", "ax", "prev"}


def param_shapes(opt: Any) -> list[list[list[int]]]:
    """The shape of every parameter of every group, in the order a state dict numbers them."""
    return [[list(p.shape) for p in g["params"]] for g in opt.param_groups]


def _params_in_order(opt: Any) -> list[nn.Parameter]:
    return [p for g in opt.param_groups for p in g["params"]]


def _tensors(tree: Any, prefix: str) -> list[tuple[str, Tensor]]:
    out: list[tuple[str, Tensor]] = []
    if torch.is_tensor(tree):
        out.append((prefix, tree))
    elif isinstance(tree, Mapping):
        for k, v in tree.items():
            out += _tensors(v, f"{prefix}.{k}")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out += _tensors(v, f"{prefix}[{i}]")
    return out


def _nonfinite(tree: Any, prefix: str) -> list[str]:
    return [
        name
        for name, t in _tensors(tree, prefix)
        if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t).all())
    ]


def spec_signature(specs: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each tuned value's spec as plain data (JSON types; a module object as its repr), saved with
    a state: λ is stored on the tuning scale, so other bounds or another kind under the same name
    would resume at other values."""
    import json

    return {name: json.loads(json.dumps(spec.to_json(), default=repr)) for name, spec in specs.items()}


def spec_problems(saved: Any, live: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """What differs between the specs a state was saved with and this model's (an older state
    without specs is not checked)."""
    if saved is None:
        return []
    if not isinstance(saved, Mapping):
        return ["specs is not a mapping"]
    problems = []
    for name, spec in live.items():
        old = saved.get(name)
        if not isinstance(old, Mapping):
            continue  # a name mismatch is reported by the names check
        if old.get("kind") != spec.get("kind"):
            problems.append(f"hparams[{name!r}] was saved as a {old.get('kind')!r} spec and is a {spec.get('kind')!r} one here")
            continue
        # init is not compared: the saved λ replaces it
        fields_ = [f"{k}: {old.get(k)!r} vs {spec.get(k)!r}" for k in spec if k != "init" and old.get(k) != spec.get(k)]
        if fields_:
            problems.append(
                f"hparams[{name!r}] was saved with another spec ({', '.join(fields_)}): λ is stored on the "
                "tuning scale, so it would resume at another value; wrap with the spec the run used"
            )
    return problems


def inner_problems(key: str, saved: Any, live: Any, shapes: Any) -> list[str]:
    """What keeps ``saved`` (an inner optimizer's state dict) from loading into ``live``."""
    if not (isinstance(saved, Mapping) and isinstance(saved.get("param_groups"), list) and isinstance(saved.get("state"), Mapping)):
        return [f"{key} is not a torch optimizer state dict"]
    problems = []
    layout = [len(g.get("params", [])) for g in saved["param_groups"]]
    live_layout = [len(g["params"]) for g in live.param_groups]
    if layout != live_layout:
        problems.append(
            f"{key} has {layout} parameters per group, this one {live_layout}: build the "
            "optimizer the same way as in the run that saved it"
        )
        return problems
    params = _params_in_order(live)
    if shapes is not None and shapes != param_shapes(live):
        diff = [
            f"#{i} {tuple(a)} vs {tuple(b)}"
            for i, (a, b) in enumerate(zip(
                [s for g in shapes for s in g], [s for g in param_shapes(live) for s in g]
            ))
            if a != b
        ]
        problems.append(
            f"{key} was saved for parameters of other shapes (saved vs this model: {diff[:5]}): "
            "the model's layer sizes differ"
        )
    bad_shapes = []
    for index, entry in saved["state"].items():
        if not (isinstance(index, int) and 0 <= index < len(params)):
            problems.append(f"{key}.state has an entry for parameter #{index}, which this optimizer lacks")
            continue
        if not isinstance(entry, Mapping):
            problems.append(f"{key}.state[{index}] is not a mapping")
            continue
        p = params[index]
        live_entry = live.state.get(p, {})
        for name, value in entry.items():
            if not torch.is_tensor(value):
                continue
            ref = live_entry.get(name)
            expected = tuple(ref.shape) if torch.is_tensor(ref) else tuple(p.shape) if name in _PER_ELEMENT else None
            if expected is not None and tuple(value.shape) != expected:
                bad_shapes.append(f"state[{index}].{name} {tuple(value.shape)} vs {expected}")
    if bad_shapes:
        problems.append(
            f"{key} holds state of other shapes than this model's parameters ({bad_shapes[:5]}): "
            "it was saved for a model with other layer sizes"
        )
    nonfinite = _nonfinite(saved["state"], f"{key}.state")
    if nonfinite:
        problems.append(f"{key} holds non-finite values in {nonfinite[:5]}")
    return problems


def state_problems(
    state: Any,
    *,
    mode: str,
    names: Sequence[str],
    hyper: Mapping[str, Tensor],
    inner: Mapping[str, Any],
    response_groups: int,
    specs: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[str]:
    """Every reason ``state`` cannot be loaded; empty if it can."""
    if not isinstance(state, Mapping) or state.get("format") != FORMAT:
        return ["not a DeltaSTNOptimizer state dict (missing format tag)"]
    if state.get("version") != VERSION:
        return [f"state dict version {state.get('version')} is not supported (this hypertune writes {VERSION})"]
    problems = []
    required = ["mode", "hparam_names", *INNER, "hparams", "counters", "lr_reference"]
    missing = [k for k in required if k not in state]
    if missing:
        problems.append(f"it lacks the key(s) {missing}")
    if "mode" in state and state["mode"] != mode:
        problems.append(f"state dict was saved in mode {state['mode']!r} but this optimizer runs {mode!r}")
    if "hparam_names" in state and list(state["hparam_names"]) != list(names):
        problems.append(f"state dict tunes {state['hparam_names']} but this model tunes {list(names)}")
    if specs is not None:
        problems += spec_problems(state.get("specs"), specs)
    saved = state.get("hparams")
    if saved is not None:
        if not isinstance(saved, Mapping):
            problems.append("hparams is not a mapping")
        else:
            for key, live in hyper.items():
                value = saved.get(key)
                if not torch.is_tensor(value):
                    problems.append(f"hparams.{key} is missing or not a tensor")
                elif tuple(value.shape) != tuple(live.shape):
                    problems.append(f"hparams.{key} has shape {tuple(value.shape)}, expected {tuple(live.shape)}")
                elif value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    problems.append(f"hparams.{key} holds non-finite values {value.tolist()}")
    shapes = state.get("param_shapes") or {}
    for key in INNER:
        if key in state:
            problems += inner_problems(key, state[key], inner[key], shapes.get(key) if isinstance(shapes, Mapping) else None)
    counters = state.get("counters")
    if counters is not None:
        for key in ("train_steps", "val_steps", "skipped_steps"):
            value = counters.get(key) if isinstance(counters, Mapping) else None
            if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
                problems.append(f"counters.{key}={value!r} must be a non-negative int")
    ref = state.get("lr_reference")
    if ref is not None:
        ok = (
            isinstance(ref, (list, tuple))
            and len(ref) == 2
            and isinstance(ref[1], (list, tuple))
            and len(ref[1]) == response_groups
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in [ref[0], *ref[1]])
        )
        if not ok:
            problems.append(f"lr_reference={ref!r} must be [w₀ lr, [Θ lr per group ({response_groups})]]")
    noise = state.get("noise", {})
    pending = noise.get("pending") if isinstance(noise, Mapping) else None
    if not isinstance(noise, Mapping):
        problems.append("noise is not a mapping")
    elif pending is not None and not (
        torch.is_tensor(pending) and pending.dim() == 2 and pending.shape[1] == len(names)
        and pending.is_floating_point() and bool(torch.isfinite(pending).all())
    ):
        problems.append(f"noise.pending must be None or a finite (rows, {len(names)}) tensor")
    history = state.get("history", {"records": []})
    records = history.get("records") if isinstance(history, Mapping) else None
    known = {f.name for f in fields(Record)}
    if not isinstance(records, list) or not all(
        isinstance(r, Mapping) and {"step", "kind", "loss", "hparams", "scales"} <= set(r) <= known for r in records
    ):
        problems.append("history is not a list of History records")
    return problems


def refuse(problems: Sequence[str]) -> StateDictError:
    lines = "\n".join(f"  - {p}" for p in problems)
    return StateDictError(
        f"load_state_dict found {len(problems)} problem(s); nothing was loaded:\n{lines}"
    )


def backup(inner: Mapping[str, Any]) -> dict[str, Any]:
    """Deep copies of the inner optimizers' states, to put back if applying a state fails."""
    return {k: copy.deepcopy(opt.state_dict()) for k, opt in inner.items()}
