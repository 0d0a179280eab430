"""Search index kinds on clustered synthetic vectors: build time, memory, queries/s and recall@10.

    .venv/bin/python bench/bench_retrieval.py [--n 1000000] [--d 512] [--kinds ivf,ivfpqfs,ivfpq16,auto]
                                              [--memory-budget 4G] [--max-query-ms 1] [--target 0.95] [--draft]

The database is `clustered_vectors` of bench/synthetic.py (image-like clusters); the queries come from its
shifted "text" distribution, as text queries to an image index do. A kind is a name of `retrieval.kinds`
(`-disk`: inverted lists on disk; digits after `ivfpq` or `ivfpqfs`: its `--pq-m`, as in `ivfpq16`). Half
the queries tune each index (`retrieval.tuning.tune`, target recall@10 `--target`, `--compressed-target`
for IVF-PQ); the other half measure it. Every kind is compared with exact search (FAISS IndexFlatIP, all
queries in one batch, so BLAS runs at full speed) measured in the same run: recall@10 against its results,
and queries per second as a ratio to its queries per second. Memory per vector is what the index holds
in RAM (the size of its index file; on-disk lists and the full vectors used for re-ranking are
memory-mapped files and are reported as disk). `auto` runs `retrieval.plan` on the tuning queries
(trials on a sample) and prints its estimate next to what the chosen kind then measured. `--draft` also
measures reduced-size JPEG decoding against full decoding.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import best_time, print_table  # noqa: E402
from synthetic import clustered_vectors  # noqa: E402

from retrieval.build import BuildOptions  # noqa: E402
from retrieval.index import INDEX_FILE, LISTS_FILE, VectorIndex, exact_search, set_threads  # noqa: E402
from retrieval.kinds import default_memory_budget, format_bytes, make_spec, parse_memory  # noqa: E402
from retrieval.plan import plan_for_build  # noqa: E402
from retrieval.tuning import recall_vs_exact, tune  # noqa: E402
from retrieval.vectors import write_vectors  # noqa: E402

K = 10


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--nq", type=int, default=2000, help="queries: half tune, half measure")
    parser.add_argument("--kinds", default="ivf,ivfpqfs,ivfpq,ivfpq-disk,hnswsq,auto")
    parser.add_argument("--memory-budget", default=None, help="for auto (default: half the machine's memory)")
    parser.add_argument("--max-query-ms", type=float, default=None, help="for auto: see retrieval.plan")
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--compressed-target", type=float, default=0.9)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--workdir", default=None, help="where the vectors and indexes go (default: a temporary dir)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--draft", action="store_true", help="also measure reduced-size JPEG decoding")
    return parser.parse_args()


def main() -> None:
    args = _arguments()
    threads = set_threads(args.threads)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_retrieval_"))
    budget = parse_memory(args.memory_budget) if args.memory_budget else default_memory_budget()
    print(
        f"{args.n:,} x {args.d} vectors, {args.nq} queries, {threads} FAISS threads, auto budget {format_bytes(budget)}, in {work}"
    )

    start = time.perf_counter()
    data = clustered_vectors(args.n, args.d, nq=args.nq, seed=0)
    store = write_vectors(work / "vectors", [(np.arange(args.n, dtype=np.int64), data.xb)], args.n, args.d)
    del data.xb  # from here on the vectors are read from the memory-mapped store, as in an index directory
    tune_q, eval_q = data.xq[: args.nq // 2], data.xq[args.nq // 2 :]
    print(f"generated and stored in {time.perf_counter() - start:.0f}s", flush=True)

    start = time.perf_counter()
    exact = VectorIndex.build(make_spec("flat", args.n, args.d), store, work)
    t_build = time.perf_counter() - start
    t_exact = best_time(lambda: exact.search(eval_q, K), args.repeats)
    truth = exact.search(eval_q, K)
    exact = None  # free its 4 bytes a dimension a vector before the next index is built
    qps_exact = len(eval_q) / t_exact
    print(f"exact search: {qps_exact:.1f} queries/s", flush=True)
    tune_truth = exact_search(tune_q, store, K)
    ram = args.d * 4 + 8
    # exact search is the baseline itself: its row is the measurement above, not a second run of it
    rows, done = (
        [],
        {
            make_spec("flat", args.n, args.d): (
                "flat",
                "Flat",
                f"{t_build:.0f}",
                f"{ram}",
                "0",
                "-",
                "1.0000",
                f"{qps_exact:.0f}",
                "1.0",
            )
        },
    )
    for name in args.kinds.split(","):
        kind, on_disk = name.removesuffix("-disk"), name.endswith("-disk")
        coded = re.fullmatch(r"(ivfpq|ivfpqfs)(\d+)", kind)  # ivfpq16: 16-byte codes (factory strings untouched)
        kind, pq_m = coded.groups() if coded else (kind, None)
        if kind == "auto":
            spec = auto_spec(store, tune_q, budget, args)
        else:
            pq_m = int(pq_m) if pq_m else None
            spec = make_spec(kind, args.n, args.d, memory_budget=budget, on_disk=on_disk or None, pq_m=pq_m)
        label = f"auto -> {spec.kind}{'-disk' if spec.on_disk else ''}" if kind == "auto" else name
        if spec in done:
            rows.append((label, *done[spec][1:]))
            print(rows[-1], flush=True)
            continue
        target = args.compressed_target if spec.kind == "ivfpq" else args.target
        rows.append(
            (
                label,
                *measure(spec, store, work / name, tune_q, tune_truth, eval_q, truth, target, qps_exact, args.repeats),
            )
        )
        done[spec] = rows[-1]
        print(rows[-1], flush=True)
    print_table(
        f"FAISS index kinds, {args.n:,} x {args.d}, recall@{K} and speed against exact search (same run)",
        rows,
        ("kind", "factory", "build s", "RAM B/vec", "disk B/vec", "tuned", f"recall@{K}", "queries/s", "x exact"),
    )
    if args.draft:
        bench_draft(work)
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def auto_spec(store, tune_q, budget, args):
    """What `vlm index build --kind auto` builds here: the same plan (`retrieval.plan.plan_for_build`)."""
    start = time.perf_counter()
    options = BuildOptions(kind="auto", max_query_ms=args.max_query_ms, target_recall=args.target, k=K)
    plan = plan_for_build(store, tune_q, options, budget)
    if plan is None:  # nothing to choose between
        return make_spec("auto", len(store), store.dim, memory_budget=budget)
    print(plan.summary(), f"\n  (planned in {time.perf_counter() - start:.0f}s)", flush=True)
    return plan.chosen


def measure(spec, store, directory, tune_q, tune_truth, eval_q, truth, target, qps_exact, repeats) -> tuple:
    directory.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    vindex = VectorIndex.build(spec, store, directory)
    build = time.perf_counter() - start
    report = tune(vindex, tune_q, k=K, target_recall=target, query_source="synthetic text-like", truth=tune_truth)
    vindex.write(directory)
    if spec.on_disk:  # search what a reader opens: the index file with its memory-mapped lists
        vindex = VectorIndex.read(directory, spec, vindex.params, store)
    seconds = best_time(lambda: vindex.search(eval_q, K), repeats)
    recall = recall_vs_exact(vindex.search(eval_q, K).I, truth.I)
    n = len(store)
    ram = (directory / INDEX_FILE).stat().st_size / n
    disk = (directory / LISTS_FILE).stat().st_size / n if spec.on_disk else 0.0
    if spec.rerank:
        disk += store.xb.shape[1] * 4  # the full vectors read back for re-ranking
    knobs = ", ".join(f"{k}={v}" for k, v in report.params.to_dict().items() if v) or "-"
    qps = len(eval_q) / seconds
    shutil.rmtree(directory, ignore_errors=True)
    return (
        spec.factory,
        f"{build:.0f}",
        f"{ram:.0f}",
        f"{disk:.0f}",
        knobs,
        f"{recall:.4f}",
        f"{qps:.0f}",
        f"{qps / qps_exact:.1f}",
    )


def bench_draft(work: Path) -> None:
    """Camera-sized JPEGs decoded at full size vs at the reduced scale `draft` allows: time and cosine."""
    import torch
    from PIL import Image
    from skimage import data as photos

    import vlm
    from vlm.data import iter_image_batches

    torch.manual_seed(0)
    model = vlm.create_model("ViT-B-32").eval()
    transform = vlm.image_transform(model)
    paths = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera"):
        image = Image.fromarray(getattr(photos, name)()).convert("RGB").resize((4032, 3024), Image.BICUBIC)
        paths.append(work / f"{name}.jpg")
        image.save(paths[-1], quality=92)
    size = model.config.vision.image_size

    def decode(draft):
        return next(
            iter_image_batches(
                paths, transform, batch_size=len(paths), draft_size=(size, size) if draft else None, progress=False
            )
        ).images

    t_full, t_draft = best_time(lambda: decode(False), 3), best_time(lambda: decode(True), 3)
    full, draft = decode(False), decode(True)
    with torch.inference_mode():
        cos = (model.encode_image(full, normalize=True) * model.encode_image(draft, normalize=True)).sum(-1)
    pixels = torch.nn.functional.cosine_similarity(full.flatten(1), draft.flatten(1))
    print_table(
        f"JPEG draft decoding, {len(paths)} photos 4032x3024 -> {size}px (ViT-B-32, random weights)",
        [
            ("full decode", f"{len(paths) / t_full:.1f}", "1.00", "1", "1"),
            (
                "draft decode",
                f"{len(paths) / t_draft:.1f}",
                f"{t_full / t_draft:.2f}",
                f"{pixels.min():.5f}",
                f"{cos.min():.5f}",
            ),
        ],
        ("decoding", "images/s", "speed-up", "min cos (pixels)", "min cos (embeddings)"),
    )


if __name__ == "__main__":
    main()
