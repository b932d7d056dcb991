"""HyperModel: a user's module after surgery, plus the hyper-state it is tuned by."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
import warnings
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import context, surgery
from .augment.base import Augmentation
from .context import Perturbation
from .errors import HyperTuneError, WrapError
from .hyperparameters import HyperParameters
from .attention import TunedRateCalls
from .kinds.base import Installation, kind_of
from .kinds.dropout import DropoutRate, attention_float_dropouts
from .kinds.input_dropout import InputDropoutHook
from .layers import HyperDropout, HyperLayer
from .layers.dropout import RateInterceptionNeeded
from .notices import listing, notice
from .penalties import WeightDecayPenalty
from . import rows
from .rows import BatchPerturbationNeeded
from .specs import HParam, Target, validate_specs

__all__ = ["HyperModel", "Coverage", "InputDropoutHook"]


def _rng_state() -> tuple[Tensor, list[Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, list[Tensor] | None]) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])


def _examples(value: Any) -> list[tuple[int, bool]]:
    """Batch sizes ``value`` could carry, in order, each with whether it is a list's length (a
    list of tensors may be a list of examples, as the images of torchvision's detection models,
    or a list of batched tensors); a tensor's leading axis is its batch; containers are searched
    in order; 0-d tensors carry none."""
    if torch.is_tensor(value):
        return [(value.shape[0], False)] if value.dim() >= 1 else []
    found: list[tuple[int, bool]] = []
    if isinstance(value, list) and value and all(torch.is_tensor(v) for v in value):
        found.append((len(value), True))
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        found += [c for v in value for c in _examples(v)]
    return found


def _per_example_lists(value: Any) -> list[int]:
    """Lengths of lists whose entries are not tensors (one annotation dict per image)."""
    if isinstance(value, list) and value and not any(torch.is_tensor(v) for v in value):
        return [len(value)]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _per_example_lists(v)]
    return []


def _tensor_lists(value: Any) -> list[list[Tensor]]:
    if isinstance(value, list) and value and all(torch.is_tensor(v) for v in value):
        return [value]
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensor_lists(v)]
    return []


def batch_size(args: Sequence[Any], kwargs: Mapping[str, Any], target: Any = None) -> tuple[int, bool] | None:
    """(number of examples, whether a list of tensors holds them one per entry).

    A list of tensors is read as the examples only where something says so: its tensors'
    leading sizes differ (so they are no batch), or the target, or another input, is a list of
    per-example annotations of its length (torchvision detection's images and targets);
    otherwise its tensors' leading axis is the batch, as for any tensor. Then the first reading
    of the inputs, unless the target's size disagrees with it and matches a later one: a small
    table or a batch-1 tensor before the batch (``{"position_ids": (1, T), "input_ids": (B, T)}``).
    """
    values = (*args, *kwargs.values())
    wanted = None
    if torch.is_tensor(target) and target.dim() >= 1:
        wanted = target.shape[0]
    elif isinstance(target, list) and target:
        wanted = len(target)
    annotated = {n for value in values for n in _per_example_lists(value)}
    if wanted is not None:
        annotated.add(wanted)
    examples = {
        len(tensors)
        for value in values
        for tensors in _tensor_lists(value)
        if len(tensors) in annotated or len({t.shape[0] if t.dim() else None for t in tensors}) > 1
    }
    sizes = [c for value in values for c in _examples(value) if not c[1] or c[0] in examples]
    if not sizes:
        return None
    if wanted is not None and sizes[0][0] != wanted:
        return next((c for c in sizes if c[0] == wanted), sizes[0])
    return sizes[0]


def first_examples(tree: Any, rows: int, n: int, lists: bool, primal: bool = False) -> Any:
    """``tree`` with its first ``n`` of ``rows`` examples: tensors whose leading axis is the batch
    are cut, and so are lists with one entry per example (a list of dicts or strings of the
    batch's length, or a list of tensors when those are the examples; their entries are kept
    whole). ``primal``: cut tensors lose their forward-AD tangent."""

    def example_list(value: Any) -> bool:
        if not (isinstance(value, list) and len(value) == rows):
            return False
        return lists or not all(torch.is_tensor(v) for v in value)

    def take(value: Any) -> Any:
        if example_list(value):
            return value[:n]
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == rows:
            return (fwAD.unpack_dual(value).primal if primal else value)[:n]
        return value

    return torch.utils._pytree.tree_map(take, tree, is_leaf=example_list)


_SEQUENCE_FIRST_KINDS = (
    nn.RNNBase,  # nn.LSTM, nn.GRU, nn.RNN
    nn.MultiheadAttention,
    nn.Transformer,
    nn.TransformerEncoderLayer,
    nn.TransformerDecoderLayer,
)


def _sequence_first_site(module: nn.Module) -> str | None:
    """The first torch attention or recurrent module built with batch_first=False, described for a notice.

    Around it the batch is axis 1 of (T, B, E) tensors, while the model's input, whose leading
    axis sets the perturbation rows, may be (T, B, ...) too: rows would then be time steps.
    Shapes cannot tell the two apart when T happens to fit, so such models are perturbed per
    batch from their first perturbed pass.
    """
    for path, m in module.named_modules():
        if isinstance(m, _SEQUENCE_FIRST_KINDS) and getattr(m, "batch_first", None) is False:
            return f"'{path or '<root>'}' ({type(m).__name__}, batch_first=False)"
    return None


# Attributes that switch activation checkpointing on: Hugging Face's ``gradient_checkpointing``
# (set by ``gradient_checkpointing_enable()``) and timm's ``grad_checkpointing``.
_CHECKPOINT_SWITCHES = ("gradient_checkpointing", "grad_checkpointing")


@dataclass(frozen=True)
class Coverage:
    """How much of a wrapped model is tuned: the share of its trainable w₀ weights (by element
    count) that hyper-layers modulate, and each weight-bearing module left as w₀ with the reason."""

    tuned_fraction: float
    untuned: dict[str, str]

    def __str__(self) -> str:
        head = f"{100 * self.tuned_fraction:.1f}% of the model's weights are tuned"
        if not self.untuned:
            return head
        items = [f"'{p or '<root>'}' ({why})" for p, why in self.untuned.items()]
        return f"{head}; {len(items)} weight-bearing module(s) stay w₀: {listing(items, 4)}"


class HyperModel(nn.Module):
    """A model whose regularization hyperparameters are tuned online (Self-Tuning Networks).

    Build it with :meth:`wrap`. Calling it runs the user's forward at the current values λ₀ and
    w₀; :class:`~hypertune.DeltaSTNOptimizer` evaluates it at perturbed values.
    """

    module: nn.Module
    hparams: HyperParameters

    def __init__(
        self,
        module: nn.Module,
        hparams: HyperParameters,
        plan: surgery.SurgeryPlan,
        installed: Installation,
    ) -> None:
        """Use :meth:`wrap`; this takes what ``surgery.plan`` and ``surgery.apply`` produced."""
        super().__init__()
        self.module = module
        self.hparams = hparams
        self.training = module.training
        self._centered = True
        self._unwrapped: list[nn.Module] = []  # the module unwrap() returned (a list: not a submodule)
        # where each tuned value acts (module paths / parameter names), and what stays w₀
        self._where: dict[str, dict[str, Any]] = {}
        for name, claim in plan.claims.items():
            kind = plan.kinds[name]
            for value in claim.values:
                self._where[value] = kind.where(claim, value, module) if hasattr(kind, "where") else {}
        self._untuned = dict(plan.untuned)
        self._input_transforms = [fn for _, fn in sorted(installed.input_transforms, key=lambda t: t[0])]
        self._penalties = list(installed.penalties)
        self._collectors = list(installed.collectors)
        self._hook_handles = list(installed.hooks)
        self._layer_paths = [n for n, m in module.named_modules() if isinstance(m, HyperLayer)]
        # generic values only a forward can use (hypertune.hparam): which ones training passes read
        self._read_in_forward = [n for n, s in hparams.specs.items() if s.read_in_forward]
        self._reads_seen: set[str] = set()
        self._dropouts = list({id(m): m for m in module.modules() if isinstance(m, HyperDropout)}.values())
        for drop in self._dropouts:
            drop.attach(hparams)
        self._per_batch: str | None = None  # the site that needed per-batch perturbation
        self._layout_seen = False  # a pass with per-example rows has run through
        self._intercept_rates = False  # a tuned dropout's rate is read as a float (attention)
        self._sequence_first = _sequence_first_site(module)
        self._guide: rows.LayoutGuide | None = None  # layouts found by a one-example probe pass
        # the library switches for activation checkpointing (Hugging Face, timm), read each step
        self._checkpoint_switches = [
            (path, m, attr) for path, m in module.named_modules() for attr in _CHECKPOINT_SWITCHES if hasattr(m, attr)
        ]

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def wrap(
        cls,
        model: nn.Module,
        hparams: Mapping[str, HParam | Augmentation] | Sequence[tuple[str, HParam | Augmentation]],
        *,
        targets: Sequence[Target | nn.Module] | None = None,
        exclude: Sequence[Target | nn.Module] | None = None,
    ) -> HyperModel:
        """Swap ``model``'s layers of a registered kind for centered hyper-layers, in place.

        ``targets``/``exclude`` select layers by path pattern (fnmatch), type, or module object of
        the model; the default is every module a layer kind handles (see
        :func:`hypertune.register_layer_kind`). The swapped layers keep the same Parameter objects.
        Nothing changes unless the whole model validates; weight-bearing modules left as w₀ are
        named in one :class:`~hypertune.WrapNotice` (see :meth:`coverage`).
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
        if not space.unconstrained.is_meta:
            # an init that rounds onto a bound in the model's dtype sits where sigmoid/exp are
            # flat: its λ could never move
            stuck = [
                f"{name}={spec.init:g} (it is {value:g} in {space.unconstrained.dtype})"
                for (name, spec), value in zip(space.specs.items(), space.values().values())
                if not spec.low < value < spec.high
            ]
            if stuck:
                raise WrapError(
                    [f"init {', '.join(stuck)} rounds onto a bound of its range, where λ could never "
                     "move: start further inside"]
                )
        installed = surgery.apply(model, plan, len(space))
        wrapped = cls(installed.root, space, plan, installed)
        if wrapped._untuned:
            coverage = wrapped.coverage()
            if any(why not in ("excluded", "not selected by targets", surgery.FROZEN) for why in coverage.untuned.values()):
                notice(f"hypertune: {coverage} (see HyperModel.coverage())")
        if any(isinstance(spec, DropoutRate) for spec in specs.values()):
            fixed = [f"{path} (p={rate:g})" for path, rate in attention_float_dropouts(installed.root.named_modules())]
            if fixed:
                notice(
                    f"hypertune: nn.MultiheadAttention keeps its attention dropout fixed in {listing(fixed)}: "
                    "the rate is a float argument, not a dropout module, so DropoutRate does not tune it"
                )
        return wrapped

    def coverage(self) -> Coverage:
        """Which weight-bearing modules stay w₀ (and why), and the share of weights tuned."""
        tuned = {id(p) for own in self.hyper_layer_weights().values() for p in own}
        base = [p for p in self.base_parameters() if p.requires_grad]  # frozen weights are not for tuning
        total = sum(p.numel() for p in base)
        covered = sum(p.numel() for p in base if id(p) in tuned)
        return Coverage(covered / total if total else 0.0, dict(self._untuned))

    def unreached_layers(self, called: set[str]) -> list[str]:
        """Hyper-layers whose response no called layer carries: a layer never called is fine
        when it shares its response with one that was (tied weights, e.g. T5's ``shared``)."""
        layers = self.hyper_layers()
        reached = {id(layer.hyper_projection) for path, layer in layers.items() if path in called}
        return [path for path, layer in layers.items() if path not in called and id(layer.hyper_projection) not in reached]

    def describe_hparams(self) -> dict[str, dict[str, Any]]:
        """Per tuned value: its kind, its spec (serialized) and where it acts; valid for
        ``unwrap()`` and for a fresh instance of the same architecture."""
        meta: dict[str, dict[str, Any]] = {}
        for name, spec in self.hparams.specs.items():
            kind = kind_of(name, spec)
            entry: dict[str, Any] = {"kind": kind}
            if kind != "augmentation":
                entry["spec"] = spec.to_json()
            if spec.log or spec.plot_log:
                entry["log"] = True
            entry.update(self._where.get(name, {}))
            meta[name] = entry
        return meta

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
        layers = {}
        for path in self._layer_paths:
            try:
                module = self.module.get_submodule(path) if path else self.module
            except AttributeError:
                module = None
            if not isinstance(module, HyperLayer):
                raise HyperTuneError(
                    f"hyper-layer {path!r} is no longer where wrap put it (found "
                    f"{f'{type(module).__module__}.{type(module).__qualname__}' if module is not None else 'nothing'}): the model's modules were "
                    "replaced after wrapping (e.g. peft's get_peft_model adds its adapters that way). Change "
                    "the model first, then wrap it: plain = hyper_model.unwrap(), modify plain, "
                    "HyperModel.wrap(plain, ...)"
                )
            layers[path] = module
        return layers

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

    def hyper_layer_weights(self) -> dict[str, list[nn.Parameter]]:
        """Each hyper-layer's own w₀ parameters (its weights and biases, not Θ), by path."""
        theta = {id(p) for p in self.response_parameters()}
        return {
            path: [p for p in layer.parameters() if id(p) not in theta]
            for path, layer in self.hyper_layers().items()
        }

    def base_parameters(self) -> list[nn.Parameter]:
        """w₀: every parameter of the user's model, hyper-layers' original weights included."""
        exclude = {id(p) for p in self.response_parameters()} | {id(p) for p in self.hyper_parameters()}
        return [p for p in self.parameters() if id(p) not in exclude]

    # ---- loading weights ----------------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """Also takes the *plain* model's state dict (a pretrained checkpoint, keys without
        ``module.``): it loads into w₀, and Θ and λ keep their values. ``strict`` then means every
        w₀ key, and no other, is there; the keys reported are the plain model's."""
        keys = list(state_dict)
        if not keys or any(k.startswith(("module.", "hparams.")) for k in keys):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)
        inner = self.module.state_dict(keep_vars=True)
        theta = {id(p) for p in self.response_parameters()}
        response_keys = {k for k, v in inner.items() if id(v) in theta}
        if response_keys & set(keys):  # the inner module's own state dict, Θ included
            return self.module.load_state_dict(state_dict, strict=strict, assign=assign)
        own = set(inner) - response_keys
        if not own & set(keys):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)  # torch names the keys
        missing = sorted(own - set(keys))
        unexpected = sorted(set(keys) - own)
        if strict and (missing or unexpected):
            raise RuntimeError(
                f"Error(s) in loading a plain state_dict into {type(self.module).__name__}'s w₀ (Θ and λ are not "
                f"in a plain state dict and keep their values): missing key(s): {missing}; unexpected key(s): "
                f"{unexpected}. Nothing was loaded; pass strict=False to load the keys that match"
            )
        self.module.load_state_dict({k: state_dict[k] for k in keys if k in own}, strict=False, assign=assign)
        return nn.modules.module._IncompatibleKeys(missing, unexpected)

    # ---- evaluation points -------------------------------------------------------------------
    @property
    def centered(self) -> bool:
        """Whether w₀ is the model at λ (Δ-STN, centered STN) or not (STN, set by the optimizer)."""
        return self.__dict__.get("_centered", self.__dict__.get("centered", True))

    @centered.setter
    def centered(self, value: bool) -> None:
        self.__dict__["_centered"] = bool(value)
        for m in self.module.modules():  # the layers then refuse a forward outside this model's
            if isinstance(m, HyperLayer):
                m.__dict__["_uncentered"] = not value

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
        if self._per_batch is None and self._sequence_first is not None and point.rows > 1:
            self._fall_back_to_batch(
                self._sequence_first, "around it the batch is axis 1; build it with batch_first=True for per-example perturbation"
            )
        if self._per_batch is not None:
            point.share_first_row()
        if self._guide is None and point.rows > 1 and self._per_batch is None:
            self._guide = self._probe_layouts(point, args, kwargs)
        while True:
            saved = self._norm_stats() if point.rows > 1 and not self._layout_seen else None
            # The retry must draw the same dropout masks as a run that never needed it (a resumed
            # run learns the layout again, so its random stream must not depend on the retry).
            # (Not while compiling: reading the random state would break the graph.)
            rng = _rng_state() if saved is not None and not torch.compiler.is_compiling() else None
            try:
                out = self._run(point, args, kwargs)
            except RateInterceptionNeeded:
                if self._intercept_rates:
                    raise
                self._intercept_rates = True
            except BatchPerturbationNeeded as err:
                if point.rows == 1:
                    raise
                self._fall_back_to_batch(err.site, str(err))
                point.share_first_row()
            except RuntimeError:
                # A batch-1 input (position ids, a positional table) gave a site one output row
                # per example, and the code after it relied on the 1: perturb per batch instead.
                grown = rows.grown_site()
                if point.rows == 1 or self._layout_seen or grown is None:
                    raise
                self._fall_back_to_batch(
                    grown, "its batch-1 input (position ids, a table) gave one output per example, which the code after it did not expect"
                )
                point.share_first_row()
            else:
                if point.rows > 1:
                    self._layout_seen = True
                if self.training and self._read_in_forward:
                    self._reads_seen |= point.values_read()
                return out
            # run the pass again: undo what the interrupted pass left behind
            for buf, value in saved or ():
                buf.copy_(value)
            if rng is not None:
                _set_rng_state(rng)
            for penalty in self._collectors:
                penalty.outputs.clear()

    def _run(self, point: Perturbation, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        intercept = self._intercept_rates and point.rows > 1
        guide = self._guide if point.rows > 1 else None
        with context.active(point), rows.guided_by(guide), (TunedRateCalls() if intercept else nullcontext()):
            if self.training:
                for transform in self._input_transforms:
                    args, kwargs = transform((args, kwargs), point)
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

    @torch.no_grad()
    def _probe_layouts(self, point: Perturbation, args: tuple[Any, ...], kwargs: dict[str, Any]) -> rows.LayoutGuide:
        """Run the pass once more on the batch's first example alone (eval mode, no gradient, no
        running-statistics update) and record each site's input shape: see ``rows.LayoutGuide``.
        A model that cannot run on one example gets an empty guide (the shape rules decide)."""
        n = point.rows

        def probe(count: int) -> rows.Probe:
            """The pass on the first ``count`` examples, all at example 0's perturbation."""

            some_args, some_kwargs = first_examples((args, kwargs), n, count, lists, primal=True)
            one = Perturbation(
                self.hparams,
                point.hparams[:1].detach(),
                None if point.response_input is None else fwAD.unpack_dual(point.response_input).primal[:1].detach(),
            )
            with rows.recording() as recorded, context.active(one):
                self.module(*some_args, **some_kwargs)
            return recorded

        def before(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if inputs and torch.is_tensor(inputs[0]):
                rows.recording_input(fwAD.unpack_dual(inputs[0]).primal)

        lists = (batch_size(args, kwargs) or (n, False))[1]
        # fingerprints of each site's input rows (not while compiling: hooks would break the graph)
        sites = [] if torch.compiler.is_compiling() else [*self.hyper_layers().values(), *self._dropouts]
        hooks = [m.register_forward_pre_hook(before) for m in sites]
        hooks += [m.register_forward_hook(lambda *_: rows.recording_done()) for m in sites]
        flags = [(m, m.training) for m in self.modules()]
        self.eval()
        alone: rows.Probe = rows.Probe()
        pair = None
        try:
            alone = probe(1)
            pair = probe(2)  # example 0 again, beside example 1: where its rows land in a batch
        except Exception:  # noqa: BLE001 - a probe only; the real pass reports real errors
            pass
        finally:
            for h in hooks:
                h.remove()
            for m, flag in flags:
                m.training = flag
            for penalty in self._collectors:
                penalty.outputs.clear()
        return rows.LayoutGuide.from_probes(alone, pair)

    def _fall_back_to_batch(self, site: str, why: str | None = None) -> None:
        """Perturb the whole model per batch from now on: a site cannot carry per-example rows,
        and the Θ objective needs every site of one example at the same perturbation."""
        self._per_batch = site
        reason = f" ({why})" if why else ""
        warnings.warn(
            f"hypertune: {site} cannot take one perturbation per example{reason}, so the hyperparameters "
            "are perturbed once per batch instead (correct, noisier)",
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

    def unread_hparams(self) -> list[str]:
        """Generic values (read with hypertune.hparam) that no training pass has read so far:
        tuning them would change nothing, so the optimizer's first step refuses them."""
        return [n for n in self._read_in_forward if n not in self._reads_seen]

    def batch_rows(self, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None, target: Any = None) -> int:
        """Number of examples in a batch: the leading dimension of its first input tensor that has
        one, or the length of a list of tensors (a later input's, when only that one agrees with
        the target)."""
        found = batch_size(args, kwargs or {}, target)
        if found is None:
            raise HyperTuneError(
                "could not find a batched input tensor: pass the batch as a tensor (or a tuple/dict "
                "of tensors, the batch dimension first, or a list of one tensor per example)"
            )
        return found[0]

    @contextmanager
    def collecting_activations(self) -> Iterator[None]:
        """Let AR/TAR hooks record outputs for the training penalty of the enclosed pass."""
        for penalty in self._collectors:
            penalty.outputs.clear()
            penalty.collecting = True
        try:
            yield
        finally:
            for penalty in self._collectors:
                penalty.collecting = False

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The w₀ weights a tuned WeightDecay penalizes (each once)."""
        seen: dict[int, nn.Parameter] = {}
        for penalty in self._penalties:
            if isinstance(penalty, WeightDecayPenalty):
                for p in penalty.decayed_parameters():
                    seen.setdefault(id(p), p)
        return list(seen.values())

    def training_penalty(self, point: Perturbation) -> Tensor | None:
        """Sum of tuned training-only penalties, per perturbation row; ``None`` if there are none."""
        total: Tensor | None = None
        for penalty in self._penalties:
            term = penalty(point)
            total = term if total is None else total + term
        return total

    def hparam_values(self) -> dict[str, float]:
        return self.hparams.values()

    def checkpointed_modules(self) -> list[str]:
        """Modules with activation (gradient) checkpointing switched on, which training cannot take:
        the recomputation runs in backward, outside this model's forward, so dropout has no
        per-example rate there and Θ's tangents are gone."""
        switches = self.__dict__.get("_checkpoint_switches", ())  # (absent in a model pickled before it)
        return [path or "<root>" for path, m, attr in switches if getattr(m, attr) is True]

    # ---- undoing -----------------------------------------------------------------------------
    def _bake_responses(self, lam: Tensor) -> None:
        """Fold Θ at λ₀ into w₀, once per (tied) weight. A weight that a module left untuned
        also holds (Gemma's and BART's scaled embeddings, tied to ``lm_head``) computed with w₀
        there and with w₀ + Θλ₀ in the hyper-layers: folding it in place would change that
        module, so the hyper-layers get the folded weight as their own Parameter instead."""
        layers = self.hyper_layers()
        inside = {id(m) for m in layers.values()}
        holders: dict[int, list[str]] = {}
        for path, module in self.module.named_modules(remove_duplicate=False):
            if id(module) not in inside and not isinstance(module, parametrize.ParametrizationList):
                for p in module._parameters.values():
                    if p is not None:
                        holders.setdefault(id(p), []).append(path or "the model")

        def stored(layer: HyperLayer) -> list[Tensor]:
            """The Parameters the weight is made of (a parametrization's originals; none for
            layers with weights of their own names, like HyperLSTM's)."""
            if parametrize.is_parametrized(layer, "weight"):
                return list(layer.parametrizations.weight.parameters())  # type: ignore[union-attr]
            weight = layer._parameters.get("weight")
            return [] if weight is None else [weight]

        shared = {}
        for path, layer in layers.items():
            users = [h for p in stored(layer) for h in holders.get(id(p), [])]
            if users:
                shared[path] = users
        refusals = [r for layer in layers.values() if (r := layer.bake_refusal()) is not None]
        refused = [path for path in shared if parametrize.is_parametrized(layers[path], "weight")]
        if refused:
            refusals.append(
                f"plain STN's Θ cannot be folded back into the reparametrized weight of {listing(refused)}: "
                f"{listing(sorted({h for p in refused for h in shared[p]}))} also hold(s) it untuned; "
                "unwrap in mode 'delta' or 'centered', or exclude those layers"
            )
        if refusals:
            raise HyperTuneError("; ".join(refusals) + ". The model was not changed")
        untied: dict[int, nn.Parameter] = {}  # response -> the weight folded into a new Parameter
        baked: set[int] = set()
        for path, layer in layers.items():
            key = id(layer.hyper_projection)
            if key not in baked:
                baked.add(key)
                if path in shared:
                    layer.bake(lam, untie=True)
                    untied[key] = layer.weight
                else:  # (layer kinds registered before ``untie`` existed take one argument)
                    layer.bake(lam)
            elif key in untied and layer.weight is not untied[key]:  # a tie partner of the untied weight
                layer.weight = untied[key]
        if shared:
            notice(
                f"unwrap: plain STN's Θ was folded into the weight of {listing(sorted(shared))}, which "
                f"{listing(sorted({h for hs in shared.values() for h in hs}))} also use(s) untuned; so that "
                "the unwrapped model computes what the wrapped one did, the tuned layers now have their "
                "own copy of it (the weight is untied). Re-tying it (transformers' tie_weights()) undoes the fold"
            )

    @torch.no_grad()
    def unwrap(self) -> nn.Module:
        """Return the plain module with tuned values baked in; this HyperModel is then spent.

        Hyper-layers become their own classes again with the same w₀ Parameters (plain STN first
        folds Θ at λ₀ into them, once per weight: a tied weight is folded once), tuned dropouts
        become plain dropouts at the final rate, and a tuned input dropout becomes a forward
        pre-hook: each kind's fixed form at its final value. Tuned weight decay has no module
        form: read it from :meth:`hparam_values`, like tuned AR/TAR coefficients (their hooks are
        removed). Calling it again returns the same module.
        """
        if self._unwrapped:
            return self._unwrapped[0]
        values = self.hparam_values()
        lam = self.hparams.unconstrained.detach()
        if not self.centered:
            self._bake_responses(lam)
        for handle in self._hook_handles:
            handle.remove()
        root = self.module
        replaced: dict[int, nn.Module] = {}
        for path, module in list(root.named_modules(remove_duplicate=False)):
            new: nn.Module | None = replaced.get(id(module))
            if new is None:
                if isinstance(module, HyperLayer):
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
        lost = []
        for name, spec in self.hparams.specs.items():
            if spec.bakes_on_unwrap():
                spec.fixed_form(root, self._where.get(name, {}), values[name])
            elif spec.unwrap_loses:
                lost.append(f"{name!r} = {values[name]:.4g} ({spec.unwrap_loses})")
        if lost:
            notice(
                f"hypertune: unwrap: the plain model does not apply {', '.join(lost)}; its eval outputs "
                "are unchanged, but training it further goes without them (ScheduleReplayer lists them "
                "as unapplied)"
            )
        self._unwrapped.append(root)
        return root
