"""`vlm serve DIR`: an HTTP service and a web page over a search index.

    GET  /search?text=...&k=...&where=...     text query (or like=ID: "more like this")
    POST /search                              multipart `image` upload, or JSON {"embedding": [...]}
    GET  /items/{id}, /items/{id}/image, /items/{id}/thumbnail
    GET  /health, /info, /                    (the page), /openapi.json (the schema)

The model loads once. Text (and image) queries that arrive together are embedded in one batch
(`MicroBatcher`).
Files are served only when they belong to the index *and* their real path (symlinks resolved) lies
under the collection's root folders, so neither `..` nor a symlink reaches anything else. Uploads
are limited in bytes while reading and in pixels from the image header, before any decoding.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, Response

from vlm.images import ImageLoadError, load_image
from vlm.transforms import image_transform

from .search import SearchIndex, SearchResults

__all__ = ["ServiceConfig", "MicroBatcher", "create_app", "serve_main"]

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
IMAGE_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".jfif": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
    ".webp": "image/webp", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
    ".ppm": "image/x-portable-pixmap", ".pgm": "image/x-portable-graymap", ".pbm": "image/x-portable-bitmap",
}


@dataclass(frozen=True)
class ServiceConfig:
    """Limits and settings of the HTTP service: request sizes, micro-batching, which files may be served."""

    max_k: int = 200
    max_text_chars: int = 500
    max_where_chars: int = 500
    max_upload_bytes: int = 10 * 2**20
    # 40 megapixels: a large phone photo; bigger uploads are refused from the header, before decoding.
    max_upload_pixels: int = 40_000_000
    thumbnail_size: int = 256
    batch_window_ms: float = 5.0  # how long the embedder waits for more queries to batch together
    max_batch: int = 64
    # Folders whose files may be served; None: the common folder of the indexed paths.
    roots: tuple[str, ...] | None = None
    filter_fields: tuple[str, ...] | None = None  # metadata columns offered as filters on the page

    def __post_init__(self) -> None:
        for name in ("max_k", "max_text_chars", "max_upload_bytes", "max_upload_pixels", "max_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ServiceConfig.{name} must be positive, got {getattr(self, name)}")


class MicroBatcher:
    """Collects texts from concurrent requests and embeds them together in one worker thread."""

    def __init__(self, embed: Any, *, window_ms: float = 5.0, max_batch: int = 64) -> None:
        self._embed = embed  # callable: list[str] -> (n, E) array
        self._window = window_ms / 1000
        self._max_batch = max_batch
        self._queue: queue.Queue[tuple[str, Future]] = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches run (for tests and /info)
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
            try:
                vectors = self._embed([text for text, _ in items])
                for (_, future), vector in zip(items, vectors):
                    future.set_result(vector)
            except Exception as err:  # the requests get the error; the worker keeps serving
                for _, future in items:
                    future.set_exception(err)


class FileGuard:
    """Decides whether a file may be served: it must be indexed and really live under a root."""

    def __init__(self, index: SearchIndex, roots: Sequence[str] | None) -> None:
        self.index = index
        self.roots = [Path(os.path.realpath(r)) for r in (roots or _common_roots(index))]

    def check(self, path: str) -> Path | None:
        """The real path of `path` if it is an indexed image that resolves (symlinks followed) inside a root
        and exists; else None (refusals outside the roots are logged)."""
        if not self.index.contains_path(path):
            return None
        real = Path(os.path.realpath(path))
        if not any(real == root or root in real.parents for root in self.roots):
            logger.warning("refused to serve %s: it resolves to %s, outside %s", path, real, self.roots)
            return None
        return real if real.is_file() else None


def _common_roots(index: SearchIndex) -> list[str]:
    rows = index.meta.conn.execute("SELECT path FROM items").fetchall()
    paths = [os.path.abspath(path) for (path,) in rows if path]
    if not paths:
        return []
    return [os.path.commonpath([os.path.dirname(p) for p in paths])]


def _filter_fields(index: SearchIndex, names: Sequence[str] | None, limit: int = 50) -> list[dict[str, Any]]:
    """Metadata columns with few distinct values, offered as drop-down filters on the page."""
    conn = index.meta.conn
    columns = [c for c in index.meta.columns if c not in ("id", "key", "path", "caption")]
    fields = []
    for name in names if names is not None else columns:
        if name not in columns:
            raise ValueError(f"filter field {name!r} is not a metadata column; columns are {columns}")
        values = [row[0] for row in conn.execute(f'SELECT DISTINCT "{name}" FROM items LIMIT {limit + 1}')]
        values = [v for v in values if v is not None]
        if names is not None or len(values) <= limit:
            fields.append({"name": name, "values": sorted(str(v) for v in values)[:limit]})
    return fields


def _results_json(results: SearchResults) -> list[dict[str, Any]]:
    return [
        {
            "id": hit.id,
            "score": round(float(hit.score), 6),
            "metadata": {"path": hit.path, "caption": hit.caption, **hit.extra},
            "image_url": f"/items/{hit.id}/image",
            "thumbnail_url": f"/items/{hit.id}/thumbnail",
        }
        for hit in results[0]
    ]


def create_app(index: SearchIndex, config: ServiceConfig | None = None, *, model_name: str | None = None):
    """The FastAPI app serving `index` (see the module docstring)."""
    config = config or ServiceConfig()
    model = index.model  # load once, at start-up, not on the first request
    from vlm.embed import embed_texts

    batcher = MicroBatcher(
        lambda texts: embed_texts(model, texts).numpy(), window_ms=config.batch_window_ms, max_batch=config.max_batch
    )
    image_batcher = MicroBatcher(
        lambda images: _embed_image_batch(model, images), window_ms=config.batch_window_ms, max_batch=config.max_batch
    )
    guard = FileGuard(index, config.roots)
    fields = _filter_fields(index, config.filter_fields)
    app = FastAPI(title="vlm search", version="1", description="Search an image-text index by text, image or vector.")
    app.state.batcher, app.state.image_batcher = batcher, image_batcher

    def run(xq: np.ndarray, k: int, where: str | None) -> dict[str, Any]:
        if where is not None and len(where) > config.max_where_chars:
            raise HTTPException(422, f"where is longer than {config.max_where_chars} characters")
        started = time.perf_counter()
        try:
            results = index.search_vector(np.asarray(xq, dtype=np.float32).reshape(1, -1), k=k, where=where or None)
        except ValueError as err:
            raise HTTPException(400, str(err)) from err
        return {"results": _results_json(results), "took_ms": round(1000 * (time.perf_counter() - started), 2)}

    def item_or_404(item_id: int):
        item = index.get(item_id)
        if item is None:
            raise HTTPException(404, f"no item with id {item_id}")
        return item

    def served_path(item_id: int) -> Path:
        item = item_or_404(item_id)
        path = guard.check(item.path)
        if path is None or path.suffix.lower() not in IMAGE_TYPES:
            raise HTTPException(404, f"item {item_id} has no image file this service may serve")
        return path

    K = Query(10, ge=1, le=config.max_k, description="number of results")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page() -> HTMLResponse:
        return HTMLResponse((STATIC / "index.html").read_text())

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict[str, Any]:
        manifest = index.manifest
        return {
            "model": model_name or manifest.model.get("source") or manifest.model["fingerprint"],
            "fingerprint": index.fingerprint,
            "modality": index.modality,
            "index_kind": manifest.spec.get("kind") or manifest.spec.get("factory"),
            "size": len(index),
            "dim": index.dim,
            "tuning": manifest.tuning,
            "filters": fields,
        }

    @app.get("/search")
    def search_get(
        text: str | None = Query(None, description="the query text"),
        like: int | None = Query(None, description="id of an item: find items like it"),
        k: int = K,
        where: str | None = Query(None, description="SQL filter on metadata, e.g. label = 'cat'"),
    ) -> dict[str, Any]:
        if (text is None) == (like is None):
            raise HTTPException(422, "give exactly one of text= or like=")
        if like is not None:
            return run(_vector_of(like), k, where)
        if not text.strip():
            raise HTTPException(422, "text is empty")
        if len(text) > config.max_text_chars:
            raise HTTPException(422, f"text is longer than {config.max_text_chars} characters")
        return run(batcher.embed(text), k, where)

    def _vector_of(item_id: int) -> np.ndarray:
        item_or_404(item_id)
        vectors = index.index.vectors
        if vectors is None or vectors.rows(np.array([item_id]))[0] < 0:
            raise HTTPException(404, f"the index keeps no vector for item {item_id}")
        return vectors.get(np.array([item_id]))[0]

    @app.post("/search")
    async def search_post(request: Request) -> dict[str, Any]:
        kind = request.headers.get("content-type", "")
        if kind.startswith("application/json"):
            body = await _read_limited(request, config.max_upload_bytes)
            return _search_embedding(body)
        if kind.startswith("multipart/form-data"):
            declared = int(request.headers.get("content-length") or 0)
            if declared > config.max_upload_bytes + 64 * 1024:
                raise HTTPException(413, f"upload larger than {config.max_upload_bytes} bytes")
            form = await request.form(max_files=1, max_fields=4)
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise HTTPException(422, "multipart body needs an `image` file field")
            data = await upload.read(config.max_upload_bytes + 1)
            k = _form_int(form.get("k"), 10, config.max_k)
            return run(_embed_upload(data), k, form.get("where") or None)
        raise HTTPException(415, "send multipart/form-data with an `image` file, or JSON {\"embedding\": [...]}")

    def _search_embedding(body: bytes) -> dict[str, Any]:
        import json

        try:
            payload = json.loads(body)
            vector = np.asarray(payload["embedding"], dtype=np.float32)
        except (ValueError, KeyError, TypeError) as err:
            raise HTTPException(422, f"JSON body must be {{\"embedding\": [numbers], \"k\": int}}: {err}") from err
        if vector.shape != (index.dim,):
            raise HTTPException(422, f"embedding must have {index.dim} numbers, got shape {list(vector.shape)}")
        k = _form_int(payload.get("k"), 10, config.max_k)
        return run(vector, k, payload.get("where"))

    transform = image_transform(model)

    def _embed_upload(data: bytes) -> np.ndarray:
        if len(data) > config.max_upload_bytes:
            raise HTTPException(413, f"upload larger than {config.max_upload_bytes} bytes")
        _check_pixels(data, config.max_upload_pixels)
        try:
            image = load_image(data, max_pixels=config.max_upload_pixels)
        except ImageLoadError as err:
            raise HTTPException(400, f"not a readable image: {err.reason}") from err
        # Decoding and resizing happen in the request's thread; the model sees a batch of uploads.
        return image_batcher.embed(transform(image))

    @app.get("/items/{item_id}")
    def item(item_id: int) -> dict[str, Any]:
        found = item_or_404(item_id)
        return {
            "id": found.id,
            "metadata": {"path": found.path, "caption": found.caption, **found.extra},
            "image_url": f"/items/{found.id}/image",
            "thumbnail_url": f"/items/{found.id}/thumbnail",
        }

    @app.get("/items/{item_id}/image")
    def image(item_id: int) -> FileResponse:
        path = served_path(item_id)
        return FileResponse(path, media_type=IMAGE_TYPES[path.suffix.lower()])

    @app.get("/items/{item_id}/thumbnail")
    def thumbnail(item_id: int) -> Response:
        path = served_path(item_id)
        data = _thumbnail(str(path), path.stat().st_mtime_ns, config.thumbnail_size)
        if data is None:
            raise HTTPException(404, f"item {item_id}'s image cannot be decoded")
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


def _embed_image_batch(model: Any, images: list[Any]) -> np.ndarray:
    """(n, E) normalised embeddings of preprocessed image tensors (3, H, W)."""
    import torch

    with torch.inference_mode():
        x = torch.stack(images).to(model.logit_scale.device, model.logit_scale.dtype)
        return model.encode_image(x, normalize=True).float().cpu().numpy()


def _form_int(value: Any, default: int, maximum: int) -> int:
    if value is None or value == "":
        return default
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise HTTPException(422, f"k must be an integer, got {value!r}") from None
    if not 1 <= k <= maximum:
        raise HTTPException(422, f"k must be between 1 and {maximum}, got {k}")
    return k


async def _read_limited(request: Any, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_pixels(data: bytes, max_pixels: int) -> None:
    """Refuses an upload from its header alone: not an image (400) or too many pixels (413)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as probe:  # reads the header only
            width, height = probe.size
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise HTTPException(400, "the upload is not an image this service can read") from err
    except Image.DecompressionBombError as err:
        raise HTTPException(413, f"image has too many pixels: {err}") from err
    if width * height > max_pixels:
        raise HTTPException(413, f"image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels")


@lru_cache(maxsize=4096)
def _thumbnail(path: str, mtime_ns: int, size: int) -> bytes | None:
    from vlm.images import ImageLoadError, load_image

    try:
        image = load_image(path, draft_size=(size, size))
    except ImageLoadError:
        return None
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=85)
    return buffer.getvalue()


def serve_main(argv: list[str]) -> int:
    """`vlm serve`: serves the index's web page and JSON API with uvicorn until interrupted; returns 0.
    Imports uvicorn when called."""
    parser = argparse.ArgumentParser(prog="vlm serve", description="Serve a search index over HTTP with a web page.")
    parser.add_argument("index", help="index directory written by `vlm index build`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None, help="model for queries (default: the one that built the index)")
    parser.add_argument("--root", action="append", default=None, help="folder whose files may be served (repeatable)")
    parser.add_argument("--max-k", type=int, default=ServiceConfig.max_k)
    args = parser.parse_args(argv)
    import uvicorn

    index = SearchIndex.open(args.index, model=args.model)
    app = create_app(index, ServiceConfig(max_k=args.max_k, roots=tuple(args.root) if args.root else None), model_name=args.model)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning("binding to %s: the service is reachable from other machines", args.host)
    print(f"serving {args.index} ({len(index)} items) at http://{args.host}:{args.port}/")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
