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


def step_bar(total: int, initial: int = 0, desc: str = "train"):
    """A terminal progress bar over training steps, with rate and ETA (tqdm, on stderr).

    Drawn only when stderr is a terminal (``disable=None``): logs and CI output keep the one-line-per-epoch
    messages alone.  Call ``update(1)`` per step, ``set_postfix(loss=...)`` as it goes and ``close()`` at the end.
    """
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=None, leave=False, dynamic_ncols=True)
