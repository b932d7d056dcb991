"""hypertune: tune regularization hyperparameters online, inside one training run.

Wrap a model, swap its optimizer, keep the loop::

    model = hypertune.HyperModel.wrap(model, hparams={"dropout": hypertune.DropoutRate()})
    opt = hypertune.DeltaSTNOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.01))
"""

from .augment import Augmentation, ColorJitter, Cutout, RandomAffine
from .context import Perturbation, hparam
from .errors import (
    HyperTuneError,
    NonFiniteLossError,
    PerturbationError,
    SpecError,
    StateDictError,
    WrapError,
)
from .global_response import GlobalBestResponse
from .hyperparameters import HyperParameters
from .kinds import register_hparam_kind
from .layers import HyperLayer, register_layer_kind
from .model import Coverage, HyperModel
from .notices import WrapNotice
from .optim import DeltaSTNOptimizer, StepResult
from . import checkpoint, distributed  # noqa: E402  (they import the optimizer)
from .schedule import Schedule, ScheduleReplayer  # noqa: E402
from .specs import (
    ActivationRegularization,
    DropConnect,
    DropoutRate,
    DropPathRate,
    EmbeddingDropout,
    HParam,
    InputDropout,
    hparam_from_json,
    TemporalActivationRegularization,
    VariationalDropout,
    WeightDecay,
)

__version__ = "0.1.0"

__all__ = [
    "HyperModel",
    "Coverage",
    "HyperLayer",
    "register_layer_kind",
    "register_hparam_kind",
    "WrapNotice",
    "DeltaSTNOptimizer",
    "StepResult",
    "HParam",
    "hparam_from_json",
    "DropoutRate",
    "DropPathRate",
    "InputDropout",
    "WeightDecay",
    "DropConnect",
    "VariationalDropout",
    "EmbeddingDropout",
    "ActivationRegularization",
    "TemporalActivationRegularization",
    "Augmentation",
    "Cutout",
    "ColorJitter",
    "RandomAffine",
    "HyperParameters",
    "Perturbation",
    "hparam",
    "HyperTuneError",
    "SpecError",
    "WrapError",
    "PerturbationError",
    "NonFiniteLossError",
    "StateDictError",
    "Schedule",
    "ScheduleReplayer",
    "GlobalBestResponse",
    "checkpoint",
    "distributed",
    "__version__",
]
