"""Write a tuning run's History to CSV or TensorBoard, and summarize it for progress bars.

Every record of ``opt.history`` carries the step, whether it was a train or val step, its loss
(and the Θ step's loss), the constrained values λ and the perturbation scales σ. Writers are
incremental: call ``update(opt.history)`` as often as you like (every step, every epoch) and only
new records are written::

    csv_log = CSVWriter("run.csv")
    tb_log = TensorBoardWriter("runs/stn")          # needs: pip install 'hypertune-stn[tensorboard]'
    pbar = tqdm(train_loader)
    for x, y in pbar:
        opt.train_step(x, y, F.cross_entropy)
        ...
        pbar.set_postfix(progress_summary(opt))     # loss=0.412 val=0.389 dropout=0.12 ...
    csv_log.update(opt.history); tb_log.update(opt.history); tb_log.close()
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .history import History, Record

LAMBDA = "lambda/"
SIGMA = "sigma/"
_FIXED = ["step", "kind", "loss", "response_loss", "skipped"]


def _history_of(source: Any) -> History:
    """A History from a History or anything holding one as ``.history`` (DeltaSTNOptimizer)."""
    if isinstance(source, History):
        return source
    history = getattr(source, "history", None)
    if isinstance(history, History):
        return history
    raise TypeError(
        f"expected a hypertune History or an object with a .history (DeltaSTNOptimizer), got "
        f"{type(source).__name__}"
    )


# ---- flat rows and CSV ---------------------------------------------------------------------------
def record_row(record: Record) -> dict[str, Any]:
    """One record as a flat dict: step, kind, loss, response_loss, skipped, lambda/…, sigma/…."""
    row: dict[str, Any] = {
        "step": record.step,
        "kind": record.kind,
        "loss": record.loss,
        "response_loss": record.response_loss,
        "skipped": record.skipped,
    }
    row.update({LAMBDA + n: v for n, v in record.hparams.items()})
    row.update({SIGMA + n: v for n, v in record.scales.items()})
    return row


def history_rows(history: History | Any) -> list[dict[str, Any]]:
    return [record_row(r) for r in _history_of(history)]


def _columns(record: Record) -> list[str]:
    return _FIXED + [LAMBDA + n for n in record.hparams] + [SIGMA + n for n in record.scales]


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


class CSVWriter:
    """Appends a History's records to a CSV file, one row per record, as they arrive.

    ``update(history)`` writes the records added since the last call. The file is rewritten on
    the first call unless ``append=True``. Columns: ``step, kind, loss, response_loss, skipped``,
    then ``lambda/<name>`` (constrained values) and ``sigma/<name>`` (perturbation scales).
    """

    def __init__(self, path: str | Path, *, append: bool = False) -> None:
        self.path = Path(path)
        self._written = 0
        self._columns: list[str] | None = None
        self._append = append

    def update(self, history: History | Any) -> int:
        """Write new records; returns how many were written."""
        records = _history_of(history).records
        if len(records) < self._written:  # a new run's history, or one reloaded shorter
            self._written = 0
            self._columns = None
            self._append = False
        new = records[self._written :]
        if not new:
            return 0
        if self._columns is None:
            self._columns = _columns(new[0])
            mode = "a" if self._append and self.path.exists() else "w"
            header = mode == "w"
        else:
            mode, header = "a", False
        with self.path.open(mode, newline="") as f:
            writer = csv.writer(f)
            if header:
                writer.writerow(self._columns)
            for r in new:
                row = record_row(r)
                writer.writerow([_cell(row.get(c)) for c in self._columns])
        self._written = len(records)
        return len(new)


def write_csv(history: History | Any, path: str | Path) -> Path:
    """The whole History as one CSV file (see :class:`CSVWriter` for the columns)."""
    CSVWriter(path).update(history)
    return Path(path)


def read_csv(path: str | Path) -> History:
    """Read a CSV written by :func:`write_csv` / :class:`CSVWriter` back into a History."""
    history = History()
    with Path(path).open(newline="") as f:
        reader = csv.DictReader(f)
        fields = reader.fieldnames or []
        if fields[: len(_FIXED)] != _FIXED:
            raise ValueError(f"{path}: not a hypertune history CSV (columns {fields[:5]})")
        lam = [c[len(LAMBDA) :] for c in fields if c.startswith(LAMBDA)]
        sig = [c[len(SIGMA) :] for c in fields if c.startswith(SIGMA)]
        for row in reader:
            history.append(
                Record(
                    step=int(row["step"]),
                    kind=row["kind"],  # type: ignore[arg-type]
                    loss=float(row["loss"]),
                    hparams={n: float(row[LAMBDA + n]) for n in lam},
                    scales={n: float(row[SIGMA + n]) for n in sig},
                    response_loss=float(row["response_loss"]) if row["response_loss"] else None,
                    skipped=row["skipped"] == "True",
                )
            )
    return history


# ---- TensorBoard ---------------------------------------------------------------------------------
def _summary_writer_class() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ImportError(
            "TensorBoard logging needs the tensorboard package, which is an optional dependency of "
            "hypertune: pip install 'hypertune-stn[tensorboard]' (or pip install tensorboard)"
        ) from err
    return SummaryWriter


class TensorBoardWriter:
    """Writes a History to TensorBoard scalars, incrementally, at ``global_step = record.step``.

    Tags: ``loss/train``, ``loss/val``, ``loss/response`` (the Θ step's perturbed loss),
    ``hparam/<name>`` (constrained λ) and ``sigma/<name>``. λ and σ are written from train
    records (the values each train step used) and from val records (where they change).
    ``every`` thins the train records (val records are always written).

    Pass ``log_dir`` to own a SummaryWriter, or ``writer=`` to share one (e.g. a Lightning
    logger's ``experiment``). Needs ``tensorboard``: ``pip install 'hypertune-stn[tensorboard]'``.
    """

    def __init__(
        self,
        log_dir: str | Path | None = None,
        *,
        writer: Any | None = None,
        prefix: str = "",
        every: int = 1,
    ) -> None:
        if writer is None:
            writer = _summary_writer_class()(log_dir=None if log_dir is None else str(log_dir))
            self._owns = True
        else:
            self._owns = False
        self.writer = writer
        self.prefix = prefix
        self.every = max(1, int(every))
        self._written = 0

    def _tag(self, tag: str) -> str:
        return f"{self.prefix}{tag}"

    def update(self, history: History | Any) -> int:
        records = _history_of(history).records
        if len(records) < self._written:
            self._written = 0
        new = records[self._written :]
        count = 0
        for r in new:
            if r.kind == "train" and r.step % self.every:
                continue
            scalar = self.writer.add_scalar
            scalar(self._tag(f"loss/{r.kind}"), r.loss, r.step)
            if r.response_loss is not None:
                scalar(self._tag("loss/response"), r.response_loss, r.step)
            for n, v in r.hparams.items():
                scalar(self._tag(f"hparam/{n}"), v, r.step)
            for n, v in r.scales.items():
                scalar(self._tag(f"sigma/{n}"), v, r.step)
            count += 1
        self._written = len(records)
        return count

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.flush()
        if self._owns:
            self.writer.close()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_tensorboard(history: History | Any, log_dir: str | Path, **kwargs: Any) -> Path:
    """The whole History to a TensorBoard log directory (see :class:`TensorBoardWriter`)."""
    with TensorBoardWriter(log_dir, **kwargs) as tb:
        tb.update(history)
    return Path(log_dir)


# ---- progress bars -------------------------------------------------------------------------------
def _fmt(value: float) -> str:
    if value is None or not math.isfinite(value):
        return str(value)
    return f"{value:.3g}"


def _short(name: str, names: Sequence[str], limit: int = 16) -> str:
    """A long per-site name ``dropout:encoder.layers.3.dropout`` -> its last ``limit`` characters."""
    if len(name) <= limit:
        return name
    short = "…" + name[-(limit - 1) :]
    clashes = [n for n in names if n != name and n.endswith(name[-(limit - 1) :])]
    return name if clashes else short


def progress_summary(
    source: History | Any,
    *,
    window: int = 20,
    names: Iterable[str] | None = None,
    max_hparams: int = 6,
    scales: bool = False,
) -> dict[str, str]:
    """A short ordered dict of strings for ``tqdm``'s ``pbar.set_postfix(...)``.

    ``loss``: mean training loss of the last ``window`` train steps; ``val``: the last val
    step's loss; then up to ``max_hparams`` current values (3 significant digits), and their σ
    with ``scales=True``. ``source`` is a History or a DeltaSTNOptimizer.
    """
    history = _history_of(source)
    out: dict[str, str] = {}
    # skipped steps (a NaN/inf loss under nonfinite="skip") trained nothing: left out of the mean
    train = [r for r in history.records[-(window * 8 + 8) :] if r.kind == "train" and not r.skipped][-window:]
    if train:
        out["loss"] = _fmt(sum(r.loss for r in train) / len(train))
    val = next((r for r in reversed(history.records) if r.kind == "val"), None)
    if val is not None:
        out["val"] = _fmt(val.loss)
    last = history.latest()
    if last is None:
        return out
    chosen = list(names) if names is not None else list(last.hparams)[:max_hparams]
    all_names = list(last.hparams)
    for n in chosen:
        key = _short(n, all_names)
        out[key] = _fmt(last.hparams[n])
        if scales:
            out[f"σ({key})"] = _fmt(last.scales[n])
    return out


def format_summary(source: History | Any, **kwargs: Any) -> str:
    """:func:`progress_summary` as one line: ``loss=0.412 val=0.389 dropout=0.12``."""
    return " ".join(f"{k}={v}" for k, v in progress_summary(source, **kwargs).items())
