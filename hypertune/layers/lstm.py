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
from torch.nn.utils.rnn import PackedSequence

from .. import context
from ..errors import HyperTuneError, PerturbationError
from .base import HyperLayer, swap_class

__all__ = ["HyperLSTM", "set_cell_backend"]

_Cell = Callable[..., tuple[Tensor, Tensor]]


# ---- the per-step cells (the only Python-level work inside the time loops) --------------------
def _cell(a: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """LSTM cell on pre-activations whose rows are ordered (i, f, o, g) — see ``_IFOG``."""
    n = c.shape[-1]
    ifo = torch.sigmoid(a[:, : 3 * n])
    g = torch.tanh(a[:, 3 * n :])
    c = torch.addcmul(ifo[:, n : 2 * n] * c, ifo[:, :n], g)
    return ifo[:, 2 * n :] * torch.tanh(c), c


def _tangent_cell(da: Tensor, k: Tensor, f: Tensor, od: Tensor, dc: Tensor) -> tuple[Tensor, Tensor]:
    """One step of the tangent recurrence (natural i, f, g, o order), see ``_tangent_direction``."""
    n = dc.shape[-1]
    v = da * k
    dc = v[:, :n] + v[:, n : 2 * n] + v[:, 2 * n : 3 * n] + f * dc
    return torch.addcmul(v[:, 3 * n :], od, dc), dc


_CELLS: dict[str, tuple[_Cell, _Cell]] = {"eager": (_cell, _tangent_cell)}
_BACKEND = "eager"


def set_cell_backend(backend: str) -> str:
    """Choose how the per-step cells run: ``"eager"`` (default) or ``"compile"``.

    ``"compile"`` fuses each cell's pointwise ops (forward and backward) with torch.compile. On a
    2-core CPU it did not pay (see benchmarks/lstm_speed.py); it is kept for GPUs, where one
    fused kernel per step replaces about ten. If torch.compile is unavailable or fails on first
    use the cells fall back to eager. Returns the previous backend.
    """
    global _BACKEND
    if backend not in ("eager", "compile"):
        raise HyperTuneError(f"cell backend {backend!r}: choose 'eager' or 'compile'")
    if backend == "compile" and "compile" not in _CELLS:
        _CELLS["compile"] = (_guarded_compile(_cell, 0), _guarded_compile(_tangent_cell, 1))
    previous, _BACKEND = _BACKEND, backend
    return previous


def _guarded_compile(fn: _Cell, which: int) -> _Cell:
    try:
        compiled = torch.compile(fn, dynamic=False)
    except Exception:  # pragma: no cover - torch.compile missing on this platform
        return fn
    state = {"fn": compiled}

    def run(*args: Tensor) -> tuple[Tensor, Tensor]:
        try:
            return state["fn"](*args)
        except Exception:  # pragma: no cover - no compiler toolchain: keep going eagerly
            state["fn"] = fn
            eager = list(_CELLS["compile"])
            eager[which] = fn
            _CELLS["compile"] = (eager[0], eager[1])
            return fn(*args)

    return run


def _ifog(rows: int, device: torch.device) -> Tensor:
    """Row permutation from torch's (i, f, g, o) gate order to (i, f, o, g): one sigmoid call."""
    h = rows // 4
    return torch.cat(
        [torch.arange(0, 2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)]
    ).to(device)


def _flip(x: Tensor | None, reverse: bool) -> Tensor | None:
    return x.flip(0) if (reverse and x is not None) else x


def _linear(x: Tensor, w: Tensor) -> Tensor:
    return F.linear(x, w)


class HyperLSTM(HyperLayer, nn.LSTM):
    """A centered hyper-layer for ``nn.LSTM`` (any layers, bias, batch_first, bidirectional).

    Build it with :meth:`from_module`; it keeps the LSTM's Parameter objects, so state_dict keys
    stay valid, and :meth:`to_module` gives the plain nn.LSTM back. ``dropconnect``,
    ``input_dropout`` and ``hidden_dropout`` name the tuned hyperparameters (or ``None``).
    ``proj_size > 0`` is refused.
    """

    base_class = nn.LSTM
    dropconnect: str | None
    input_dropout: str | None
    hidden_dropout: str | None

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
        for attr in ("hyper_path", "dropconnect", "input_dropout", "hidden_dropout"):
            plain.__dict__.pop(attr, None)
        plain._init_flat_weights()
        return plain

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
        self.hyper_projection = nn.Linear(num_hyper, n_out, bias=False, device=ref.device, dtype=ref.dtype)
        nn.init.zeros_(self.hyper_projection.weight)

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
    def bake(self, response_input: Tensor) -> None:
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
        for attr in ("dropconnect", "input_dropout", "hidden_dropout"):
            if getattr(self, attr, None) is not None:
                s += f", {attr}={getattr(self, attr)!r}"
        return s

    # ---- forward -------------------------------------------------------------------------
    def _where(self) -> str:
        return f"HyperLSTM '{self.hyper_path}'"

    def _has_regularizers(self) -> bool:
        return any(getattr(self, a, None) is not None for a in ("dropconnect", "input_dropout", "hidden_dropout"))

    def forward(self, input: Any, hx: Any = None) -> Any:  # type: ignore[override]
        p = context.current()
        modulated = p is not None and p.response_input is not None
        regularized = self.training and self._has_regularizers()
        if regularized and p is None:
            raise PerturbationError(
                f"{self._where()} ran in training mode outside a HyperModel forward, so its tuned "
                "regularizers have no rates; call the wrapped model rather than its inner module"
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
                m = None
                if dc_rate is not None:
                    keep = 1.0 - dc_rate.detach().to(w[1].dtype)
                    m = (torch.rand_like(w[1]) < keep).to(w[1].dtype) / keep
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
            output = fwAD.make_dual(output, dx)
            h_n = fwAD.make_dual(h_n, torch.stack(dhn))
            c_n = fwAD.make_dual(c_n, torch.stack(dcn))
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
    """Inverted-dropout mask (1, B, F) (time-major) shared by every step, rate per example."""
    keep = (1.0 - rate.detach().to(like.dtype)).reshape(-1, 1)
    mask = torch.rand(batch, features, dtype=like.dtype, device=like.device) < keep
    return (mask.to(like.dtype) / keep).unsqueeze(0)


def _modulated_direction(
    x: Tensor,
    h: Tensor,
    c: Tensor,
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
    g = w_ih.shape[0]
    perm = _ifog(g, x.device)
    # input projection of every step at once: x @ [W_ih; R_ih]ᵀ, rows in (i, f, o, g) order
    w_in = torch.cat([w_ih, r_ih])[torch.cat([perm, perm + g])]
    xw = _linear(x, w_in)
    xg = torch.addcmul(xw[..., :g], s_ih[:, perm], xw[..., g:])
    if len(w) == 4:
        assert r_b is not None and s_b is not None
        xg = xg + (w[2] + w[3])[perm] + s_b[:, perm] * r_b[perm]
    xg = _flip(xg, reverse)
    assert xg is not None
    w_rec = torch.cat([w_hh, r_hh])[torch.cat([perm, perm + g])].t()
    s_rec = s_hh[:, perm]
    cell = _CELLS[_BACKEND][0]
    outs = []
    # unbind, not xg[t]: one backward node for all steps instead of a zero-filled (T, B, 4H)
    # gradient per step
    for xt in xg.unbind(0):
        hh = torch.mm(h, w_rec)
        a = torch.addcmul(xt + hh[:, :g], s_rec, hh[:, g:])
        h, c = cell(a, c)
        outs.append(h)
    out = torch.stack(outs)
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
    n = h0.shape[-1]
    xs, outs, dxs = _flip(x, reverse), _flip(out, reverse), _flip(dx, reverse)
    assert xs is not None and outs is not None
    steps = xs.shape[0]
    h_prev = torch.cat([h0.unsqueeze(0), outs[:-1]])
    # the primal gates and cells of every step (the fused kernel does not return them)
    a = F.linear(torch.cat([xs, h_prev], -1), torch.cat([w_ih, w_hh], 1), bias)
    i, f, gg, o = a.chunk(4, -1)
    i, f, gg, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(gg), torch.sigmoid(o)
    ig = i * gg
    cs = []
    c = c0
    f_steps = f.unbind(0)
    for ig_t, f_t in zip(ig.unbind(0), f_steps):
        c = torch.addcmul(ig_t, f_t, c)
        cs.append(c)
    c_seq = torch.stack(cs)
    c_prev = torch.cat([c0.unsqueeze(0), c_seq[:-1]])
    tc = torch.tanh(c_seq)
    k = torch.cat([i * (1 - i) * gg, f * (1 - f) * c_prev, (1 - gg * gg) * i, o * (1 - o) * tc], -1)
    od = o * (1 - tc * tc)
    # what drives the tangent recurrence
    u: Tensor | None = None
    if resp is not None and scales is not None:
        r_ih, r_hh, r_b = resp
        s_ih, s_hh, s_b = scales
        assert r_ih is not None and r_hh is not None
        u = torch.addcmul(s_ih * _linear(xs, r_ih), s_hh, _linear(h_prev, r_hh))
        if r_b is not None and s_b is not None:
            u = u + s_b * r_b
    if dxs is not None:
        u = _linear(dxs, w_ih) if u is None else u + _linear(dxs, w_ih)
    tangent_cell = _CELLS[_BACKEND][1]
    w_rec = w_hh.t()
    dh, dc = dh0, dc0
    if dh is None and u is None:
        dh = torch.zeros_like(h0)
    if dc is None:
        dc = torch.zeros_like(c0)
    douts = []
    u_steps = [None] * steps if u is None else u.unbind(0)
    for u_t, k_t, f_t, od_t in zip(u_steps, k.unbind(0), f_steps, od.unbind(0)):
        if u_t is None:
            da = torch.mm(dh, w_rec)
        elif dh is None:
            da = u_t
        else:
            da = torch.addmm(u_t, dh, w_rec)
        dh, dc = tangent_cell(da, k_t, f_t, od_t, dc)
        douts.append(dh)
    dout = torch.stack(douts)
    assert dh is not None
    return _flip(dout, reverse), dh, dc  # type: ignore[return-value]
