"""`vlm serve` in a child process, for the tests that need a real server (browser, shutdown)."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index: Path, *args: str, timeout: float = 60) -> tuple[subprocess.Popen, str]:
    """`vlm serve INDEX ARGS` on a free port, once it answers /health: the process and its base URL;
    RuntimeError (with the server's output) when it exits or does not answer within `timeout` seconds."""
    port = free_port()
    # Output goes to a file, not a pipe nobody reads: a server that logs a lot would block on a full pipe.
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlm", "serve", str(index), "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return proc, url
        except OSError:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"vlm serve exited: {log.read().decode(errors='replace')}") from None
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"vlm serve did not answer /health within {timeout:.0f} s")
