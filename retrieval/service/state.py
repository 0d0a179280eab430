"""What one service app holds: its limits (`ServiceConfig`), the embedders that batch concurrent queries
(`MicroBatcher`), and the state its routes share (`ServiceState`)."""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from ..search import SearchIndex
from .file_guard import FileGuard, ThumbnailCache
from .metrics import ServiceMetrics

__all__ = ["LOCAL_HOSTS", "ServiceConfig", "MicroBatcher", "ServiceState"]

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class ServiceConfig:
    """Limits and settings of the HTTP service: request sizes, micro-batching, which files may be served."""

    max_k: int = 200
    max_text_chars: int = 500
    max_where_chars: int = 500
    max_upload_bytes: int = 10 * 2**20
    max_json_bytes: int = 256 * 1024  # a JSON body holds one embedding and a few fields
    max_json_depth: int = 8
    # 40 megapixels: a large phone photo; bigger uploads are refused from the header, before decoding.
    max_upload_pixels: int = 40_000_000
    thumbnail_size: int = 256
    batch_window_ms: float = 5.0  # how long the embedder waits for more queries to batch together
    max_batch: int = 64
    # Folders whose files may be served; None: the roots the index recorded when it was built.
    roots: tuple[str, ...] | None = None
    filter_fields: tuple[str, ...] | None = None  # metadata columns offered as filters on the page
    # Host header names the service answers to ("*": any); local names only by default.
    allowed_hosts: tuple[str, ...] = LOCAL_HOSTS
    show_paths: bool = False  # absolute file paths in responses (default: relative to their root)

    def __post_init__(self) -> None:
        for name in (
            "max_k",
            "max_text_chars",
            "max_upload_bytes",
            "max_json_bytes",
            "max_json_depth",
            "max_upload_pixels",
            "max_batch",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"ServiceConfig.{name} must be positive, got {getattr(self, name)}")


class MicroBatcher:
    """Collects texts from concurrent requests and embeds them together in one worker thread."""

    def __init__(
        self, embed: Any, *, window_ms: float = 5.0, max_batch: int = 64, on_batch: Callable[[int], None] | None = None
    ) -> None:
        self._embed = embed  # callable: list[str] -> (n, E) array
        self._on_batch = on_batch  # called with each batch's size (the service's metrics)
        self._window = window_ms / 1000
        self._max_batch = max_batch
        self._queue: queue.Queue[tuple[str, Future]] = queue.Queue()
        # sizes of the last batches run (for tests); bounded, the service runs for months
        self.batches: collections.deque[int] = collections.deque(maxlen=1024)
        self._thread = threading.Thread(target=self._run, name="vlm-embedder", daemon=True)
        self._thread.start()

    def submit(self, text: str) -> Future:
        """Queues one input (a text, or an image for the image batcher); the future resolves to its
        embedding (E,) or to the error the embedding raised."""
        future: Future = Future()
        self._queue.put((text, future))
        return future

    def embed(self, text: str, timeout: float = 60.0) -> np.ndarray:
        """The embedding (E,) of one input, batched with concurrent requests; waits at most `timeout`
        seconds, then raises TimeoutError."""
        return self.submit(text).result(timeout=timeout)

    def _collect(self) -> list[tuple[str, Future]]:
        items = [self._queue.get()]
        deadline = time.monotonic() + self._window
        while len(items) < self._max_batch:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                items.append(self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return items

    def _run(self) -> None:
        while True:
            items = self._collect()
            self.batches.append(len(items))
            if self._on_batch is not None:
                self._on_batch(len(items))
            try:
                vectors = self._embed([text for text, _ in items])
                for (_, future), vector in zip(items, vectors):
                    future.set_result(vector)
            except Exception as err:  # the requests get the error; the worker keeps serving
                for _, future in items:
                    future.set_exception(err)



@dataclass(frozen=True)
class ServiceState:
    """What the routes of one app share (kept in `app.state.service`): the index, the limits, the
    embedders that batch concurrent queries, and the guard of the files."""

    index: SearchIndex
    config: ServiceConfig
    model_name: str | None
    batcher: MicroBatcher  # texts
    image_batcher: MicroBatcher  # preprocessed uploads
    guard: FileGuard
    thumbnails: ThumbnailCache
    fields: list[dict[str, Any]]  # filters offered on the page
    transform: Any  # the model's image preprocessing, run in the request's thread
    allowed_hosts: frozenset[str]
    metrics: ServiceMetrics  # served at /metrics

    @classmethod
    def start(
        cls, index: SearchIndex, config: ServiceConfig, model_name: str | None, onnx: Any = None
    ) -> "ServiceState":
        """Loads the model and starts the embedding threads for `index`. With `onnx` (an export directory or a
        `vlm.onnx.OnnxCLIP`), queries are embedded by onnxruntime and the torch model is never loaded."""
        embed_texts, embed_images, transform = _onnx_embedders(index, onnx) if onnx is not None else _embedders(index)
        batching = {"window_ms": config.batch_window_ms, "max_batch": config.max_batch}
        metrics = ServiceMetrics.create(index)
        return cls(
            index=index,
            config=config,
            model_name=model_name,
            batcher=MicroBatcher(embed_texts, on_batch=metrics.batch_observer("text"), **batching),
            image_batcher=MicroBatcher(embed_images, on_batch=metrics.batch_observer("image"), **batching),
            guard=FileGuard(index, config.roots),
            thumbnails=ThumbnailCache(config.thumbnail_size),
            fields=_filter_fields(index, config.filter_fields),
            transform=transform,
            allowed_hosts=frozenset(h.lower().strip("[]") for h in config.allowed_hosts),
            metrics=metrics,
        )


# Texts -> (n, E) embeddings, preprocessed images -> (n, E), and the preprocessing of one PIL image.
_Embedders = tuple[Callable[[list[str]], np.ndarray], Callable[[list[Any]], np.ndarray], Callable[[Any], Any]]


def _embedders(index: SearchIndex) -> _Embedders:
    model = index.model  # load once, at start-up, not on the first request
    from vlm.embed import embed_texts
    from vlm.transforms import image_transform

    return (
        lambda texts: embed_texts(model, texts).numpy(),
        lambda images: _embed_image_batch(model, images),
        image_transform(model),
    )


def _onnx_embedders(index: SearchIndex, onnx: str | os.PathLike | Any) -> _Embedders:
    """The embedders of an ONNX export of the index's model; ValueError when it exports another model."""
    from vlm.onnx import OnnxCLIP

    runtime = onnx if isinstance(onnx, OnnxCLIP) else OnnxCLIP(onnx)
    if runtime.fingerprint != index.fingerprint:
        recorded = index.manifest.model.get("source") or "?"
        raise ValueError(
            f"the ONNX export {runtime.directory} is of model fingerprint {runtime.fingerprint}, but "
            f"{index.store.path} was built with model {recorded} (fingerprint {index.fingerprint}): its queries "
            "would not be comparable; export the model that built the index (vlm export onnx MODEL --out DIR), "
            "or serve without --onnx"
        )
    return runtime.encode_text, lambda images: runtime.encode_image(np.stack(images)), runtime.preprocess


def _filter_fields(index: SearchIndex, names: Sequence[str] | None, limit: int = 50) -> list[dict[str, Any]]:
    """Metadata columns with few distinct values, offered as drop-down filters on the page."""
    columns = [c for c in index.meta.columns if c not in ("id", "key", "path", "caption")]
    fields = []
    for name in names if names is not None else columns:
        if name not in columns:
            raise ValueError(f"filter field {name!r} is not a metadata column; columns are {columns}")
        values = index.meta.distinct_values(name, limit + 1)
        if names is not None or len(values) <= limit:
            fields.append({"name": name, "values": sorted(str(v) for v in values)[:limit]})
    return fields


def _embed_image_batch(model: Any, images: list[Any]) -> np.ndarray:
    """(n, E) normalised embeddings of preprocessed image tensors (3, H, W)."""
    import torch

    with torch.inference_mode():
        x = torch.stack(images).to(model.logit_scale.device, model.logit_scale.dtype)
        return model.encode_image(x, normalize=True).float().cpu().numpy()

