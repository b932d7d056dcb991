"""Global best-response (hyper-training, Lorraine & Duvenaud 2018, Algorithm 2).

Instead of tracking the best response near the current λ (Δ-STN), train the hypernetwork over a
*broad prior* on λ once, then read off the validation loss of ``w_φ(λ)`` anywhere in the prior
without retraining: a whole validation curve for the price of about one training run, plus
gradient descent on λ through the hypernetwork if wanted.

It reuses the library's uncentered (plain STN) hyper-layers: ``W(λ) = W₀ + diag(P z(λ)) W_resp``
per layer, where the hypernetwork input ``z(λ)`` maps the prior's range on the tuning scale to
``[-1, 1]``. With ``degree > 1`` the input also carries Chebyshev polynomials ``T_k(z)`` of each
tuned value (as extra, unused hyperparameter columns named ``"<name>^<k>"``), which makes the
best response a degree-``degree`` polynomial in λ instead of an affine one::

    gbr = GlobalBestResponse.wrap(model, {"weight_decay": ht.WeightDecay(init=1e-3)},
                                  prior={"weight_decay": (1e-6, 1.0)}, degree=3)
    optimizer = torch.optim.Adam(gbr.parameters(), lr=1e-3)
    for epoch in range(epochs):
        for x, y in train_loader:
            gbr.train_step(x, y, F.cross_entropy, optimizer)       # λ ~ prior, one per example
    grid = {"weight_decay": log_grid(1e-6, 1.0, 25)}
    curve = gbr.validation_curve(grid, val_batches, F.cross_entropy)  # [(values, loss), ...]
    best = gbr.optimize(val_batches, F.cross_entropy)                 # Algorithm 2, second loop
    plain = gbr.unwrap_at(best)                                      # w_φ(λ*) as a plain module
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .context import Perturbation
from .errors import HyperTuneError
from .model import HyperModel
from .specs import HParam

LossFn = Callable[[Any, Any], Tensor]
Batches = Iterable[tuple[Any, Any]]


def _chebyshev(z: Tensor, degree: int) -> list[Tensor]:
    """T_1(z) .. T_degree(z)."""
    out = [z]
    prev, cur = torch.ones_like(z), z
    for _ in range(2, degree + 1):
        prev, cur = cur, 2 * z * cur - prev
        out.append(cur)
    return out


def feature_name(name: str, k: int) -> str:
    return f"{name}^{k}"


class GlobalBestResponse:
    """A HyperModel trained over a prior on λ, evaluated at any fixed λ in it.

    Args:
        model: a HyperModel (it is switched to uncentered STN form: ``model.centered = False``).
        prior: ``{name: (low, high)}`` in constrained values; λ is drawn uniformly between them
            on each value's tuning scale (log scale for weight decay, logit scale for dropout),
            one draw per example (per batch for ``perturb="batch"`` specs). Tuned values not in
            the prior stay at their current value.
        degree: polynomial degree of the hypernetwork input; ``degree > 1`` needs the feature
            columns that :meth:`wrap` adds.
    """

    def __init__(self, model: HyperModel, prior: Mapping[str, tuple[float, float]], *, degree: int = 1) -> None:
        if not isinstance(model, HyperModel):
            raise HyperTuneError(
                f"GlobalBestResponse needs a HyperModel, got {type(model).__name__}: use "
                "GlobalBestResponse.wrap(module, hparams, prior) or HyperModel.wrap first"
            )
        if not (isinstance(degree, int) and degree >= 1):
            raise HyperTuneError(f"degree={degree!r} must be an int >= 1")
        space = model.hparams
        self.model = model
        self.space = space
        self.degree = degree
        if not prior:
            raise HyperTuneError("prior is empty: give (low, high) for at least one tuned value")
        self.names = list(prior)
        lows, highs = [], []
        for name in self.names:
            if name not in space.names:
                raise HyperTuneError(f"prior names {name!r}, which the model does not tune; it tunes {space.names}")
            spec = space.specs[name]
            try:
                low, high = (float(v) for v in prior[name])
            except (TypeError, ValueError):
                raise HyperTuneError(f"prior[{name!r}] must be a (low, high) pair, got {prior[name]!r}") from None
            if not (spec.low < low < high < spec.high):
                raise HyperTuneError(
                    f"prior[{name!r}] = ({low}, {high}) must satisfy {spec.low} < low < high < {spec.high} "
                    "(the spec's open bounds)"
                )
            lows.append(spec.transform.inverse(low))
            highs.append(spec.transform.inverse(high))
            for k in range(2, degree + 1):
                if feature_name(name, k) not in space.names:
                    raise HyperTuneError(
                        f"degree={degree} needs the feature column {feature_name(name, k)!r}: build with "
                        "GlobalBestResponse.wrap(module, hparams, prior, degree=...)"
                    )
        ref = space.unconstrained
        self._index = torch.tensor([space.index(n) for n in self.names], device=ref.device)
        self._low = torch.tensor(lows, dtype=ref.dtype, device=ref.device)
        self._high = torch.tensor(highs, dtype=ref.dtype, device=ref.device)
        self._features = [
            [space.index(feature_name(n, k)) for k in range(2, degree + 1)] for n in self.names
        ]
        self._shared = torch.tensor(
            [space.specs[n].perturb == "batch" for n in self.names], device=ref.device
        )
        model.centered = False
        self.train_steps = 0

    @classmethod
    def wrap(
        cls,
        module: nn.Module,
        hparams: Mapping[str, HParam],
        prior: Mapping[str, tuple[float, float]],
        *,
        degree: int = 1,
        **wrap_kwargs: Any,
    ) -> GlobalBestResponse:
        """``HyperModel.wrap`` with the polynomial feature columns ``degree`` needs."""
        specs = dict(hparams)
        for name in prior:
            for k in range(2, degree + 1):
                specs[feature_name(name, k)] = HParam(init=0.0, perturb=getattr(specs.get(name), "perturb", "example"))
        return cls(HyperModel.wrap(module, specs, **wrap_kwargs), prior, degree=degree)

    # ---- λ <-> hypernetwork input ----------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """What the hypernetwork training updates: w₀ and Θ (not λ or σ)."""
        self._check_live()
        return self.model.base_parameters() + self.model.response_parameters()

    def _points(self, u_tuned: Tensor) -> Perturbation:
        """The forward-pass point for rows of tuned unconstrained values (R, len(names))."""
        space = self.space
        rows = u_tuned.shape[0]
        base = space.unconstrained.detach()
        u = base.unsqueeze(0).expand(rows, -1).clone()
        u[:, self._index] = u_tuned.detach()
        z = 2 * (u_tuned - self._low) / (self._high - self._low) - 1
        # Values outside the prior keep their own λ column, but the hypernetwork sees 0 for them.
        response = torch.zeros(rows, len(space), dtype=u.dtype, device=u.device)
        response = response.index_copy(1, self._index, z)
        if self.degree > 1:
            for j, cols in enumerate(self._features):
                powers = _chebyshev(z[:, j], self.degree)[1:]
                for col, t in zip(cols, powers):
                    response = response.index_copy(1, torch.tensor([col], device=u.device), t.unsqueeze(1))
        return Perturbation(space, u, response)

    def sample(self, rows: int, generator: torch.Generator | None = None) -> Tensor:
        """Unconstrained tuned values drawn from the prior, shape (rows, len(names))."""
        r = torch.rand(rows, len(self.names), generator=generator, dtype=self._low.dtype)
        r = r.to(self._low.device)
        if bool(self._shared.any()):
            r[:, self._shared] = r[:1, self._shared]
        return self._low + (self._high - self._low) * r

    def encode(self, values: Mapping[str, float]) -> Tensor:
        """Constrained values -> unconstrained row (1, len(names)); every prior name is needed."""
        missing = [n for n in self.names if n not in values]
        if missing:
            raise HyperTuneError(f"values for {missing} are missing")
        bad = []
        for n in self.names:
            spec = self.space.specs[n]
            try:
                v = float(values[n])
            except (TypeError, ValueError):
                bad.append(f"{n}={values[n]!r} is not a number")
                continue
            if not (math.isfinite(v) and spec.low < v < spec.high):
                bad.append(f"{n}={v} lies outside the spec's open range ({spec.low}, {spec.high})")
        if bad:
            raise HyperTuneError("; ".join(bad) + ": give values inside each spec's bounds")
        u = [self.space.specs[n].transform.inverse(float(values[n])) for n in self.names]
        return torch.tensor([u], dtype=self._low.dtype, device=self._low.device)

    def decode(self, u_tuned: Tensor) -> dict[str, float]:
        u = u_tuned.detach().reshape(1, -1)
        point = self._points(u)
        return {n: float(point.value(n)[0]) for n in self.names}

    # ---- Algorithm 2, first loop: the hypernetwork over the prior ----------------------------
    def train_step(self, inputs: Any, target: Any, loss_fn: LossFn, optimizer: torch.optim.Optimizer) -> float:
        """One step of w₀ and Θ on the training loss at λ drawn from the prior per example."""
        self._check_live()
        model = self.model
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        rows = model.batch_rows(args)
        point = self._points(self.sample(rows))
        was = model.training
        model.train()
        try:
            optimizer.zero_grad(set_to_none=True)
            collecting = getattr(model, "collecting_activations", None)  # AR/TAR hooks
            with model.evaluated_at(point), (collecting() if collecting else contextlib.nullcontext()):
                out = model(*args)
                loss = loss_fn(out, target)
                penalty = model.training_penalty(point)
                total = loss if penalty is None else loss + penalty.mean()
            total.backward()
            optimizer.step()
        finally:
            model.train(was)
        self.train_steps += 1
        return float(loss.detach())

    def fit(
        self,
        batches: Callable[[], Batches] | Batches,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer,
        epochs: int = 1,
        scheduler: Any | None = None,
    ) -> list[float]:
        """``epochs`` passes of :meth:`train_step`; ``batches`` is re-iterated each epoch (a
        loader, or a callable returning one). Returns the mean training loss of each epoch."""
        means = []
        for _ in range(epochs):
            total, n = 0.0, 0
            for x, y in batches() if callable(batches) else batches:
                total += self.train_step(x, y, loss_fn, optimizer)
                n += 1
            if scheduler is not None:
                scheduler.step()
            means.append(total / max(n, 1))
        return means

    # ---- evaluating w_φ(λ) at fixed λ --------------------------------------------------------
    def _loss_at(self, u_tuned: Tensor, batches: Batches, loss_fn: LossFn) -> Tensor:
        model = self.model
        point = self._points(u_tuned)
        total: Tensor | None = None
        count = 0
        with model.evaluated_at(point):
            for x, y in batches:
                args = x if isinstance(x, tuple) else (x,)
                n = model.batch_rows(args)
                term = loss_fn(model(*args), y) * n
                total = term if total is None else total + term
                count += n
        if total is None:
            raise HyperTuneError("no validation batches were given")
        return total / count

    @torch.no_grad()
    def evaluate(self, values: Mapping[str, float], batches: Batches, loss_fn: LossFn) -> float:
        """Loss (mean over examples) of ``w_φ(λ)`` at ``values``, regularizers off (eval mode).

        ``loss_fn`` must return the batch mean; ``batches`` must be re-iterable.
        """
        self._check_live()
        was = self.model.training
        self.model.eval()
        try:
            return float(self._loss_at(self.encode(values), batches, loss_fn))
        finally:
            self.model.train(was)

    def validation_curve(
        self,
        grid: Mapping[str, Sequence[float]] | Sequence[Mapping[str, float]],
        batches: Batches,
        loss_fn: LossFn,
    ) -> list[tuple[dict[str, float], float]]:
        """The loss at every grid point: ``{name: values}`` (their product) or a list of dicts."""
        if isinstance(grid, Mapping):
            names = list(grid)
            points = [dict(zip(names, combo)) for combo in itertools.product(*(grid[n] for n in names))]
        else:
            points = [dict(p) for p in grid]
        batches = list(batches) if not isinstance(batches, (list, tuple)) else batches
        return [(p, self.evaluate(p, batches, loss_fn)) for p in points]

    # ---- Algorithm 2, second loop: λ by gradient descent through the hypernetwork -----------
    def optimize(
        self,
        batches: Batches,
        loss_fn: LossFn,
        *,
        steps: int = 200,
        lr: float = 0.05,
        init: Mapping[str, float] | None = None,
    ) -> dict[str, float]:
        """Minimize the validation loss of ``w_φ(λ)`` over λ (Adam on the tuning scale, kept
        inside the prior, where the hypernetwork was trained). Starts at ``init`` or the
        middle of the prior. ``batches`` is cycled; one batch per step."""
        self._check_live()
        u = (self.encode(init) if init is not None else ((self._low + self._high) / 2).unsqueeze(0)).clone()
        u.requires_grad_(True)
        opt = torch.optim.Adam([u], lr=lr * float((self._high - self._low).max()))
        was = self.model.training
        self.model.eval()
        frozen = [(p, p.requires_grad) for p in self.parameters()]
        for p, _ in frozen:
            p.requires_grad_(False)
        kept = list(batches)
        if not kept:
            raise HyperTuneError("no validation batches were given")
        stream = itertools.cycle(kept)
        try:
            for _ in range(steps):
                opt.zero_grad()
                loss = self._loss_at(u, [next(stream)], loss_fn)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    u.copy_(torch.maximum(torch.minimum(u, self._high), self._low))
        finally:
            for p, flag in frozen:
                p.requires_grad_(flag)
            self.model.train(was)
        return self.decode(u)

    # ---- the model at one λ ------------------------------------------------------------------
    @torch.no_grad()
    def unwrap_at(self, values: Mapping[str, float]) -> nn.Module:
        """The plain module with weights ``w_φ(λ)`` and dropout rates at ``values``; the
        HyperModel is spent afterwards (as after ``HyperModel.unwrap``)."""
        self._check_live()
        u = self.encode(values)
        point = self._points(u)
        self.space.unconstrained.copy_(point.hparams[0])
        for layer in self.model.hyper_layers().values():
            layer.bake(point.response_input[0])  # type: ignore[index]
        self.model.centered = True  # Θ is folded in now: unwrap must not fold it again
        self._spent = True
        return self.model.unwrap()

    def _check_live(self) -> None:
        if getattr(self, "_spent", False):
            raise HyperTuneError(
                "this GlobalBestResponse was unwrapped (unwrap_at folded its hypernetwork into the "
                "plain model it returned): build a new one to train or evaluate again"
            )


def log_grid(low: float, high: float, num: int) -> list[float]:
    """``num`` values spaced evenly on a log scale from ``low`` to ``high``."""
    if num < 2:
        return [math.sqrt(low * high)]
    a, b = math.log(low), math.log(high)
    return [math.exp(a + (b - a) * i / (num - 1)) for i in range(num)]
