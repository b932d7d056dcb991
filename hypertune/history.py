"""The record of a tuning run: every step's hyperparameters, scales and losses.

Kept by DeltaSTNOptimizer as ``opt.history``; writers, plots and schedule replay read it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Kind = Literal["train", "val"]


@dataclass
class Record:
    """One step. ``step`` counts train steps so train and val records share one time axis."""

    step: int
    kind: Kind
    loss: float
    hparams: dict[str, float]
    scales: dict[str, float]
    response_loss: float | None = None
    skipped: bool = False


@dataclass
class History:
    records: list[Record] = field(default_factory=list)

    def append(self, record: Record) -> None:
        self.records.append(record)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def of_kind(self, kind: Kind) -> list[Record]:
        return [r for r in self.records if r.kind == kind]

    @property
    def hparam_names(self) -> list[str]:
        return list(self.records[0].hparams) if self.records else []

    def series(self, name: str, kind: Kind = "train") -> tuple[list[int], list[float]]:
        """(steps, values) of one hyperparameter; ``name`` may also be ``"loss"``."""
        rows = self.of_kind(kind)
        if name == "loss":
            return [r.step for r in rows], [r.loss for r in rows]
        return [r.step for r in rows], [r.hparams[name] for r in rows]

    def latest(self) -> Record | None:
        return self.records[-1] if self.records else None

    def state_dict(self) -> dict[str, Any]:
        return {"records": [asdict(r) for r in self.records]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.records = [Record(**r) for r in state["records"]]
