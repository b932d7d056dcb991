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
from .model import HyperModel
from .optim import DeltaSTNOptimizer, StepResult
from . import checkpoint, distributed  # noqa: E402  (they import the optimizer)
from .schedule import Schedule, ScheduleReplayer  # noqa: E402
from .specs import (
    ActivationRegularization,
    DropConnect,
    DropoutRate,
    EmbeddingDropout,
    HParam,
    InputDropout,
    TemporalActivationRegularization,
    VariationalDropout,
    WeightDecay,
)

__version__ = "0.1.0"

__all__ = [
    "HyperModel",
    "DeltaSTNOptimizer",
    "StepResult",
    "HParam",
    "DropoutRate",
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
