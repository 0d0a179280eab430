"""Silencing FAISS's C-level writes to stdout, which Python's own redirections do not reach."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

__all__ = ["quiet_stdout"]


@contextlib.contextmanager
def quiet_stdout() -> Iterator[None]:
    """Silences C-level writes to stdout: FAISS's on-disk inverted lists printf a line on every load and
    merge, which would corrupt the output of `vlm search --json`."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
