"""Module surgery: which modules become hyper-layers, validated first, swapped in place, undone.

Validation walks the whole model and collects every problem before anything changes (opacus'
validators), so a refused wrap leaves the model exactly as it was; swaps then touch leaves only
(peft's ``inject_adapter``), keeping shared modules shared. What each module becomes is decided by
the layer-kind registry (:mod:`hypertune.layers.registry`), each kind with its own checks; what
each hyperparameter acts on is decided by its kind's ``claim`` (:mod:`hypertune.kinds`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.nn.utils import parametrize

from .augment.base import Augmentation
from .errors import WrapError
from .kinds.augmentation import AugmentationKind
from .kinds.base import Claim, HParam, Installation, WrapSites
from .kinds.dropout import DROPOUTS, is_dropout_site
from .layers import HyperDropout, HyperLayer
from .layers import registry
from .sites import Site, Target, as_targets, describe, is_exact_path, selects, sites_of

__all__ = ["DROPOUTS", "LayerPlan", "SurgeryPlan", "plan", "apply", "lifecycle", "set_submodule"]

_DISTRIBUTED = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")

# Modules that read their children's weights without calling them (so a hyper-layer's forward
# would never run and its Θ never learn): nn.MultiheadAttention, and torchvision's Swin window
# attention, which passes qkv.weight / proj.weight to a functional kernel. Matched by class name
# so torchvision need not be imported. Their children stay w₀, named in the wrap notice.
FUNCTIONAL_WEIGHT_USERS = {"ShiftedWindowAttention", "ShiftedWindowAttentionV2", "ShiftedWindowAttention3d"}


# timm's BEiT and EVA attention with a q/v bias: ``F.linear(x, self.qkv.weight, cat(q_bias, 0, v_bias))``
# (their ``qkv_bias_separate`` variant calls ``self.qkv`` and is tuned as usual).
_QKV_BIAS_ATTENTION = {("timm.models.beit", "Attention"), ("timm.models.eva", "EvaAttention")}


def uses_weights_functionally(module: nn.Module) -> bool:
    """Whether ``module`` reads every child's weights without calling the child."""
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__ in FUNCTIONAL_WEIGHT_USERS


# State-space and linear-attention mixers (Mamba, Mamba-2, Jamba, Bamba, Zamba, Falcon-Mamba,
# Nemotron-H in transformers; mamba_ssm's Mamba; Qwen3-Next's gated DeltaNet) pass their causal
# conv's weight to a scan kernel or its reference code; the Mamba ones also x_proj, dt_proj and
# out_proj (fused kernels), and on CPU dt_proj through ``self.dt_proj.weight @ ...``.
_MIXER_FUNCTIONAL = ("conv1d", "x_proj", "dt_proj", "out_proj")


def children_used_functionally(module: nn.Module) -> tuple[str, ...]:
    """The children whose weights ``module`` reads without calling them (its other children are
    called as usual)."""
    cls = type(module)
    if (cls.__module__, cls.__name__) in _QKV_BIAS_ATTENTION and getattr(module, "q_bias", None) is not None:
        return () if getattr(module, "qkv_bias_separate", False) else ("qkv",)
    if isinstance(getattr(module, "conv1d", None), nn.Conv1d):
        name = cls.__name__
        if name.endswith("Mixer") or "Mamba" in name:
            return tuple(c for c in _MIXER_FUNCTIONAL if isinstance(getattr(module, c, None), nn.Module))
        if name.endswith("DeltaNet"):
            return ("conv1d",)
    return ()


def _functional_owner(path: str, functional: list[str]) -> str | None:
    """The module that reads ``path``'s weights without calling it, if any. ``functional`` holds
    modules that do so for all their descendants, and single children marked ``"path/"``."""
    if path + "/" in functional:
        return path.rpartition(".")[0]
    return next((a for a in functional if not a.endswith("/") and _inside(path, [a])), None)


def _inside(path: str, parents: list[str]) -> bool:
    return any(path.startswith(a + ".") or (a == "" and path) for a in parents)


def lifecycle(spec: HParam | Augmentation) -> Any:
    """The object whose claim/install a spec's kind runs: the spec itself, or an adapter."""
    return AugmentationKind(spec) if isinstance(spec, Augmentation) else spec


def _weight_bearing(module: nn.Module) -> bool:
    """Holds a matrix or filter of its own (norms' 1-d scales are not counted)."""
    if parametrize.is_parametrized(module, "weight"):
        return True
    return any(_is_matrix(p) for p in module.parameters(recurse=False))


# Why a frozen module stays w₀; like "excluded", the user's own choice, so the wrap notice skips it.
FROZEN = "frozen (requires_grad=False): its weights do not train, so they have no response"


def _frozen(module: nn.Module) -> bool:
    """Its weight matrices (a parametrization's originals too) are all frozen. A hyper-layer there
    would learn a response that training never follows (w₀ cannot move), and λ's gradient would
    count it: a frozen backbone under a trained head stays w₀."""
    matrices = [p for p in module.parameters() if _is_matrix(p)]
    return bool(matrices) and not any(p.requires_grad for p in matrices)


def _is_matrix(p: nn.Parameter) -> bool:
    return isinstance(p, nn.parameter.UninitializedParameter) or p.dim() >= 2


@dataclass
class LayerPlan:
    """One module that becomes a hyper-layer of ``kind``; ``tied_to`` indexes the plan entry
    whose weight Parameter it shares (that entry owns the one response)."""

    site: Site
    kind: type[HyperLayer]
    modulated_dim: int | None = None
    tied_to: int | None = None


@dataclass
class SurgeryPlan:
    """What ``apply`` will do; built by ``plan`` only when the model passed validation."""

    layer_plans: list[LayerPlan] = field(default_factory=list)
    # spec name -> its claim, and the object that claimed (the spec, or an adapter)
    claims: dict[str, Claim] = field(default_factory=dict)
    kinds: dict[str, Any] = field(default_factory=dict)
    # tuned value name -> its spec (what λ holds)
    specs: dict[str, HParam] = field(default_factory=dict)
    # weight-bearing modules left as w₀ -> why
    untuned: dict[str, str] = field(default_factory=dict)

    @property
    def layers(self) -> list[Site]:
        return [lp.site for lp in self.layer_plans]


def _choose_layers(
    sites: list[Site], explicit: tuple | None, exclude: tuple, problems: list[str], untuned: dict[str, str]
) -> list[LayerPlan]:
    """The modules that become hyper-layers, each with its kind; refusals go to ``problems`` and
    weight-bearing modules left as w₀ to ``untuned`` (path -> why)."""
    functional = [s.path for s in sites if uses_weights_functionally(s.module)]
    functional += [f"{s.path}.{c}/" if s.path else f"{c}/" for s in sites for c in children_used_functionally(s.module)]
    matched: set[int] = set()
    chosen: list[LayerPlan] = []
    for site in sites:
        if isinstance(site.module, parametrize.ParametrizationList):
            continue  # a parametrized module's internals: the module itself is the site
        named = _selected(site, explicit, exclude, matched, untuned)
        if named is None:
            continue
        kind = _layer_kind(site, named, functional, sites, problems, untuned)
        if kind is not None:
            chosen.append(LayerPlan(site, kind))
    if explicit is not None:
        for i, sel in enumerate(explicit):
            if i not in matched:
                problems.append(f"targets entry {sel!r} matches no module: check the module paths")
    return chosen


def _selected(
    site: Site, explicit: tuple | None, exclude: tuple, matched: set[int], untuned: dict[str, str]
) -> bool | None:
    """None: targets/exclude leave the module out; else whether targets name it exactly.

    A broad selection ("enc.*", nn.Linear) also meets containers, activations, norms and
    dropouts: they keep training as w₀. A module named exactly is meant, so it is checked and
    refused if it cannot become a hyper-layer.
    """
    bearing = _weight_bearing(site.module)
    if selects(site, exclude):
        if bearing:
            untuned[site.path] = "excluded"
        return None
    if explicit is None:
        return False
    hits = [i for i, sel in enumerate(explicit) if selects(site, (sel,))]
    if not hits:
        if bearing:
            untuned[site.path] = "not selected by targets"
        return None
    matched.update(hits)
    return any(is_exact_path(explicit[i]) for i in hits)


def _layer_kind(
    site: Site, named: bool, functional: list[str], sites: list[Site], problems: list[str],
    untuned: dict[str, str],
) -> type[HyperLayer] | None:
    """The kind ``site`` becomes, after the kind's own checks; None (with a reason) if none."""
    path, module = site.path, site.module
    bearing = _weight_bearing(module)
    found = registry.match(module)
    parent = _functional_owner(path, functional)
    if parent is not None:
        if named and found is not None:
            owner = type(sites_at(sites, parent)).__name__
            problems.append(
                f"{describe(path, module)} belongs to {owner} '{parent or '<root>'}', which uses its "
                "weights without calling it: remove it from targets"
            )
        elif bearing:
            untuned[path] = f"its weights are used functionally by '{parent or '<root>'}'"
        return None
    if bearing and _frozen(module):
        if named:
            problems.append(
                f"{describe(path, module)} was selected by targets, but its weights are frozen "
                "(requires_grad=False), so they cannot respond to the hyperparameters: remove it from "
                "targets, or unfreeze it before wrapping"
            )
        else:
            untuned[path] = FROZEN
        return None
    if found is None:
        if uses_weights_functionally(module):
            if bearing:
                untuned[path] = "attention computed from its weights functionally"
        elif named and not list(module.children()) and not is_dropout_site(module):
            problems.append(
                f"{describe(path, module)} was selected by targets (by its exact path) but no layer "
                f"kind handles {type(module).__name__}: register one with hypertune.register_layer_kind, "
                "or remove it from targets"
            )
        elif bearing and list(module.children()):
            own = [n for n, p in module.named_parameters(recurse=False) if _is_matrix(p)]
            untuned[path] = f"holds {', '.join(own) or 'weights'} used directly by its forward"
        elif bearing:
            untuned[path] = f"no layer kind handles {type(module).__name__} (hypertune.register_layer_kind)"
        return None
    if found.kind is None:
        if named:
            problems.append(f"{describe(path, module)} was selected by targets but is a {found.reason}")
        elif bearing:
            untuned[path] = found.reason
        return None
    reasons = found.kind.check(module)
    problems.extend(f"{describe(path, module)} {r}" for r in reasons)
    return None if reasons else found.kind


def sites_at(sites: list[Site], path: str) -> nn.Module:
    return next(s.module for s in sites if path in s.paths)


def _tie(layers: list[LayerPlan], problems: list[str]) -> None:
    """Give layers sharing one weight Parameter one response (the first is its owner)."""
    groups: dict[int, list[int]] = {}
    for i, lp in enumerate(layers):
        w = lp.site.module._parameters.get("weight")
        if w is not None:
            groups.setdefault(id(w), []).append(i)
    for members in groups.values():
        if len(members) < 2:
            continue
        kinds = [layers[i].kind for i in members]
        common = [d for d in kinds[0].modulated_dims if all(d in k.modulated_dims for k in kinds)]
        if not common:
            names = ", ".join(describe(layers[i].site.path, layers[i].site.module) for i in members)
            problems.append(
                f"{names} share one weight, but their layer kinds cannot share one response: add all "
                "but one to exclude"
            )
            continue
        shape = layers[members[0]].site.module.weight.shape
        dim = min(common, key=lambda d: shape[d])  # the smaller modulation is the cheaper one
        for n, i in enumerate(members):
            layers[i].modulated_dim = dim
            layers[i].tied_to = members[0] if n else None


def plan(
    model: nn.Module,
    specs: dict[str, HParam | Augmentation],
    targets: Sequence[Target | nn.Module] | None = None,
    exclude: Sequence[Target | nn.Module] | None = None,
) -> SurgeryPlan:
    """Validate ``model`` against ``specs``; return the plan or raise one WrapError listing all."""
    if type(model).__name__ in _DISTRIBUTED:
        raise WrapError(
            [
                f"the model is wrapped in {type(model).__name__}: call HyperModel.wrap on the plain "
                "module first (model.module), then build DDP from the HyperModel with "
                "hypertune.distributed.prepare_ddp(hyper_model, **ddp_kwargs) (one process per GPU; "
                "nn.DataParallel is not supported)"
            ]
        )
    problems: list[str] = []
    explicit = as_targets(targets, "HyperModel.wrap: targets", modules_allowed=True)
    excluded = as_targets(exclude, "HyperModel.wrap: exclude", modules_allowed=True) or ()
    sites = sites_of(model)
    for site in sites:
        if isinstance(site.module, (HyperLayer, HyperDropout)):
            problems.append(
                f"{describe(site.path, site.module)} is already a hyper-module: the model was wrapped "
                "before; use the existing HyperModel or wrap the original model"
            )
    if problems:
        raise WrapError(problems)

    result = SurgeryPlan()
    result.layer_plans = _choose_layers(sites, explicit, excluded, problems, result.untuned)
    _tie(result.layer_plans, problems)
    if not result.layer_plans:
        problems.append(
            "no module can become a hyper-layer (nn.Linear, nn.Conv1d/2d/3d, nn.Embedding, nn.LSTM or a "
            "registered layer kind), so no weights could respond to the hyperparameters: check targets/exclude"
        )
    view = WrapSites(sites, result.layers, problems)
    ordered = sorted(specs.items(), key=lambda item: lifecycle(item[1]).claim_order())
    claims: dict[str, Claim] = {}
    for name, spec in ordered:
        kind = lifecycle(spec)
        claims[name] = kind.claim(name, view)
        result.kinds[name] = kind
    # λ's order (checkpoints store λ by position): dropout rates in claim order, then the rest
    # in the user's order
    first = [n for n in claims if getattr(specs[n], "leads_lambda", False)]
    for name in first + [n for n in specs if n in claims and n not in first]:
        result.claims[name] = claims[name]
        result.specs.update(claims[name].values)
    if problems:
        raise WrapError(problems)
    return result


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def apply(model: nn.Module, surgery: SurgeryPlan, num_hyper: int) -> Installation:
    """Swap the planned layers in place, then install every spec; returns what was installed
    (its ``root`` is the possibly new top module)."""
    into = Installation(model)
    made: list[HyperLayer] = []
    for lp in surgery.layer_plans:
        tied = made[lp.tied_to] if lp.tied_to is not None else None
        layer = lp.kind.from_module(lp.site.module, num_hyper, lp.site.path, modulated_dim=lp.modulated_dim, tied_to=tied)
        made.append(layer)
        into.replace(lp.site, layer)
    for name, claim in surgery.claims.items():
        surgery.kinds[name].install(name, claim, into)
    _switch_off_fast_paths(into)
    return into


class _RestoreAttribute:
    """A hook-handle-like undo for an attribute surgery set: ``remove()`` puts the old value back."""

    def __init__(self, module: nn.Module, name: str, value: Any) -> None:
        self.module, self.name, self.value = module, name, value

    def remove(self) -> None:
        setattr(self.module, self.name, self.value)


def _no_op_pre_hook(module: nn.Module, args: Any) -> None:
    return None


def _switch_off_fast_paths(into: Installation) -> None:
    """Keep torch's fused Transformer inference paths off modules that hold hyper-layers.

    In eval mode, when no weight needs a gradient (inference, and every λ step, which freezes the
    weights), ``nn.TransformerEncoderLayer`` runs one fused kernel that reads ``linear1`` and
    ``linear2``'s weights directly and never calls their forwards: Θ is ignored and λ gets no
    gradient through the layer (the λ step even fails when nothing else is tuned). Any forward
    pre-hook on the layer is torch's own reason to take the ordinary path; ``nn.TransformerEncoder``
    would also turn a padded batch into a nested tensor, which hyper-layers cannot take. Both
    are undone by ``unwrap``.
    """
    for module in into.root.modules():
        if not any(isinstance(m, HyperLayer) for m in module.modules()):
            continue
        if isinstance(module, nn.TransformerEncoderLayer):
            into.hooks.append(module.register_forward_pre_hook(_no_op_pre_hook))
        elif isinstance(module, nn.TransformerEncoder) and getattr(module, "use_nested_tensor", False):
            into.hooks.append(_RestoreAttribute(module, "use_nested_tensor", True))
            module.use_nested_tensor = False
