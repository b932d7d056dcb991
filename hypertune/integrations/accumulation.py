"""Gradient accumulation for DeltaSTNOptimizer: k ``train_step`` calls, one update of w₀ and Θ.

``train_step`` runs a forward and a backward per call and steps at once. To keep the memory of a
micro-batch while updating on the mean of ``k`` of them, :class:`GradientAccumulation` puts an
:class:`AccumulatingOptimizer` in front of the weights' and Θ's optimizers: each guarded step
adds its (checked, unscaled) gradients to a running sum instead of stepping, and
:meth:`GradientAccumulation.flush` steps once on the mean::

    accumulation = GradientAccumulation(stn)
    for i, (x, y) in enumerate(loader):
        stn.train_step(x, y, loss_fn)            # forward + backward of one micro-batch
        if (i + 1) % k == 0:
            accumulation.flush()                  # one update of w₀ and Θ on the mean gradient
            if ...: stn.val_step(xv, yv, loss_fn)  # λ steps need no accumulation

With ``k`` micro-batches the Θ step of every micro-batch is taken at the weights the
accumulated batch started from (without accumulation ``train_step`` takes it after the w₀
update). A micro-batch whose step was refused (non-finite, ``nonfinite="skip"``) adds nothing;
the mean is over the micro-batches that did. ``stn.train_steps`` and its History count
micro-batches, and so does ``response_every``: with ``response_every=k`` only every k-th
micro-batch has a Θ part, and Θ's update is the mean over those.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..errors import HyperTuneError, NonFiniteLossError, add_note
from ..optim import DeltaSTNOptimizer
from ..optim.transaction import BAD_WRITE, WriteSnapshot, writes_finite


class AccumulatingOptimizer(torch.optim.Optimizer):
    """Stands in for ``optimizer``: ``step`` adds the gradients to a sum, ``step_on_mean`` steps
    the real optimizer on their mean (:meth:`GradientAccumulation.flush` calls it).

    It shares ``optimizer``'s param groups, state and defaults (LR schedulers, GradScaler and
    DeltaSTNOptimizer's learning-rate following act on the real optimizer through it), and its
    ``state_dict`` is the real optimizer's: the sum is empty between updates, where checkpoints
    are taken.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        # No Optimizer.__init__: the groups, state and defaults are the wrapped optimizer's.
        self.optimizer = optimizer
        self._sums: dict[int, tuple[torch.nn.Parameter, Tensor]] = {}
        self.contributions = 0

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.optimizer.state

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    def _params(self) -> Iterable[torch.nn.Parameter]:
        return (p for g in self.optimizer.param_groups for p in g["params"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        if closure is not None:
            raise HyperTuneError("AccumulatingOptimizer.step takes no closure")
        for p in self._params():
            if p.grad is None:
                continue
            entry = self._sums.get(id(p))
            if entry is None:
                self._sums[id(p)] = (p, p.grad.detach().clone())
            else:
                entry[1].add_(p.grad)
        self.contributions += 1

    @property
    def summed(self) -> list[torch.nn.Parameter]:
        """The parameters the next flush updates."""
        return [p for p, _ in self._sums.values()]

    @torch.no_grad()
    def step_on_mean(self) -> None:
        """Step the real optimizer on the mean gradient, keeping the sums (for a flush that is put
        back) until :meth:`discard`."""
        for p in self._params():
            p.grad = None
        try:
            for p, total in self._sums.values():
                p.grad = total / self.contributions
            self.optimizer.step()
        finally:
            for p, _ in self._sums.values():
                p.grad = None

    def discard(self) -> None:
        """Forget the gradients added since the last flush."""
        self._sums.clear()
        self.contributions = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        if self.contributions:
            # the sum is not in the real optimizer's state: a checkpoint would drop it silently
            raise HyperTuneError(
                f"{self.contributions} accumulated micro-batch(es) wait for the next update: call "
                "accumulation.flush() before state_dict() or checkpoint.save, so that a resumed run "
                "starts from the same weights"
            )
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"AccumulatingOptimizer({self.optimizer!r})"


class GradientAccumulation:
    """Accumulate ``stn``'s w₀ and Θ updates over micro-batches until :meth:`flush`.

    Installs :class:`AccumulatingOptimizer` in front of ``stn.optimizer`` and
    ``stn.response_optimizer``; :meth:`close` puts the real ones back (call it after the last
    flush, or use the object as a context manager).
    """

    def __init__(self, stn: DeltaSTNOptimizer) -> None:
        if not isinstance(stn, DeltaSTNOptimizer):
            raise HyperTuneError(
                f"GradientAccumulation needs a DeltaSTNOptimizer, got {type(stn).__name__}"
            )
        if isinstance(stn.optimizer, AccumulatingOptimizer):
            raise HyperTuneError("this DeltaSTNOptimizer already accumulates gradients")
        self.stn = stn
        self.weights = AccumulatingOptimizer(stn.optimizer)
        self.response = AccumulatingOptimizer(stn.response_optimizer)
        stn.optimizer = self.weights
        stn.response_optimizer = self.response
        self._checked = False  # the first flush is snapshotted and checked, as a first train_step is

    @property
    def pending(self) -> int:
        """Micro-batches whose w₀ gradients wait for the next flush."""
        return self.weights.contributions

    def flush(self) -> bool:
        """One update of w₀ and of Θ on the mean of the micro-batches since the last flush.

        Returns whether w₀ was updated (False when every micro-batch was refused). The first flush
        is all-or-nothing, as ``train_step``'s first step is: if an inner optimizer raises or leaves
        a non-finite value, w₀, Θ and their optimizers' state are put back and the micro-batches
        stay pending (call :meth:`close` to drop them).
        """
        parts = [a for a in (self.weights, self.response) if a.contributions]
        if not parts:
            self.weights.discard()
            self.response.discard()
            return False
        snapshot = None
        if not self._checked:
            snapshot = WriteSnapshot()
            for a in parts:
                snapshot.add(a.summed, [a.optimizer])
        try:
            for a in parts:
                a.step_on_mean()
            if snapshot is not None:
                like = parts[0].summed[0]
                checks = [writes_finite(a.summed, [a.optimizer], like).to(like.device) for a in parts]
                if not bool(torch.stack(checks).all()):
                    raise NonFiniteLossError(
                        f"accumulation.flush() was refused: the {BAD_WRITE}. w₀, Θ and their optimizers' "
                        f"state were put back and the {self.pending} micro-batch(es) stay pending; lower the "
                        "learning rate, or call accumulation.close() to drop them"
                    )
        except BaseException as err:
            if snapshot is not None:
                snapshot.restore()
                if not isinstance(err, NonFiniteLossError):
                    add_note(
                        err,
                        "hypertune: accumulation.flush() was put back: w₀, Θ and their optimizers' state "
                        f"are as before it, and the {self.pending} micro-batch(es) stay pending"
                    )
            raise
        stepped = bool(self.weights.contributions)
        self.weights.discard()
        self.response.discard()
        self._checked = True
        return stepped

    def close(self) -> None:
        """Put the real optimizers back in ``stn`` (pending gradients are dropped)."""
        self.weights.discard()
        self.response.discard()
        if self.stn.optimizer is self.weights:
            self.stn.optimizer = self.weights.optimizer
        if self.stn.response_optimizer is self.response:
            self.stn.response_optimizer = self.response.optimizer

    def __enter__(self) -> GradientAccumulation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
