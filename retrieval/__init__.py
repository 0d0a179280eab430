"""Image-text search indexes with FAISS: embed a collection (resumably, on one process or many), index it
with stable ids and SQLite metadata, tune it to a target recall, update it atomically, search it.

    from retrieval import build_index, SearchIndex
    build_index("photos/", "photos.index", model)
    hits = SearchIndex.open("photos.index").search_text("a red car", k=10)[0]
"""

# Public name -> submodule. Imported on first use: `import retrieval.cli` must not load FAISS before
# the CLI has quieted FAISS's import-time logging, and `import retrieval` stays cheap.
_EXPORTS = {
    "BuildOptions": "build",
    "UpdateReport": "build",
    "add_to_index": "update",
    "build_index": "build",
    "build_from_embeddings": "embeddings_build",
    "export_index": "clip_retrieval",
    "remove_from_index": "update",
    "EmbeddingJob": "embedding_job",
    "EmbedOptions": "embedding_job",
    "PairedRecall": "evaluate",
    "evaluate_pairs": "evaluate",
    "paired_recall": "evaluate",
    "recall_at_k": "evaluate",
    "Neighbors": "index",
    "SearchParams": "index",
    "VectorIndex": "index",
    "KINDS": "kinds",
    "IndexSpec": "kinds",
    "choose_spec": "kinds",
    "make_spec": "kinds",
    "parse_memory": "kinds",
    "Item": "metadata",
    "MetadataStore": "metadata",
    "Hit": "search",
    "SearchIndex": "search",
    "SearchResults": "search",
    "Collection": "sources",
    "open_source": "sources",
    "IndexCorruptError": "index_directory",
    "Diversity": "dedup",
    "IndexDirectory": "index_directory",
    "Manifest": "index_directory",
    "TuningReport": "tuning",
    "tune": "tuning",
}

__all__ = [
    "BuildOptions",
    "Collection",
    "Diversity",
    "EmbedOptions",
    "EmbeddingJob",
    "Hit",
    "IndexCorruptError",
    "IndexDirectory",
    "IndexSpec",
    "Item",
    "KINDS",
    "Manifest",
    "MetadataStore",
    "Neighbors",
    "PairedRecall",
    "SearchIndex",
    "SearchParams",
    "SearchResults",
    "TuningReport",
    "UpdateReport",
    "VectorIndex",
    "add_to_index",
    "build_from_embeddings",
    "build_index",
    "choose_spec",
    "evaluate_pairs",
    "export_index",
    "make_spec",
    "open_source",
    "paired_recall",
    "parse_memory",
    "recall_at_k",
    "remove_from_index",
    "tune",
]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
