"""User-facing input errors, and a concise report of them when they end a program.

Bad input (a missing folder, a corrupt file, an unknown mode...) raises an :class:`InputError` whose message
names the file or option and the problem. When such an error ends the program, even wrapped in other
exceptions (MONAI's config parser wraps errors raised while evaluating ``$`` expressions), the excepthook
installed by :func:`install_excepthook` prints just that message, not a traceback from deep inside torch or
MONAI. Set ``SEQINV_TRACEBACK=1`` to see the full traceback.
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = ["InputError", "find_input_error", "install_excepthook"]


class InputError(ValueError):
    """Invalid user input; the message says which file/option and what is wrong."""


def find_input_error(exc: BaseException | None) -> InputError | None:
    """The first :class:`InputError` in ``exc``'s cause/context chain (``None`` if there is none)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, InputError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


_previous_hook = sys.excepthook


def _hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    found = find_input_error(exc)
    if found is None or os.environ.get("SEQINV_TRACEBACK"):
        _previous_hook(exc_type, exc, tb)
        return
    print(f"error: {found}", file=sys.stderr)
    print("(set SEQINV_TRACEBACK=1 to see the full traceback)", file=sys.stderr)


def install_excepthook() -> None:
    """Report uncaught :class:`InputError` s as one message (idempotent)."""
    if sys.excepthook is not _hook:
        sys.excepthook = _hook
