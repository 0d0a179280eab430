"""Load on the search service from a second process on 127.0.0.1: text queries, quiet and under attack.

    .venv/bin/python bench/bench_service.py [--requests 2000] [--concurrency 8] [--model small]

Builds a small index of the digits (scikit-learn) with a random-weight model, starts `vlm serve` on a
free loopback port and sends the text queries from this process with a thread pool, twice: alone, then
while an attacker thread sends hostile filters (SQL injections, huge LIKE patterns, deep nesting),
deeply nested JSON and chunked 40 MiB uploads without a length. Prints median and p99 latency, requests
per second and the error count of the normal queries in both runs, the p99 ratio, and what the attacker
got back. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from servers import start_server  # noqa: E402

import vlm  # noqa: E402
from demo.sample_data import DIGIT_NAMES, write_digits  # noqa: E402

QUERIES = [f"a handwritten {name}" for name in DIGIT_NAMES] + [f"the digit {d}" for d in range(10)]
HOSTILE_FILTERS = [
    "1=1) UNION SELECT rowid FROM sqlite_master --",
    "length(randomblob(900000000)) > 0",
    "(SELECT count(*) FROM items a, items b, items c, items d) > 0",
    "label LIKE '" + "%_" * 240 + "'",
    "(" * 200 + "label = 'x'" + ")" * 200,
    " OR ".join(f"label LIKE '%{i}%{i}%{i}%'" for i in range(40)),
]


def _one(url: str, i: int) -> tuple[float, bool]:
    query = urllib.parse.urlencode({"text": QUERIES[i % len(QUERIES)], "k": 10})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(f"{url}/search?{query}", timeout=30) as response:
            ok = response.status == 200 and b"results" in response.read()
    except OSError:
        ok = False
    return time.perf_counter() - start, ok


def _attack(url: str, stop: threading.Event, answers: collections.Counter) -> None:
    """Sends hostile requests in a loop until `stop`; counts the status codes (or exceptions) it gets."""
    host, port = urllib.parse.urlsplit(url).netloc.split(":")
    i = 0
    while not stop.is_set():
        kind = i % 4
        try:
            if kind < 2:
                where = HOSTILE_FILTERS[i % len(HOSTILE_FILTERS)]
                query = urllib.parse.urlencode({"text": "a digit", "where": where})
                answers[_status(lambda: urllib.request.urlopen(f"{url}/search?{query}", timeout=60))] += 1
            elif kind == 2:
                body = b"[" * 100_000 + b"]" * 100_000
                request = urllib.request.Request(f"{url}/search", data=body, headers={"Content-Type": "application/json"})
                answers[_status(lambda: urllib.request.urlopen(request, timeout=60))] += 1
            else:
                answers[_chunked_upload(host, int(port), 40 << 20)] += 1
        except Exception as err:  # the attacker's own failures are counted, not raised
            answers[type(err).__name__] += 1
        i += 1


def _status(call) -> int:
    try:
        with call() as response:
            response.read()
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _chunked_upload(host: str, port: int, size: int) -> int | str:
    """A multipart upload of `size` random bytes sent chunked (no Content-Length); the status, or how it ended."""
    conn = http.client.HTTPConnection(host, port, timeout=60)
    boundary = "bench"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'.encode()
    chunk = os.urandom(1 << 16)
    body = [head] + [chunk] * (size // len(chunk))
    try:
        conn.request("POST", "/search", body=iter(body), encode_chunked=True,
                     headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        return conn.getresponse().status
    except (ConnectionError, http.client.HTTPException):  # the server cut the body at its limit
        return "cut"
    finally:
        conn.close()


def _run(url: str, requests: int, concurrency: int) -> tuple[list[float], int, float]:
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: _one(url, i), range(requests)))
    wall = time.perf_counter() - start
    return sorted(t for t, _ in results), sum(not ok for _, ok in results), wall


def _p99(latencies: list[float]) -> float:
    return latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]


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
        os.environ["OMP_NUM_THREADS"] = "1"
        proc, url = start_server(root / "index", timeout=120)
        try:
            for i in range(20):
                _one(url, i)
            quiet = _run(url, args.requests, args.concurrency)
            stop, answers = threading.Event(), collections.Counter()
            attacker = threading.Thread(target=_attack, args=(url, stop, answers))
            attacker.start()
            try:
                attacked = _run(url, args.requests, args.concurrency)
            finally:
                stop.set()
                attacker.join()
        finally:
            proc.terminate()
            proc.wait(10)
    print(f"{args.requests} text queries, {args.concurrency} concurrent, model {args.model}, "
          f"index of {len(data.test.paths)} digits")
    for name, (latencies, errors, wall) in (("quiet", quiet), ("under attack", attacked)):
        print(f"{name:13s} median {1000 * statistics.median(latencies):.1f} ms  p99 {1000 * _p99(latencies):.1f} ms  "
              f"{args.requests / wall:.0f} requests/s  errors {errors}")
    print(f"p99 under attack / quiet: {_p99(attacked[0]) / _p99(quiet[0]):.2f}x")
    print("attacker's answers: " + ", ".join(f"{k}: {v}" for k, v in sorted(answers.items(), key=str)))


if __name__ == "__main__":
    main()
