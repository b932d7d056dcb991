"""PyTorch Lightning: a LightningModule that tunes its HyperModel with Δ-STN (manual optimization).

Subclass :class:`DeltaSTNModule`, give it the wrapped model, a loss and, as usual,
``configure_optimizers`` returning the optimizer for the weights (and optionally LR schedulers).
Each training batch runs ``DeltaSTNOptimizer.train_step``; every ``tune_every`` batches a
validation batch runs ``val_step`` (the λ, σ step). λ, σ and the losses are logged through
``self.log`` (so through whatever logger the Trainer has) as ``hparam/<name>``,
``sigma/<name>``, ``train/loss``, ``train/response_loss`` and ``tune/loss`` (the loss of the
latest λ step; Lightning repeats it on the steps in between)::

    class Net(DeltaSTNModule):
        def __init__(self):
            super().__init__(ht.HyperModel.wrap(MyNet(), {"dropout": ht.DropoutRate()}),
                             loss_fn=F.cross_entropy, tune_every=5)

        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)
            return [opt], [torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)]

        def train_dataloader(self):       # tuning batches come with the training batches ...
            return {"train": train_loader, "tune": tune_loader}

        # ... or from a method instead (cycled):  def tune_dataloader(self): return tune_loader

    Trainer(max_epochs=10, logger=CSVLogger("logs")).fit(Net())

The tuning batches must be a split of the *training* data that the weights never train on; the
Trainer's own validation loop (``validation_step``) runs without gradients and cannot move λ.
Steps go through Lightning's optimizer wrapper, so ``trainer.global_step``, ``max_steps`` and
``on_before_optimizer_step`` hooks count the weight steps. The optimizer state of Θ, λ and σ,
the step counters and the History travel in checkpoints under ``"hypertune"``. Supported: one
process (CPU, one GPU), precision 32/64/bf16; not gradient accumulation, gradient clipping by
the Trainer (Lightning refuses both under manual optimization), 16-bit AMP or multi-process
strategies.

Needs Lightning: ``pip install 'hypertune-stn[lightning]'``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from ..errors import HyperTuneError
from ..model import HyperModel
from ..optim import DeltaSTNOptimizer, StepResult

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities import move_data_to_device
except ImportError:  # pragma: no cover - the older package name
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.utilities import move_data_to_device  # type: ignore[no-redef]
    except ImportError as err:
        raise ImportError(
            "hypertune.integrations.lightning needs PyTorch Lightning, an optional dependency: "
            "pip install 'hypertune-stn[lightning]' (or pip install lightning)"
        ) from err

LossFn = Callable[[Any, Any], Tensor]


def hparam_metrics(source: DeltaSTNOptimizer | HyperModel, *, scales: bool = True) -> dict[str, float]:
    """``{"hparam/<name>": λ, "sigma/<name>": σ}`` of an optimizer or HyperModel, for ``log_dict``."""
    hm = source.hyper_model if isinstance(source, DeltaSTNOptimizer) else source
    out = {f"hparam/{n}": v for n, v in hm.hparam_values().items()}
    if scales:
        out.update({f"sigma/{n}": v for n, v in hm.hparams.scales().items()})
    return out


class DeltaSTNModule(pl.LightningModule):
    """LightningModule base class that trains ``hyper_model`` with :class:`DeltaSTNOptimizer`.

    Args:
        hyper_model: the wrapped model (``HyperModel.wrap``); stored as ``self.hyper_model``.
        loss_fn: ``loss_fn(outputs, target)`` returning the batch-mean loss; or override
            :meth:`compute_loss`.
        tune_every: one val (λ) step every this many train steps (T_train / T_valid).
        log_scales: also log σ.
        prog_bar: show the current λ (and the training loss) in the progress bar.
        **stn_kwargs: passed to :class:`DeltaSTNOptimizer` (``mode``, ``hyper_lr``,
            ``warmup_steps``, ``entropy_weight``, ``nonfinite``, ...).
    """

    def __init__(
        self,
        hyper_model: HyperModel,
        *,
        loss_fn: LossFn | None = None,
        tune_every: int = 5,
        log_scales: bool = True,
        prog_bar: bool = True,
        **stn_kwargs: Any,
    ) -> None:
        super().__init__()
        if not isinstance(hyper_model, HyperModel):
            raise HyperTuneError(
                f"DeltaSTNModule needs a HyperModel, got {type(hyper_model).__name__}: wrap the model "
                "first with hypertune.HyperModel.wrap(model, hparams=...)"
            )
        if not (isinstance(tune_every, int) and tune_every >= 1):
            raise HyperTuneError(f"tune_every={tune_every!r} must be an int >= 1")
        self.automatic_optimization = False
        self.hyper_model = hyper_model
        self.loss_fn = loss_fn
        self.tune_every = tune_every
        self.log_scales = log_scales
        self.prog_bar = prog_bar
        self.stn_kwargs = stn_kwargs
        self.stn: DeltaSTNOptimizer | None = None
        self._pending_state: dict[str, Any] | None = None
        self._tune_iter: Iterator[Any] | None = None

    # ---- what subclasses may override --------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.hyper_model(*args, **kwargs)

    def compute_loss(self, outputs: Any, target: Any) -> Tensor:
        """The batch-mean loss; default ``loss_fn(outputs, target)``."""
        if self.loss_fn is None:
            raise HyperTuneError("give DeltaSTNModule a loss_fn=... or override compute_loss")
        return self.loss_fn(outputs, target)

    def unpack_batch(self, batch: Any) -> tuple[Any, Any]:
        """``(inputs, target)`` of a batch; default: the batch is ``(inputs, target)``."""
        inputs, target = batch
        return inputs, target

    def tune_dataloader(self) -> Iterable[Any] | None:
        """Batches for the λ steps, if the training batches do not carry them (``"tune"`` key)."""
        return None

    # ---- set-up ------------------------------------------------------------------------------
    def on_fit_start(self) -> None:
        trainer = self.trainer
        if trainer.world_size > 1:
            raise HyperTuneError(
                "DeltaSTNModule runs in one process only (its λ steps are not synchronized across "
                f"processes); this Trainer has world_size={trainer.world_size}"
            )
        if str(trainer.precision).startswith("16"):
            raise HyperTuneError(
                f"precision={trainer.precision!r} needs a gradient scaler that DeltaSTNOptimizer does "
                "not use: choose precision 32, 64 or 'bf16-mixed'"
            )
        optimizers = self.optimizers()
        if isinstance(optimizers, list):
            if len(optimizers) != 1:
                raise HyperTuneError(
                    f"configure_optimizers returned {len(optimizers)} optimizers: return one optimizer "
                    "for the model's weights (hypertune builds the ones for Θ, λ and σ)"
                )
            optimizers = optimizers[0]
        lightning_opt = optimizers
        raw = getattr(lightning_opt, "optimizer", lightning_opt)
        stn = DeltaSTNOptimizer(self.hyper_model, raw, **self.stn_kwargs)
        # Weight steps go through Lightning's wrapper: it counts them (global_step, max_steps)
        # and runs the precision plugin and the on_before_optimizer_step hooks.
        stn.optimizer = lightning_opt
        self.stn = stn
        if self._pending_state is not None:
            self._load_stn_state(self._pending_state)
            self._pending_state = None

    def _load_stn_state(self, state: Mapping[str, Any]) -> None:
        assert self.stn is not None
        wrapper = self.stn.optimizer
        self.stn.optimizer = getattr(wrapper, "optimizer", wrapper)
        try:
            self.stn.load_state_dict(state)
        finally:
            self.stn.optimizer = wrapper

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.stn is None:
            return
        wrapper = self.stn.optimizer
        self.stn.optimizer = getattr(wrapper, "optimizer", wrapper)
        try:
            checkpoint["hypertune"] = self.stn.state_dict()
        finally:
            self.stn.optimizer = wrapper

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("hypertune")
        if state is None:
            return
        if self.stn is not None:
            self._load_stn_state(state)
        else:
            self._pending_state = state

    # ---- the loop ----------------------------------------------------------------------------
    def _next_tune_batch(self, batch: Any) -> Any:
        if isinstance(batch, Mapping) and "tune" in batch:
            return batch["tune"]
        if self._tune_iter is None:
            loader = self.tune_dataloader()
            if loader is None:
                raise HyperTuneError(
                    "no tuning batches: return {'train': loader, 'tune': loader} from "
                    "train_dataloader, or implement tune_dataloader()"
                )
            self._tune_iter = itertools.chain.from_iterable(itertools.repeat(loader))
        return move_data_to_device(next(self._tune_iter), self.device)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        if self.stn is None:  # pragma: no cover - on_fit_start always runs first
            raise HyperTuneError("DeltaSTNModule.training_step ran before on_fit_start")
        stn = self.stn
        train_batch = batch["train"] if isinstance(batch, Mapping) and "train" in batch else batch
        inputs, target = self.unpack_batch(train_batch)
        result = stn.train_step(inputs, target, self.compute_loss)
        rows = self.hyper_model.batch_rows(*_as_args(inputs))
        metrics: dict[str, float] = {"train/loss": result.loss}
        if result.response_loss is not None:
            metrics["train/response_loss"] = result.response_loss
        if stn.train_steps % self.tune_every == 0:
            tune_inputs, tune_target = self.unpack_batch(self._next_tune_batch(batch))
            tuned: StepResult = stn.val_step(tune_inputs, tune_target, self.compute_loss)
            metrics["tune/loss"] = tuned.loss
        self._step_schedulers("step", stn.train_steps)
        hp = hparam_metrics(stn, scales=self.log_scales)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=rows, prog_bar=False)
        shown = {k: v for k, v in hp.items() if k.startswith("hparam/")}
        self.log_dict(shown, on_step=True, on_epoch=False, batch_size=rows, prog_bar=self.prog_bar)
        rest = {k: v for k, v in hp.items() if k not in shown}
        if rest:
            self.log_dict(rest, on_step=True, on_epoch=False, batch_size=rows)
        return torch.tensor(result.loss)

    def on_train_epoch_end(self) -> None:
        self._step_schedulers("epoch", self.current_epoch + 1)

    def _step_schedulers(self, interval: str, count: int) -> None:
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval or count % max(1, config.frequency):
                continue
            if config.reduce_on_plateau:
                value = self.trainer.callback_metrics.get(config.monitor) if config.monitor else None
                if value is None:
                    if config.strict:
                        raise HyperTuneError(
                            f"ReduceLROnPlateau monitors {config.monitor!r}, which was not logged"
                        )
                    continue
                config.scheduler.step(value)
            else:
                config.scheduler.step()


def _as_args(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple):
        return inputs, {}
    return (inputs,), {}
