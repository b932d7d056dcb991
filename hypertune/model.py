"""HyperModel: a user's module after surgery, plus the hyper-state it is tuned by."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from . import context, surgery
from .augment.base import Augmentation
from .context import Perturbation
from .errors import HyperTuneError
from .hyperparameters import HyperParameters
from .layers import HyperDropout, HyperLayer, dropout_per_example
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
        self._unwrapped = False
        self._input_dropout = plan.input_dropout
        self._augmentations = list(plan.augmentations)
        layers: dict[str, HyperLayer] = {}
        for name, m in module.named_modules():
            if isinstance(m, HyperLayer):
                layers[name] = m
        self._layer_paths = list(layers)
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

    def to_empty(self, *, device: torch.device | str | int | None, recurse: bool = True) -> HyperModel:
        """Materialize a model wrapped on the meta device; λ, σ and Θ get their initial values
        (``to_empty`` alone leaves uninitialised memory). w₀ is yours to load or initialize."""
        super().to_empty(device=device, recurse=recurse)
        self.hparams.reset_parameters()
        for layer in self.hyper_layers().values():
            layer.reset_response_parameters()
        return self

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
        """Make the next forward passes in this thread (or task) run at ``point`` instead of λ₀."""
        with context.pinned(self, point):
            yield point

    def exclusive(self) -> AbstractContextManager[bool]:
        """The lock an optimizer step holds and every forward takes: hold it in another thread to
        read or change the model (mode, weights, state) between steps, never in the middle of one."""
        return context.lock_for(self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._unwrapped:
            raise HyperTuneError("this HyperModel was unwrapped; use the module unwrap() returned")
        if torch.compiler.is_compiling():  # a compiled graph cannot hold a lock
            return self._forward_at_point(args, kwargs)
        with self.exclusive():
            return self._forward_at_point(args, kwargs)

    def _forward_at_point(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        point = context.pinned_point(self) or self.current_point()
        with context.active(point):
            if self.training and args and torch.is_tensor(args[0]) and args[0].is_floating_point():
                args = (self._transform_input(args[0], point), *args[1:])
            return self.module(*args, **kwargs)

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
