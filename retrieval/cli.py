"""`vlm index ...` and `vlm search ...`.

    vlm index build SOURCE --out DIR [--model M] [--kind auto|flat|hnsw|ivf|ivfpq|FACTORY] [--memory-budget 4G]
    vlm index build --embeddings CLIP_RETRIEVAL_DIR --out DIR [--model M] [--modality image|text]
    vlm index export DIR OUT_DIR [--shard-size 1000000] [--dtype float32|float16]
    vlm index add DIR SOURCE [--upsert]
    vlm index remove DIR [--ids 3 5] [--paths a.jpg] [--where "label = 'cat'"]
    vlm index info DIR [--verify] [--json]
    vlm index eval SOURCE [--model M] [-k 1 5 10]
    vlm index plan SOURCE [--memory-budget 4G] [--max-query-ms 2] [--sample 20000]
    vlm search DIR --text "a red car" | --image photo.jpg [-k 10] [--where "label = 'cat'"] [--dedup 0.95]
               [--mmr 0.5] [--json]

Under `accelerate launch`, `vlm index build` and `vlm index add` split the embedding across processes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

from vlm.cli.args import add_model_argument, add_source_arguments, add_text_overflow_argument, load_model_from_args
from vlm.cli.args import text_overflow_from_args

__all__ = ["index_main", "search_main"]

INDEX_COMMANDS = ("build", "add", "remove", "info", "eval", "export", "plan")


def index_main(argv: list[str]) -> int:
    """`vlm index build|add|remove|info|eval ...`: runs the subcommand and returns its exit code; without
    a known subcommand prints the usage on stderr and returns 2 (0 for --help)."""
    _quiet_faiss_loader()
    if not argv or argv[0] not in INDEX_COMMANDS:
        print(
            f"usage: vlm index {{{','.join(INDEX_COMMANDS)}}} ... (`vlm index build --help` and so on)", file=sys.stderr
        )
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, rest = argv[0], argv[1:]
    verbs = {"build": _build, "add": _add, "remove": _remove, "info": _info, "eval": _eval, "export": _export}
    verbs["plan"] = _plan
    return verbs[command](rest)


def _quiet_faiss_loader() -> None:
    # FAISS logs at INFO which SIMD library variants it tried on every import: noise for a CLI user.
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)


# ---- build and add -------------------------------------------------------------------------------
def _build(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlm index build", description="Embed a collection and build a search index.")
    parser.add_argument(
        "source",
        nargs="?",
        help="a folder of images, a list file, a table (csv/tsv/jsonl/json/parquet) or hf:NAME_OR_DIR",
    )
    parser.add_argument(
        "--embeddings",
        default=None,
        metavar="DIR",
        help="index embeddings made elsewhere instead: clip-retrieval's img_emb/ text_emb/ metadata/ layout",
    )
    parser.add_argument("--out", required=True, help="the index directory to create")
    add_model_argument(parser)
    parser.add_argument(
        "--kind",
        default="auto",
        help="auto, flat, hnsw, hnswsq, ivf, ivfpq, ivfpqfs or a FAISS factory string (default: auto)",
    )
    parser.add_argument(
        "--pq-m",
        type=int,
        default=None,
        help="ivfpq: bytes a code (16 on 512-d: 34 bytes a vector in RAM at 1M); ivfpqfs: 4-bit sub-quantizers",
    )
    _add_tuning_arguments(parser)
    disk = parser.add_mutually_exclusive_group()
    disk.add_argument(
        "--on-disk",
        dest="on_disk",
        action="store_const",
        const=True,
        default=None,
        help="IVF lists in a memory-mapped file",
    )
    disk.add_argument("--in-memory", dest="on_disk", action="store_const", const=False, help="IVF lists in RAM")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing index in --out")
    _add_source_arguments(parser)
    args = parser.parse_args(argv)
    from .build import build_index

    if (args.source is None) == (args.embeddings is None):
        parser.error("give a SOURCE to embed, or --embeddings DIR (embeddings made elsewhere), not both")
    tune_texts = _tune_texts(args)
    options = _options(args, kind=args.kind, on_disk=args.on_disk, pq_m=args.pq_m, **_tuning_options(args))
    if args.embeddings is not None:
        return _build_from_embeddings(args, options, tune_texts)
    model, model_source = _model(args)
    with text_overflow_from_args(args):
        report = build_index(
            args.source,
            args.out,
            model,
            options=options,
            modality=args.embed,
            overwrite=args.overwrite,
            tuning_texts=tune_texts,
            model_source=model_source,
            **_source_options(args),
        )
    print(report.summary())
    return 0


def _build_from_embeddings(args: argparse.Namespace, options, tune_texts: list[str] | None) -> int:
    from .embeddings_build import build_from_embeddings

    # Only a model the user names is recorded: the default model did not make these embeddings.
    model, model_source = _model(args) if args.model or args.pretrained else (None, None)
    with text_overflow_from_args(args):
        report = build_from_embeddings(
            args.embeddings,
            args.out,
            model=model,
            model_source=model_source,
            modality=args.embed,
            options=options,
            overwrite=args.overwrite,
            roots=args.root,
            tuning_texts=tune_texts,
        )
    print(report.summary())
    return 0


def _add_tuning_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags `vlm index build` and `vlm index plan` share: what to index, the budget, the recall to reach."""
    parser.add_argument(
        "--memory-budget", default=None, help="RAM the index may use, e.g. 4G (default: half the machine's memory)"
    )
    parser.add_argument(
        "--max-query-ms",
        type=float,
        default=None,
        help="auto: build the smallest kind estimated to answer a query within this many ms (default: the fastest)",
    )
    parser.add_argument(
        "--target-recall", type=float, default=0.95, help="tune search to this recall@k against exact search"
    )
    parser.add_argument("-k", type=int, default=10, help="the k of the tuned recall@k (default 10)")
    parser.add_argument(
        "--embed",
        "--modality",
        choices=("image", "text"),
        default="image",
        help="index the images (default) or the captions (with --embeddings: img_emb/ or text_emb/)",
    )
    parser.add_argument(
        "--tune-queries", default=None, help="a text file of typical queries, one per line, to tune with"
    )


def _tuning_options(args: argparse.Namespace) -> dict:
    from .kinds import parse_memory

    return {
        "memory_budget": parse_memory(args.memory_budget) if args.memory_budget else None,
        "k": args.k,
        "target_recall": args.target_recall,
        "max_query_ms": args.max_query_ms,
    }


def _tune_texts(args: argparse.Namespace) -> list[str] | None:
    return Path(args.tune_queries).read_text().splitlines() if args.tune_queries else None


def _plan(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vlm index plan",
        description="Estimate, from a sample, which index `vlm index build --kind auto` builds and what it costs.",
    )
    parser.add_argument("source", help="a collection (folder, list file, table, hf:...) or a clip-retrieval embeddings folder")
    add_model_argument(parser)
    _add_tuning_arguments(parser)
    parser.add_argument("--sample", type=int, default=20_000, help="items to embed (or read) for the trials")
    _add_source_arguments(parser)
    args = parser.parse_args(argv)
    from .plan import plan_source

    options = _options(args, **_tuning_options(args))
    embeddings = Path(args.source).is_dir() and (Path(args.source) / "metadata").is_dir()
    model = None if embeddings else _model(args)[0]
    texts = _tune_texts(args)
    with text_overflow_from_args(args):
        plan = plan_source(
            args.source, model, options=options, modality=args.embed, sample=args.sample, tuning_texts=texts,
            **({} if embeddings else _source_options(args)),
        )
    print(plan.summary())
    return 0


def _add(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlm index add", description="Add the new items of a collection to an index.")
    parser.add_argument("directory", help="the index directory")
    parser.add_argument("source", help="a folder, list file, table or hf:NAME_OR_DIR")
    add_model_argument(parser)
    parser.add_argument(
        "--upsert", action="store_true", help="re-embed items already indexed and replace them under their ids"
    )
    _add_source_arguments(parser)
    args = parser.parse_args(argv)
    from .search import index_model
    from .index_directory import IndexDirectory
    from .update import add_to_index

    if args.model is None:  # the model that built the index, not the user's default
        args.model = index_model(IndexDirectory(args.directory).read_manifest())
    model, _ = _model(args)
    with text_overflow_from_args(args):
        report = add_to_index(
            args.directory, args.source, model, upsert=args.upsert, options=_options(args), **_source_options(args)
        )
    print(report.summary())
    return 0


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    _add_columns(parser)
    parser.add_argument(
        "--root",
        action="append",
        default=None,
        help="a folder whose files may be indexed and served (repeatable; default: the folder of the source). "
        "Files that resolve outside every root are left out and reported",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes decoding images")
    parser.add_argument("--chunk-size", type=int, default=4096, help="items per resumable shard")
    parser.add_argument(
        "--no-draft", action="store_true", help="decode JPEGs at full size (slower, nearly identical vectors)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="FAISS threads (default: this process's share of the CPUs)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_text_overflow_argument(parser)


def _add_columns(parser: argparse.ArgumentParser) -> None:
    add_source_arguments(parser, text=True)
    # The flag's name before every verb called the text column --text-column.
    parser.add_argument("--caption-column", dest="text_column", help=argparse.SUPPRESS)


def _source_options(args: argparse.Namespace) -> dict:
    return {
        "image_column": args.image_column,
        "text_column": args.text_column,
        "split": args.split,
        "roots": args.root,
    }


def _options(args: argparse.Namespace, **overrides):
    from .build import BuildOptions
    from .embedding_job import EmbedOptions

    embed = EmbedOptions(
        batch_size=args.batch_size,
        num_workers=args.workers,
        draft=not args.no_draft,
        chunk_size=args.chunk_size,
        progress=not args.no_progress,
    )
    return BuildOptions(embed=embed, threads=args.threads, **overrides)


def _model(args: argparse.Namespace):
    """The model and the name to record for it (a directory as an absolute path)."""
    from vlm.defaults import resolve_model

    name = resolve_model(args.model)
    source = str(Path(name).resolve()) if Path(name).exists() else name
    if args.pretrained:
        source = None  # a preset plus weights cannot be reloaded from one name; `vlm search --model` must say it
    return load_model_from_args(args), source


# ---- remove, info, eval --------------------------------------------------------------------------
def _remove(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlm index remove", description="Remove items from an index.")
    parser.add_argument("directory")
    parser.add_argument("--ids", type=int, nargs="*", default=[], help="ids to remove")
    parser.add_argument("--paths", nargs="*", default=[], help="image paths to remove")
    parser.add_argument("--where", default=None, help="remove the items matching this metadata filter")
    args = parser.parse_args(argv)
    if not (args.ids or args.paths or args.where):
        parser.error("say what to remove: --ids, --paths or --where")
    from .update import remove_from_index

    print(remove_from_index(args.directory, ids=args.ids, paths=args.paths, where=args.where).summary())
    return 0


def _info(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlm index info", description="Describe an index directory.")
    parser.add_argument("directory")
    parser.add_argument(
        "--verify", action="store_true", help="check every file's sha256, and the metadata with SQLite's quick_check"
    )
    parser.add_argument("--json", action="store_true", help="print the manifest as JSON")
    args = parser.parse_args(argv)
    from .kinds import IndexSpec, format_bytes
    from .metadata import METADATA_FILE, MetadataStore
    from .index_directory import IndexDirectory

    store = IndexDirectory(args.directory)
    manifest = store.read_manifest()
    store.verify(manifest, full=args.verify)
    if args.json:
        print(manifest.to_json())
        return 0
    spec = IndexSpec.from_dict(manifest.spec)
    dim = int(manifest.model["embed_dim"])
    columns = MetadataStore(store.version_path(manifest) / METADATA_FILE).columns
    size = sum(f["size"] for f in manifest.files.values())
    lines = [
        f"index        {store.path} (version {manifest.version})",
        f"items        {manifest.count} {manifest.modality} vectors of dimension {dim}, L2-normalised (cosine scores)",
        f"kind         {spec.kind}: {spec.factory}{' with on-disk lists' if spec.on_disk else ''}"
        f"{', re-ranked from stored vectors' if spec.rerank else ''}",
        f"memory       ~{format_bytes(spec.bytes_per_vector(dim))} per vector in RAM; {format_bytes(size)} on disk",
        f"search       {', '.join(f'{k}={v}' for k, v in manifest.params.items() if v) or 'exact'}",
        f"model        {manifest.model.get('source') or '(not recorded)'} fingerprint {manifest.model['fingerprint']}",
        f"metadata     {', '.join(columns)}",
    ]
    if manifest.tuning:
        t = manifest.tuning
        lines.append(
            f"tuning       recall@{t['k']} {t['recall']:.4f} (target {t['target_recall']}, "
            f"{'reached' if t['reached'] else 'NOT reached'}) on {t['queries']} queries: {t['query_source']}"
        )
    checked = "all files (sha256), metadata (SQLite)" if args.verify else "sizes, and sha256 of small files"
    lines.append(f"verified     {checked}")
    print("\n".join(lines))
    return 0


def _eval(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vlm index eval", description="Image-text recall@k of a paired collection.")
    parser.add_argument("source", help="a table or hf:NAME_OR_DIR with image and text columns")
    add_model_argument(parser)
    parser.add_argument("-k", type=int, nargs="+", default=[1, 5, 10])
    _add_columns(parser)
    parser.add_argument("--root", action="append", default=None, help="a folder the images may lie in (repeatable)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from .evaluate import evaluate_pairs

    result = evaluate_pairs(
        load_model_from_args(args),
        args.source,
        ks=args.k,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        **_source_options(args),
    )
    print(json.dumps(asdict(result)) if args.json else result.summary())
    return 0


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="vlm index export", description="Write an index's vectors and metadata in clip-retrieval's layout."
    )
    parser.add_argument("directory", help="the index directory")
    parser.add_argument("out", help="the folder to write img_emb/ (or text_emb/) and metadata/ into")
    parser.add_argument("--shard-size", type=int, default=1_000_000, help="rows per shard (default 1000000)")
    parser.add_argument(
        "--dtype", choices=("float32", "float16"), default="float32", help="float32 (exact) or float16 (half the size)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    from .clip_retrieval import export_index

    report = export_index(
        args.directory, args.out, shard_size=args.shard_size, dtype=args.dtype, overwrite=args.overwrite
    )
    print(report.summary())
    return 0


# ---- search --------------------------------------------------------------------------------------
def search_main(argv: list[str]) -> int:
    """`vlm search`: prints the top-k hits (rank, cosine score, id, path, caption) of each text or image
    query, or one JSON line per query with --json. Returns 0."""
    parser = argparse.ArgumentParser(prog="vlm search", description="Query a search index by text or image.")
    parser.add_argument("directory", help="the index directory")
    query = parser.add_mutually_exclusive_group(required=True)
    query.add_argument("--text", action="append", help="a text query (repeatable)")
    query.add_argument("--image", action="append", help="an image query (repeatable)")
    parser.add_argument("-k", type=int, default=10, help="results per query")
    parser.add_argument(
        "--where", default=None, help="metadata filter, e.g. \"label = 'cat'\" or \"folder LIKE 'a/%%'\""
    )
    parser.add_argument(
        "--dedup",
        type=float,
        default=None,
        metavar="COSINE",
        help="drop results whose vector has at least this cosine, in (0, 1], with a better result's (e.g. 0.95); "
        "may return fewer than -k",
    )
    parser.add_argument(
        "--mmr",
        type=float,
        default=None,
        metavar="LAMBDA",
        help="re-rank by maximal marginal relevance, LAMBDA in [0, 1]: 1 by relevance only, lower for more variety",
    )
    parser.add_argument(
        "--model", default=None, help="the model to embed queries with (default: the one that built the index)"
    )
    parser.add_argument(
        "--mmap", action="store_true", help="memory-map the index's inverted lists instead of reading them"
    )
    parser.add_argument("--json", action="store_true", help="print results as JSON lines")
    add_text_overflow_argument(parser)
    args = parser.parse_args(argv)
    _quiet_faiss_loader()
    from .search import SearchIndex

    index = SearchIndex.open(args.directory, model=args.model, mmap=args.mmap)
    queries = args.text or args.image
    ranking = {"where": args.where, "dedup": args.dedup, "mmr": args.mmr}
    with text_overflow_from_args(args):
        results = (
            index.search_text(queries, args.k, **ranking)
            if args.text
            else index.search_image(queries, args.k, **ranking)
        )
    for query, hits in zip(queries, results.hits):
        if args.json:
            print(json.dumps({"query": query, "hits": [asdict(h) for h in hits]}))
            continue
        print(f"{query}:" + ("" if hits else " no results"))
        for rank, hit in enumerate(hits, 1):
            caption = f"  {hit.caption}" if hit.caption else ""
            print(f"  {rank:>3}. {hit.score:.4f}  id {hit.id}  {hit.path}{caption}")
    return 0
