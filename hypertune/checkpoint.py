"""Checkpoint and resume a tuning run in one call each.

::

    ht.checkpoint.save("run.pt", model=model, optimizer=opt, schedulers=[sched], extra={"epoch": e})
    ...
    extra = ht.checkpoint.load("run.pt", model=model, optimizer=opt, schedulers=[sched])

A checkpoint holds the model's state (w₀, Θ, λ, σ, buffers), every inner optimizer of the
:class:`~hypertune.DeltaSTNOptimizer` with its step counters and History, the GradScaler, the LR
schedulers, the RNG states (torch CPU and CUDA, numpy, Python ``random``), a format version and a
fingerprint of the model (state names and shapes, tuned hyperparameter names). On CPU, resuming
reproduces the uninterrupted run bit for bit, provided the data order is a function of what
was saved (put the epoch/batch position in ``extra``).

The file is written atomically: a temporary file in the same directory, flushed and fsynced,
then renamed over ``path``; a crash leaves the previous checkpoint intact. ``load`` checks
everything it can before it changes anything (format, version, fingerprint, optimizer and
scheduler layout), and if applying the state still fails it puts back what it had changed: a
model is never left half-loaded.

Distributed (DDP): call both on every rank. ``save`` gathers every rank's RNG state and rank 0
writes the file; ``load`` reads it on every rank and each rank takes its own RNG state back.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import random
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .distributed import _inner_hyper_model
from .errors import StateDictError
from .model import HyperModel
from .optim.state import spec_problems, spec_signature

__all__ = ["save", "load", "fingerprint", "FORMAT", "VERSION"]

FORMAT = "hypertune.checkpoint"
VERSION = 1


# ---- pieces ------------------------------------------------------------------------------------
def fingerprint(model: nn.Module) -> dict[str, Any]:
    """What a checkpoint must match: the HyperModel's state names and shapes and its tuned names."""
    hm = _inner_hyper_model(model)
    return {
        "state": [[name, list(t.shape)] for name, t in hm.state_dict().items()],
        "hparams": list(hm.hparams.names),
    }


def _digest(fp: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass
    else:
        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype("int64")),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        }
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"].cpu())  # map_location may have moved it
    random.setstate(_tuples(state["python"]))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    if state.get("numpy") is not None:
        import numpy as np

        s = state["numpy"]
        np.random.set_state(
            (s["kind"], s["keys"].cpu().numpy().astype("uint32"), s["pos"], s["has_gauss"], s["gauss"])
        )


def _tuples(x: Any) -> Any:
    """``random.setstate`` wants tuples where a round trip may have produced lists."""
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _optimizer_layout(state: Mapping[str, Any]) -> list[int]:
    return [len(g["params"]) for g in state["param_groups"]]


def _atomic_save(obj: Any, path: str) -> None:
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        # mkstemp would fail naming its temporary file, not the path the caller asked for.
        raise FileNotFoundError(
            errno.ENOENT,
            f"cannot save the checkpoint: the folder {directory!r} does not exist (create it first, "
            "e.g. os.makedirs(folder, exist_ok=True))",
            path,
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(dir_fd)


# ---- save --------------------------------------------------------------------------------------
def save(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: Any = None,
    schedulers: Sequence[Any] = (),
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write everything needed to resume to ``path``, atomically.

    Args:
        model: the HyperModel (or DDP / torch.compile around it); saved without wrapper prefixes,
            so a checkpoint moves between single-process, DDP and compiled runs.
        optimizer: the DeltaSTNOptimizer (its inner optimizers, λ/σ, counters, History and
            GradScaler), or any object with ``state_dict``.
        schedulers: LR schedulers (or anything with ``state_dict``), restored in the same order.
        extra: your own resumable state (epoch, batch index, best metric, ...); plain Python
            values and tensors keep ``load``'s safe default ``weights_only=True`` usable.
    """
    hm = _inner_hyper_model(model)
    fp = fingerprint(hm)
    rank, world = _distributed()
    rng = _rng_state()
    local = getattr(optimizer, "_local_state", None)
    mine = {"rng": rng, "local": local() if local is not None else None}
    if world > 1:
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, mine)
    else:
        gathered = [mine]
    rng_all = [g["rng"] for g in gathered]
    local_all = [g["local"] for g in gathered]
    if rank == 0:
        scaler = getattr(optimizer, "grad_scaler", None)
        # Written under the model's lock: never a state half-way through a step that another
        # thread is running (the payload holds the live tensors, not copies).
        with hm.exclusive():
            payload = _payload(hm, fp, optimizer, scaler, schedulers, rng_all, extra)
            if local is not None:
                payload["optimizer_local"] = local_all  # per rank: each draws its own antithetic ε
            _atomic_save(payload, os.fspath(path))
    if world > 1:
        dist.barrier()


def _payload(
    hm: HyperModel,
    fp: Mapping[str, Any],
    optimizer: Any,
    scaler: Any,
    schedulers: Sequence[Any],
    rng_all: list[Any],
    extra: Mapping[str, Any] | None,
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": str(torch.__version__),
        "fingerprint": fp,
        "digest": _digest(fp),
        "specs": spec_signature(hm.hparams.specs),
        "model": hm.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "optimizer_class": None if optimizer is None else type(optimizer).__name__,
        "grad_scaler": None if scaler is None else scaler.state_dict(),
        "schedulers": [s.state_dict() for s in schedulers],
        "scheduler_classes": [type(s).__name__ for s in schedulers],
        "rng": rng_all,
        "extra": dict(extra or {}),
    }


# ---- load --------------------------------------------------------------------------------------
def _check(ck: Any, path: str, hm: HyperModel, optimizer: Any, schedulers: Sequence[Any]) -> None:
    """Everything that can be checked before anything is changed; raises StateDictError."""
    where = f"checkpoint {path!r}"
    if not isinstance(ck, Mapping) or ck.get("format") != FORMAT:
        hint = ""
        if isinstance(ck, Mapping) and ck.get("format") == "hypertune.DeltaSTNOptimizer":
            hint = " (it is a bare DeltaSTNOptimizer.state_dict(): load it with opt.load_state_dict)"
        raise StateDictError(
            f"{where} is not a hypertune checkpoint (no {FORMAT!r} format tag){hint}; write one with "
            "hypertune.checkpoint.save(path, model=..., optimizer=...)"
        )
    version = ck.get("version")
    if version != VERSION:
        raise StateDictError(
            f"{where} has layout version {version}, this hypertune reads version {VERSION}: resume "
            "it with the hypertune release that wrote it; nothing was loaded"
        )
    saved_fp, fp = ck.get("fingerprint", {}), fingerprint(hm)
    if saved_fp != fp:
        saved_names, names = list(saved_fp.get("hparams", [])), fp["hparams"]
        saved_state = {n: tuple(s) for n, s in saved_fp.get("state", [])}
        state = {n: tuple(s) for n, s in fp["state"]}
        problems = []
        if saved_names != names:
            problems.append(f"it tunes {saved_names}, this model tunes {names}")
        missing = [n for n in state if n not in saved_state]
        unexpected = [n for n in saved_state if n not in state]
        shapes = [f"{n}: {saved_state[n]} vs {state[n]}" for n in state if n in saved_state and saved_state[n] != state[n]]
        if missing:
            problems.append(f"it lacks {len(missing)} entr(ies) of this model: {missing[:5]}")
        if unexpected:
            problems.append(f"it has {len(unexpected)} entr(ies) this model lacks: {unexpected[:5]}")
        if shapes:
            problems.append(f"{len(shapes)} shape(s) differ (checkpoint vs model): {shapes[:5]}")
        if not problems:
            problems.append("the state order differs")
        raise StateDictError(
            f"{where} was written for a different model (fingerprint {ck.get('digest')} vs "
            f"{_digest(fp)}): " + "; ".join(problems) + ". Wrap the same model with the same "
            "hyperparameters before loading; nothing was loaded"
        )
    problems = spec_problems(ck.get("specs"), spec_signature(hm.hparams.specs))
    for i, local in enumerate(ck.get("optimizer_local") or []):
        pending = (local.get("noise") or {}).get("pending") if isinstance(local, Mapping) else None
        if not isinstance(local, Mapping) or (pending is not None and not (
            torch.is_tensor(pending) and pending.dim() == 2 and pending.shape[1] == len(hm.hparams)
            and pending.is_floating_point() and bool(torch.isfinite(pending).all())
        )):
            problems.append(f"rank {i}'s optimizer state (its antithetic draw) is malformed")
    problems += _model_problems(ck.get("model"), hm)
    saved_opt = ck.get("optimizer")
    if optimizer is not None:
        problems += _optimizer_problems(saved_opt, ck.get("optimizer_class"), optimizer)
    classes = list(ck.get("scheduler_classes", []))
    if len(schedulers) != len(classes) or any(
        c != type(s).__name__ for c, s in zip(classes, schedulers)
    ):
        problems.append(
            f"it holds schedulers {classes}, given {[type(s).__name__ for s in schedulers]}; "
            "pass the same schedulers in the same order"
        )
    problems = list(dict.fromkeys(problems))  # a spec differs in the checkpoint and in its optimizer state
    if problems:
        if len(problems) == 1:
            raise StateDictError(f"{where}: {problems[0]}; nothing was loaded")
        lines = "\n".join(f"  - {p}" for p in problems)
        raise StateDictError(f"{where} has {len(problems)} problem(s); nothing was loaded:\n{lines}")


def _model_problems(state: Any, hm: HyperModel) -> list[str]:
    """The saved model state against the live model, tensor by tensor (the fingerprint only
    records what the writer claimed)."""
    if not isinstance(state, Mapping):
        return ["it holds no model state"]
    live = hm.state_dict()
    problems = []
    missing = [k for k in live if k not in state]
    if missing:
        problems.append(f"its model state lacks {len(missing)} entr(ies): {missing[:5]}")
    shapes = [
        f"{k}: {tuple(v.shape)} vs {tuple(live[k].shape)}"
        for k, v in state.items()
        if k in live and torch.is_tensor(v) and tuple(v.shape) != tuple(live[k].shape)
    ]
    if shapes:
        problems.append(f"{len(shapes)} model tensor shape(s) differ (checkpoint vs model): {shapes[:5]}")
    not_tensors = [k for k, v in state.items() if k in live and not torch.is_tensor(v)]
    if not_tensors:
        problems.append(f"model entries that are not tensors: {not_tensors[:5]}")
    nonfinite = [
        k for k, v in state.items()
        if torch.is_tensor(v) and v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all())
    ]
    if nonfinite:
        problems.append(f"the model state holds non-finite values (NaN/inf) in {nonfinite[:5]}")
    return problems


def _optimizer_problems(saved: Any, saved_class: Any, optimizer: Any) -> list[str]:
    if saved is None:
        return ["it holds no optimizer state; load it without optimizer="]
    if saved_class != type(optimizer).__name__:
        return [f"it holds the state of a {saved_class}, not of a {type(optimizer).__name__}"]
    check = getattr(optimizer, "state_dict_problems", None)
    if check is not None:  # a DeltaSTNOptimizer checks its own layout, every tensor included
        current = optimizer.state_dict()
        for key in ("version", "mode", "hparam_names"):
            if isinstance(saved, Mapping) and saved.get(key) != current.get(key):
                return [f"the optimizer was saved with {key}={saved.get(key)!r}, this one has {current.get(key)!r}"]
        return [_group_hint(p) for p in check(saved)]
    current = optimizer.state_dict()
    if not (isinstance(saved, Mapping) and "param_groups" in saved) or _optimizer_layout(saved) != _optimizer_layout(current):
        return [
            f"the optimizer's parameter groups differ (checkpoint "
            f"{_optimizer_layout(saved) if isinstance(saved, Mapping) and 'param_groups' in saved else '?'} "
            f"vs {_optimizer_layout(current)} parameters per group); build the optimizer the same way "
            "as in the run that saved it"
        ]
    return []


def _group_hint(problem: str) -> str:
    """Name a group-layout problem the way checkpoint users know it."""
    if "parameters per group" in problem:
        return f"the optimizer's parameter groups differ: {problem}"
    return problem


def load(
    path: str | os.PathLike[str],
    *,
    model: nn.Module,
    optimizer: Any = None,
    schedulers: Sequence[Any] = (),
    map_location: Any = None,
    restore_rng: bool = True,
    weights_only: bool = True,
) -> dict[str, Any]:
    """Restore what :func:`save` wrote into ``model``, ``optimizer`` and ``schedulers``; return ``extra``.

    Refuses, with a StateDictError and before changing anything, a file that is not a hypertune
    checkpoint, one of another layout version, one written for a different model (state names,
    shapes or tuned hyperparameters differ), or one whose optimizer/schedulers do not match.
    ``map_location`` defaults to the model's device. ``weights_only=False`` is needed only if
    ``extra`` or a scheduler holds arbitrary Python objects (load only files you trust then).
    """
    hm = _inner_hyper_model(model)
    path = os.fspath(path)
    if hm.hparams.unconstrained.is_meta:
        raise StateDictError(
            f"the model is on the meta device, where a checkpoint has nowhere to go: call "
            f"hyper_model.to_empty(device=...) before loading {path!r}; nothing was loaded"
        )
    if map_location is None:
        map_location = hm.hparams.unconstrained.device
    try:
        ck = torch.load(path, map_location=map_location, weights_only=weights_only)
    except FileNotFoundError:
        raise
    except Exception as err:
        raise StateDictError(f"could not read checkpoint {path!r}: {err}") from err
    _check(ck, path, hm, optimizer, schedulers)

    # Apply under the model's lock (no step runs half-way through it), undoing everything if any
    # part fails after the checks.
    with hm.exclusive():
        scaler = getattr(optimizer, "grad_scaler", None) if optimizer is not None else None
        backup_model = {k: v.detach().clone() for k, v in hm.state_dict().items()}
        backup_opt = copy.deepcopy(optimizer.state_dict()) if optimizer is not None else None
        backup_sched = [copy.deepcopy(s.state_dict()) for s in schedulers]
        backup_scaler = copy.deepcopy(scaler.state_dict()) if scaler is not None else None
        try:
            hm.load_state_dict(ck["model"], strict=True)
            if optimizer is not None:
                optimizer.load_state_dict(ck["optimizer"])
                if scaler is not None and ck.get("grad_scaler"):
                    scaler.load_state_dict(ck["grad_scaler"])
            for s, state in zip(schedulers, ck["schedulers"]):
                s.load_state_dict(state)
        except Exception as err:
            hm.load_state_dict(backup_model, strict=True)
            if optimizer is not None and backup_opt is not None:
                optimizer.load_state_dict(backup_opt)
            if scaler is not None and backup_scaler is not None:
                scaler.load_state_dict(backup_scaler)
            for s, state in zip(schedulers, backup_sched):
                s.load_state_dict(state)
            raise StateDictError(
                f"checkpoint {path!r} could not be applied ({type(err).__name__}: {err}); the model, "
                "optimizer and schedulers were put back as they were"
            ) from err
    rank, world = _distributed()
    locals_ = ck.get("optimizer_local")
    loader = getattr(optimizer, "_load_local_state", None)
    if loader is not None and isinstance(locals_, list) and len(locals_) == world and locals_[rank] is not None:
        loader(locals_[rank])
    if restore_rng:
        states = ck.get("rng") or []
        if len(states) == world:
            _set_rng_state(states[rank])
        elif states:
            warnings.warn(
                f"checkpoint {path!r} holds RNG states of {len(states)} rank(s) but this run has "
                f"{world}: the RNG states were not restored (the run resumes, but not bit for bit)",
                stacklevel=2,
            )
    return dict(ck.get("extra") or {})
