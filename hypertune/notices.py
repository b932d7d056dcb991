"""One-line notices: things hypertune decided for the user that they should know about.

A notice is a :class:`WrapNotice` warning, so users can silence or escalate it with the
``warnings`` filters they already know (``warnings.simplefilter("error", WrapNotice)`` in tests).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence


class WrapNotice(UserWarning):
    """Something in the model is kept as it was (w₀, or a fixed rate) rather than tuned."""


def notice(message: str, stacklevel: int = 3) -> None:
    warnings.warn(message, WrapNotice, stacklevel=stacklevel)


def listing(items: Sequence[str], limit: int = 6) -> str:
    """``a, b, c and 4 more``: long lists stay on one line."""
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown} and {len(items) - limit} more"
