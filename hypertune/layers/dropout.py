"""Dropout whose rate is a tuned hyperparameter, drawn per example at that example's rate.

F.dropout takes one Python float for the whole batch; tuning needs a rate per example and a
tensor rate (a float per value would recompile under torch.compile), so the mask is built here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import context
from ..attention import intercepting, tuned_rate
from ..errors import HyperTuneError, PerturbationError
from ..linearize import scale_tangent_too
from ..rows import SHARED, layout, note
from .base import carry_hooks


def dropout_per_example(
    x: Tensor,
    rate: Tensor,
    shared_trailing_dims: int = 0,
    where: str = "dropout",
    locked_dim: int | None = None,
    sequence_first: bool = True,
) -> Tensor:
    """Inverted dropout of ``x`` with rate ``rate[i]`` for example ``i`` (rate shape (R,), R ∈ {1, B}).

    ``shared_trailing_dims`` trailing axes share one mask entry (channel dropout: 1, 2 or 3);
    ``locked_dim`` shares the mask along one more axis (variational dropout over time).
    ``sequence_first=False`` says axis 1 is no batch axis (attention probabilities: heads).
    The rate carries no gradient: regularizers reach λ through the response path only.
    """
    # Rates and masks in float32 at least: a bf16 rate of 0.05 would round to about 0.051.
    rate = rate.detach().to(torch.promote_types(x.dtype, torch.float32))
    batched = x.dim() >= 2 + shared_trailing_dims
    rows = rate.shape[0]
    if batched:
        lay = layout(
            x.shape, rows, where, feature_dims=1 + shared_trailing_dims,
            sequence_first=sequence_first and shared_trailing_dims == 0,
        )
    else:
        context.rows_for(1, rows, where)
        lay = SHARED
    mask_shape = list(x.shape[: x.dim() - shared_trailing_dims]) + [1] * shared_trailing_dims
    if lay.grows:
        mask_shape[0] = rows
    if locked_dim is not None:
        if not batched or locked_dim >= x.dim():
            raise PerturbationError(
                f"{where}: locked_dim={locked_dim} needs a batched input with that axis, got shape "
                f"{tuple(x.shape)}"
            )
        mask_shape[locked_dim] = 1
    keep = lay.place(1.0 - rate, x.dim())
    mask = torch.rand(mask_shape, device=x.device, dtype=keep.dtype) < keep
    # One pass over x, as torch's own dropout does (noise.div_(keep), then one multiply): the
    # scale is built at the mask's size, in place; its forward-AD tangent and backward are one
    # multiply each too.
    scale = mask.to(x.dtype).div_(keep.to(x.dtype))
    return scale_tangent_too(x, scale)  # in Δ-STN's Θ step x carries a tangent


class RateInterceptionNeeded(PerturbationError):
    """A site's rate was read as a float in a pass with one rate per example, while no
    :class:`~hypertune.attention.TunedRateCalls` mode could catch where it goes; ``HyperModel``
    switches the mode on for the model and runs the pass again."""


# The float value of a rate for the last pass that asked: reading ``.p`` costs a device sync once
# per pass and hyperparameter, not once per attention layer.
_float_cache: tuple[context.Perturbation | None, dict[str, float]] = (None, {})


def _rate_float(point: context.Perturbation, name: str) -> float:
    global _float_cache
    cached_point, values = _float_cache
    if cached_point is not point:
        values = {}
        _float_cache = (point, values)
    value = values.get(name)
    if value is None:
        value = values[name] = float(point.value(name)[0])
    return value


class HyperDropout(nn.Module):
    """Replaces nn.Dropout/Dropout1d/2d/3d; reads its rate from the active perturbation.

    Attention code that reads the module's rate instead of calling it (``self.attn_drop.p``,
    handed to SDPA or to ``F.dropout``) gets a :class:`~hypertune.attention.TunedRate`, so the
    site is tuned there too.
    """

    def __init__(
        self,
        hparam: str,
        base_class: type[nn.Module],
        shared_trailing_dims: int,
        path: str = "",
        locked_dim: int | None = None,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        self.hparam = hparam
        self.locked_dim = locked_dim
        self.inplace = inplace  # kept only to give it back on unwrap
        self.base_class = base_class
        self.shared_trailing_dims = shared_trailing_dims
        self.hyper_path = path
        # set by the HyperModel: where .p reads the current rate outside a forward
        self.__dict__["space"] = None
        # the pass (a Perturbation) in which .p was last read / the rate last used
        self.__dict__["read_in"] = None
        self.__dict__["used_in"] = None

    def attach(self, space: Any) -> None:
        """Let ``.p`` read the current rate of ``space`` (a HyperParameters) outside a forward;
        kept out of the module tree, so it is no submodule and no state-dict entry."""
        self.__dict__["space"] = space

    @property
    def p(self) -> float:
        """The rate as a float, for code that reads it rather than calling this module."""
        point = context.current()
        if point is None:
            space = self.__dict__["space"]
            if space is None:
                raise PerturbationError(
                    f"HyperDropout '{self.hyper_path}' has no rate outside a HyperModel: read it from "
                    "the HyperModel's hparam_values()"
                )
            return tuned_rate(space.values()[self.hparam], self)
        self.__dict__["read_in"] = point
        if torch.compiler.is_compiling() and point.rows == 1:
            # one rate for the batch: a plain float (the site a TunedRate carries is only read by
            # the per-example interception, and dynamo cannot trace a float subclass's attribute)
            return float(point.value(self.hparam)[0])
        if point.rows > 1 and not intercepting():
            raise RateInterceptionNeeded(
                f"HyperDropout '{self.hyper_path}': its rate is read as a float in a pass with one rate "
                "per example; call the HyperModel, which intercepts where the rate goes"
            )
        return tuned_rate(_rate_float(point, self.hparam), self)

    @p.setter
    def p(self, value: float) -> None:
        raise HyperTuneError(
            f"HyperDropout '{self.hyper_path}': its rate is tuned by hypertune (hyperparameter "
            f"{self.hparam!r}) and cannot be set; exclude the module from the DropoutRate's targets "
            "to keep a fixed rate"
        )

    def mark_used(self) -> None:
        self.__dict__["used_in"] = context.current()

    def read_but_unused(self, point: context.Perturbation) -> bool:
        """Whether, in ``point``'s pass, the rate was read but reached no call that acts per example."""
        return self.__dict__["read_in"] is point and self.__dict__["used_in"] is not point

    def drop_per_example(self, x: Tensor, sequence_first: bool = True) -> Tensor:
        """Dropout of ``x`` at this pass's per-example rates (the rows map onto x's layout)."""
        p = self._pass_using_the_rate()
        return dropout_per_example(
            x,
            p.value(self.hparam),
            self.shared_trailing_dims,
            f"HyperDropout '{self.hyper_path}'",
            self.locked_dim,
            sequence_first,
        )

    def _pass_using_the_rate(self) -> context.Perturbation:
        """The active pass, marked as using this site's rate; refused outside a HyperModel forward."""
        p = context.current()
        if p is None:
            raise PerturbationError(
                f"{type(self).__name__} '{self.hyper_path}' ran outside a HyperModel forward, so it has "
                "no rate; " + context.outside_forward_fix()
            )
        self.__dict__["used_in"] = p
        return p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            if x.dim() >= 2 + self.shared_trailing_dims:  # the eval-mode probe of rows.LayoutGuide
                note(f"HyperDropout '{self.hyper_path}'", x.shape)
            return x
        return self.drop_per_example(x)

    def to_module(self, rate: float) -> nn.Module:
        """The plain dropout at the tuned rate (a locked mask has no torch module: its eval
        behaviour, the identity, is the same)."""
        plain = self.base_class(p=rate, inplace=self.inplace)
        plain.train(self.training)
        carry_hooks(self, plain)
        return plain

    def extra_repr(self) -> str:
        locked = f", locked_dim={self.locked_dim}" if self.locked_dim is not None else ""
        return f"hparam={self.hparam!r}, like={self.base_class.__name__}{locked}"
