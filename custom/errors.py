"""User-facing input errors, and a concise report of them when they end a program.

Bad input (a missing folder, a corrupt file, an unknown mode...) raises an :class:`InputError` whose message
names the file or option and the problem. When such an error ends the program, even wrapped in other
exceptions (MONAI's config parser wraps errors raised while evaluating ``$`` expressions), the excepthook
installed by :func:`install_excepthook` prints just that message, not a traceback from deep inside torch or
MONAI. Set ``SEQINV_TRACEBACK=1`` to see the full traceback.

Nothing is installed on import. :func:`report_input_errors` (the first step of every bundle config's run list)
installs the hook only when the program being run is ``python -m monai.bundle`` (or ``torchrun -m monai.bundle``);
a program that uses a bundle through MONAI's Python API (``ConfigWorkflow``, ``create_workflow``) keeps its own
``sys.excepthook``. (The ``seqinv`` command catches these errors itself.)
"""

from __future__ import annotations

import os
import sys
from types import TracebackType

__all__ = ["InputError", "find_input_error", "install_excepthook", "report_input_errors"]


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
#: ``__main__`` module names of the programs whose uncaught input errors are reported in one line.
_COMMAND_LINE_MAINS: tuple[str, ...] = ("monai.bundle.__main__", "monai.bundle")


def _hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    found = find_input_error(exc)
    if found is None or os.environ.get("SEQINV_TRACEBACK"):
        _previous_hook(exc_type, exc, tb)
        return
    print(f"error: {found}", file=sys.stderr)
    print("(set SEQINV_TRACEBACK=1 to see the full traceback)", file=sys.stderr)


def install_excepthook() -> None:
    """Report uncaught :class:`InputError` s as one message (idempotent); other exceptions go to the hook that was
    installed before."""
    global _previous_hook
    if sys.excepthook is not _hook:
        _previous_hook = sys.excepthook
        sys.excepthook = _hook


def _main_program() -> str:
    """Module name of the program being run (``__main__.__spec__.name``; ``""`` for a script, ``-c`` or a REPL)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return str(getattr(spec, "name", "") or "")


def report_input_errors() -> bool:
    """Install :func:`install_excepthook` when this process is MONAI's bundle command line; return whether.

    A bundle config calls it first in its run list (``"$custom.errors.report_input_errors()"``), so
    ``python -m monai.bundle run ...`` ends on bad input with one line naming the file and the problem. When the
    bundle runs inside another program (MONAI's Python API, a notebook, a test) nothing changes: the caller gets
    the exception and keeps its own ``sys.excepthook``.
    """
    if _main_program() not in _COMMAND_LINE_MAINS:
        return False
    install_excepthook()
    return True
