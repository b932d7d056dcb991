"""The centered hyper-layer: weights w(δλ) = w₀ + Θ δλ with STN's row-wise structure.

For weight W (out × ...) and bias b the response is
``W(δλ) = W₀ + diag(s_w) W_resp`` and ``b(δλ) = b₀ + s_b ⊙ b_resp`` with ``[s_w, s_b] = P δλ``.
Because the modulation scales output channels, a layer computes ``W₀x + b₀`` plus
``s_w ⊙ (W_resp x) + s_b ⊙ b_resp``: each example carries its own δλ for one extra matmul.
Θ = {P, W_resp, b_resp}; P starts at zero so a freshly wrapped model computes exactly w₀.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import context
from ..errors import PerturbationError
from ..rows import layout
from ..linearize import make_dual

# Registries that hold user state a module swap must keep. Hook registries are *shared* by the old
# and the new module (not copied): a RemovableHandle the user made before wrapping points at the
# dict object itself, so only sharing lets it still remove its hook after wrap and unwrap.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
# Registries a swap copies, so the hyper-layer can add Θ without touching the original module.
_OWN_DICTS = ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set")

M = TypeVar("M", bound=nn.Module)


def carry_hooks(source: nn.Module, target: nn.Module) -> None:
    """Give ``target`` ``source``'s hook registries (the same dicts), so a user's hooks, and the
    handles that remove them, survive a swap."""
    for attr in _HOOK_DICTS:
        if attr in source.__dict__:
            target.__dict__[attr] = source.__dict__[attr]


def swap_class(module: nn.Module, cls: type[M]) -> M:
    """A shallow copy of ``module`` of class ``cls`` holding the *same* Parameter objects.

    Sharing the Parameters keeps state_dict keys, values and any optimizer references valid
    (torchao's ``from_float`` pattern); copying the parameter/module registries keeps the
    original module intact; sharing the hook registries keeps the user's hook handles working.
    """
    # Not copy.copy: parametrized modules refuse to be copied that way (they forbid pickling).
    new = object.__new__(cls)
    new.__dict__.update(module.__dict__)
    for attr in _OWN_DICTS:
        if attr in new.__dict__:
            new.__dict__[attr] = copy.copy(new.__dict__[attr])
    return new


# Parametrizations that reparametrize a weight without constraining it (any weight is reachable),
# so w₀ may be the computed weight and the response added to it: torch's weight_norm.
REPARAMETRIZATIONS = {"_WeightNorm"}


class HyperProjection(nn.Module):
    """P: the hyperparameters' map to a layer's row scales, ``s = P δλ`` (no bias, zero at wrap).

    Not an ``nn.Linear``: an init function applied to the whole model (``model.apply(init)``,
    Hugging Face's ``_init_weights``, timm's) picks layers by ``isinstance(m, nn.Linear)``, and
    must not re-initialise Θ's projection, or zero a bias it does not have.
    """

    def __init__(self, in_features: int, out_features: int, **factory: Any) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        weight = torch.empty(out_features, in_features, **factory)
        # the random draw nn.Linear's init made (P was an nn.Linear before): seeded runs stay as they were
        nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        self.weight = nn.Parameter(weight.zero_())

    def reset_parameters(self) -> None:
        """Back to zero, as wrap made it (the response then starts from w₀)."""
        with torch.no_grad():
            self.weight.zero_()

    def forward(self, delta: Tensor) -> Tensor:
        return F.linear(delta, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class HyperLayer(nn.Module):
    """Mixin turning a Linear/Conv/Embedding into a centered hyper-layer.

    Subclasses name the torch class they replace in ``base_class`` and implement
    ``base_forward`` (the w₀ computation) and ``response`` (Θ's contribution for given s).
    """

    base_class: type[nn.Module]
    # Weight dimensions the modulation can scale, preferred first: output rows (0) for
    # Linear/Conv, embedding columns (1) for Embedding. A layer whose weight is tied to another
    # layer's uses the first dimension both kinds support, so the two share one response.
    modulated_dims: tuple[int, ...] = (0,)
    weight: nn.Parameter
    bias: nn.Parameter | None
    response_weight: nn.Parameter
    response_bias: nn.Parameter | None
    hyper_projection: HyperProjection
    hyper_path: str
    # Weight regularizers this kind can run, each naming its hyperparameter (None: off). Surgery
    # sets them through :meth:`attach_regularizer`.
    regularizer_roles: tuple[str, ...] = ("dropconnect",)
    dropconnect: str | None = None

    @property
    def modulated_dim(self) -> int:
        return self.__dict__.get("_modulated_dim", self.modulated_dims[0])

    # ---- the kind's own checks -----------------------------------------------------------
    @classmethod
    def check(cls, module: nn.Module) -> list[str]:
        """Why ``module`` cannot become this kind (empty: it can). Each reason says the fix.

        Kinds extend this with their own rules (``super().check(module) + [...]``).
        """
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            return ["has uninitialized lazy parameters: run one forward pass before wrapping"]
        if parametrize.is_parametrized(module):
            refused = [
                f"{name} ({type(p).__name__})"
                for name, plist in module.parametrizations.items()  # type: ignore[union-attr]
                for p in plist
                if name != "weight" or type(p).__name__ not in REPARAMETRIZATIONS
            ]
            if refused:
                return [
                    f"has a parametrization that constrains its weight ({', '.join(refused)}): the "
                    "response would break the constraint; remove the parametrization or add the "
                    "module to exclude (weight_norm is supported)"
                ]
            return []
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            hooks = {type(h).__name__ for h in module._forward_pre_hooks.values()}
            legacy = hooks & {"WeightNorm", "SpectralNorm"}
            if "WeightNorm" in legacy:
                return [
                    "computes its weight in a forward pre-hook (the deprecated torch.nn.utils.weight_norm): "
                    "use torch.nn.utils.parametrizations.weight_norm, which is supported, or add the module to exclude"
                ]
            if legacy:
                return [
                    "computes its weight in a forward pre-hook (torch.nn.utils.spectral_norm), a constraint "
                    "the response would break: add the module to exclude"
                ]
            return ["has no weight Parameter: add it to exclude"]
        return []

    # ---- construction and undoing -------------------------------------------------------
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        num_hyper: int,
        path: str = "",
        *,
        modulated_dim: int | None = None,
        tied_to: HyperLayer | None = None,
    ) -> HyperLayer:
        """Swap ``module`` for this kind, keeping its Parameters.

        ``tied_to``: a hyper-layer holding the same weight Parameter; this layer then shares
        its response (W_resp and the projection), so the tied weight has one w(δλ).
        """
        from .registry import concrete_class

        layer = swap_class(module, concrete_class(cls, type(module)))
        layer.hyper_path = path
        if tied_to is not None:
            layer.__dict__["_modulated_dim"] = tied_to.modulated_dim
            layer.response_weight = tied_to.response_weight
            layer.register_parameter("response_bias", None)
            layer.hyper_projection = tied_to.hyper_projection
        else:
            if modulated_dim is not None and modulated_dim != cls.modulated_dims[0]:
                layer.__dict__["_modulated_dim"] = modulated_dim
            layer._init_response(num_hyper)
        return layer

    @property
    def original_class(self) -> type[nn.Module]:
        """The user's class this layer was swapped from (a subclass of ``base_class`` or itself)."""
        return next(c for c in type(self).__mro__ if not issubclass(c, HyperLayer))

    def to_module(self) -> nn.Module:
        """The plain torch module with the same w₀ Parameters and no Θ."""
        plain = swap_class(self, self.original_class)
        for name in ("response_weight", "response_bias"):
            plain._parameters.pop(name, None)
        plain._modules.pop("hyper_projection", None)
        for attr in ("hyper_path", "_modulated_dim", "_uncentered", *self.regularizer_roles):
            plain.__dict__.pop(attr, None)
        return plain

    def attach_regularizer(self, role: str, hparam: str) -> None:
        """Let hyperparameter ``hparam`` drive this layer's regularizer ``role``."""
        if role not in self.regularizer_roles:
            raise ValueError(
                f"{type(self).__name__} has no regularizer {role!r}; it has {list(self.regularizer_roles)}"
            )
        setattr(self, role, hparam)

    @property
    def modulated_size(self) -> int:
        return self.weight.shape[self.modulated_dim]

    def _init_response(self, num_hyper: int) -> None:
        w = self.weight
        factory: dict[str, Any] = {"device": w.device, "dtype": w.dtype}
        self.response_weight = nn.Parameter(torch.empty_like(w, requires_grad=True))
        self._reset_response_weight()
        bias = getattr(self, "bias", None)
        if bias is not None:
            bound = 1.0 / math.sqrt(max(1, self._fan_in()))
            self.response_bias = nn.Parameter(
                torch.empty_like(bias).detach().uniform_(-bound, bound)
            )
        else:
            self.register_parameter("response_bias", None)
        n_out = self.modulated_size + (bias.numel() if bias is not None else 0)
        self.hyper_projection = HyperProjection(num_hyper, n_out, **factory)

    @torch.no_grad()
    def reset_response_parameters(self) -> None:
        """Θ as wrap made it (P = 0), in the same Parameter objects: what fills Θ after
        ``to_empty`` on a model wrapped on the meta device."""
        mine = {id(p) for p in self.response_parameters()}
        kept = {name: p for name, p in self.named_parameters() if id(p) in mine}
        projection = self.hyper_projection
        self._init_response(projection.in_features)
        fresh = dict(self.named_parameters())
        for name, p in kept.items():
            p.copy_(fresh[name])
        self.hyper_projection = projection
        for name, p in kept.items():
            if "." not in name:
                setattr(self, name, p)

    def _fan_in(self) -> int:
        return nn.init._calculate_fan_in_and_fan_out(self.weight)[0]

    def _reset_response_weight(self) -> None:
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.response_weight, a=math.sqrt(5))

    def response_parameters(self) -> list[nn.Parameter]:
        """Θ: everything this layer adds on top of the module it replaced."""
        params = [self.response_weight, self.hyper_projection.weight]
        if self.response_bias is not None:
            params.append(self.response_bias)
        return params

    # ---- the math ----------------------------------------------------------------------
    def base_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # pragma: no cover
        """The replaced module's computation with the given w₀ weights."""
        raise NotImplementedError

    def response(
        self, x: Tensor, s_w: Tensor, s_b: Tensor | None, weight: Tensor, bias: Tensor | None
    ) -> Tensor:  # pragma: no cover
        """Θ's contribution ``s_w ⊙ (W_resp x) + s_b ⊙ b_resp``; s has shape (R, modulated)."""
        raise NotImplementedError

    def split(self, s: Tensor) -> tuple[Tensor, Tensor | None]:
        n = self.modulated_size
        return s[:, :n], (s[:, n:] if self.response_bias is not None else None)

    def _weights(
        self, p: context.Perturbation | None
    ) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """(W₀, b₀, W_resp, b_resp) for this pass; DropConnect masks W(δλ) as a whole.

        A weight mask is shared by every example, so DropConnect is drawn once per batch at
        the batch's rate (its spec is per-batch).
        """
        w, b = self.weight, getattr(self, "bias", None)
        wr, br = self.response_weight, self.response_bias
        name = self.dropconnect
        if name is not None and self.training and p is not None:
            keep = 1.0 - p.value(name)[0].detach().to(w.dtype)
            mask = (torch.rand(w.shape, device=w.device, dtype=w.dtype) < keep).to(w.dtype) / keep
            w, wr = w * mask, wr * mask
        return w, b, wr, br

    def refuse_outside_forward(self) -> None:
        """In STN mode (uncentered) a layer's weights are w₀ + Θ(λ): run outside a HyperModel
        forward (``model.module(x)``, ``model.module.generate(...)``), w₀ alone would be a model
        nobody trained, so it refuses instead. (During backward it is activation checkpointing
        recomputing a region, which the step turns into its own error.)"""
        if self.__dict__.get("_uncentered", False) and torch._C._current_graph_task_id() == -1:
            raise PerturbationError(
                f"hyper-layer '{self.hyper_path}' ran outside a HyperModel forward while the model is in STN "
                "mode, where its weights are w₀ + Θ(λ) and w₀ alone is not the trained model; "
                f"{context.outside_forward_fix()}, or use the plain module unwrap() returns, which folds Θ at "
                "the current λ into the weights (copy.deepcopy(model).unwrap() keeps the HyperModel), for "
                "generate(), export or another library's evaluation"
            )

    def forward(self, x: Tensor) -> Tensor:
        p = context.current()
        if p is None:
            self.refuse_outside_forward()
        w, b, wr, br = self._weights(p)
        if p is not None and p.linearize and p.response_input is not None:
            out = self.base_forward(fwAD.unpack_dual(x).primal, w, b)
        else:
            out = self.base_forward(x, w, b)
        if p is None or p.response_input is None:
            return out
        s_w, s_b = self.split(self.hyper_projection(p.response_input))
        if not p.linearize:
            return out + self.response(x.detach() if p.at_center else x, s_w, s_b, wr, br)
        # Δ-STN: the primal stays w₀'s output, Θ δλ enters only the tangent, so the primal path
        # never touches Θ and needs no graph. The layer's own tangent is written out rather than
        # left to forward AD, whose addmm/conv rules also multiply by the weight's (zero) tangent.
        x_p, x_t = fwAD.unpack_dual(x)
        tangent = self.response(x_p, s_w, s_b, wr, br)
        if x_t is not None:
            tangent = tangent + self.base_forward(x_t, w, None)
        if tangent.shape != out.shape:  # a batch-shared input (rows.RowLayout.grows)
            out = out.expand(tangent.shape).contiguous()
        return make_dual(out, tangent)

    def decayed_parameters(self, include_bias: bool = False) -> list[nn.Parameter]:
        """The w₀ Parameters ``weight_sq_norm`` measures (a reparametrized weight's originals)."""
        bias = getattr(self, "bias", None)
        if parametrize.is_parametrized(self, "weight"):
            weights = list(self.parametrizations.weight.parameters())  # type: ignore[union-attr]
        else:
            weights = [self.weight]
        return weights + ([bias] if include_bias and bias is not None else [])

    def weight_sq_norm(self, response_input: Tensor | None, include_bias: bool = False) -> Tensor:
        """||w(δλ)||² per perturbation row (shape (R,)), in closed form from the row structure."""
        s_w, s_b = (None, None) if response_input is None else self.split(self.hyper_projection(response_input))
        total = _sq_norm(self.weight, self.response_weight, s_w, self.modulated_dim)
        bias = getattr(self, "bias", None)
        if include_bias and bias is not None:
            total = total + _sq_norm(bias, self.response_bias, s_b, 0)
        return total

    def bias_sq_norm(self, response_input: Tensor | None) -> Tensor:
        """||b(δλ)||² per row: the part of a layer whose weight is tied to (and measured by)
        another layer, while its bias is its own."""
        bias = getattr(self, "bias", None)
        if bias is None:
            return torch.zeros(1, dtype=self.weight.dtype, device=self.weight.device)
        s_b = None if response_input is None else self.split(self.hyper_projection(response_input))[1]
        return _sq_norm(bias, self.response_bias, s_b, 0)

    @torch.no_grad()
    def bake_refusal(self) -> str | None:
        """Why Θ cannot be folded into this layer's weight (checked for every layer before any
        is folded, so a refused ``unwrap`` changes nothing); ``None`` when it can."""
        return None

    def bake(self, response_input: Tensor, *, untie: bool = False) -> None:
        """Fold Θ at one point into w₀ (plain STN, whose w₀ is not the current weights).

        In place, unless ``untie``: then the folded weight is a new Parameter, for a weight that
        a module left untuned also holds, which must keep computing with w₀. A reparametrized
        weight (weight_norm) is set through its parametrization.
        """
        s_w, s_b = self.split(self.hyper_projection(response_input.reshape(1, -1)))
        shape = [1] * self.weight.dim()
        shape[self.modulated_dim] = -1
        delta = s_w.reshape(shape) * self.response_weight
        if parametrize.is_parametrized(self, "weight"):
            self.weight = self.weight + delta
        elif untie:
            self.weight = nn.Parameter(self.weight.detach() + delta, requires_grad=self.weight.requires_grad)
        else:
            self.weight.add_(delta)
        bias = getattr(self, "bias", None)
        if s_b is not None and bias is not None and self.response_bias is not None:
            bias.add_(s_b.reshape(-1) * self.response_bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_hyper={self.hyper_projection.in_features}"


def _sq_norm(w0: Tensor, wr: Tensor | None, s: Tensor | None, dim: int) -> Tensor:
    """||w0 + s ⊙_dim wr||² per row of s (R, w0.shape[dim]); ``s=None``: ||w0||²."""
    base = w0.pow(2).sum()
    if s is None or wr is None:
        return base.reshape(1)
    w0m = w0.movedim(dim, 0).reshape(w0.shape[dim], -1)
    wrm = wr.movedim(dim, 0).reshape(wr.shape[dim], -1)
    return base + 2 * (s @ (w0m * wrm).sum(1)) + s.pow(2) @ wrm.pow(2).sum(1)


def row_view(
    s: Tensor,
    out_dim: int,
    channel_dim: int,
    batched: bool,
    batch: int,
    where: str,
    shape: Sequence[int] | None = None,
    feature_dims: int = 1,
    sequence_first: bool = True,
) -> Tensor:
    """Shape s (R, C) to broadcast against an output of rank ``out_dim`` whose channels are at
    ``channel_dim``; an unbatched input only takes one shared row.

    ``shape`` is the input's shape, from which :func:`hypertune.rows.layout` finds which example
    each row belongs to (batch first, position ids of batch 1, batch-major windows, sequence
    first); without it the leading dimension ``batch`` must be the batch.
    """
    rows, channels = s.shape
    if not batched:
        context.rows_for(1, rows, where)
        view = [1] * out_dim
        view[channel_dim] = channels
        return s.reshape(view)
    if shape is None:
        lay = layout((batch,), rows, where, feature_dims=0, sequence_first=False)
    else:
        lay = layout(tuple(shape), rows, where, feature_dims, sequence_first)
    return lay.place(s, out_dim, channel_dim)
