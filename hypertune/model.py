"""HyperModel: a user's module after surgery, plus the hyper-state it is tuned by."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import warnings
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn

from . import context, surgery
from .attention import TunedRateCalls
from .augment.base import Augmentation
from .context import Perturbation
from .errors import HyperTuneError
from .hyperparameters import HyperParameters
from .layers import HyperDropout, HyperLayer, dropout_per_example
from .layers.dropout import RateInterceptionNeeded
from .rows import BatchPerturbationNeeded
from .penalties import ActivationPenalty, WeightDecayPenalty
from .specs import HParam, Target, TemporalActivationRegularization, WeightDecay, validate_specs


class InputDropoutHook:
    """Forward pre-hook that bakes a tuned input-dropout rate into an unwrapped model."""

    def __init__(self, rate: float) -> None:
        self.rate = rate

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        if not module.training or not args or not torch.is_tensor(args[0]):
            return None
        return (torch.nn.functional.dropout(args[0], self.rate, True), *args[1:])


def _first_tensor(args: Sequence[Any], kwargs: Mapping[str, Any]) -> Tensor | None:
    leaves = torch.utils._pytree.tree_leaves((list(args), dict(kwargs)))
    return next((x for x in leaves if torch.is_tensor(x)), None)


_SEQUENCE_FIRST_KINDS = (
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def _sequence_first_site(module: nn.Module) -> str | None:
    """The first torch attention module built with batch_first=False, described for a notice.

    Around it the batch is axis 1 of (T, B, E) tensors, while the model's input, whose leading
    axis sets the perturbation rows, may be (T, B, ...) too: rows would then be time steps.
    Shapes cannot tell the two apart when T happens to fit, so such models are perturbed per
    batch from their first perturbed pass.
    """
    for path, m in module.named_modules():
        if isinstance(m, _SEQUENCE_FIRST_KINDS) and getattr(m, "batch_first", None) is False:
            return f"'{path or '<root>'}' ({type(m).__name__}, batch_first=False)"
    return None


class HyperModel(nn.Module):
    """A model whose regularization hyperparameters are tuned online (Self-Tuning Networks).

    Build it with :meth:`wrap`. Calling it runs the user's forward at the current values λ₀ and
    w₀; :class:`~hypertune.DeltaSTNOptimizer` evaluates it at perturbed values.
    """

    module: nn.Module
    hparams: HyperParameters

    def __init__(self, module: nn.Module, hparams: HyperParameters, plan: surgery.SurgeryPlan) -> None:
        super().__init__()
        self.module = module
        self.hparams = hparams
        self.training = module.training
        self.centered = True
        self._override: Perturbation | None = None
        self._unwrapped = False
        self._input_dropout = plan.input_dropout
        self._augmentations = list(plan.augmentations)
        layers: dict[str, HyperLayer] = {}
        for name, m in module.named_modules():
            if isinstance(m, HyperLayer):
                layers[name] = m
        self._layer_paths = list(layers)
        self._dropouts = list({id(m): m for m in module.modules() if isinstance(m, HyperDropout)}.values())
        for drop in self._dropouts:
            drop.attach(hparams)
        self._per_batch: str | None = None  # the site that needed per-batch perturbation
        self._layout_seen = False  # a pass with per-example rows has run through
        self._intercept_rates = False  # a tuned dropout's rate is read as a float (attention)
        self._sequence_first = _sequence_first_site(module)
        self._penalties = []
        for name, paths in plan.weight_decay.items():
            spec = plan.specs[name]
            assert isinstance(spec, WeightDecay)
            hyper, plain = [], []
            for path in paths:
                m = module.get_submodule(path) if path else module
                if isinstance(m, HyperLayer):
                    hyper.append(m)
                else:
                    plain.append(m.weight)
                    if spec.include_bias and isinstance(getattr(m, "bias", None), nn.Parameter):
                        plain.append(m.bias)
            self._penalties.append(WeightDecayPenalty(name, hyper, plain, spec.include_bias))
        self._activation_penalties: list[ActivationPenalty] = []
        self._hook_handles: list[Any] = []
        for name, paths in plan.activation_penalties.items():
            spec = plan.specs[name]
            time_dim = spec.time_dim if isinstance(spec, TemporalActivationRegularization) else None
            penalty = ActivationPenalty(name, time_dim)
            self._activation_penalties.append(penalty)
            for path in paths:
                m = module.get_submodule(path) if path else module
                self._hook_handles.append(m.register_forward_hook(penalty.hook))

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def wrap(
        cls,
        model: nn.Module,
        hparams: Mapping[str, HParam | Augmentation] | Sequence[tuple[str, HParam | Augmentation]],
        *,
        targets: Sequence[Target] | None = None,
        exclude: Sequence[Target] | None = None,
    ) -> HyperModel:
        """Swap ``model``'s Linear/Conv/Embedding layers for centered hyper-layers, in place.

        ``targets``/``exclude`` select layers by path pattern (fnmatch) or type; the default is
        every exact nn.Linear, nn.Conv1d/2d/3d and nn.Embedding. The swapped layers keep the same
        Parameter objects. Nothing changes unless the whole model validates.
        """
        if isinstance(model, HyperModel):
            raise HyperTuneError("the model is already a HyperModel: use it as it is")
        specs = validate_specs(hparams)
        plan = surgery.plan(model, specs, targets, exclude)
        ref = next(
            (p for p in model.parameters() if p.is_floating_point()),
            None,
        )
        space = HyperParameters(
            plan.specs,
            dtype=ref.dtype if ref is not None else None,
            device=ref.device if ref is not None else None,
        )
        root = surgery.apply(model, plan, len(space))
        return cls(root, space, plan)

    # ---- parameters by role ------------------------------------------------------------------
    def hyper_layers(self) -> dict[str, HyperLayer]:
        return {p: self.module.get_submodule(p) if p else self.module for p in self._layer_paths}  # type: ignore[misc]

    def response_parameters(self) -> list[nn.Parameter]:
        """Θ: the best-response parameters of every hyper-layer."""
        seen: dict[int, nn.Parameter] = {}
        for layer in self.hyper_layers().values():
            for p in layer.response_parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def hyper_parameters(self) -> list[nn.Parameter]:
        """λ and the raw perturbation scales."""
        return [self.hparams.unconstrained, self.hparams.raw_scale]

    def base_parameters(self) -> list[nn.Parameter]:
        """w₀: every parameter of the user's model, hyper-layers' original weights included."""
        exclude = {id(p) for p in self.response_parameters()} | {id(p) for p in self.hyper_parameters()}
        return [p for p in self.parameters() if id(p) not in exclude]

    # ---- evaluation points -------------------------------------------------------------------
    def current_point(self, rows: int = 1) -> Perturbation:
        """The unperturbed point λ₀ (w₀'s own output in the centered modes)."""
        lam = self.hparams.unconstrained.detach().unsqueeze(0)
        response_input = None if self.centered else lam
        return Perturbation(self.hparams, lam.expand(rows, -1), response_input)

    @contextmanager
    def evaluated_at(self, point: Perturbation) -> Iterator[Perturbation]:
        """Make the next forward passes run at ``point`` instead of λ₀ (used by the optimizer)."""
        previous, self._override = self._override, point
        try:
            yield point
        finally:
            self._override = previous

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._unwrapped:
            raise HyperTuneError("this HyperModel was unwrapped; use the module unwrap() returned")
        point = self._override if self._override is not None else self.current_point()
        if self._per_batch is None and self._sequence_first is not None and point.rows > 1:
            self._fall_back_to_batch(self._sequence_first)
        if self._per_batch is not None:
            point.share_first_row()
        while True:
            saved = self._norm_stats() if point.rows > 1 and not self._layout_seen else None
            try:
                out = self._run(point, args, kwargs)
            except RateInterceptionNeeded:
                if self._intercept_rates:
                    raise
                self._intercept_rates = True
            except BatchPerturbationNeeded as err:
                if point.rows == 1:
                    raise
                self._fall_back_to_batch(err.site)
                point.share_first_row()
            else:
                if point.rows > 1:
                    self._layout_seen = True
                return out
            # run the pass again: undo what the interrupted pass left behind
            for buf, value in saved or ():
                buf.copy_(value)
            for penalty in self._activation_penalties:
                penalty.outputs.clear()

    def _run(self, point: Perturbation, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        intercept = self._intercept_rates and point.rows > 1
        with context.active(point), (TunedRateCalls() if intercept else nullcontext()):
            if self.training and args and torch.is_tensor(args[0]) and args[0].is_floating_point():
                args = (self._transform_input(args[0], point), *args[1:])
            out = self.module(*args, **kwargs)
        if point.rows > 1:
            unused = [d.hyper_path for d in self._dropouts if d.read_but_unused(point)]
            if unused:
                raise BatchPerturbationNeeded(
                    f"tuned dropout '{unused[0]}'",
                    f"tuned dropout '{unused[0]}': its rate was read as a float and used outside "
                    "F.dropout / F.scaled_dot_product_attention",
                )
        return out

    def _fall_back_to_batch(self, site: str) -> None:
        """Perturb the whole model per batch from now on: a site cannot carry per-example rows,
        and the Θ objective needs every site of one example at the same perturbation."""
        self._per_batch = site
        warnings.warn(
            f"hypertune: {site} cannot take one perturbation per example, so the hyperparameters "
            "are perturbed once per batch instead (correct, noisier); keep the batch dimension "
            "first for per-example perturbation",
            stacklevel=3,
        )

    @property
    def perturbed_per_batch(self) -> str | None:
        """The site that made the model fall back to one perturbation per batch, if any."""
        return self._per_batch

    def _norm_stats(self) -> list[tuple[Tensor, Tensor]]:
        """Running statistics a pass may update before it is interrupted and run again."""
        if not self.training:
            return []
        return [
            (buf, buf.detach().clone())
            for m in self.module.modules()
            if isinstance(m, nn.modules.batchnorm._NormBase)
            for buf in m.buffers()
        ]

    def _transform_input(self, x: Tensor, point: Perturbation) -> Tensor:
        """Training-only input regularizers: augmentations in order, then input dropout."""
        for name, aug in self._augmentations:
            values = {sub: point.value(f"{name}:{sub}") for sub in aug.hparams()}
            x = aug.apply(x, values)
        if self._input_dropout is not None:
            x = dropout_per_example(x, point.value(self._input_dropout), 0, "input dropout")
        return x

    def batch_rows(self, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None) -> int:
        """Number of examples in a batch: the leading dimension of its first tensor."""
        x = _first_tensor(args, kwargs or {})
        if x is None or x.dim() == 0:
            raise HyperTuneError(
                "could not find a batched input tensor: pass the batch as a tensor (or a tuple/dict "
                "of tensors whose first tensor has the batch dimension first)"
            )
        return x.shape[0]

    @contextmanager
    def collecting_activations(self) -> Iterator[None]:
        """Let AR/TAR hooks record outputs for the training penalty of the enclosed pass."""
        for penalty in self._activation_penalties:
            penalty.outputs.clear()
            penalty.collecting = True
        try:
            yield
        finally:
            for penalty in self._activation_penalties:
                penalty.collecting = False

    def training_penalty(self, point: Perturbation) -> Tensor | None:
        """Sum of tuned training-only penalties, per perturbation row; ``None`` if there are none."""
        total: Tensor | None = None
        for penalty in [*self._penalties, *self._activation_penalties]:
            term = penalty(point)
            total = term if total is None else total + term
        return total

    def hparam_values(self) -> dict[str, float]:
        return self.hparams.values()

    # ---- undoing -----------------------------------------------------------------------------
    @torch.no_grad()
    def unwrap(self) -> nn.Module:
        """Return the plain module with tuned values baked in; this HyperModel is then spent.

        Hyper-layers become their torch classes again with the same w₀ Parameters (plain STN first
        folds Θ at λ₀ into them), tuned dropouts become plain dropouts at the final rate, and a
        tuned input dropout becomes a forward pre-hook. Tuned weight decay has no module form:
        read it from :meth:`hparam_values`, like tuned AR/TAR coefficients (their hooks are
        removed).
        """
        values = self.hparam_values()
        lam = self.hparams.unconstrained.detach()
        for handle in self._hook_handles:
            handle.remove()
        root = self.module
        replaced: dict[int, nn.Module] = {}
        for path, module in list(root.named_modules(remove_duplicate=False)):
            new: nn.Module | None = replaced.get(id(module))
            if new is None:
                if isinstance(module, HyperLayer):
                    if not self.centered:
                        module.bake(lam)
                    new = module.to_module()
                elif isinstance(module, HyperDropout):
                    new = module.to_module(values[module.hparam])
                else:
                    continue
                replaced[id(module)] = new
            if path == "":
                root = new
            else:
                surgery.set_submodule(root, path, new)
        if self._input_dropout is not None:
            root.register_forward_pre_hook(InputDropoutHook(values[self._input_dropout]))
        self._unwrapped = True
        return root
