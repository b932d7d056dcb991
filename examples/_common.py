"""Glue shared by the example scripts: command line, training loop, CSV/JSON/PNG outputs.

Every example builds a plain model, a mapping of hyperparameter specs and in-memory loaders,
then calls :func:`train`. With ``--untuned`` the same model is trained by the same loop with a
plain optimizer, the hyperparameters held at their starting values (dropout modules keep their
initial rate; augmentations, input dropout, embedding dropout and AR/TAR are applied at their
``init``), so the two runs differ only in the tuning.

Outputs under ``--out DIR``: ``schedule.csv`` (every train/val step's hyperparameters, written by
:mod:`hypertune.logging`), ``schedule.png`` (:func:`hypertune.plotting.plot_schedule`),
``epochs.csv`` (per-epoch losses and values) and ``metrics.json`` (final validation and test
metrics, final hyperparameters, wall time, arguments).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python examples/x.py` from a checkout
    sys.path.insert(0, str(REPO))

import hypertune as ht
from hypertune.experiments import TensorLoader  # noqa: E402
from hypertune.augment.base import Augmentation  # noqa: E402

Metrics = dict[str, float]
LossFn = Callable[[Any, Any], Tensor]


# ---- command line ----------------------------------------------------------------------------
def sigma0(init_scale: float | None) -> dict[str, float]:
    """``init_scale=`` for a spec when ``--init-scale`` was given; else the kind keeps its own σ₀."""
    return {} if init_scale is None else {"init_scale": init_scale}


def default_data_root() -> Path:
    """``../shared/datasets`` next to the checkout if it exists, else ``./data``."""
    shared = REPO.parent / "shared" / "datasets"
    return shared if shared.is_dir() else Path("data")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _int_at_least(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{value} must be at least {least}")
    return value


def positive_int(text: str) -> int:
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0)


def output_dir(text: str) -> Path:
    """``--out``: created and checked before training, so a bad path cannot cost a finished run."""
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise argparse.ArgumentTypeError(f"cannot write to {text!r}: {err.strerror or err}") from None
    return path


def base_parser(
    description: str,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    warmup_epochs: int,
    train_steps: int = 5,
    val_steps: int = 1,
    val_fraction: float = 0.15,
) -> argparse.ArgumentParser:
    """The options every example shares, with that example's paper defaults."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-root", type=Path, default=default_data_root(),
                   help="folder holding the dataset (torchvision layout); downloaded there if missing")
    p.add_argument("--epochs", type=positive_int, default=epochs)
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--device", default=default_device())
    p.add_argument("--mode", choices=["delta", "centered", "stn"], default="delta",
                   help="Δ-STN (delta), centered STN without linearization, or the original STN")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=output_dir, default=None,
                   help="folder for schedule.csv, schedule.png, epochs.csv and metrics.json")
    p.add_argument("--untuned", action="store_true",
                   help="train the same model with the same loop, hyperparameters fixed at their starting values")
    p.add_argument("--smoke", action="store_true",
                   help="a few batches (seconds): checks that everything runs (real data where it is "
                        "found; an example whose data set is missing says so and uses random tensors)")
    p.add_argument("--lr", type=float, default=lr, help="learning rate of the weights (w₀; Θ too in stn mode)")
    p.add_argument("--response-optimizer", choices=["adam", "clone"], default=None,
                   help="Θ's optimizer: adam (the centered modes' default) or clone (a copy of the "
                        "weights' optimizer: stn mode's default and the reference code's choice)")
    p.add_argument("--response-lr", type=float, default=None, help="Θ's Adam learning rate (default 1e-3)")
    p.add_argument("--hyper-lr", type=float, default=1e-2, help="RMSprop learning rate of λ and σ")
    p.add_argument("--entropy-weight", type=float, default=1e-3, help="τ, the entropy bonus of σ (with --tune-scales)")
    p.add_argument("--init-scale", type=float, default=None,
                   help="σ₀ of every hyperparameter, the perturbation scale held there by default "
                        "(default: each kind's own, 2 for dropout rates and 1 for the rest)")
    p.add_argument("--tune-scales", action="store_true",
                   help="tune σ with the entropy bonus, inside [0.1, 4]·σ₀ (the library holds σ at σ₀)")
    p.add_argument("--response-every", type=int, default=None,
                   help="Θ step on every k-th train step (default: the library's, 3)")
    p.add_argument("--warmup-epochs", type=non_negative_int, default=warmup_epochs,
                   help="epochs of weight training before λ starts moving")
    p.add_argument("--train-steps", type=positive_int, default=train_steps, help="T_train: train steps per val step")
    p.add_argument("--val-steps", type=positive_int, default=val_steps, help="T_valid: val steps after each T_train")
    p.add_argument("--val-fraction", type=float, default=val_fraction,
                   help="fraction of the training set held out for validation (test set untouched)")
    p.add_argument("--train-subset", type=int, default=None,
                   help="train on the first N examples of the training split only (short benchmarks)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Seeds, CPU threads and the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(args.seed)
    return device


# ---- loaders ---------------------------------------------------------------------------------
class Limited:
    """At most ``max_batches`` batches of a loader per epoch (for ``--smoke``)."""

    def __init__(self, loader: Any, max_batches: int) -> None:
        self.loader = loader
        self.max_batches = max_batches

    def __len__(self) -> int:
        return min(len(self.loader), self.max_batches)

    def __iter__(self) -> Iterator[Any]:
        for i, batch in enumerate(self.loader):
            if i >= self.max_batches:
                return
            yield batch

    def cycle(self) -> Iterator[Any]:
        while True:
            yield from self


def _cycle(loader: Any) -> Iterator[Any]:
    if hasattr(loader, "cycle"):
        return loader.cycle()

    def gen() -> Iterator[Any]:
        while True:
            yield from loader

    return gen()


# ---- the untuned baseline: the starting hyperparameters, held fixed --------------------------
class FixedRegularizers:
    """The training-only regularizers of a spec mapping, at their ``init`` values, on a plain model.

    Each spec is applied by its kind's fixed form (hypertune.kinds: the same code ``unwrap`` and
    schedule replay use), at the sites wrapping would give it: dropout modules run at ``init``
    (a locked spec shares its mask along its axis), augmentations and input dropout transform
    the batch (in HyperModel's order), word dropout masks embeddings, AR/TAR and weight decay add
    penalties. Kinds without a plain form (DropConnect, generic HParam values) are listed in
    ``skipped``.
    """

    def __init__(self, model: nn.Module, hparams: Mapping[str, Any]) -> None:
        from hypertune import surgery
        from hypertune.specs import validate_specs

        specs = validate_specs(hparams)
        plan = surgery.plan(model, specs)  # where each spec acts; the model is not changed
        self.forms: list[Any] = []
        self.skipped: list[str] = []
        for name, claim in plan.claims.items():
            kind, spec = plan.kinds[name], specs[name]
            if isinstance(spec, Augmentation):
                self.forms.insert(0, kind.fixed_form({sub: s.init for sub, s in spec.hparams().items()}))
                continue
            for value, value_spec in claim.values.items():
                form = value_spec.fixed_form(model, kind.where(claim, value, model), value_spec.init)
                if form is None:
                    self.skipped.append(value)
                else:
                    self.forms.append(form)

    @property
    def collecting(self) -> bool:
        return any(getattr(f, "collecting", False) for f in self.forms)

    @collecting.setter
    def collecting(self, on: bool) -> None:
        for form in self.forms:
            if hasattr(form, "collecting"):
                form.collecting = on

    def transform(self, x: Tensor) -> Tensor:
        for form in self.forms:
            x = form.transform(x)
        return x

    def penalty(self) -> Tensor | float:
        total: Tensor | float = 0.0
        for form in self.forms:
            term = form.penalty()
            if term is not None:
                total = total + term
        return total


# ---- outputs ---------------------------------------------------------------------------------
def _fmt(v: float) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_epochs_csv(rows: list[dict[str, Any]], path: Path) -> None:
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in rows:
            w.writerow(r)


def write_outputs(out: Path, opt: ht.DeltaSTNOptimizer | None, epochs: list[dict[str, Any]],
                  metrics: dict[str, Any], steps_per_epoch: int, title: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_epochs_csv(epochs, out / "epochs.csv")
    if opt is not None and len(opt.history):
        from hypertune.logging import write_csv
        from hypertune.plotting import plot_schedule

        write_csv(opt.history, out / "schedule.csv")
        try:
            fig = plot_schedule(opt.history, out / "schedule.png", model=opt.hyper_model,
                                steps_per_epoch=steps_per_epoch, title=title, dpi=80)
            import matplotlib.pyplot as plt

            plt.close(fig)
        except ImportError as err:  # matplotlib is optional
            print(f"no plot ({err}); install matplotlib for schedule.png", file=sys.stderr)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")


# ---- the loop --------------------------------------------------------------------------------
def train(
    args: argparse.Namespace,
    *,
    name: str,
    model: nn.Module,
    hparams: Mapping[str, Any],
    train_loader: Any,
    val_loader: Any,
    evaluate: Callable[[nn.Module, str], Metrics],
    device: torch.device,
    loss_fn: LossFn = F.cross_entropy,
    make_optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
    make_scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    batch_transform: Callable[[Tensor], Tensor] | None = None,
    headline: str = "loss",
) -> dict[str, Any]:
    """Train ``model`` with Δ-STN (or plainly with ``args.untuned``); return the final metrics.

    ``evaluate(model, split)`` gives the metrics of ``"val"`` or ``"test"`` in eval mode.
    ``make_scheduler(optimizer)`` returns an LR scheduler stepped once per epoch (with the
    epoch's validation loss if it is a ReduceLROnPlateau). ``batch_transform`` is applied to
    every training batch in both runs (fixed, untuned augmentation such as random flips).
    """
    from tqdm import tqdm

    from hypertune.logging import progress_summary

    steps_per_epoch = len(train_loader)
    warmup = args.warmup_epochs * steps_per_epoch
    fixed: FixedRegularizers | None = None
    opt: ht.DeltaSTNOptimizer | None = None
    if args.untuned:
        net = model.to(device)
        optimizer = make_optimizer(net.parameters())
        fixed = FixedRegularizers(net, hparams)
        if fixed.skipped:
            print(f"untuned run: {fixed.skipped} have no fixed form here and are not applied")
    else:
        net = ht.HyperModel.wrap(model, hparams).to(device)
        optimizer = make_optimizer(net.parameters())
        opt = ht.DeltaSTNOptimizer(net, optimizer, mode=args.mode, hyper_lr=args.hyper_lr,
                                   entropy_weight=args.entropy_weight, warmup_steps=warmup,
                                   response_optimizer=args.response_optimizer, response_lr=args.response_lr,
                                   tune_scales=args.tune_scales,
                                   **({} if args.response_every is None else {"response_every": args.response_every}))
        print(f"tuning {len(net.hparams)} hyperparameters ({args.mode}): {', '.join(net.hparams.names)}")
    scheduler = make_scheduler(optimizer) if make_scheduler is not None else None
    val_iter = _cycle(val_loader)
    history: list[dict[str, Any]] = []
    start = time.time()
    steps = 0
    for epoch in range(1, args.epochs + 1):
        net.train()
        running, count = 0.0, 0
        bar = tqdm(train_loader, desc=f"{name} {epoch}/{args.epochs}", leave=False,
                   disable=args.no_progress, dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(device), y.to(device)
            if batch_transform is not None:
                x = batch_transform(x)
            if opt is not None:
                loss = opt.train_step(x, y, loss_fn).loss
                if opt.train_steps % args.train_steps == 0 and opt.train_steps >= warmup:
                    for _ in range(args.val_steps):
                        xv, yv = next(val_iter)
                        opt.val_step(xv.to(device), yv.to(device), loss_fn)
            else:
                assert fixed is not None
                fixed.collecting = True
                out = net(fixed.transform(x))
                fixed.collecting = False
                data_loss = loss_fn(out, y)
                total = data_loss + fixed.penalty()
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                optimizer.step()
                loss = float(data_loss.detach())
            steps += 1
            running, count = running + loss, count + 1
            if not math.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss} at step {steps}; lower --lr")
            if steps % 10 == 0 or count == 1:
                bar.set_postfix(progress_summary(opt, max_hparams=4) if opt is not None else {"loss": f"{running / count:.3g}"})
        bar.close()
        val = evaluate(net, "val")
        row: dict[str, Any] = {"epoch": epoch, "step": steps, "train_loss": running / max(count, 1),
                               **{f"val_{k}": v for k, v in val.items()},
                               "lr": optimizer.param_groups[0]["lr"], "time_s": round(time.time() - start, 1)}
        if opt is not None:
            row.update(opt.hparams())
        history.append(row)
        shown = {k: v for k, v in row.items() if k not in ("epoch", "step", "time_s")}
        print(f"epoch {epoch}: " + " ".join(f"{k}={_fmt(v)}" for k, v in list(shown.items())[:12]), flush=True)
        if scheduler is not None:
            if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
                scheduler.step(val["loss"])
            else:
                scheduler.step()
    wall = time.time() - start
    val, test = evaluate(net, "val"), evaluate(net, "test")
    metrics: dict[str, Any] = {
        "example": name,
        "tuned": opt is not None,
        "mode": args.mode if opt is not None else None,
        "epochs": args.epochs,
        "train_steps": steps,
        "val": val,
        "test": test,
        "final_hparams": opt.hparams() if opt is not None else _initial_values(hparams),
        "skipped_steps": opt.skipped_steps if opt is not None else 0,
        "wall_time_s": round(wall, 1),
        "device": str(device),
        "torch": torch.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
    }
    kind = f"tuned ({args.mode})" if opt is not None else "untuned"
    print(f"final {name} [{kind}] validation: " + " ".join(f"{k}={_fmt(v)}" for k, v in val.items()))
    print(f"final {name} [{kind}] test:       " + " ".join(f"{k}={_fmt(v)}" for k, v in test.items()))
    if opt is not None:
        print("final hyperparameters: " + " ".join(f"{k}={_fmt(v)}" for k, v in opt.hparams().items()))
    if args.out is not None:
        write_outputs(args.out, opt, history, metrics, steps_per_epoch, f"{name} ({kind})")
        print(f"wrote {args.out}/")
    return metrics


def _initial_values(hparams: Mapping[str, Any]) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, spec in hparams.items():
        if isinstance(spec, Augmentation):
            out.update({f"{name}:{k}": float(s.init) for k, s in spec.hparams().items()})
        else:
            out[name] = float(spec.init)
    return out


# ---- evaluation of classifiers -----------------------------------------------------------------
def image_loaders(
    args: argparse.Namespace, data: Mapping[str, tuple[Tensor, Tensor]], *, smoke_batches: tuple[int, int] = (6, 4),
    smoke_limit: int = 512,
) -> tuple[Any, Any, int | None]:
    """Train and validation loaders over in-memory splits (``--train-subset`` applied), cut to
    a few batches under ``--smoke``; returns them with the evaluation limit for smoke runs."""
    x, y = data["train"]
    if args.train_subset:
        x, y = x[: args.train_subset], y[: args.train_subset]
    train_loader: Any = TensorLoader(x, y, args.batch_size, seed=args.seed)
    val_loader: Any = TensorLoader(*data["val"], args.batch_size, seed=args.seed + 1)
    if not args.smoke:
        return train_loader, val_loader, None
    n_train, n_val = smoke_batches
    return Limited(train_loader, n_train), Limited(val_loader, n_val), smoke_limit


def classification_evaluator(splits: Mapping[str, tuple[Tensor, Tensor]], batch_size: int = 1000,
                             limit: int | None = None) -> Callable[[nn.Module, str], Metrics]:
    """``evaluate(model, split)``: mean cross-entropy and accuracy of a split, in eval mode."""

    @torch.no_grad()
    def evaluate(model: nn.Module, split: str) -> Metrics:
        x, y = splits[split]
        if limit is not None:
            x, y = x[:limit], y[:limit]
        was = model.training
        model.eval()
        total, correct = 0.0, 0
        try:
            for i in range(0, len(x), batch_size):
                out = model(x[i : i + batch_size])
                total += float(F.cross_entropy(out, y[i : i + batch_size], reduction="sum"))
                correct += int((out.argmax(1) == y[i : i + batch_size]).sum())
        finally:
            model.train(was)
        return {"loss": total / len(x), "acc": correct / len(x)}

    return evaluate


def smoke_overrides(args: argparse.Namespace, *, batch_size: int = 32) -> None:
    """One short epoch, no warm-up, a val step after every 2 train steps."""
    args.epochs = 1
    args.batch_size = min(args.batch_size, batch_size)
    args.warmup_epochs = 0
    args.train_steps = min(args.train_steps, 2)
