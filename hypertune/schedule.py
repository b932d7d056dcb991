"""Export the hyperparameter schedule a tuning run found, and replay it in a plain training run.

Δ-STN changes its hyperparameters as training goes; the STN paper found that the *schedule*, not
just its final values, is what helps. :class:`Schedule` is that schedule as data (step -> tuned
values, plus where each value acts), saved as JSON or CSV; :class:`ScheduleReplayer` drives an
ordinary model (the unwrapped one, or a fresh instance of the same architecture) with it, inside
the user's own loop and with the user's own optimizer, no hypernetwork involved::

    schedule = Schedule.from_optimizer(opt)          # after a Δ-STN run
    schedule.to_json("schedule.json")

    model = MyNet()                                   # fresh weights, same module paths
    replayer = ScheduleReplayer(Schedule.from_json("schedule.json"), model)
    optimizer = torch.optim.SGD(replayer.param_groups(), lr=0.01, momentum=0.9)
    for step, (x, y) in enumerate(batches):
        replayer.apply(step, optimizer)               # dropout p, input dropout, weight decay
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

Steps count train steps from 0: ``apply(i)`` sets the values Δ-STN used in its ``i``-th train step
(``i`` = number of train steps taken before it), so a replay with the same number of steps per
epoch reproduces the run's schedule step for step; :meth:`Schedule.stretched` maps it onto a run
of another length.
"""

from __future__ import annotations

import bisect
import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import HyperTuneError, SpecError
from .history import History
from .kinds.base import FixedForm, FixedFormError, HParam, hparam_from_json, kind_class, kind_of

if TYPE_CHECKING:
    from .model import HyperModel

_FORMAT = "hypertune.Schedule"
_VERSION = 1


def spec_kind(name: str, spec: Any) -> str:
    """The serialized kind of one tuned value (its spec class's ``kind``); ``augmentation`` is a
    sub-value ``"<aug>:<sub>"`` of an Augmentation."""
    return kind_of(name, spec)


def guess_kind(name: str) -> str:
    """A kind from the name alone, only for data saved without one (old files, bare CSVs)."""
    base = name.split(":")[0].lower()
    if "input" in base and "drop" in base:
        return "input_dropout"
    if "connect" in base:
        return "dropconnect"
    if ("embed" in base or "word" in base) and "drop" in base:
        return "embedding_dropout"
    if "drop" in base:
        return "dropout"
    if "decay" in base or base in ("wd", "l2"):
        return "weight_decay"
    if base in ("ar", "tar", "alpha", "beta") or "activation" in base:
        return "activation_penalty"
    return "augmentation" if ":" in name else "hparam"


def spec_from_meta(name: str, meta: Mapping[str, Any]) -> HParam | None:
    """The spec a schedule entry was tuned with: saved with it, or (older files, which saved only
    a kind) that kind's defaults; None where neither exists."""
    if "spec" in meta:
        return hparam_from_json(meta["spec"])
    cls = kind_class(str(meta.get("kind", guess_kind(name))))
    if cls is None:
        return None
    try:
        return cls()  # type: ignore[call-arg]
    except (TypeError, SpecError):
        return None


def describe_hparams(model: HyperModel) -> dict[str, dict[str, Any]]:
    """Per tuned value: its kind, its spec and where it acts (see HyperModel.describe_hparams)."""
    return model.describe_hparams()


@dataclass
class Schedule:
    """Tuned values over training: ``values[name][k]`` holds from train step ``steps[k]`` on.

    ``steps`` is increasing and starts at 0; only steps where some value changes are kept.
    ``total_steps`` is the length of the run the schedule came from. ``meta[name]`` says what the
    value is (``kind``) and where it acts (``modules`` / ``params``), see :func:`describe_hparams`.
    """

    steps: list[int]
    values: dict[str, list[float]]
    meta: dict[str, dict[str, Any]] = field(default_factory=dict)
    total_steps: int = 0

    def __post_init__(self) -> None:
        if not self.steps:
            raise HyperTuneError("a Schedule needs at least one step")
        if self.steps[0] != 0 or any(b <= a for a, b in zip(self.steps, self.steps[1:])):
            raise HyperTuneError(
                f"Schedule steps must start at 0 and increase strictly, got {self.steps[:5]}..."
            )
        for name, vals in self.values.items():
            if len(vals) != len(self.steps):
                raise HyperTuneError(
                    f"Schedule value {name!r} has {len(vals)} entries for {len(self.steps)} steps"
                )
            bad = [k for k, v in enumerate(vals) if not math.isfinite(v)]
            if bad:
                raise HyperTuneError(
                    f"Schedule value {name!r} is not finite at step(s) {[self.steps[k] for k in bad[:5]]}: "
                    "a replay cannot set a rate or coefficient to NaN/inf"
                )
        for name in self.values:
            self.meta.setdefault(name, {"kind": guess_kind(name)})
        # The last change may come after the last train step (a val step ends the run).
        self.total_steps = max(int(self.total_steps), self.steps[-1])

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_history(cls, history: History, model: HyperModel | None = None) -> Schedule:
        """The values every train step of a run used, from its History.

        A train record with ``step = s`` ran train step ``s - 1`` (0-based) at its values; a
        val record with ``step = s`` sets the values from train step ``s`` on. Pass the wrapped
        ``model`` to record where each value acts (needed to replay dropout and weight decay).
        """
        if not len(history):
            raise HyperTuneError("the history is empty: run some train_step calls first")
        names = history.hparam_names
        at: dict[int, dict[str, float]] = {}
        for r in history:
            if r.skipped:  # a skipped step ran nothing; its record keeps the step counter it found
                continue
            index = r.step - 1 if r.kind == "train" else r.step
            at[max(index, 0)] = dict(r.hparams)
        if not at:
            raise HyperTuneError("every step in the history was skipped: no values were trained with")
        train_steps = max((r.step for r in history.of_kind("train")), default=0)
        steps: list[int] = []
        values: dict[str, list[float]] = {n: [] for n in names}
        previous: dict[str, float] | None = None
        for index in sorted(at):
            current = at[index]
            if previous is not None and all(current[n] == previous[n] for n in names):
                continue
            if not steps and index != 0:
                index = 0  # values before the first record are the first record's
            steps.append(index)
            for n in names:
                values[n].append(float(current[n]))
            previous = current
        meta = describe_hparams(model) if model is not None else {}
        return cls(steps, values, meta, total_steps=train_steps)

    @classmethod
    def from_optimizer(cls, optimizer: Any) -> Schedule:
        """``from_history(opt.history, opt.hyper_model)`` for a DeltaSTNOptimizer."""
        return cls.from_history(optimizer.history, optimizer.hyper_model)

    @classmethod
    def constant(
        cls,
        values: Mapping[str, float],
        meta: Mapping[str, Mapping[str, Any]] | None = None,
        total_steps: int = 0,
    ) -> Schedule:
        """The same values at every step (a baseline: the final values held fixed, or untuned)."""
        return cls(
            [0],
            {n: [float(v)] for n, v in values.items()},
            {n: dict(m) for n, m in (meta or {}).items() if n in values},
            total_steps,
        )

    # ---- reading -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.values)

    def at(self, step: int) -> dict[str, float]:
        """Values in effect at train step ``step`` (0-based); the last values hold after the end."""
        k = max(bisect.bisect_right(self.steps, int(step)) - 1, 0)
        return {n: v[k] for n, v in self.values.items()}

    def initial(self) -> dict[str, float]:
        return self.at(0)

    def final(self) -> dict[str, float]:
        return {n: v[-1] for n, v in self.values.items()}

    def stretched(self, total_steps: int) -> Schedule:
        """The same schedule mapped onto a run of ``total_steps`` train steps (same fractions)."""
        if total_steps < 1:
            raise HyperTuneError(f"total_steps={total_steps} must be >= 1")
        factor = total_steps / self.total_steps if self.total_steps else 1.0
        steps: list[int] = []
        values: dict[str, list[float]] = {n: [] for n in self.values}
        for k, s in enumerate(self.steps):
            new = int(math.floor(s * factor + 1e-9))
            if steps and new == steps[-1]:
                for n in values:  # several changes land on one step: the latest wins
                    values[n][-1] = self.values[n][k]
                continue
            steps.append(new)
            for n in values:
                values[n].append(self.values[n][k])
        return Schedule(steps, values, {n: dict(m) for n, m in self.meta.items()}, total_steps)

    # ---- files -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "total_steps": self.total_steps,
            "hparams": {n: dict(self.meta.get(n, {})) for n in self.values},
            "steps": list(self.steps),
            "values": {n: list(v) for n, v in self.values.items()},
        }

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> Schedule:
        if state.get("format") != _FORMAT:
            raise HyperTuneError("not a hypertune schedule (missing format tag)")
        if state.get("version") != _VERSION:
            raise HyperTuneError(f"schedule version {state.get('version')} is not supported")
        try:
            steps = [int(s) for s in state["steps"]]
            values = {n: [float(x) for x in v] for n, v in state["values"].items()}
            meta = {n: dict(m) for n, m in state.get("hparams", {}).items()}
            total = int(state.get("total_steps", 0))
        except KeyError as err:
            raise HyperTuneError(f"the schedule lacks its {err.args[0]!r} entry; write it with Schedule.to_json") from None
        except (TypeError, ValueError, AttributeError) as err:
            raise HyperTuneError(f"the schedule's entries are malformed ({err}); write it with Schedule.to_json") from None
        return cls(steps, values, meta, total)

    def to_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.state_dict(), indent=1))
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> Schedule:
        try:
            state = json.loads(Path(path).read_text())
        except json.JSONDecodeError as err:
            raise HyperTuneError(f"{path}: not JSON ({err})") from None
        if not isinstance(state, Mapping):
            raise HyperTuneError(f"{path}: not a hypertune schedule (a JSON object is expected)")
        try:
            return cls.from_state_dict(state)
        except HyperTuneError as err:
            raise HyperTuneError(f"{path}: {err}") from None

    def to_csv(self, path: str | Path) -> Path:
        """One row per change: ``step,<name>,...``. CSV holds values only; JSON also keeps
        where each value acts, which :class:`ScheduleReplayer` needs for dropout/weight decay
        (or pass ``meta=`` to :meth:`from_csv`)."""
        path = Path(path)
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["step", *self.values])
            for k, s in enumerate(self.steps):
                w.writerow([s, *(repr(self.values[n][k]) for n in self.values)])
        return path

    @classmethod
    def from_csv(
        cls,
        path: str | Path,
        meta: Mapping[str, Mapping[str, Any]] | None = None,
        total_steps: int = 0,
    ) -> Schedule:
        with Path(path).open(newline="") as f:
            rows = list(csv.reader(f))
        if not rows or rows[0][:1] != ["step"]:
            raise HyperTuneError(f"{path}: not a schedule CSV (first column must be 'step')")
        names = rows[0][1:]
        for line, r in enumerate(rows[1:], start=2):
            if len(r) != len(rows[0]):
                raise HyperTuneError(f"{path}, line {line}: {len(r)} fields for the header's {len(rows[0])}")
        try:
            steps = [int(r[0]) for r in rows[1:]]
            values = {n: [float(r[i + 1]) for r in rows[1:]] for i, n in enumerate(names)}
        except ValueError as err:
            raise HyperTuneError(f"{path}: a step or value is not a number ({err})") from None
        try:
            return cls(steps, values, {n: dict(m) for n, m in (meta or {}).items()}, total_steps)
        except HyperTuneError as err:
            raise HyperTuneError(f"{path}: {err}") from None


class ScheduleReplayer:
    """Drive a plain model's regularizers from a :class:`Schedule`, in the user's own loop.

    Each tuned value is applied by its kind's fixed form (the same one ``unwrap`` and untuned
    baselines use). ``apply(step)`` sets, for that train step,

    * ``p`` of every dropout module a ``dropout`` value drives (by module path);
    * the rate of the input dropout (the forward pre-hook ``HyperModel.unwrap`` installs, added
      if the model has none); the rate of word dropout on embeddings (a forward hook);
    * ``weight_decay`` of the optimizer's param groups tagged ``"hparam": name`` — build the
      optimizer from :meth:`param_groups` so exactly the weights Δ-STN penalised are decayed
      (biases are not, unless the spec said ``include_bias``). torch's coupled ``weight_decay``
      (SGD, Adam, RMSprop) adds ``c·w`` to the gradient, the same as Δ-STN's ``c/2·‖w‖²`` loss
      term; decoupled AdamW is *not* the same — add :meth:`penalty` to the loss instead;
    * AR/TAR coefficients, whose terms :meth:`penalty` returns;

    and returns all current values, so values it cannot place (``unapplied``: DropConnect,
    augmentation and generic ``HParam`` values, which have no plain torch form) can be used by
    the caller.

    Args:
        schedule: the schedule, with ``meta`` saying where values act (JSON keeps it).
        model: the unwrapped model or a fresh one of the same architecture.
        optimizer: default optimizer for :meth:`apply`.
        modules: ``{name: [module path, ...]}`` overriding or supplying dropout sites.
    """

    def __init__(
        self,
        schedule: Schedule,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        modules: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        from .model import HyperModel

        if isinstance(model, HyperModel):
            raise HyperTuneError(
                "ScheduleReplayer drives a plain model: pass model.unwrap() or a fresh instance of "
                "the architecture, not the HyperModel"
            )
        self.schedule = schedule
        self.model = model
        self.optimizer = optimizer
        self.forms: dict[str, FixedForm] = {}
        self.unapplied: list[str] = []
        self.values: dict[str, float] = {}
        overrides = {n: list(p) for n, p in (modules or {}).items()}
        problems: list[str] = []
        first = schedule.initial()
        for name in schedule.names:
            meta = dict(schedule.meta.get(name, {}))
            if name in overrides:
                meta["modules"] = overrides[name]
            spec = spec_from_meta(name, meta)
            try:
                form = spec.fixed_form(model, meta, first[name]) if spec is not None else None
            except FixedFormError as err:
                problems.extend(f"{name!r}: {p}" for p in err.problems)
                continue
            if form is not None:
                self.forms[name] = form
            elif spec is not None and spec.kind == "dropout":
                problems.append(
                    f"{name!r}: the schedule does not say which dropout modules it drives; export "
                    "it with Schedule.from_optimizer(opt) (JSON keeps that) or pass "
                    f"modules={{{name!r}: [paths]}}"
                )
            elif spec is not None and spec.kind == "weight_decay":
                problems.append(
                    f"{name!r}: the schedule does not say which weights it decays; export it with "
                    "Schedule.from_optimizer(opt)"
                )
            else:
                self.unapplied.append(name)
        if problems:
            for form in self.forms.values():
                form.remove()
            raise HyperTuneError(
                "the schedule does not fit this model:\n  - " + "\n  - ".join(problems)
            )

    @property
    def weight_decays(self) -> dict[str, list[nn.Parameter]]:
        """Per weight-decay value, the weights it decays."""
        return {n: f.decayed_parameters() for n, f in self.forms.items() if f.decayed_parameters()}

    def param_groups(self, **group_defaults: Any) -> list[dict[str, Any]]:
        """Param groups for the user's optimizer: one per weight decay (tagged ``"hparam"``),
        starting at the schedule's first value, and one with ``weight_decay=0`` for the rest."""
        computed = [n for n, f in self.forms.items() if getattr(f, "computed", None)]
        if computed:
            raise HyperTuneError(
                f"weight decay {computed} acts on weights a parametrization computes (weight_norm's "
                "g·v/‖v‖): an optimizer's weight_decay would decay their originals g and v instead, a "
                "different penalty. Build the optimizer without weight decay and add "
                "replayer.penalty() to the training loss"
            )
        first = self.schedule.initial()
        groups: list[dict[str, Any]] = []
        taken: set[int] = set()
        for name, params in self.weight_decays.items():
            own = [p for p in params if id(p) not in taken and p.requires_grad]
            taken.update(id(p) for p in own)
            groups.append({"params": own, "weight_decay": first[name], "hparam": name, **group_defaults})
        rest = [p for p in self.model.parameters() if id(p) not in taken and p.requires_grad]
        if rest:
            groups.append({"params": rest, "weight_decay": 0.0, **group_defaults})
        return groups

    def apply(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> dict[str, float]:
        """Set the model (and optimizer) to the schedule's values at train step ``step``."""
        values = self.schedule.at(step)
        optimizer = optimizer if optimizer is not None else self.optimizer
        decays = self.weight_decays
        if optimizer is not None and decays:
            tagged = {g.get("hparam") for g in optimizer.param_groups}
            missing = [n for n in decays if n not in tagged]
            if missing:
                raise HyperTuneError(
                    f"the optimizer has no param group tagged 'hparam' for {missing}: build it from "
                    "replayer.param_groups(), or pass no optimizer and add replayer.penalty() to the loss"
                )
        for name, form in self.forms.items():
            form.set_value(values[name])
        if optimizer is not None and decays:
            for group in optimizer.param_groups:
                name = group.get("hparam")
                if name in decays:
                    group["weight_decay"] = float(values[name])
        self.values = values
        return dict(values)

    def penalty(self) -> Tensor:
        """The scheduled training-loss terms at the last applied values: ``Σ c/2·‖w‖²`` over the
        weight decays (exactly Δ-STN's penalty; use it instead of optimizer weight decay if you
        like) plus the AR/TAR terms of the training passes since the last call."""
        if not self.values:
            for name, form in self.forms.items():
                form.set_value(self.schedule.initial()[name])
        total: Tensor | None = None
        for form in self.forms.values():
            term = form.penalty()
            if term is not None:
                total = term if total is None else total + term
        if total is None:
            ref = next(self.model.parameters(), None)
            return torch.zeros((), device=ref.device if ref is not None else None)
        return total


def schedule_table(schedule: Schedule, every: int = 1) -> Iterable[tuple[int, dict[str, float]]]:
    """``(step, values)`` rows at every ``every`` train steps, for printing or custom export."""
    for step in range(0, schedule.total_steps, max(1, every)):
        yield step, schedule.at(step)
