"""Plot a tuning run: hyperparameter schedules, grouped by kind, and the losses (Δ-STN Fig. 6b,c).

    plot_schedule(opt.history, "schedule.png", model=model)

Needs matplotlib: ``pip install 'hypertune-stn[plot]'``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .history import History
from .kinds.base import kind_class
from .schedule import Schedule, guess_kind, spec_kind

if TYPE_CHECKING:
    from .model import HyperModel

def panel_title(name: str, kind: str) -> str:
    """The plot panel of tuned value ``name``: its kind's ``panel`` (dropout rates share one,
    weight decays one, ...), an augmentation's own panel, else a panel of its own."""
    cls = kind_class(kind)
    if cls is not None and cls.panel is not None:
        return cls.panel
    base = name.split(":")[0]
    return f"Augmentation: {base}" if kind == "augmentation" else base


def _log_kind(kind: str) -> bool:
    cls = kind_class(kind)
    return cls is not None and cls.plot_log


def _matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            "plotting needs matplotlib, an optional dependency of hypertune: "
            "pip install 'hypertune-stn[plot]' (or pip install matplotlib)"
        ) from err
    return Figure


def group_hparams(
    names: Sequence[str],
    specs: Mapping[str, Any] | None = None,
    kinds: Mapping[str, str] | None = None,
) -> dict[str, list[str]]:
    """Panels of the schedule plot: title -> names, in first-seen order.

    All dropout rates (input, DropConnect and word dropout included) share a panel, weight
    decays share one, AR/TAR coefficients share one, each
    augmentation's sub-values share one (``"Augmentation: cutout"``), and every other value gets
    its own. Kinds come from ``specs`` (``model.hparams.specs``), else ``kinds``, else the names.
    """
    groups: dict[str, list[str]] = {}
    for n in names:
        if specs is not None and n in specs:
            kind = spec_kind(n, specs[n])
        elif kinds is not None and n in kinds:
            kind = kinds[n]
        else:
            kind = guess_kind(n)
        groups.setdefault(panel_title(n, kind), []).append(n)
    return groups


def _moving_average(values: Sequence[float], window: int) -> list[float]:
    """The mean of the last ``window`` finite values (a skipped step's NaN/inf loss would
    otherwise stay in a running sum, and inf - inf is NaN, for the rest of the run)."""
    out: list[float] = []
    kept = [v if math.isfinite(v) else None for v in values]
    total, count = 0.0, 0
    for i, v in enumerate(kept):
        if v is not None:
            total, count = total + v, count + 1
        if i >= window and kept[i - window] is not None:
            total, count = total - kept[i - window], count - 1  # type: ignore[operator]
        out.append(total / count if count else math.nan)
    return out


def _hparam_series(history: History) -> tuple[list[int], dict[str, list[float]], dict[str, list[float]]]:
    """Values in effect at every step where some record holds them (train and val records)."""
    at: dict[int, tuple[dict[str, float], dict[str, float]]] = {}
    for r in history:
        if r.skipped:  # it ran nothing and found the step counter of the step before
            continue
        index = r.step - 1 if r.kind == "train" else r.step
        at[max(index, 0)] = (r.hparams, r.scales)
    steps = sorted(at)
    names = history.hparam_names
    values = {n: [at[s][0][n] for s in steps] for n in names}
    scales = {n: [at[s][1][n] for s in steps] for n in names}
    return steps, values, scales


def plot_schedule(
    history: History | Any,
    path: str | Path | None = None,
    *,
    model: HyperModel | None = None,
    specs: Mapping[str, Any] | None = None,
    groups: Mapping[str, Sequence[str]] | None = None,
    steps_per_epoch: int | None = None,
    show_scale: bool | str = "auto",
    smooth: int = 50,
    title: str | None = None,
    dpi: int = 120,
) -> Any:
    """Draw the hyperparameter schedules and the losses of a run; save a PNG if ``path`` is given.

    One panel per group of hyperparameters (see :func:`group_hparams`; pass ``groups`` to choose
    your own), then a loss panel: the training loss (raw, faint, and a ``smooth``-step moving
    average) and the validation loss of the val steps. With the ``model`` (or its ``specs``)
    log-scale values (weight decay) get a log axis, and values get a band λ ± σ of their
    perturbation distribution (``show_scale=True``; ``"auto"``: in panels of at most two lines). ``history`` may be a History, a DeltaSTNOptimizer or a :class:`Schedule`
    (schedules only, no loss panel). ``steps_per_epoch`` labels the x axis in epochs.

    Returns the matplotlib Figure.
    """
    Figure = _matplotlib()
    if specs is None and model is not None:
        specs = model.hparams.specs
    if isinstance(history, Schedule):
        steps = list(history.steps) + [history.total_steps]
        values = {n: list(v) + [v[-1]] for n, v in history.values.items()}
        scales: dict[str, list[float]] = {}
        kinds = {n: m.get("kind", guess_kind(n)) for n, m in history.meta.items()}
        train, val = [], []
        drawstyle = "steps-post"
    else:
        if not isinstance(history, History):
            history = getattr(history, "history", history)
        if not isinstance(history, History) or not len(history):
            raise ValueError("plot_schedule needs a non-empty History (run some steps first)")
        steps, values, scales = _hparam_series(history)
        kinds = None
        train = history.of_kind("train")
        val = history.of_kind("val")
        drawstyle = "steps-post"
    names = list(values)
    panels = (
        {t: list(ns) for t, ns in groups.items()} if groups is not None else group_hparams(names, specs, kinds)
    )
    unknown = [n for ns in panels.values() for n in ns if n not in values]
    if unknown:
        raise ValueError(f"groups name hyperparameters the history does not have: {unknown}")
    has_losses = bool(train or val)
    n_panels = len(panels) + int(has_losses)
    fig = Figure(figsize=(8, 2.3 * n_panels + 0.6), dpi=dpi, layout="constrained")
    axes = fig.subplots(n_panels, 1, sharex=True, squeeze=False)[:, 0]
    scale_x = 1.0 / steps_per_epoch if steps_per_epoch else 1.0
    xs = [s * scale_x for s in steps]
    colors = [f"C{i}" for i in range(10)]

    for ax, (panel, members) in zip(axes, panels.items()):
        log_axis = True
        for i, n in enumerate(members):
            color = colors[i % len(colors)]
            spec = specs.get(n) if specs is not None else None
            label: str | None = n
            if len(members) == 1 and n == panel:
                label = None  # the panel's title already names it
            ax.plot(xs, values[n], color=color, label=label, drawstyle=drawstyle, linewidth=1.6)
            banded = show_scale is True or (show_scale == "auto" and len(members) <= 2)
            if banded and spec is not None and scales and not spec.discrete:
                lo, hi = _band(spec, values[n], scales[n])
                if lo is not None:
                    ax.fill_between(xs, lo, hi, color=color, alpha=0.12, linewidth=0, step="post")
            if spec is not None:
                is_log = _tuned_on_log_scale(spec)
            else:
                is_log = _log_kind((kinds or {}).get(n, guess_kind(n)))
            log_axis = log_axis and is_log and min(values[n]) > 0
        if log_axis:
            ax.set_yscale("log")
        ax.set_title(panel, loc="left", fontsize=10)
        ax.grid(True, alpha=0.3)
        if any(not line.get_label().startswith("_") for line in ax.get_lines()):
            ax.legend(fontsize=8, loc="best", ncol=2 if len(members) > 3 else 1)

    if has_losses:
        ax = axes[-1]
        if train:
            tx = [r.step * scale_x for r in train]
            ty = [r.loss for r in train]
            ax.plot(tx, ty, color="0.6", alpha=0.35, linewidth=0.6)
            ax.plot(tx, _moving_average(ty, max(1, smooth)), color="C0", linewidth=1.6,
                    label=f"train (mean of {smooth})" if smooth > 1 else "train")
        if val:
            vx = [r.step * scale_x for r in val]
            vy = [r.loss for r in val]
            ax.plot(vx, vy, color="C3", alpha=0.25, linewidth=0.6)
            ax.plot(vx, _moving_average(vy, max(1, smooth // 5)), color="C3", linewidth=1.6,
                    label=f"validation (mean of {max(1, smooth // 5)})" if smooth > 5 else "validation")
        ax.set_title("Losses", loc="left", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        finite = [v for v in ([r.loss for r in train] + [r.loss for r in val]) if math.isfinite(v)]
        if finite:
            finite.sort()
            top = finite[int(0.98 * (len(finite) - 1))]
            ax.set_ylim(max(0.0, finite[0] * 0.9), top * 1.1 if top > 0 else None)
    axes[-1].set_xlabel("epoch" if steps_per_epoch else "train step")
    if title:
        fig.suptitle(title)
    if path is not None:
        fig.savefig(str(path))
    return fig


def _tuned_on_log_scale(spec: Any) -> bool:
    """Log-scale specs and positive ones tuned as exp(u) (weight decay, AR/TAR) get a log axis."""
    from .transforms import ShiftedExp

    transform = spec.transform
    return bool(spec.log) or (isinstance(transform, ShiftedExp) and transform.low == 0)


def _band(spec: Any, values: Sequence[float], scales: Sequence[float]) -> tuple[list[float] | None, list[float] | None]:
    """constrain(u ± σ) for each (value, σ), u = the value on its tuning scale."""
    import torch

    transform = spec.transform
    try:
        u = torch.tensor([transform.inverse(float(v)) for v in values], dtype=torch.float64)
    except (ValueError, ZeroDivisionError, OverflowError):
        return None, None
    s = torch.tensor(list(scales), dtype=torch.float64)
    lo = transform.forward(u - s).tolist()
    hi = transform.forward(u + s).tolist()
    return lo, hi
