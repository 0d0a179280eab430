"""An index build larger than the memory budget: peak memory against the budget, build time, recall, speed.

    .venv/bin/python bench/bench_retrieval_scale.py [--n 5000000] [--d 512] [--memory-budget 2G]
                                                    [--kind ivfpq] [--pq-m 64] [--in-memory] [--nq 200]
                                                    [--workdir DIR]

The vectors are generated shard by shard straight into a memory-mapped vector store, never all in RAM:
each shard of `--shard-rows` is one `clustered_vectors` draw of bench/synthetic.py under its own seed (its
own clusters and "text" query distribution), so the collection mixes n / shard-rows such families and the
queries come from all of them. The index is built as `vlm index build` builds it (`VectorIndex.build`
under the budget, on-disk lists unless `--in-memory` or `--kind auto`, then tuning to `--target` recall@10 on a second
set of queries), while a thread polls the process's resident memory: peak anonymous memory (RssAnon,
what the budget bounds) and peak total resident memory (VmRSS, which adds the pages of memory-mapped
files: page cache the kernel can take back). Recall@10 and queries/s are measured on `--nq` other
queries against exact search streamed over the stored vectors in the same run.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import best_time  # noqa: E402
from synthetic import clustered_vectors  # noqa: E402

from retrieval.index import INDEX_FILE, LISTS_FILE, VectorIndex, exact_search, set_threads  # noqa: E402
from retrieval.kinds import format_bytes, make_spec, parse_memory  # noqa: E402
from retrieval.ondisk import MemoryPeak  # noqa: E402
from retrieval.tuning import recall_vs_exact, tune  # noqa: E402
from retrieval.vectors import VectorStore, write_vectors  # noqa: E402

K = 10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--memory-budget", default="2G")
    parser.add_argument("--kind", default="ivfpq", help="auto: the kind and list placement a build picks")
    parser.add_argument("--in-memory", action="store_true", help="inverted lists in RAM (default: on disk)")
    parser.add_argument("--pq-m", type=int, default=None, help="ivfpq: bytes a code (default: the kind's)")
    parser.add_argument("--nq", type=int, default=200, help="queries measured (as many again tune the index)")
    parser.add_argument("--target", type=float, default=0.9, help="recall@10 tuning aims at")
    parser.add_argument("--shard-rows", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="where vectors and index go (default: a temporary dir)")
    args = parser.parse_args()
    threads = set_threads(args.threads)
    budget = parse_memory(args.memory_budget)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_retrieval_scale_"))
    data_bytes = args.n * args.d * 4
    print(f"{args.n:,} x {args.d} vectors ({format_bytes(data_bytes)}), budget {format_bytes(budget)}, "
          f"{threads} FAISS threads, in {work}", flush=True)

    store, xq = stored_vectors(args, work)
    tune_q, eval_q = xq[0::2], xq[1::2]

    start = time.perf_counter()
    truth = exact_search(eval_q, store, K)
    t_exact = time.perf_counter() - start
    on_disk = None if args.kind == "auto" else not args.in_memory  # auto: as a build decides it
    spec = make_spec(args.kind, args.n, args.d, memory_budget=budget, on_disk=on_disk, pq_m=args.pq_m)
    directory = work / "index"
    directory.mkdir(exist_ok=True)
    with MemoryPeak() as peak:
        start = time.perf_counter()
        vindex = VectorIndex.build(spec, store, directory, memory_budget=budget)
        t_build = time.perf_counter() - start
        report = tune(vindex, tune_q, k=K, target_recall=args.target, query_source="synthetic text-like")
        t_tune = time.perf_counter() - start - t_build
        vindex.write(directory)
    if spec.on_disk:  # search what a reader opens: the index file with its memory-mapped lists
        vindex = VectorIndex.read(directory, spec, vindex.params, store)
    qps = len(eval_q) / best_time(lambda: vindex.search(eval_q, K), 3)
    recall = recall_vs_exact(vindex.search(eval_q, K).I, truth.I)
    lists = (directory / LISTS_FILE).stat().st_size if spec.on_disk else 0
    rows = [
        ("data (vectors.npy)", format_bytes(data_bytes)),
        ("memory budget", format_bytes(budget)),
        ("index", f"{spec.factory}{' (on-disk lists)' if spec.on_disk else ''}"),
        ("index file / lists file", f"{format_bytes((directory / INDEX_FILE).stat().st_size)} / {format_bytes(lists)}"),
        ("peak anonymous RSS (build + tune)", f"{format_bytes(peak.anon)} ({peak.anon / budget:.0%} of the budget)"),
        ("peak total RSS (adds mapped files)", format_bytes(peak.total)),
        ("build s (train, add, merge)", f"{t_build:.0f}"),
        ("tune s", f"{t_tune:.0f} ({report.params.to_dict()})"),
        (f"recall@{K} on {len(eval_q)} queries", f"{recall:.4f} (tuned {report.recall:.4f} for {args.target})"),
        ("queries/s", f"{qps:.0f} ({qps * t_exact / len(eval_q):.0f}x exact search streamed from disk, "
                      f"{len(eval_q) / t_exact:.1f}/s)"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\nlarger-than-budget build, {args.n:,} x {args.d}")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def stored_vectors(args: argparse.Namespace, work: Path) -> tuple[VectorStore, np.ndarray]:
    """The vectors in `work/vectors` and their queries: generated, or those a run with the same --n, --d,
    --nq and --shard-rows left in `--workdir`."""
    folder, name = work / "vectors", f"queries-{args.n}-{args.d}-{args.nq}-{args.shard_rows}.npy"
    if (work / name).is_file() and (folder / "vectors.npy").is_file():
        store = VectorStore.open(folder)
        if store.xb.shape == (args.n, args.d):
            print(f"reusing the {args.n:,} vectors in {folder}", flush=True)
            return store, np.load(work / name)
    start = time.perf_counter()
    queries: list[np.ndarray] = []
    store = write_vectors(folder, generate(args, queries), args.n, args.d)
    np.save(work / name, np.concatenate(queries))
    print(f"generated {len(store):,} vectors to disk in {time.perf_counter() - start:.0f}s", flush=True)
    return store, np.load(work / name)


def generate(args: argparse.Namespace, queries: list[np.ndarray]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(ids, xb) shard by shard, one `clustered_vectors` draw each; appends each draw's queries (twice
    the share of `--nq`: half tune, half measure) to `queries`."""
    shards = -(-args.n // args.shard_rows)
    for i in range(shards):
        start = i * args.shard_rows
        rows = min(args.shard_rows, args.n - start)
        nq = 2 * (args.nq * (i + 1) // shards - args.nq * i // shards)
        data = clustered_vectors(rows, args.d, nq=nq, seed=i)
        queries.append(data.xq)
        yield np.arange(start, start + rows, dtype=np.int64), data.xb


if __name__ == "__main__":
    main()
