"""Data-parallel tuning with torch DistributedDataParallel (DDP), launched by ``torchrun``.

The order is: wrap, prepare, then build the optimizer::

    hm = ht.HyperModel.wrap(model, hparams={...}).to(device)
    ddp = ht.distributed.prepare_ddp(hm, device_ids=[local_rank])   # DDP around the HyperModel
    opt = ht.DeltaSTNOptimizer(ddp, torch.optim.SGD(hm.parameters(), lr=0.1))

What each rank does:

- DDP averages w₀'s gradients as usual: the w₀ step (and the joint ``stn`` step) runs through
  the DDP module.
- Θ, λ and σ are kept **out of DDP's gradient buckets** (:func:`ignore_hyperstate`). The w₀ step
  gives them no gradient and the Θ/λ steps give w₀ none, so in DDP's buckets they would leave its
  reducer waiting for gradients that never come. The Θ step and the λ/σ step run through the
  module inside DDP and :class:`~hypertune.DeltaSTNOptimizer` averages their gradients itself,
  in one all-reduce per step (:func:`average_gradients`), before its non-finite check: every rank
  takes or refuses the same step and applies the same update.
- Θ, λ and σ start equal on every rank: the optimizer broadcasts them from rank 0 when it is
  built (DDP's constructor broadcasts w₀ and the buffers, not ignored parameters).
- Per-example perturbations ε and dropout masks come from each rank's own RNG; seed ranks
  differently (``torch.manual_seed(seed + rank)``) so different examples get independent draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .errors import HyperTuneError
from .model import HyperModel

__all__ = [
    "prepare_ddp",
    "ignore_hyperstate",
    "hyperstate_names",
    "check_ddp",
    "find_ddp",
    "broadcast_hyperstate",
    "average_gradients",
]

_NOT_SUPPORTED = ("DataParallel", "FullyShardedDataParallel")


def _is_ddp(module: Any) -> bool:
    return isinstance(module, nn.parallel.DistributedDataParallel)


def _inner_hyper_model(model: nn.Module) -> HyperModel:
    """The HyperModel under compile/DDP wrappers (raises with the right order otherwise)."""
    m: Any = model
    for _ in range(8):
        if isinstance(m, HyperModel):
            return m
        if type(m).__name__ in _NOT_SUPPORTED:
            raise HyperTuneError(
                f"{type(m).__name__} is not supported: use DistributedDataParallel, built with "
                "hypertune.distributed.prepare_ddp(hyper_model, ...)"
            )
        if hasattr(m, "_orig_mod") and isinstance(m, nn.Module):  # torch.compile's OptimizedModule
            m = m._orig_mod
        elif _is_ddp(m) or isinstance(getattr(m, "module", None), nn.Module):
            m = m.module
        else:
            break
    raise HyperTuneError(
        f"expected a HyperModel (or DDP / torch.compile around one), got {type(model).__name__}: "
        "wrap the model first with hypertune.HyperModel.wrap(model, hparams=...)"
    )


def find_ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DistributedDataParallel in ``model``'s wrapper chain (DDP, compile(DDP)), if any."""
    m: Any = model
    for _ in range(8):
        if _is_ddp(m):
            return m
        if isinstance(m, HyperModel):
            return None
        if hasattr(m, "_orig_mod") and isinstance(m, nn.Module):
            m = m._orig_mod
        elif isinstance(getattr(m, "module", None), nn.Module):
            m = m.module
        else:
            return None
    return None


def hyperstate_names(model: nn.Module) -> list[str]:
    """Names, relative to ``model``, of every Θ, λ and σ parameter (shared ones under every path)."""
    hm = _inner_hyper_model(model)
    special = {id(p) for p in hm.response_parameters()} | {id(p) for p in hm.hyper_parameters()}
    return [n for n, p in model.named_parameters(remove_duplicate=False) if id(p) in special]


def ignore_hyperstate(model: nn.Module) -> list[str]:
    """Keep Θ, λ and σ out of DDP's gradient buckets; call it *before* ``DistributedDataParallel(model)``.

    ``model`` is the HyperModel (or a torch.compile of it) that DDP will wrap. Names already
    marked for DDP to ignore are kept. Returns the names added.
    """
    if _is_ddp(model):
        raise HyperTuneError(
            "the model is already inside DistributedDataParallel, whose gradient buckets are fixed: "
            "call ignore_hyperstate (or prepare_ddp) on the HyperModel *before* wrapping it in DDP"
        )
    names = hyperstate_names(model)
    existing = list(getattr(model, "_ddp_params_and_buffers_to_ignore", []) or [])
    merged = existing + [n for n in names if n not in existing]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, merged)
    return names


def prepare_ddp(model: nn.Module, **ddp_kwargs: Any) -> nn.parallel.DistributedDataParallel:
    """``DistributedDataParallel(model, **ddp_kwargs)`` with Θ, λ and σ kept out of its buckets.

    Call it after ``HyperModel.wrap`` and ``.to(device)``, after ``init_process_group``, and
    before building :class:`~hypertune.DeltaSTNOptimizer` (give the optimizer the returned module).
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise HyperTuneError(
            "prepare_ddp needs an initialized process group: call "
            "torch.distributed.init_process_group(...) first (torchrun sets the environment)"
        )
    ignore_hyperstate(model)
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def check_ddp(ddp: nn.parallel.DistributedDataParallel) -> None:
    """Refuse a DDP that holds Θ, λ or σ in its gradient buckets (built without the ignore list)."""
    names = hyperstate_names(ddp.module)
    missing = [n for n in names if n not in ddp.parameters_to_ignore]
    if missing:
        raise HyperTuneError(
            f"DistributedDataParallel was built with {len(missing)} hypertune parameter(s) in its "
            f"gradient buckets ({missing[:4]}{' ...' if len(missing) > 4 else ''}): the w₀ step gives "
            "Θ, λ and σ no gradient, so DDP would wait for them forever. Build it with "
            "ddp = hypertune.distributed.prepare_ddp(hyper_model, **ddp_kwargs) (or call "
            "hypertune.distributed.ignore_hyperstate(hyper_model) before DistributedDataParallel(...)), "
            "then DeltaSTNOptimizer(ddp, ...)"
        )


def prepared_for_ddp(hm: HyperModel) -> bool:
    """True if ``hm`` was marked for DDP and this process is one of several ranks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return False
    ignored = set(getattr(hm, "_ddp_params_and_buffers_to_ignore", []) or [])
    if not ignored:
        return False
    return bool(ignored & set(hyperstate_names(hm)))


def _src(group: Any) -> int:
    return 0 if group is None else dist.get_global_rank(group, 0)


def _buckets(tensors: Sequence[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    out: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.dtype, t.device), []).append(i)
    return out


@torch.no_grad()
def broadcast_hyperstate(hm: HyperModel, group: Any = None) -> None:
    """Copy rank 0's Θ, λ and σ to every rank of ``group`` (coalesced: one broadcast per dtype)."""
    params = [*hm.response_parameters(), *hm.hyper_parameters()]
    for idx in _buckets(params).values():
        flat = torch.cat([params[i].detach().reshape(-1) for i in idx])
        dist.broadcast(flat, src=_src(group), group=group)
        offset = 0
        for i in idx:
            n = params[i].numel()
            params[i].copy_(flat[offset : offset + n].view_as(params[i]))
            offset += n


@torch.no_grad()
def average_gradients(params: Sequence[nn.Parameter], ok: Tensor, group: Any = None) -> Tensor:
    """Average ``params``' gradients over ``group`` in place; return whether every rank is ``ok``.

    One all-reduce per dtype carries the gradients, a has-gradient flag per parameter and each
    rank's non-finite flag, so the result is the same on every rank: a parameter no rank gave a
    gradient keeps ``grad=None``; one some ranks left without a gradient counts as zero there
    (DDP's convention); the mean divides by the world size.
    """
    world = dist.get_world_size(group)
    params = list(params)
    device = ok.device if not params else params[0].device
    flags = torch.zeros(1 + len(params), dtype=torch.float32, device=device)
    flags[0] = (~ok.detach().to(torch.bool)).to(torch.float32)
    for i, p in enumerate(params):
        flags[1 + i] = 0.0 if p.grad is None else 1.0
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    buckets = _buckets(grads)
    # The flags travel with a float32/float64 bucket when there is one (exact integer counts).
    carrier = next(
        (k for k in buckets if k[0] in (torch.float32, torch.float64) and k[1] == device), None
    )
    if carrier is None:
        dist.all_reduce(flags, group=group)
    for key, idx in buckets.items():
        parts = [grads[i].reshape(-1) for i in idx]
        if key == carrier:
            parts.append(flags.to(key[0]))
        flat = torch.cat(parts)
        dist.all_reduce(flat, group=group)
        if key == carrier:
            flags = flat[-flags.numel() :].to(torch.float32)
        flat = flat[: sum(grads[i].numel() for i in idx)].div_(world)
        offset = 0
        for i in idx:
            n = grads[i].numel()
            params[i].grad = flat[offset : offset + n].view_as(params[i])
            offset += n
    summed = flags.tolist()
    for p, has in zip(params, summed[1:]):
        if has == 0:
            p.grad = None
    return torch.tensor(summed[0] == 0, device=ok.device)
