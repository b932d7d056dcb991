"""nn.LSTM as a centered hyper-layer, with tuned DropConnect and variational dropout.

For layer (and direction) k the gate pre-activations of example n at step t are

    a_t = W_ih(δλ) x_t + W_hh(δλ) h_{t-1} + b_ih(δλ) + b_hh(δλ)
    W_ih(δλ) = W_ih + diag(s_ih) R_ih,   W_hh(δλ) = W_hh + diag(s_hh) R_hh,
    b_·(δλ)  = b_· + s_b ⊙ r_·,           [s_ih, s_hh, s_b] = P_k δλ_n,

the row structure of the other hyper-layers applied to the 4H gate rows: the per-example part is
``s ⊙ (R x)``, one extra matmul against weights shared by the batch. Θ = {R, r, P}, P starts at
zero. Three code paths:

* bare (δλ = 0, ``response_input`` None): ``nn.LSTM.forward`` itself (cuDNN on GPU, oneDNN on
  CPU) when no tuned regularizer is on; with DropConnect/variational dropout one fused
  ``_VF.lstm`` call per layer with masked weights and inputs (the masks do not depend on time).
* perturbed: a custom recurrence: one matmul for the input projection of every step, then one
  ``h @ [W_hh; R_hh]ᵀ`` matmul per step.
* linearized (Δ-STN): the primal is the bare pass (so it is exactly w₀'s output); its tangent
  J_yw Θδλ is computed by a hand-written JVP of the LSTM recurrence. Everything that does not
  depend on the previous tangent (gate activations, the response terms, the input tangent) is
  computed for all steps in a few large matmuls; the loop only carries the linear tangent
  recurrence (one matmul per step). Fused RNN kernels have no forward-AD formulas, so the
  primal/tangent split is also what makes linearization work at all.

The two recurrences are autograd Functions whose backward is one more scan (the adjoint), with
every weight gradient one matmul over all steps; on CPU their products use oneDNN. Measured in
benchmarks/lstm_speed.py: a perturbed or linearized pass costs about 2.3-2.7× nn.LSTM's (the
modulation doubles the recurrent matmul), against 3.7-4.5× for plain autograd loops; compiling
the per-step cell (torch.compile, torch.jit.script) saved at most a few percent on CPU and costs
seconds per shape, so it is not used. ``proj_size > 0`` is refused; a PackedSequence input is
accepted only at δλ = 0 without tuned regularizers (nn.LSTM's own forward).

Regularizers, on only in training mode, read their per-row values from the active perturbation:

* DropConnect on every hidden-to-hidden matrix (AWD-LSTM's WeightDrop): one mask on W_hh (and
  on R_hh, since it drops entries of W_hh(δλ)) per batch and layer, the same for every step.
  A per-example mask would need a B×4H×H tensor and a batched matmul per step, and would no
  longer be the WeightDrop a tuned rate is meant for; so the rate must be drawn per batch
  (spec ``perturb="batch"``).
* variational (locked) dropout of the input of layer 0 (``input_dropout``) and of the hidden
  state fed to layers 1..L-1 (``hidden_dropout``, which replaces nn.LSTM's own ``dropout``):
  one mask per example and feature, the same for every step, at each example's own rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, _VF, nn
from torch.nn.utils import parametrize
from torch.autograd.function import once_differentiable
from torch.nn.utils.rnn import PackedSequence

from .. import context
from ..linearize import make_dual
from ..errors import HyperTuneError, PerturbationError
from .base import HyperLayer, HyperProjection, swap_class
from .registry import register_layer_kind

__all__ = ["HyperLSTM"]

# ---- matrix products ----------------------------------------------------------------------------
# On CPU, float32 products go through oneDNN's matmul, as nn.LSTM's own kernel does: for the
# small-batch products of one time step it was 2-3× faster than torch.mm's BLAS on the machine
# this was tuned on. The op is private to torch, so it is probed once and dropped on any failure.
_ONEDNN: dict[str, bool] = {}


def _onednn(x: Tensor) -> bool:
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    ok = _ONEDNN.get("ok")
    if ok is None:
        try:
            probe = torch.ones(2, 3)
            packed = torch.ops.mkldnn._reorder_linear_weight(torch.ones(4, 3), 2)
            ok = bool(
                torch.backends.mkldnn.is_available()
                and torch.equal(torch.ops.mkldnn._linear_pointwise(probe, packed, None, "none", [], ""), torch.full((2, 4), 3.0))
                and torch.equal(torch.ops.mkldnn._linear_pointwise(probe, torch.ones(4, 3), None, "none", [], ""), torch.full((2, 4), 3.0))
            )
        except Exception:
            ok = False
        _ONEDNN["ok"] = ok
    return ok


def _mm_t(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` for 2-D x, w, without autograd."""
    if _onednn(x):
        try:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w.contiguous(), None, "none", [], "")
        except Exception:  # pragma: no cover - op present but unusable here
            _ONEDNN["ok"] = False
    return torch.mm(x, w.t())


class _Rec:
    """``x ↦ x @ w.T`` for a weight used at every step of a scan (oneDNN-packed once on CPU)."""

    def __init__(self, w: Tensor, rows: int) -> None:
        self.w = w
        self.packed: Tensor | None = None
        if _onednn(w):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), rows)
            except Exception:  # pragma: no cover
                _ONEDNN["ok"] = False

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return torch.mm(x, self.w.t())


class _Linear(torch.autograd.Function):
    """F.linear without bias for a batch of steps, its products through ``_mm_t``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(x, w)
        return _mm_t(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Tensor) -> Any:
        x, w = ctx.saved_tensors
        g2 = g.reshape(-1, g.shape[-1])
        gx = _mm_t(g2, w.t()).reshape(x.shape) if ctx.needs_input_grad[0] else None
        gw = _mm_t(g2.t(), x.reshape(-1, x.shape[-1]).t()) if ctx.needs_input_grad[1] else None
        return gx, gw


def _dense(x: Tensor, w: Tensor) -> Tensor:
    """``x @ w.T`` over the last axis, differentiable (forward AD: plain F.linear)."""
    if not _onednn(x) or fwAD.unpack_dual(x).tangent is not None or fwAD.unpack_dual(w).tangent is not None:
        return F.linear(x, w)
    return _Linear.apply(x, w)


# ---- the recurrences ------------------------------------------------------------------------------
# Gates are in torch's (i, f, g, o) order throughout. The scans run without autograd into
# preallocated buffers; the two autograd Functions wrap them so that a backward pass is one more
# scan (the adjoint: one matmul and a few pointwise ops per step) and every weight gradient is one
# large matmul over all steps, instead of T small per-step matmuls and autograd nodes.


def _primal_scan(
    xg: Tensor, rec: _Rec, s: Tensor | None, h: Tensor, c: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """LSTM recurrence with pre-activations ``xg[t] + h W_hhᵀ (+ s ⊙ h R_hhᵀ)``.

    ``rec`` multiplies by ``W_hhᵀ``, or by ``[W_hh; R_hh]ᵀ`` when ``s`` (R, 4H) is given.
    Returns the hidden states (T, B, H), the gate activations (T, B, 4H), the cells (T, B, H)
    and, with ``s``, the products ``h_{t-1} R_hhᵀ`` (T, B, 4H) that s's gradient needs.
    """
    steps, batch, g = xg.shape
    n = g // 4
    out = xg.new_empty(steps, batch, n)
    acts = xg.new_empty(steps, batch, g)
    cs = xg.new_empty(steps, batch, n)
    hr = None if s is None else xg.new_empty(steps, batch, g)
    for t in range(steps):
        hh = rec(h)
        if s is None or hr is None:
            a = hh.add_(xg[t])
        else:
            hr[t] = hh[:, g:]
            a = torch.addcmul(hh[:, :g].add_(xg[t]), s, hh[:, g:])
        act = acts[t]
        torch.sigmoid(a, out=act)
        torch.tanh(a[:, 2 * n : 3 * n], out=act[:, 2 * n : 3 * n])
        c = torch.addcmul(act[:, n : 2 * n] * c, act[:, :n], act[:, 2 * n : 3 * n], out=cs[t])
        h = torch.mul(act[:, 3 * n :], torch.tanh(c), out=out[t])
    return out, acts, cs, hr


def _coefficients(acts: Tensor, cs: Tensor, c0: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The step Jacobian of the LSTM cell, for every step at once.

    With v = da ⊙ K: dc_t = v_i + v_f + v_g + f_t ⊙ dc_{t-1} and dh_t = v_o + od_t ⊙ dc_t.
    """
    i, f, g, o = acts.chunk(4, -1)
    c_prev = torch.cat([c0.unsqueeze(0), cs[:-1]])
    tc = torch.tanh(cs)
    k = torch.cat([i * (1 - i) * g, f * (1 - f) * c_prev, (1 - g * g) * i, o * (1 - o) * tc], -1)
    return k, f, o * (1 - tc * tc)


def _tangent_scan(
    u: Tensor, k: Tensor, f: Tensor, od: Tensor, rec: _Rec, dh: Tensor | None, dc: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    """The linear recurrence da_t = u_t + dh_{t-1} W_hhᵀ through the cells' Jacobians."""
    steps, batch, g = k.shape
    n = g // 4
    dout = k.new_empty(steps, batch, n)
    if dc is None:
        dc = k.new_zeros(batch, n)
    for t in range(steps):
        v = (u[t] * k[t] if dh is None else rec(dh).add_(u[t]).mul_(k[t])).view(batch, 4, n)
        dc = torch.addcmul(v[:, :3].sum(1), f[t], dc)
        dh = torch.addcmul(v[:, 3], od[t], dc, out=dout[t])
    return dout, dout[-1], dc


def _adjoint_scan(
    gout: Tensor | None,
    gh: Tensor | None,
    gc: Tensor | None,
    k: Tensor,
    f: Tensor,
    od: Tensor,
    matvec: Callable[[Tensor], Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """Backward of both scans: gradients of the pre-activations (T, B, 4H), h_0 and c_0.

    ``matvec(ga)`` maps a pre-activation gradient to the previous hidden state's: ``ga W_hh``.
    """
    steps, batch, g = k.shape
    n = g // 4
    ga = k.new_empty(steps, batch, g)
    gh = k.new_zeros(batch, n) if gh is None else gh
    gc = k.new_zeros(batch, n) if gc is None else gc
    for t in range(steps - 1, -1, -1):
        if gout is not None:
            gh = gh + gout[t]
        gc = torch.addcmul(gc, gh, od[t])
        ga_t, k_t = ga[t].view(batch, 4, n), k[t].view(batch, 4, n)
        torch.mul(k_t[:, :3], gc.unsqueeze(1), out=ga_t[:, :3])
        torch.mul(k_t[:, 3], gh, out=ga_t[:, 3])
        gc = gc * f[t]
        gh = matvec(ga[t])
    return ga, gh, gc


class _ModulatedLSTM(torch.autograd.Function):
    """One direction of one layer at δλ ≠ 0: (xg, W_hh, R_hh, s_hh, h0, c0) -> (out, h_T, c_T)."""

    @staticmethod
    def forward(ctx: Any, xg: Tensor, w_hh: Tensor, r_hh: Tensor, s: Tensor, h0: Tensor, c0: Tensor) -> Any:
        w_cat = torch.cat([w_hh, r_hh])
        out, acts, cs, hr = _primal_scan(xg, _Rec(w_cat, xg.shape[1]), s, h0, c0)
        ctx.save_for_backward(w_cat, s, h0, c0, out, acts, cs, hr)
        return out, out[-1].clone(), cs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gout: Tensor, g_h: Tensor, g_c: Tensor) -> Any:
        w_cat, s, h0, c0, out, acts, cs, hr = ctx.saved_tensors
        k, f, od = _coefficients(acts, cs, c0)
        back = _Rec(w_cat.t(), out.shape[1])

        def matvec(ga: Tensor) -> Tensor:
            return back(torch.cat([ga, ga * s], 1))

        ga, g_h0, g_c0 = _adjoint_scan(gout, g_h, g_c, k, f, od, matvec)
        need = ctx.needs_input_grad
        g = ga.shape[-1]
        h_prev_t = torch.cat([h0.unsqueeze(0), out[:-1]]).reshape(-1, h0.shape[-1]).t()
        g_w = _mm_t(ga.reshape(-1, g).t(), h_prev_t) if need[1] else None
        g_r = _mm_t((ga * s).reshape(-1, g).t(), h_prev_t) if need[2] else None
        g_s = None
        if need[3]:
            g_s = (ga * hr).sum(0)
            if s.shape[0] != g_s.shape[0]:
                g_s = g_s.sum(0, keepdim=True)
        return ga, g_w, g_r, g_s, g_h0 if need[4] else None, g_c0 if need[5] else None


class _TangentLSTM(torch.autograd.Function):
    """The tangent recurrence, differentiable in its drive u and initial tangents only."""

    @staticmethod
    def forward(
        ctx: Any, u: Tensor, k: Tensor, f: Tensor, od: Tensor, w_hh: Tensor, dh0: Tensor | None, dc0: Tensor | None
    ) -> Any:
        dout, dh, dc = _tangent_scan(u, k, f, od, _Rec(w_hh, u.shape[1]), dh0, dc0)
        ctx.save_for_backward(k, f, od, w_hh)
        return dout, dh.clone(), dc

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gout: Tensor, g_h: Tensor, g_c: Tensor) -> Any:
        k, f, od, w_hh = ctx.saved_tensors
        ga, g_h0, g_c0 = _adjoint_scan(gout, g_h, g_c, k, f, od, _Rec(w_hh.t(), k.shape[1]))
        need = ctx.needs_input_grad
        return ga, None, None, None, None, g_h0 if need[5] else None, g_c0 if need[6] else None


# Autograd reference versions of the two Functions: used where a Function does not apply (a
# forward-AD input in the perturbed pass; a primal that itself carries a graph), and in the tests.
def _modulated_reference(
    xg: Tensor, w_hh: Tensor, r_hh: Tensor, s: Tensor, h: Tensor, c: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    outs = []
    for x_t in xg.unbind(0):  # unbind: one backward node, not a (T, B, 4H) zero fill per step
        a = x_t + F.linear(h, w_hh) + s * F.linear(h, r_hh)
        i, f, g, o = a.chunk(4, 1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs), h, c


def _tangent_reference(
    u: Tensor, k: Tensor, f: Tensor, od: Tensor, w_hh: Tensor, dh: Tensor | None, dc: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    n = w_hh.shape[-1]
    dc = u.new_zeros(u.shape[1], n) if dc is None else dc
    douts = []
    for u_t, k_t, f_t, od_t in zip(u.unbind(0), k.unbind(0), f.unbind(0), od.unbind(0)):
        da = u_t if dh is None else u_t + F.linear(dh, w_hh)
        v = da * k_t
        dc = v[:, :n] + v[:, n : 2 * n] + v[:, 2 * n : 3 * n] + f_t * dc
        dh = v[:, 3 * n :] + od_t * dc
        douts.append(dh)
    assert dh is not None
    return torch.stack(douts), dh, dc


def _flip(x: Tensor | None, reverse: bool) -> Tensor | None:
    return x.flip(0) if (reverse and x is not None) else x


@register_layer_kind
class HyperLSTM(HyperLayer, nn.LSTM):
    """A centered hyper-layer for ``nn.LSTM`` (any layers, bias, batch_first, bidirectional).

    Build it with :meth:`from_module`; it keeps the LSTM's Parameter objects, so state_dict keys
    stay valid, and :meth:`to_module` gives the plain nn.LSTM back. ``dropconnect``,
    ``input_dropout`` and ``hidden_dropout`` name the tuned hyperparameters (or ``None``).
    ``proj_size > 0`` is refused.
    """

    base_class = nn.LSTM
    # Names of the tuned hyperparameters of the three regularizers (None: off); surgery may also
    # set them on the instance after from_module.
    regularizer_roles = ("dropconnect", "input_dropout", "hidden_dropout")
    dropconnect: str | None = None
    input_dropout: str | None = None
    hidden_dropout: str | None = None
    modulated_dims = ()  # several weights, no single one to tie to another layer's

    @classmethod
    def check(cls, module: nn.Module) -> list[str]:
        if parametrize.is_parametrized(module):
            return ["has a parametrization (weight is computed, not a Parameter): remove the "
                    "parametrization or add the module to exclude"]
        if getattr(module, "proj_size", 0) > 0:
            return [
                f"uses proj_size={module.proj_size}, which HyperLSTM does not modulate: set "  # type: ignore[attr-defined]
                "proj_size=0 or add the module to exclude"
            ]
        return []

    # ---- construction and undoing -------------------------------------------------------
    @classmethod
    def from_module(  # type: ignore[override]
        cls,
        module: nn.Module,
        num_hyper: int,
        path: str = "",
        *,
        dropconnect: str | None = None,
        input_dropout: str | None = None,
        hidden_dropout: str | None = None,
        modulated_dim: int | None = None,
        tied_to: HyperLayer | None = None,
    ) -> HyperLSTM:
        where = f"nn.LSTM '{path or '<root>'}'"
        if not isinstance(module, nn.LSTM):
            raise HyperTuneError(f"HyperLSTM.from_module needs an nn.LSTM, got {type(module).__name__}")
        if module.proj_size > 0:
            raise HyperTuneError(
                f"{where} has proj_size={module.proj_size}; HyperLSTM does not modulate projected "
                "LSTMs: use proj_size=0 or exclude the module from wrapping"
            )
        if hidden_dropout is not None and module.num_layers < 2:
            raise HyperTuneError(
                f"{where} has one layer, so there is no hidden state between layers for "
                f"hidden_dropout={hidden_dropout!r} to drop: use a multi-layer LSTM or drop the spec"
            )
        if hidden_dropout is not None and module.dropout > 0:
            raise HyperTuneError(
                f"{where} already drops between layers (dropout={module.dropout}); a tuned "
                f"hidden_dropout={hidden_dropout!r} would replace it: build the LSTM with dropout=0"
            )
        layer = swap_class(module, cls)
        layer._init_flat_weights()  # its own list, not the original module's
        layer.hyper_path = path
        layer.dropconnect = dropconnect
        layer.input_dropout = input_dropout
        layer.hidden_dropout = hidden_dropout
        layer._init_response(num_hyper)
        return layer

    def to_module(self) -> nn.LSTM:
        plain = swap_class(self, nn.LSTM)
        for name in self._response_names():
            plain._parameters.pop(name, None)
        plain._modules.pop("hyper_projection", None)
        for attr in ("hyper_path", "_uncentered", *self.regularizer_roles):
            plain.__dict__.pop(attr, None)
        plain._init_flat_weights()
        return plain

    def decayed_parameters(self, include_bias: bool = False) -> list[nn.Parameter]:
        """The w₀ Parameters ``weight_sq_norm`` measures (every W_ih, W_hh; biases optionally)."""
        return [
            getattr(self, name)
            for sfx in self._suffixes()
            for name, _ in self._pairs(sfx, include_bias)
        ]

    # ---- Θ -------------------------------------------------------------------------------
    @property
    def num_directions(self) -> int:
        return 2 if self.bidirectional else 1

    def _suffixes(self) -> list[str]:
        return [
            f"_l{layer}{'_reverse' if d else ''}"
            for layer in range(self.num_layers)
            for d in range(self.num_directions)
        ]

    def _response_names(self) -> list[str]:
        names = []
        for sfx in self._suffixes():
            names += [f"response_weight_ih{sfx}", f"response_weight_hh{sfx}"]
            if self.bias:
                names += [f"response_bias_ih{sfx}", f"response_bias_hh{sfx}"]
        return names

    @property
    def modulated_size(self) -> int:
        """Outputs of P for one layer/direction: s_ih, s_hh (and s_b), 4H each."""
        return 4 * self.hidden_size * (3 if self.bias else 2)

    def _init_response(self, num_hyper: int) -> None:
        ref = self.weight_ih_l0
        stdv = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for sfx in self._suffixes():
            for kind in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if self.bias else ()):
                w = getattr(self, f"{kind}{sfx}")
                # nn.LSTM's own initialization
                setattr(self, f"response_{kind}{sfx}", nn.Parameter(torch.empty_like(w).uniform_(-stdv, stdv)))
        n_out = self.modulated_size * self.num_layers * self.num_directions
        self.hyper_projection = HyperProjection(num_hyper, n_out, device=ref.device, dtype=ref.dtype)

    def response_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self._response_names()] + [self.hyper_projection.weight]

    def _scales(self, response_input: Tensor) -> list[tuple[Tensor, Tensor, Tensor | None]]:
        """(s_ih, s_hh, s_b) of shape (R, 4H) for every layer/direction, in flat-weight order."""
        s = self.hyper_projection(response_input)
        g = 4 * self.hidden_size
        out = []
        for k in range(self.num_layers * self.num_directions):
            base = k * self.modulated_size
            s_b = s[:, base + 2 * g : base + 3 * g] if self.bias else None
            out.append((s[:, base : base + g], s[:, base + g : base + 2 * g], s_b))
        return out

    def _pairs(self, sfx: str, include_bias: bool) -> list[tuple[str, int]]:
        """(weight name, index of its scale in (s_ih, s_hh, s_b)) for one layer/direction."""
        pairs = [(f"weight_ih{sfx}", 0), (f"weight_hh{sfx}", 1)]
        if include_bias and self.bias:
            pairs += [(f"bias_ih{sfx}", 2), (f"bias_hh{sfx}", 2)]
        return pairs

    def weight_sq_norm(self, response_input: Tensor | None, include_bias: bool = False) -> Tensor:
        """Σ ||W(δλ)||² over the LSTM's matrices (and biases), per row, in closed form."""
        scales = None if response_input is None else self._scales(response_input)
        total: Tensor | None = None
        for k, sfx in enumerate(self._suffixes()):
            for name, which in self._pairs(sfx, include_bias):
                w0 = getattr(self, name)
                term = w0.pow(2).sum().reshape(1)
                if scales is not None:
                    s = scales[k][which]
                    assert s is not None
                    wr = getattr(self, f"response_{name}")
                    w0m, wrm = w0.reshape(w0.shape[0], -1), wr.reshape(wr.shape[0], -1)
                    term = term + 2 * (s @ (w0m * wrm).sum(1)) + s.pow(2) @ wrm.pow(2).sum(1)
                total = term if total is None else total + term
        assert total is not None
        return total

    @torch.no_grad()
    def bake(self, response_input: Tensor, *, untie: bool = False) -> None:
        scales = self._scales(response_input.reshape(1, -1))
        for k, sfx in enumerate(self._suffixes()):
            for name, which in self._pairs(sfx, True):
                s = scales[k][which]
                assert s is not None
                w = getattr(self, name)
                shape = [-1] + [1] * (w.dim() - 1)
                w.add_(s.reshape(shape) * getattr(self, f"response_{name}"))

    def extra_repr(self) -> str:
        s = nn.LSTM.extra_repr(self) + f", num_hyper={self.hyper_projection.in_features}"
        for attr in self.regularizer_roles:
            if getattr(self, attr, None) is not None:
                s += f", {attr}={getattr(self, attr)!r}"
        return s

    # ---- forward -------------------------------------------------------------------------
    def _where(self) -> str:
        return f"HyperLSTM '{self.hyper_path}'"

    def _has_regularizers(self) -> bool:
        return any(getattr(self, a, None) is not None for a in self.regularizer_roles)

    def forward(self, input: Any, hx: Any = None) -> Any:  # type: ignore[override]
        p = context.current()
        if p is None:
            self.refuse_outside_forward()
        modulated = p is not None and p.response_input is not None
        regularized = self.training and self._has_regularizers()
        if regularized and p is None:
            raise PerturbationError(
                f"{self._where()} ran in training mode outside a HyperModel forward, so its tuned "
                "regularizers have no rates; " + context.outside_forward_fix()
            )
        if not modulated and not regularized and not _is_dual(input, hx):
            return nn.LSTM.forward(self, input, hx)
        if isinstance(input, PackedSequence):
            raise HyperTuneError(
                f"{self._where()} got a PackedSequence; per-example modulation and tuned LSTM "
                "regularizers need a padded tensor input (batch_first=True recommended)"
            )
        return self._custom_forward(input, hx, p, modulated, regularized)

    def _rates(self, p: context.Perturbation, batch: int) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        dc = ind = hid = None
        if self.dropconnect is not None:
            dc = p.value(self.dropconnect)
            spec = p.space.specs.get(self.dropconnect)
            if dc.shape[0] > 1 and spec is not None and spec.perturb != "batch":
                raise PerturbationError(
                    f"{self._where()} draws one DropConnect mask per batch, but hyperparameter "
                    f"{self.dropconnect!r} is perturbed per example: give its spec perturb='batch'"
                )
            dc = dc[:1]
        if self.input_dropout is not None:
            ind = p.value(self.input_dropout)
            context.rows_for(batch, ind.shape[0], f"{self._where()} input_dropout")
        if self.hidden_dropout is not None:
            hid = p.value(self.hidden_dropout)
            context.rows_for(batch, hid.shape[0], f"{self._where()} hidden_dropout")
        return dc, ind, hid

    def _custom_forward(
        self, input: Tensor, hx: Any, p: context.Perturbation | None, modulated: bool, regularized: bool
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if input.dim() not in (2, 3):
            raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
        self._update_flat_weights()
        # Three ways through: "modulated" runs the perturbed recurrence (forward AD, if any, goes
        # straight through its plain ops); "tangent" runs the fused primal and the hand-written
        # JVP (Δ-STN's linearized pass, or a dual input at δλ = 0); "bare" the fused primal only.
        linearize = modulated and p is not None and p.linearize
        if modulated and not linearize:
            way = "modulated"
        elif linearize or _is_dual(input, hx):
            way = "tangent"
        else:
            way = "bare"
        batched = input.dim() == 3
        if batched:
            if hx is None:
                self.check_input(input, None)
            else:
                self.check_forward_args(input, (hx[0], hx[1]), None)
        x, dx = (input, None) if way == "modulated" else _split_dual(input)
        if not batched:
            x = x.unsqueeze(1)
            dx = None if dx is None else dx.unsqueeze(1)
        elif self.batch_first:
            x = x.transpose(0, 1)
            dx = None if dx is None else dx.transpose(0, 1)
        batch = x.shape[1]
        n_dir, hsz = self.num_directions, self.hidden_size
        # initial state (L·D, B, H), with its tangent if any
        if hx is None:
            zeros = torch.zeros(self.num_layers * n_dir, batch, hsz, dtype=x.dtype, device=x.device)
            h0, dh0, c0, dc0 = zeros, None, zeros, None
        else:
            if way == "modulated":
                (h0, dh0), (c0, dc0) = (hx[0], None), (hx[1], None)
            else:
                (h0, dh0), (c0, dc0) = _split_dual(hx[0]), _split_dual(hx[1])
            if not batched:
                if h0.dim() != 2 or c0.dim() != 2:
                    raise RuntimeError(
                        f"For unbatched 2-D input, hx and cx should also be 2-D but got "
                        f"({h0.dim()}-D, {c0.dim()}-D) tensors"
                    )
                h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
                dh0 = None if dh0 is None else dh0.unsqueeze(1)
                dc0 = None if dc0 is None else dc0.unsqueeze(1)
        scales = None
        if modulated:
            assert p is not None and p.response_input is not None
            scales = self._scales(p.response_input)
            context.rows_for(batch if batched else 1, scales[0][0].shape[0], self._where())
        dc_rate = in_rate = hid_rate = None
        if regularized:
            assert p is not None
            dc_rate, in_rate, hid_rate = self._rates(p, batch if batched else 1)

        hn: list[Tensor] = []
        cn: list[Tensor] = []
        dhn: list[Tensor] = []
        dcn: list[Tensor] = []
        weights = self._flat_weights
        per_k = 4 if self.bias else 2
        for layer in range(self.num_layers):
            # -- the layer's input: variational (locked) or nn.LSTM's own between-layer dropout
            rate = in_rate if layer == 0 else hid_rate
            mask: Tensor | None = None
            if rate is not None:
                mask = _locked_mask(batch, x.shape[-1], rate, x)
            elif layer > 0 and self.training and self.dropout > 0:
                mask = (torch.rand_like(x) >= self.dropout).to(x.dtype) / (1 - self.dropout)
            if mask is not None:
                x = x * mask
                dx = None if dx is None else dx * mask
            # -- this layer's weights, DropConnect on W_hh (and R_hh)
            ks = [layer * n_dir + d for d in range(n_dir)]
            flat: list[Tensor] = []
            hh_masks: list[Tensor | None] = []
            for k in ks:
                w = list(weights[k * per_k : (k + 1) * per_k])
                m = None if dc_rate is None else _dropconnect_mask(w[1], dc_rate)
                if m is not None:
                    w[1] = w[1] * m
                hh_masks.append(m)
                flat += w
            if way == "modulated":
                assert scales is not None
                outs = []
                for d, k in enumerate(ks):
                    resp = self._response_weights(k, hh_masks[d])
                    o, h, c = _modulated_direction(
                        x, h0[k], c0[k], flat[d * per_k : (d + 1) * per_k], resp, scales[k], d == 1
                    )
                    outs.append(o)
                    hn.append(h)
                    cn.append(c)
                x = outs[0] if n_dir == 1 else torch.cat(outs, -1)
                continue
            state = (h0[ks[0] : ks[-1] + 1], c0[ks[0] : ks[-1] + 1])
            out, h_l, c_l = _VF.lstm(
                x, state, flat, self.bias, 1, 0.0, self.training, self.bidirectional, False
            )
            if way == "tangent":
                douts = []
                for d, k in enumerate(ks):
                    resp = None if scales is None else self._response_weights(k, hh_masks[d])
                    dout, dh, dcc = _tangent_direction(
                        x, dx, out[..., d * hsz : (d + 1) * hsz], h0[k], c0[k], _index(dh0, k),
                        _index(dc0, k), flat[d * per_k : (d + 1) * per_k], resp,
                        None if scales is None else scales[k], d == 1,
                    )
                    douts.append(dout)
                    dhn.append(dh)
                    dcn.append(dcc)
                dx = douts[0] if n_dir == 1 else torch.cat(douts, -1)
            hn += list(h_l.unbind(0))
            cn += list(c_l.unbind(0))
            x = out

        output = x
        h_n, c_n = torch.stack(hn), torch.stack(cn)
        if way == "tangent":
            output = make_dual(output, dx)
            h_n = make_dual(h_n, torch.stack(dhn))
            c_n = make_dual(c_n, torch.stack(dcn))
        if not batched:
            output, h_n, c_n = output.squeeze(1), h_n.squeeze(1), c_n.squeeze(1)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    def _response_weights(self, k: int, hh_mask: Tensor | None) -> list[Tensor | None]:
        sfx = self._suffixes()[k]
        r_hh = getattr(self, f"response_weight_hh{sfx}")
        if hh_mask is not None:
            r_hh = r_hh * hh_mask
        out: list[Tensor | None] = [getattr(self, f"response_weight_ih{sfx}"), r_hh]
        if self.bias:
            out.append(getattr(self, f"response_bias_ih{sfx}") + getattr(self, f"response_bias_hh{sfx}"))
        else:
            out.append(None)
        return out


# ---- helpers ------------------------------------------------------------------------------------
def _is_dual(input: Any, hx: Any) -> bool:
    if not torch.is_tensor(input):
        return False
    tensors = [input] + ([] if hx is None else [hx[0], hx[1]])
    return any(fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _split_dual(t: Tensor) -> tuple[Tensor, Tensor | None]:
    primal, tangent = fwAD.unpack_dual(t)
    return primal, tangent


def _index(t: Tensor | None, k: int) -> Tensor | None:
    return None if t is None else t[k]


def _locked_mask(batch: int, features: int, rate: Tensor, like: Tensor) -> Tensor:
    """Inverted-dropout mask (1, B, F) (time-major): one per example and feature, shared by every
    step, example i's entries kept with probability 1 - rate[i] (rate shape (R,), R ∈ {1, B})."""
    keep = (1.0 - rate.detach().to(like.dtype)).reshape(-1, 1)
    mask = torch.rand(batch, features, dtype=like.dtype, device=like.device) < keep
    return (mask.to(like.dtype) / keep).unsqueeze(0)


def _dropconnect_mask(w: Tensor, rate: Tensor) -> Tensor:
    """Inverted DropConnect mask for one recurrent matrix: one per batch (rate shape (1,))."""
    keep = 1.0 - rate.detach().to(w.dtype).reshape(())
    return (torch.rand_like(w) < keep).to(w.dtype) / keep


def _modulated_direction(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w: list[Tensor],
    resp: list[Tensor | None],
    scales: tuple[Tensor, Tensor, Tensor | None],
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """The perturbed recurrence of one direction of one layer (time-major x: (T, B, F))."""
    w_ih, w_hh = w[0], w[1]
    r_ih, r_hh, r_b = resp
    s_ih, s_hh, s_b = scales
    assert r_ih is not None and r_hh is not None
    # the input part of every step's pre-activations, for all steps at once (two matmuls, so no
    # gradient is computed for a frozen W_ih)
    xg = torch.addcmul(_dense(x, w_ih), s_ih, _dense(x, r_ih))
    if len(w) == 4:
        assert r_b is not None and s_b is not None
        xg = xg + (w[2] + w[3]) + s_b * r_b
    xg = _flip(xg, reverse)
    assert xg is not None
    if any(fwAD.unpack_dual(t).tangent is not None for t in (xg, h0, c0)):
        out, h, c = _modulated_reference(xg, w_hh, r_hh, s_hh, h0, c0)
    else:
        out, h, c = _ModulatedLSTM.apply(xg, w_hh, r_hh, s_hh, h0, c0)
    return _flip(out, reverse), h, c  # type: ignore[return-value]


def _tangent_direction(
    x: Tensor,
    dx: Tensor | None,
    out: Tensor,
    h0: Tensor,
    c0: Tensor,
    dh0: Tensor | None,
    dc0: Tensor | None,
    w: list[Tensor],
    resp: list[Tensor | None] | None,
    scales: tuple[Tensor, Tensor, Tensor | None] | None,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Tangent of one direction of one layer at δλ = 0 along Θδλ (and the input/state tangents).

    With a the pre-activations, (i, f, g, o) their activations, c the cell and h = o·tanh(c):
        da_t = u_t + W_hh dh_{t-1},  u_t = W_ih dx_t + s_ih⊙R_ih x_t + s_hh⊙R_hh h_{t-1} + s_b⊙r
        dc_t = i'g·da_i + f'c_{t-1}·da_f + i g'·da_g + f·dc_{t-1}
        dh_t = o'·tanh(c_t)·da_o + o(1 - tanh²c_t)·dc_t
    u and every coefficient are computed for all steps in a few large matmuls (they need no
    tangent); the loop carries only the linear recurrence in (dh, dc).
    """
    w_ih, w_hh = w[0], w[1]
    bias = (w[2] + w[3]) if len(w) == 4 else None
    xs, outs, dxs = _flip(x, reverse), _flip(out, reverse), _flip(dx, reverse)
    assert xs is not None and outs is not None
    h_prev = torch.cat([h0.unsqueeze(0), outs[:-1]])
    # the primal gates and cells of every step (the fused kernel does not return them)
    a = _dense(torch.cat([xs, h_prev], -1), torch.cat([w_ih, w_hh], 1))
    if bias is not None:
        a = a + bias
    n = h0.shape[-1]
    acts = torch.cat(
        [torch.sigmoid(a[..., : 2 * n]), torch.tanh(a[..., 2 * n : 3 * n]), torch.sigmoid(a[..., 3 * n :])], -1
    )
    i, f, g = acts[..., :n], acts[..., n : 2 * n], acts[..., 2 * n : 3 * n]
    ig = i * g
    cs = []
    c = c0
    for ig_t, f_t in zip(ig.unbind(0), f.unbind(0)):
        c = torch.addcmul(ig_t, f_t, c)
        cs.append(c)
    k, f, od = _coefficients(acts, torch.stack(cs), c0)
    # what drives the tangent recurrence
    u: Tensor | None = None
    if resp is not None and scales is not None:
        r_ih, r_hh, r_b = resp
        s_ih, s_hh, s_b = scales
        assert r_ih is not None and r_hh is not None
        u = torch.addcmul(s_ih * _dense(xs, r_ih), s_hh, _dense(h_prev, r_hh))
        if r_b is not None and s_b is not None:
            u = u + s_b * r_b
    if dxs is not None:
        u = _dense(dxs, w_ih) if u is None else u + _dense(dxs, w_ih)
    if u is None:
        u = k.new_zeros(k.shape)
    constants = (k, f, od, w_hh)
    if torch.is_grad_enabled() and any(t.requires_grad for t in constants):
        dout, dh, dc = _tangent_reference(u, k, f, od, w_hh, dh0, dc0)
    else:
        dout, dh, dc = _TangentLSTM.apply(u, k, f, od, w_hh, dh0, dc0)
    return _flip(dout, reverse), dh, dc  # type: ignore[return-value]
