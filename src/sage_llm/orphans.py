"""Child processes that do not outlive the process that started them.

The benchmarks and ``sage-llm launch`` start engines, gateways and peer routers in
sessions of their own (so that a terminal's Ctrl-C reaches only the parent, which stops
them in order). Were the parent killed (SIGKILL, a crash, a SIGTERM before its handler
is installed), they would run on, re-parented to init. :func:`dies_with_parent` runs a
command so that the kernel sends it SIGTERM when its parent dies (Linux's parent-death
signal); elsewhere the command runs as it is.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence

__all__ = ["dies_with_parent"]

_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(143)  # the parent died before the line above\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def dies_with_parent(argv: Sequence[str], *, path: str | None = None) -> list[str]:
    """``argv`` run so that the kernel sends it SIGTERM when this process dies (Linux's
    parent-death signal, set by a small Python step that then executes ``argv`` in the
    same process); ``argv`` as it is elsewhere. A signal handler would not do: SIGKILL
    and a crash run none, and SIGTERM would have to reach the benchmark's own loop.

    ``argv[0]`` is looked up on ``path`` (the ``PATH`` the child gets; this process's by
    default) and run by its full name. A program that is not there, or not executable,
    is left as it is, so that starting it fails in the parent as it would without this
    (``FileNotFoundError``, ``PermissionError``), not in the child."""
    if not argv or not sys.platform.startswith("linux"):
        return list(argv)
    program = shutil.which(argv[0], path=path if path is not None else os.environ.get("PATH"))
    if program is None:
        return list(argv)
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), program, *argv[1:]]
