"""Helpers shared by the test_retrieval_* modules (no tests here): small image collections on disk,
synthetic vector stores, and running Python snippets in a subprocess that a test can kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("red", "green", "blue")


def write_images(root: Path, n: int = 30, *, broken: int = 1, size: int = 40, start: int = 0) -> list[Path]:
    """`n` PNGs spread over the FOLDERS (one nested level deeper for every third), plus `broken` files
    with an image extension that are not images. Returns the readable paths, sorted."""
    rng = np.random.default_rng(start)
    paths = []
    for i in range(start, start + n):
        folder = root / FOLDERS[i % 3] / ("deep" if i % 3 == 0 and i % 2 else "")
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        pixels[..., i % 3] = 255  # a colour per folder, so folders differ
        path = folder / f"img{i:04d}.png"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    for j in range(broken):
        (root / FOLDERS[0] / f"broken{start + j}.png").write_bytes(b"this is not a png")
    return sorted(paths)


def vector_store(directory: Path, xb: np.ndarray, ids: np.ndarray | None = None):
    from retrieval.vectors import write_vectors

    ids = np.arange(len(xb), dtype=np.int64) * 7 + 3 if ids is None else ids
    directory.mkdir(parents=True, exist_ok=True)
    return write_vectors(directory, [(ids, xb)], len(ids), xb.shape[1])


def python_process(code: str, *, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Starts `python -c code` with the repository importable; stdout and stderr go to one pipe."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", code], env=full_env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def kill_when(process: subprocess.Popen, condition, timeout: float = 120.0) -> None:
    """SIGKILLs `process` as soon as `condition()` holds; fails if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            raise AssertionError(
                f"the process ended (rc {process.returncode}) before it could be killed:\n{process.stdout.read()}"
            )
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting to kill the process")
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
