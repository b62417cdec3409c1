"""Progress reporting and cancellation without Qt.

Long work takes a ``progress`` callable ``(stage, fraction, message)`` and a ``cancel`` callable that
returns True when the user asked to stop.  The CLI draws a bar from it, the Slicer worker prints JSON
lines, tests record it.
"""
from __future__ import annotations

from typing import Callable, Optional

from .errors import Cancelled

ProgressCallback = Callable[[str, float, str], None]
CancelCheck = Callable[[], bool]


def no_progress(stage: str, fraction: float, message: str = "") -> None:
    """The default progress sink: does nothing."""


def check_cancel(cancel: Optional[CancelCheck]) -> None:
    """Raise :class:`Cancelled` when the caller asked to stop."""
    if cancel is not None and cancel():
        raise Cancelled("Cancelled by the user; no results were written.")
