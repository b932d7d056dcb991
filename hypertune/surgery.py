"""Module surgery: which modules become hyper-layers, validated first, swapped in place, undone.

Validation walks the whole model and collects every problem before anything changes (opacus'
validators), so a refused wrap leaves the model exactly as it was; swaps then touch leaves only
(peft's ``inject_adapter``), keeping shared modules shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn
from torch.nn.utils import parametrize

from .augment.base import Augmentation
from .errors import WrapError
from .layers.base import carry_hooks
from .layers import (
    HyperConv1d,
    HyperConv2d,
    HyperConv3d,
    HyperDropout,
    HyperEmbedding,
    HyperLayer,
    HyperLinear,
    HyperLSTM,
)
from .specs import (
    ActivationRegularization,
    DropConnect,
    DropoutRate,
    EmbeddingDropout,
    HParam,
    InputDropout,
    Target,
    VariationalDropout,
    WeightDecay,
)

HYPER_LAYERS: dict[type[nn.Module], type[HyperLayer]] = {
    nn.Linear: HyperLinear,
    nn.Conv1d: HyperConv1d,
    nn.Conv2d: HyperConv2d,
    nn.Conv3d: HyperConv3d,
    nn.Embedding: HyperEmbedding,
    nn.LSTM: HyperLSTM,
}
# Dropout type -> number of trailing axes that share one mask entry.
DROPOUTS: dict[type[nn.Module], int] = {
    nn.Dropout: 0,
    nn.Dropout1d: 1,
    nn.Dropout2d: 2,
    nn.Dropout3d: 3,
}
_DISTRIBUTED = ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")


def _matches(path: str, module: nn.Module, selectors: Sequence[Target]) -> bool:
    for sel in selectors:
        if isinstance(sel, str):
            if fnmatchcase(path, sel):
                return True
        elif isinstance(module, sel):
            return True
    return False


def _is_exact_path(selector: Target) -> bool:
    return isinstance(selector, str) and not any(c in selector for c in "*?[")


def _describe(path: str, module: nn.Module) -> str:
    return f"'{path or '<root>'}' ({type(module).__name__})"


@dataclass
class Site:
    """One module object and every path it is reachable at (shared modules have several)."""

    module: nn.Module
    paths: list[str]

    @property
    def path(self) -> str:
        return self.paths[0]


@dataclass
class SurgeryPlan:
    """What ``apply`` will do; built by ``plan`` only when the model passed validation."""

    layers: list[Site] = field(default_factory=list)
    dropouts: list[tuple[Site, str]] = field(default_factory=list)
    specs: dict[str, HParam] = field(default_factory=dict)
    # hyperparameter name -> paths of modules whose weights it penalises
    weight_decay: dict[str, list[str]] = field(default_factory=dict)
    input_dropout: str | None = None
    augmentations: list[tuple[str, Augmentation]] = field(default_factory=list)
    # (hyper-layer path, attribute, hyperparameter name): weight regularizers read in the layer
    layer_regularizers: list[tuple[str, str, str]] = field(default_factory=list)
    # hyperparameter name -> paths of modules whose outputs it penalises (AR/TAR)
    activation_penalties: dict[str, list[str]] = field(default_factory=dict)


def _sites(model: nn.Module) -> list[Site]:
    by_id: dict[int, Site] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        site = by_id.get(id(module))
        if site is None:
            by_id[id(module)] = Site(module, [path])
        else:
            site.paths.append(path)
    return list(by_id.values())


# Modules that read their children's weights without calling them (so a hyper-layer's forward
# would never run and its Θ never learn): nn.MultiheadAttention, and torchvision's Swin window
# attention, which passes qkv.weight / proj.weight to a functional kernel. Matched by class name
# so torchvision need not be imported.
_FUNCTIONAL_WEIGHT_USERS = ("ShiftedWindowAttention", "ShiftedWindowAttentionV2")


def _uses_weights_functionally(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__ in _FUNCTIONAL_WEIGHT_USERS


def _inside_attention(path: str, attention_paths: list[str]) -> bool:
    return any(path.startswith(a + ".") or (a == "" and path) for a in attention_paths)


def plan(
    model: nn.Module,
    specs: dict[str, HParam | Augmentation],
    targets: Sequence[Target] | None = None,
    exclude: Sequence[Target] | None = None,
) -> SurgeryPlan:
    """Validate ``model`` against ``specs``; return the plan or raise one WrapError listing all."""
    if type(model).__name__ in _DISTRIBUTED:
        raise WrapError(
            [
                f"the model is wrapped in {type(model).__name__}: call HyperModel.wrap on the plain "
                "module first, then wrap the HyperModel in DistributedDataParallel"
            ]
        )
    problems: list[str] = []
    sites = _sites(model)
    exclude = tuple(exclude or ())
    explicit = tuple(targets) if targets is not None else None
    attention = [p for p, m in model.named_modules() if _uses_weights_functionally(m)]
    result = SurgeryPlan()

    for site in sites:
        if isinstance(site.module, (HyperLayer, HyperDropout)):
            problems.append(
                f"{_describe(site.path, site.module)} is already a hyper-module: the model was wrapped "
                "before; use the existing HyperModel or wrap the original model"
            )
    if problems:
        raise WrapError(problems)

    # -- hyper-layers ----------------------------------------------------------------------
    matched_selectors: set[int] = set()
    layer_types = tuple(HYPER_LAYERS)
    for site in sites:
        path, module = site.path, site.module
        if any(_matches(p, module, exclude) for p in site.paths):
            continue
        if explicit is not None:
            hits = [i for i, sel in enumerate(explicit) if any(_matches(p, module, (sel,)) for p in site.paths)]
            if not hits:
                continue
            matched_selectors.update(hits)
            # A broad selection ("enc.*", nn.Linear) also meets containers, activations, norms,
            # dropouts and MultiheadAttention's projections: they keep training as w₀ (dropouts
            # are governed by DropoutRate specs). A module named by its exact path is meant,
            # so it is checked below and refused if it cannot become a hyper-layer.
            named = any(_is_exact_path(explicit[i]) for i in hits)
            if not named and (not isinstance(module, layer_types) or _inside_attention(path, attention)):
                continue
            if named and not isinstance(module, layer_types):
                if list(module.children()) or type(module) in DROPOUTS:
                    continue
                problems.append(
                    f"{_describe(path, module)} was selected by targets (by its exact path) but only "
                    f"{', '.join(t.__name__ for t in HYPER_LAYERS)} can become hyper-layers: remove it "
                    "from targets"
                )
                continue
        elif not isinstance(module, layer_types) or _inside_attention(path, attention):
            # MultiheadAttention reads its projections' weights without calling them; they keep
            # training as ordinary w₀ parameters.
            continue
        if _inside_attention(path, attention):
            problems.append(
                f"{_describe(path, module)} belongs to nn.MultiheadAttention, which uses its weights "
                "without calling it: remove it from targets"
            )
            continue
        if isinstance(module, nn.modules.lazy.LazyModuleMixin) and module.has_uninitialized_params():
            problems.append(
                f"{_describe(path, module)} has uninitialized lazy parameters: run one forward pass "
                "before wrapping"
            )
            continue
        if parametrize.is_parametrized(module):
            problems.append(
                f"{_describe(path, module)} has a parametrization (weight is computed, not a Parameter): "
                "remove the parametrization or add the module to exclude"
            )
            continue
        if type(module) not in HYPER_LAYERS:
            if explicit is not None:
                problems.append(
                    f"{_describe(path, module)} was selected by targets but only "
                    f"{', '.join(t.__name__ for t in HYPER_LAYERS)} (exact types, whose forward "
                    "hypertune knows) can become hyper-layers: narrow targets or add it to exclude"
                )
            # A subclass may override forward; by default it keeps training as plain w₀.
            continue
        if isinstance(module, nn.Embedding) and module.max_norm is not None:
            problems.append(
                f"{_describe(path, module)} uses max_norm, which rewrites weights during forward: set "
                "max_norm=None or add the module to exclude"
            )
            continue
        if isinstance(module, nn.LSTM):
            # its weights are weight_ih_l0, weight_hh_l0, ...: no single `weight`
            if module.proj_size > 0:
                problems.append(
                    f"{_describe(path, module)} uses proj_size={module.proj_size}, which HyperLSTM does "
                    "not modulate: set proj_size=0 or add the module to exclude"
                )
                continue
            result.layers.append(site)
            continue
        if not isinstance(getattr(module, "weight", None), nn.Parameter):
            problems.append(
                f"{_describe(path, module)} has no weight Parameter: add it to exclude"
            )
            continue
        result.layers.append(site)
    if explicit is not None:
        for i, sel in enumerate(explicit):
            if i not in matched_selectors:
                problems.append(f"targets entry {sel!r} matches no module: check the module paths")
    if not result.layers:
        problems.append(
            "no module can become a hyper-layer (nn.Linear, nn.Conv1d/2d/3d, nn.Embedding or nn.LSTM), so no "
            "weights could respond to the hyperparameters: check targets/exclude"
        )

    # -- dropout sites -----------------------------------------------------------------------
    dropout_sites = [s for s in sites if type(s.module) in DROPOUTS]
    claimed: dict[int, str] = {}
    default_specs = [n for n, s in specs.items() if isinstance(s, DropoutRate) and s.targets is None]
    if len(default_specs) > 1:
        problems.append(
            f"DropoutRate specs {default_specs} both claim every dropout module: give all but one "
            "explicit targets"
        )
    explicit_dropout_specs = [
        (n, s) for n, s in specs.items() if isinstance(s, DropoutRate) and s.targets is not None
    ]
    for name, spec in explicit_dropout_specs + [(n, specs[n]) for n in default_specs[:1]]:
        chosen: list[Site] = []
        if spec.targets is None:
            chosen = [s for s in dropout_sites if id(s.module) not in claimed]
        else:
            for site in sites:
                if not any(_matches(p, site.module, spec.targets) for p in site.paths):
                    continue
                if type(site.module) in DROPOUTS:
                    chosen.append(site)
                elif isinstance(site.module, (nn.AlphaDropout, nn.FeatureAlphaDropout)):
                    problems.append(
                        f"hparams[{name!r}] selects {_describe(site.path, site.module)}: alpha dropout "
                        "is not supported; target nn.Dropout/Dropout1d/2d/3d modules only"
                    )
                elif not list(site.module.children()):
                    problems.append(
                        f"hparams[{name!r}] selects {_describe(site.path, site.module)}, which is not a "
                        "dropout module: narrow its targets"
                    )
        if not chosen:
            where = [s.path for s in dropout_sites]
            problems.append(
                f"hparams[{name!r}] (DropoutRate) matches no dropout module; the model's dropout "
                f"modules are {where or 'none'}: add nn.Dropout modules or fix targets"
            )
            continue
        for site in chosen:
            if id(site.module) in claimed:
                problems.append(
                    f"{_describe(site.path, site.module)} is claimed by both hparams[{claimed[id(site.module)]!r}] "
                    f"and hparams[{name!r}]: give each dropout module one spec"
                )
                continue
            claimed[id(site.module)] = name
            hname = f"{name}:{site.path}" if spec.per_site else name
            result.dropouts.append((site, hname))
            result.specs[hname] = spec

    # -- other specs ---------------------------------------------------------------------------
    for name, spec in specs.items():
        if isinstance(spec, DropoutRate):
            continue
        if isinstance(spec, Augmentation):
            result.augmentations.append((name, spec))
            for sub, sub_spec in spec.hparams().items():
                result.specs[f"{name}:{sub}"] = sub_spec
            continue
        result.specs[name] = spec
        if isinstance(spec, InputDropout):
            result.input_dropout = name
        elif isinstance(spec, (DropConnect, EmbeddingDropout)):
            kind = type(spec).__name__
            allowed = [
                site
                for site in result.layers
                if isinstance(spec, DropConnect) or isinstance(site.module, nn.Embedding)
            ]
            if spec.targets is None:
                chosen = allowed
            else:
                chosen = [
                    site for site in allowed if any(_matches(p, site.module, spec.targets) for p in site.paths)
                ]
            if not chosen:
                what = "hyper-layer" if isinstance(spec, DropConnect) else "nn.Embedding hyper-layer"
                problems.append(
                    f"hparams[{name!r}] ({kind}) matches no {what}: check its targets"
                )
            attr = "dropconnect" if isinstance(spec, DropConnect) else "word_dropout"
            for site in chosen:
                _claim(result, problems, site, attr, name, f"gets {kind}", "give each layer one")
        elif isinstance(spec, VariationalDropout):
            attr = f"{spec.on}_dropout"
            lstms = [s for s in result.layers if isinstance(s.module, nn.LSTM)]
            if spec.targets is not None:
                lstms = [s for s in lstms if any(_matches(p, s.module, spec.targets) for p in s.paths)]
            chosen, refused = [], len(problems)
            for site in lstms:
                lstm = site.module
                if spec.on == "hidden" and lstm.num_layers < 2:
                    if spec.targets is not None:
                        problems.append(
                            f"hparams[{name!r}] (VariationalDropout, on='hidden') selects "
                            f"{_describe(site.path, lstm)}, which has one layer and so no hidden state "
                            "between layers: use on='input' or narrow targets"
                        )
                    continue
                if spec.on == "hidden" and lstm.dropout > 0:
                    problems.append(
                        f"{_describe(site.path, lstm)} already drops between layers (dropout={lstm.dropout}), "
                        f"which hparams[{name!r}] would replace: build the LSTM with dropout=0"
                    )
                    continue
                if _claim(
                    result, problems, site, attr, name,
                    f"gets on={spec.on!r} VariationalDropout", "give each LSTM one",
                ):
                    chosen.append(site)
            if not chosen and len(problems) == refused:
                problems.append(
                    f"hparams[{name!r}] (VariationalDropout, on={spec.on!r}) matches no nn.LSTM "
                    f"hyper-layer{' with two or more layers' if spec.on == 'hidden' else ''}: check its targets"
                )
        elif isinstance(spec, ActivationRegularization):
            assert spec.targets is not None
            paths = [
                s.path for s in sites if any(_matches(p, s.module, spec.targets) for p in s.paths)
            ]
            if not paths:
                problems.append(
                    f"hparams[{name!r}] ({type(spec).__name__}) targets {list(spec.targets)} match no "
                    "module: check the module paths"
                )
            result.activation_penalties[name] = paths
        elif isinstance(spec, WeightDecay):
            if spec.targets is None:
                result.weight_decay[name] = [s.path for s in result.layers]
                continue
            paths = [
                s.path
                for s in sites
                if any(_matches(p, s.module, spec.targets) for p in s.paths)
                and (
                    isinstance(getattr(s.module, "weight", None), nn.Parameter)
                    or (isinstance(s.module, nn.LSTM) and s in result.layers)
                )
            ]
            if not paths:
                problems.append(
                    f"hparams[{name!r}] (WeightDecay) targets {list(spec.targets)} match no module with "
                    "a weight: check the module paths or types"
                )
            result.weight_decay[name] = paths
    if problems:
        raise WrapError(problems)
    return result


def _claim(
    result: SurgeryPlan, problems: list[str], site: Site, attr: str, name: str, what: str, fix: str
) -> bool:
    """Give ``site``'s layer regularizer ``attr`` to hyperparameter ``name``, unless another has it."""
    taken = [n for p, a, n in result.layer_regularizers if p == site.path and a == attr]
    if taken:
        problems.append(
            f"{_describe(site.path, site.module)} {what} from both hparams[{taken[0]!r}] and "
            f"hparams[{name!r}]: {fix}"
        )
        return False
    result.layer_regularizers.append((site.path, attr, name))
    return True


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    setattr(parent, child, module)


def apply(model: nn.Module, surgery: SurgeryPlan, num_hyper: int) -> nn.Module:
    """Swap the planned leaves in place; returns the (possibly new) root."""
    root = model
    for site in surgery.layers:
        layer = HYPER_LAYERS[type(site.module)].from_module(site.module, num_hyper, site.path)
        for path in site.paths:
            if path == "":
                root = layer
            else:
                set_submodule(model, path, layer)
    for path, attr, hname in surgery.layer_regularizers:
        layer = root if path == "" else root.get_submodule(path)
        layer.__dict__[attr] = hname
    for site, hname in surgery.dropouts:
        module = site.module
        spec = surgery.specs[hname]
        locked = spec.locked_dim if isinstance(spec, DropoutRate) else None
        drop = HyperDropout(
            hname, type(module), DROPOUTS[type(module)], site.path, locked, getattr(module, "inplace", False)
        )
        drop.train(module.training)
        carry_hooks(module, drop)
        for path in site.paths:
            set_submodule(model, path, drop)
    return root
