"""Load on the search service from a second process on 127.0.0.1: text queries, bounded in count.

    .venv/bin/python bench/bench_service.py [--requests 2000] [--concurrency 8] [--model small]

Builds a small index of the digits (scikit-learn) with a random-weight model, starts `vlm serve` on a
free loopback port, sends the requests from this process with a thread pool, and prints median and
p99 latency, requests per second and the error count. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import vlm
from vlm.sample_data import DIGIT_NAMES, write_digits

QUERIES = [f"a handwritten {name}" for name in DIGIT_NAMES] + [f"the digit {d}" for d in range(10)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url + "/health", timeout=1)
            return
        except OSError:
            if proc.poll() is not None:
                raise SystemExit("vlm serve exited before answering")
            time.sleep(0.5)
    raise SystemExit("vlm serve did not start")


def _one(url: str, i: int) -> tuple[float, bool]:
    query = urllib.parse.urlencode({"text": QUERIES[i % len(QUERIES)], "k": 10})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(f"{url}/search?{query}", timeout=30) as response:
            ok = response.status == 200 and b"results" in response.read()
    except OSError:
        ok = False
    return time.perf_counter() - start, ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", default="small")
    args = parser.parse_args()
    from retrieval.build import BuildOptions, build_index
    from retrieval.embedding_job import EmbedOptions

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_digits(root / "digits")
        model = vlm.create_model(args.model).eval()
        model.save_pretrained(root / "model")
        options = BuildOptions(embed=EmbedOptions(progress=False))
        build_index(data.test.table, root / "index", model, options=options, model_source=str(root / "model"))
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        proc = subprocess.Popen([sys.executable, "-m", "vlm", "serve", str(root / "index"), "--port", str(port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            _wait(url, proc)
            for i in range(20):
                _one(url, i)
            start = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                results = list(pool.map(lambda i: _one(url, i), range(args.requests)))
            wall = time.perf_counter() - start
        finally:
            proc.terminate()
            proc.wait(10)
    latencies = sorted(t for t, _ in results)
    errors = sum(not ok for _, ok in results)
    p99 = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]
    print(f"{args.requests} text queries, {args.concurrency} concurrent, model {args.model}, index of {len(data.test.paths)} digits")
    print(f"median {1000 * statistics.median(latencies):.1f} ms  p99 {1000 * p99:.1f} ms  "
          f"{args.requests / wall:.0f} requests/s  errors {errors}")


if __name__ == "__main__":
    main()
