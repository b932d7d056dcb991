"""Errors raised by hypertune.

Every error says what is wrong and what to do about it, so a user never has to read the
library's source to recover.
"""

from __future__ import annotations

from collections.abc import Iterable


def add_note(err: BaseException, note: str) -> None:
    """Attach ``note`` to an error the user's code raised (Python 3.11+; dropped on 3.10, where the
    error itself still reaches the user)."""
    if hasattr(err, "add_note"):
        err.add_note(note)


class HyperTuneError(Exception):
    """Base class: catch this to catch anything hypertune refuses."""


class SpecError(HyperTuneError, ValueError):
    """A hyperparameter spec that cannot describe a valid search space."""


class WrapError(HyperTuneError, ValueError):
    """A model that cannot be wrapped as asked; lists every problem at once."""

    def __init__(self, problems: Iterable[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(
            f"HyperModel.wrap found {len(self.problems)} problem(s); the model was not changed:\n{lines}"
        )


class PerturbationError(HyperTuneError, RuntimeError):
    """A hyper-layer saw a batch that does not match the perturbation it was given."""


class NonFiniteLossError(HyperTuneError, FloatingPointError):
    """A step produced a NaN/inf loss or gradient and was refused before any update."""


class StateDictError(HyperTuneError, ValueError):
    """A state dict from another layout, mode or model."""


# How to turn activation checkpointing off, for the errors that meet it: its recomputation runs
# during backward, outside the HyperModel's forward (no per-example rates, no Δ-STN tangents).
CHECKPOINTING_FIX = (
    "turn checkpointing off: model.gradient_checkpointing_disable() (Hugging Face; "
    "TrainingArguments(gradient_checkpointing=False) with the Trainer), model.set_grad_checkpointing(False) "
    "(timm), or leave torch.utils.checkpoint out of the forward"
)
