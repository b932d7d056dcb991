"""Linearization of a wrapped model's predictions in the weights, by forward-mode AD.

Δ-STN trains Θ on ``f(x, w₀, λ₀+ε) + J_yw Θε``. The hyper-layers put ``Θε`` into the forward-AD
tangent (their primal stays w₀'s output), and forward AD carries it through every other op of
the user's forward (activations, pooling, residuals, BatchNorm), so the output's tangent is
exactly ``J_yw Θε``. Unlike ``torch.func.jvp`` this works through DDP and train-mode BatchNorm,
and the primal path builds no autograd graph: only the tangent depends on Θ.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .attention import sdpa_as_math, softmax

try:  # torch >= 2.3
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # pragma: no cover
    sdpa_kernel = None


class _LinearizableOps(TorchFunctionMode):
    """Rewrites, exactly, ops whose forward-AD formula PyTorch cannot differentiate again.

    The Θ step backpropagates through the tangent. ``F.hardsigmoid``'s tangent is computed by
    ``hardsigmoid_backward``, which has no derivative ("derivative for
    aten::hardsigmoid_backward is not implemented"; MobileNetV3's squeeze-excitation);
    ``relu6(x + 3) / 6`` is the same function built from differentiable ops.
    ``F.scaled_dot_product_attention``'s math kernel modifies its attention weights in place,
    which breaks that backward as soon as the primal needs a gradient too ("modified by an
    inplace operation"; wav2vec2 marks its input as requiring grad): it runs as
    :func:`~hypertune.attention.math_attention`, the same formula without in-place ops. Softmax
    itself has the same flaw, so a softmax whose primal needs a gradient is built from exp and sum.
    A loss computed inside the forward (a Hugging Face model given ``labels``) is the end of the
    linearization: Δ-STN's objective is the loss *of* the linearized output, L(f + JΘε), while
    forward AD would return the loss's own first-order expansion, L(f) + ∇L·JΘε, which is linear
    in Θ and has none of the curvature Θ learns from. So ``F.cross_entropy`` and the other
    ``torch.nn.functional`` losses run on primal + tangent, as a plain tensor.
    ``F.glu``'s tangent (``glu_jvp``) has no derivative either (Speech2Text's subsampler); it runs
    as ``a · sigmoid(b)``. An op with no forward-AD formula inside ``torch.no_grad()`` (DETR's
    Hungarian matcher calls ``cdist`` on the logits) runs on the primal values: no_grad already
    cuts its derivative from the backward that trains Θ.
    The grouped matrix multiply of mixture-of-experts layers (``F.grouped_mm``, Mixtral's and
    Qwen-MoE's experts in transformers) has no forward-AD formula at all: with a tangent it runs
    as one matmul per group.
    """

    def __init__(self, hardsigmoid: bool) -> None:
        super().__init__()
        self.hardsigmoid = hardsigmoid

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return sdpa_as_math(*args, **kwargs)
        if func in _SOFTMAX and args and fwAD.unpack_dual(args[0]).primal.requires_grad:
            return _softmax_call(func, *args, **kwargs)
        if self.hardsigmoid and func is F.hardsigmoid:
            return F.relu6(args[0] + 3.0) / 6.0
        if func is F.glu and args and fwAD.unpack_dual(args[0]).tangent is not None:
            return _glu(*args, **kwargs)
        if func in _LOSSES:
            return _loss_at_linearized_output(func, args, kwargs)
        if func in _GROUPED_MM:
            out = _grouped_mm_in_dual(*args, **kwargs)
            if out is not None:
                return out
        slots = _NORMS.get(func)
        if slots is not None:
            return _norm_call(func, slots, args, kwargs)
        kind = _AFFINE.get(func)
        if kind is not None:
            out = _affine_in_dual(kind, func, args, kwargs)
            if out is not None:
                return out
        if torch.is_grad_enabled():
            return func(*args, **kwargs)
        try:
            return func(*args, **kwargs)
        except NotImplementedError:
            # An op without a forward-AD formula inside torch.no_grad() (DETR's Hungarian matcher
            # calls cdist on the logits): no_grad cuts its derivative for the backward that trains
            # Θ, so its tangent is cut too and it runs on the primal values.
            plain_args, plain_kwargs = pytree.tree_map(
                lambda t: fwAD.unpack_dual(t).primal if torch.is_tensor(t) else t, (args, kwargs)
            )
            return func(*plain_args, **plain_kwargs)


# Binary ops that are affine in one dual operand when the other has no tangent. Forward AD's own
# rule for them multiplies a zero tangent for the plain operand, whose shape check runs in Python
# (0.5–1 ms per op on torch 2.14: per Θ step, more than the arithmetic of a small model).
_AFFINE: dict[Any, str] = {
    **dict.fromkeys((torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__), "mul"),
    **dict.fromkeys((torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__), "add"),
    **dict.fromkeys((torch.sub, torch.Tensor.sub, torch.Tensor.__sub__), "sub"),
    torch.Tensor.__rsub__: "rsub",
    **dict.fromkeys((torch.div, torch.Tensor.div, torch.Tensor.__truediv__), "div"),
}


def _affine_in_dual(kind: str, func: Callable[..., Any], args: tuple, kwargs: dict) -> torch.Tensor | None:
    """``func(a, b)`` as primal and tangent computed apart, when exactly one of a, b is a dual
    tensor, the other a plain tensor or number, and the result has the dual's shape and dtype;
    ``None`` (let forward AD do it) in every other case."""
    if len(args) != 2 or (kwargs and (kind not in ("add", "sub") or set(kwargs) != {"alpha"})):
        return None
    a, b = args
    a_p, a_t = fwAD.unpack_dual(a) if torch.is_tensor(a) else (a, None)
    b_p, b_t = fwAD.unpack_dual(b) if torch.is_tensor(b) else (b, None)
    if (a_t is None) == (b_t is None):
        return None
    dual, tangent, other = (a_p, a_t, b_p) if a_t is not None else (b_p, b_t, a_p)
    if not (torch.is_tensor(other) or (isinstance(other, (int, float)) and not isinstance(other, bool))):
        return None
    if torch.is_tensor(other) and not _broadcasts_into(other.shape, dual.shape):
        return None
    if torch.result_type(dual, other) != dual.dtype:
        return None
    alpha = kwargs.get("alpha", 1)
    first = a_t is not None
    if kind == "mul":
        out_t = tangent * other
    elif kind == "add":  # a copy, never the input's tangent: an in-place op on the sum must not reach it
        out_t = tangent.clone() if first or alpha == 1 else tangent * alpha
    elif kind == "sub":
        out_t = tangent.clone() if first else tangent * -alpha
    elif kind == "rsub":  # Tensor.__rsub__(self, other) = other - self
        out_t = -tangent if first else tangent.clone()
    elif kind == "div" and first:
        out_t = tangent / other
    else:  # a dual divisor: not affine
        return None
    return fwAD.make_dual(func(a_p, b_p, **kwargs), out_t)


def _glu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``F.glu`` as ``a · sigmoid(b)``: the same function, but torch computes glu's tangent with
    ``glu_jvp``, which has no derivative ("derivative for aten::glu_jvp is not implemented";
    Speech2Text's convolutional subsampler), so Θ's step could not backpropagate through it."""
    a, b = input.chunk(2, dim=dim)
    return a * torch.sigmoid(b)


def _broadcasts_into(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without growing it (torch.broadcast_shapes is
    written in Python and costs more than this whole check)."""
    if len(shape) > len(target):
        return False
    return all(s == 1 or s == t for s, t in zip(reversed(shape), reversed(target)))


_LOSSES = {
    getattr(F, name)
    for name in (
        "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
        "binary_cross_entropy_with_logits", "kl_div", "poisson_nll_loss", "gaussian_nll_loss", "ctc_loss",
        "cosine_embedding_loss", "margin_ranking_loss", "hinge_embedding_loss", "multilabel_margin_loss",
        "soft_margin_loss", "multilabel_soft_margin_loss", "multi_margin_loss", "triplet_margin_loss",
        "triplet_margin_with_distance_loss",
    )
    if hasattr(F, name)
}


def _loss_at_linearized_output(func: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
    """``func`` of every dual argument's primal + tangent: the loss at the linearized output,
    which autograd then differentiates in Θ through the tangent."""
    args, kwargs = pytree.tree_map(_linearized, (args, kwargs))
    return func(*args, **kwargs)


_GROUPED_MM = {f for f in (getattr(F, "grouped_mm", None), getattr(torch, "_grouped_mm", None)) if f is not None}


def _grouped_mm_in_dual(
    mat_a: Any, mat_b: Any, offs: Any = None, bias: Any = None, out_dtype: torch.dtype | None = None
) -> torch.Tensor | None:
    """The grouped matmul of a MoE layer as one matmul per group, which forward AD can carry:
    ``mat_a`` (M, K) split into row groups at ``offs`` (G cumulative ends), group g times
    ``mat_b[g]`` (K, N); or (G, M, K) @ (G, K, N) without ``offs``. Rows past the last offset
    are zero. ``None`` (the op itself) when no operand has a tangent or for other layouts."""
    operands = [t for t in (mat_a, mat_b, bias) if torch.is_tensor(t)]
    if not any(fwAD.unpack_dual(t).tangent is not None for t in operands):
        return None
    if not (torch.is_tensor(mat_a) and torch.is_tensor(mat_b) and mat_b.dim() == 3):
        return None
    if mat_a.dim() == 3 and offs is None:
        out = torch.bmm(mat_a, mat_b)
        if bias is not None:
            out = out + bias.unsqueeze(1)
    elif mat_a.dim() == 2 and torch.is_tensor(offs) and offs.dim() == 1 and offs.numel() == mat_b.shape[0]:
        ends = offs.tolist()  # a host read: the groups' sizes decide the slices
        pieces, start = [], 0
        for g, end in enumerate(ends):
            piece = mat_a[start:end] @ mat_b[g]
            pieces.append(piece if bias is None else piece + bias[g])
            start = end
        if start < mat_a.shape[0]:
            pieces.append(mat_a.new_zeros(mat_a.shape[0] - start, mat_b.shape[2]))
        out = torch.cat(pieces, dim=0)
    else:
        return None
    return out if out_dtype is None else out.to(out_dtype)


# Where each norm takes its affine weight and bias (positional index, keyword).
_NORMS: dict[Any, tuple[int, int]] = {F.layer_norm: (2, 3), F.batch_norm: (3, 4), F.group_norm: (2, 3)}


def _norm_call(func: Callable[..., Any], slots: tuple[int, int], args: tuple, kwargs: dict) -> Any:
    """A norm of a dual input whose weight and bias are plain tensors, given explicit zero
    tangents: forward AD's rule otherwise builds zero tensors for them with a shape check in
    Python (two per call, 0.5–1 ms each on torch 2.14); zeros of the weight's size cost next to
    nothing, and the result is the same dual."""
    if not args or not torch.is_tensor(args[0]) or fwAD.unpack_dual(args[0]).tangent is None:
        return func(*args, **kwargs)
    args, kwargs = list(args), dict(kwargs)
    for name, index in zip(("weight", "bias"), slots):
        if name in kwargs:
            kwargs[name] = _with_zero_tangent(kwargs[name])
        elif index < len(args):
            args[index] = _with_zero_tangent(args[index])
    return func(*args, **kwargs)


def _with_zero_tangent(t: Any) -> Any:
    if not torch.is_tensor(t) or fwAD.unpack_dual(t).tangent is not None:
        return t
    return fwAD.make_dual(t, torch.zeros_like(t))


_SOFTMAX = {
    F.softmax: False, torch.softmax: False, torch.Tensor.softmax: False,
    F.log_softmax: True, torch.log_softmax: True, torch.Tensor.log_softmax: True,
}


def _softmax_call(func: Callable[..., Any], x: torch.Tensor, dim: Any = None, *args: Any, **kwargs: Any) -> Any:
    dim = kwargs.pop("dim", dim)
    dtype = kwargs.pop("dtype", args[-1] if args and isinstance(args[-1], torch.dtype) else None)
    if dim is None:  # F.softmax's legacy implicit dim
        return func(x, dim, *args, **kwargs)
    if dtype is not None:
        x = x.to(dtype)
    return softmax(x, dim, log=_SOFTMAX[func])


def _math_attention():
    """Fused attention kernels (flash / memory-efficient, on CPU and CUDA) have no forward-AD
    formula; nn.MultiheadAttention and F.scaled_dot_product_attention use the math kernel."""
    if sdpa_kernel is None:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def _linearized(t: Any) -> Any:
    if not torch.is_tensor(t):
        return t
    primal, tangent = fwAD.unpack_dual(t)
    return primal if tangent is None else primal + tangent


def needs_op_rewrites(model: torch.nn.Module) -> bool:
    """Whether ``model`` holds modules whose ops :class:`_LinearizableOps` must rewrite.

    The rewrite intercepts every torch call of the forward, which costs on every step, so it is
    switched on only for models that need it (a functional ``F.hardsigmoid`` in user code still
    gets the clear error of the optimizer's Θ step).
    """
    return any(isinstance(m, torch.nn.Hardsigmoid) for m in model.modules())


@functools.cache
def _load_jvp_decompositions() -> None:
    """torch loads its forward-AD decompositions on the first ``make_dual`` through
    ``torch.jit.script``, which warns that it is deprecated: noise for our users, not theirs
    to fix. Load them once here with that one warning silenced."""
    load = getattr(fwAD, "_maybe_load_decompositions", None)
    if load is not None:
        with warnings.catch_warnings():
            # FutureWarning in torch 2.14, DeprecationWarning in 2.11: match the message only
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated")
            load()


def make_dual(primal: torch.Tensor, tangent: torch.Tensor) -> torch.Tensor:
    """``fwAD.make_dual`` for hyper-layers, without torch's first-use deprecation warning.

    The tangent takes the primal's dtype: under autocast the primal (w₀'s output) can be bf16
    while Θ's contribution came out float32, and ops on a dual of mixed dtypes fail.
    """
    _load_jvp_decompositions()
    return fwAD.make_dual(primal, tangent.to(primal.dtype))


def scale_tangent_too(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * scale`` for a ``scale`` without tangent, done on x's primal and tangent separately.

    Forward AD's rule for a dual times a plain tensor multiplies a zero tangent for the plain
    side, and that zero tensor's shape check runs in Python (about 0.5–1 ms per op on torch
    2.14, more than the multiply itself on small layers); the result is the same dual.
    """
    primal, tangent = fwAD.unpack_dual(x)
    if tangent is None:
        return x * scale
    return fwAD.make_dual(primal * scale, tangent * scale)


# ---- custom autograd.Functions without a jvp ----------------------------------------------------
_FUNCTION_APPLY = torch.autograd.Function.__dict__["apply"]
_BASE_JVP = torch.autograd.Function.jvp


def _tangent_of(t: Any) -> torch.Tensor | None:
    return fwAD.unpack_dual(t).tangent if torch.is_tensor(t) else None


def _apply(cls: type, *args: Any, **kwargs: Any) -> Any:
    """``Function.apply`` inside the linearized pass: a Function that defines no ``jvp`` (BLOOM's
    training GELU, a user's custom activation) gets its tangent from its own backward."""
    if cls.jvp is _BASE_JVP and any(_tangent_of(t) is not None for t in pytree.tree_leaves((args, kwargs))):
        out = _jvp_from_backward(cls, args, kwargs)
        if out is not None:
            return out
    return _FUNCTION_APPLY.__get__(None, cls)(*args, **kwargs)


def _jvp_from_backward(cls: type, args: tuple, kwargs: dict) -> Any:
    """J·ṫ by the double-vjp identity: with g(u) = Jᵀu from the Function's backward, J·ṫ is the
    gradient of g(u)·ṫ in u. Exact wherever the backward is differentiable, and it keeps the
    backward's meaning (a straight-through estimator's surrogate Jacobian, as training uses).
    When a primal input needs a gradient itself, the primal output is computed once more from
    it, so that its graph is kept."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    inputs, tangents, plain, primals = [], [], [], []
    for leaf in leaves:
        tangent = _tangent_of(leaf)
        if tangent is None:
            plain.append(leaf)
            primals.append(leaf)
            continue
        primal = fwAD.unpack_dual(leaf).primal
        x = primal.detach().requires_grad_(True)
        inputs.append(x)
        tangents.append(tangent)
        plain.append(x)
        primals.append(primal)
    keep_graph = any(torch.is_tensor(p) and p.requires_grad for p in primals)
    call_args, call_kwargs = pytree.tree_unflatten(plain, spec)
    try:
        with torch.enable_grad():
            out = _FUNCTION_APPLY.__get__(None, cls)(*call_args, **call_kwargs)
            outs, out_spec = pytree.tree_flatten(out)
            diff = [i for i, o in enumerate(outs) if torch.is_tensor(o) and o.requires_grad]
            us = [torch.zeros_like(outs[i], requires_grad=True) for i in diff]
            vjps = torch.autograd.grad([outs[i] for i in diff], inputs, us, create_graph=True, allow_unused=True)
            pairs = [(g, t) for g, t in zip(vjps, tangents) if g is not None]
            if any(not g.requires_grad or "Error" in type(g.grad_fn).__name__ for g, _ in pairs):
                # once_differentiable (its graph ends in an error node), or computed under no_grad
                raise RuntimeError("its backward builds no graph in the output's gradient")
            jvps = torch.autograd.grad(
                [g for g, _ in pairs], us, [t for _, t in pairs], create_graph=True, allow_unused=True
            ) if pairs else [None] * len(us)
            if pairs and all(j is None for j in jvps):
                raise RuntimeError("its backward's result does not depend on the output's gradient")
    except RuntimeError as err:
        raise NotImplementedError(
            f"{cls.__name__} (a custom autograd.Function) has no jvp, and its backward cannot be "
            f"differentiated to give one ({err})"
        ) from err
    if keep_graph:
        primal_args, primal_kwargs = pytree.tree_unflatten(primals, spec)
        outs = pytree.tree_leaves(_FUNCTION_APPLY.__get__(None, cls)(*primal_args, **primal_kwargs))
    duals = list(outs)
    for i, jvp in zip(diff, jvps):
        primal = outs[i] if keep_graph else outs[i].detach()
        duals[i] = fwAD.make_dual(primal, torch.zeros_like(primal) if jvp is None else jvp)
    for i, o in enumerate(outs):
        if torch.is_tensor(o) and i not in diff and not keep_graph:
            duals[i] = o.detach()
    return pytree.tree_unflatten(duals, out_spec)


@contextlib.contextmanager
def _custom_functions_linearized() -> Any:
    torch.autograd.Function.apply = classmethod(_apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = _FUNCTION_APPLY


# torch keeps one forward-AD dual level for the whole process, not one per thread (a second
# thread's make_dual joins the first thread's level, and opening a second level raises "Nested
# forward mode AD is not supported"), so linearized forwards of different models in different
# threads take turns.
_DUAL_LEVEL = threading.RLock()


def linearized_call(fn: Callable[[], Any], rewrite_ops: bool = False) -> Any:
    """Run ``fn`` (a forward in linearize mode) and return every output as primal + tangent.

    ``rewrite_ops`` also rewrites ``F.hardsigmoid`` (see :func:`needs_op_rewrites`); attention
    is always rewritten.
    """
    _load_jvp_decompositions()
    with (
        _DUAL_LEVEL,
        fwAD.dual_level(),
        _math_attention(),
        _custom_functions_linearized(),
        _LinearizableOps(hardsigmoid=rewrite_ops),
    ):
        out = fn()
        return pytree.tree_map(_linearized, out)
