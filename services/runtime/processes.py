"""Child processes that must not outlive the process that started them."""

from __future__ import annotations

import contextlib
import ctypes
import signal
import sys
from typing import Any

_PR_SET_PDEATHSIG = 1

_LIBC: Any = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _LIBC = ctypes.CDLL(None, use_errno=True)


def die_with_parent() -> None:
    """``preexec_fn``: if the parent dies without stopping the child (SIGKILL, a crash), the
    kernel sends the child SIGTERM. Linux only; elsewhere a no-op."""
    if _LIBC is not None:
        with contextlib.suppress(Exception):
            _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
