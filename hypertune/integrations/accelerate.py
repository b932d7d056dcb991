"""Hugging Face accelerate: :func:`prepare` readies a HyperModel for a hand-written accelerate loop.

The recipe (launch with ``accelerate launch --num_processes N train.py``, or one process)::

    accelerator = Accelerator(mixed_precision="bf16")          # or "no", "fp16" (GPU)
    hm = ht.HyperModel.wrap(model, {...})
    opt = torch.optim.AdamW(hm.parameters(), lr=1e-3, weight_decay=0.0)  # a tuned WeightDecay owns the decay
    stn, model, train_loader, tune_loader = prepare(accelerator, hm, opt, train_loader, tune_loader)
    accumulation = GradientAccumulation(stn)                   # only for gradient accumulation
    tune = itertools.cycle(tune_loader)
    for i, (x, y) in enumerate(train_loader):
        stn.train_step(x, y, F.cross_entropy)                  # w₀ and Θ: forward + backward
        if (i + 1) % k == 0:
            accumulation.flush()                               # one update on the mean of k
            scheduler.step()
            if (i + 1) // k % tune_every == 0:
                stn.val_step(*next(tune), F.cross_entropy)     # λ, σ

What :func:`prepare` does, and why the usual ``accelerator.prepare(model, optimizer, ...)`` is
not enough:

- Θ, λ and σ are kept out of DDP's gradient buckets (:func:`hypertune.distributed.ignore_hyperstate`)
  before accelerate builds its DistributedDataParallel; :class:`DeltaSTNOptimizer` then
  broadcasts them from rank 0 and averages their gradients itself, so every rank holds the same
  λ after every step.
- The optimizer is *not* handed to accelerate: DeltaSTNOptimizer steps it inside its guarded
  updates (accelerate's wrapper would skip steps on its own accumulation schedule). Build LR
  schedulers on it and step them yourself; ``stn.param_groups`` are its groups.
- Mixed precision: accelerate runs the model's forward under autocast; with ``fp16`` the
  accelerator's GradScaler is given to DeltaSTNOptimizer (``grad_scaler=``), which scales every
  step's loss and skips overflowing steps.
- Gradient accumulation: use :class:`~hypertune.integrations.accumulation.GradientAccumulation`,
  not ``accelerator.accumulate`` (each ``train_step`` runs its own backward passes).

Data loaders (and anything else) passed after the optimizer go through ``accelerator.prepare``:
each process gets its shard, and the tuning batches too.

Needs accelerate: ``pip install 'hypertune-stn[accelerate]'``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..distributed import ignore_hyperstate
from ..errors import HyperTuneError
from ..model import HyperModel
from ..optim import DeltaSTNOptimizer

try:
    from accelerate import Accelerator
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "hypertune.integrations.accelerate needs Hugging Face accelerate, an optional dependency: "
        "pip install 'hypertune-stn[accelerate]' (or pip install accelerate)"
    ) from err

__all__ = ["prepare"]


def prepare(
    accelerator: Accelerator,
    hyper_model: HyperModel,
    optimizer: torch.optim.Optimizer,
    *others: Any,
    **stn_kwargs: Any,
) -> tuple[Any, ...]:
    """``(stn, model, *others)``: the prepared model, a DeltaSTNOptimizer over it, and ``others``
    (data loaders, ...) through ``accelerator.prepare``.

    ``stn_kwargs`` go to :class:`DeltaSTNOptimizer` (``mode``, ``hyper_lr``, ...). Call it once,
    after ``HyperModel.wrap`` and building ``optimizer`` from ``hyper_model.parameters()``.
    """
    if not isinstance(accelerator, Accelerator):
        raise HyperTuneError(f"prepare needs an accelerate.Accelerator, got {type(accelerator).__name__}")
    if not isinstance(hyper_model, HyperModel):
        raise HyperTuneError(
            f"prepare needs the HyperModel, got {type(hyper_model).__name__}: wrap the model first "
            "with hypertune.HyperModel.wrap(model, hparams=...), and do not prepare it yourself"
        )
    if not isinstance(optimizer, torch.optim.Optimizer) or type(optimizer).__name__ == "AcceleratedOptimizer":
        raise HyperTuneError(
            f"prepare needs the plain torch optimizer over the HyperModel's parameters, got "
            f"{type(optimizer).__name__}: do not pass it through accelerator.prepare"
        )
    if "grad_scaler" in stn_kwargs or "autocast" in stn_kwargs:
        raise HyperTuneError(
            "grad_scaler / autocast come from the Accelerator's mixed_precision: drop them from prepare(...)"
        )
    distributed = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if distributed not in ("NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA"):
        raise HyperTuneError(
            f"accelerate's {distributed} is not supported: hypertune runs on one device or under "
            "DistributedDataParallel (multi-CPU / multi-GPU)"
        )
    if accelerator.num_processes > 1:
        ignore_hyperstate(hyper_model)
    model, *rest = accelerator.prepare(hyper_model, *others)
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None:
        stn_kwargs["grad_scaler"] = scaler
    stn = DeltaSTNOptimizer(model, optimizer, **stn_kwargs)
    return (stn, model, *rest)
