"""`vlm serve DIR`: an HTTP service and a web page over a search index.

    GET  /search?text=...&k=...&where=...     text query (or like=ID: "more like this")
    POST /search                              multipart `image` upload, or JSON {"embedding": [...]}
    GET  /items/{id}, /items/{id}/image, /items/{id}/thumbnail
    GET  /health, /info, /                    (the page), /openapi.json (the schema)

The model loads once. Text (and image) queries that arrive together are embedded in one batch
(`MicroBatcher`).

What the service guarantees about files: it serves an item's own file only, and only when the file's real
path lies inside the roots recorded when the index was built (or exactly the `--root` folders it is
started with; never a folder above them), the last component is not a link (opened with ``O_NOFOLLOW``),
and the opened file is still the one indexed (device, inode, size and modification time), so a file
swapped or edited after indexing is refused with 404. Responses show paths relative to their root
unless `show_paths` is set.

What it guarantees about requests: a ``Host`` header outside the allow-list (local names by default) is
refused (400), so a web page cannot reach the service through DNS rebinding; bodies are counted while
they stream and cut at their limit (413) before anything is spooled past it; JSON is limited in size and
nesting; ids outside int64 and wrongly typed fields are 422; filters are parsed by `retrieval.filters`
(400 naming the bad token) and time-limited; uploads are limited in pixels from the image header, before
any decoding.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import io
import logging
import os
import queue
import re
import sqlite3
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from vlm.images import ImageLoadError, load_image
from vlm.transforms import image_transform

from .metadata import Item, file_identity
from .search import Hit, SearchIndex
from .sources import is_inside, is_inside_folder

__all__ = ["ServiceConfig", "ServiceState", "MicroBatcher", "create_app", "serve_main"]

logger = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
IMAGE_TYPES = {
    ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".jfif": "image/jpeg", ".png": "image/png", ".gif": "image/gif",
    ".webp": "image/webp", ".bmp": "image/bmp", ".tif": "image/tiff", ".tiff": "image/tiff",
    ".ppm": "image/x-portable-pixmap", ".pgm": "image/x-portable-graymap", ".pbm": "image/x-portable-bitmap",
}
INT64_MAX = 2**63 - 1  # item ids are SQLite integers
LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
SHUTDOWN_SECONDS = 5  # after SIGTERM, requests still running get this long before the server stops
MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and the small fields around an uploaded image


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
    """Opens the files the service may serve (see the module docstring), and names them for responses."""

    def __init__(self, index: SearchIndex, roots: Sequence[str] | None) -> None:
        self.index = index
        recorded = index.manifest.roots
        if roots is None and recorded is None:
            logger.warning(
                "%s records no root folders (it was built by an older vlm): no image files will be served; "
                "start the service with --root FOLDER, or rebuild the index",
                index.store.path,
            )
        self.roots = [os.path.realpath(r) for r in (roots if roots is not None else recorded or [])]

    def open(self, item: Item) -> tuple[io.BufferedReader, os.stat_result] | None:
        """The open file of `item` and its stat, or None when it may not be served (logged)."""
        real = os.path.realpath(item.path) if item.path else ""
        if not real or not is_inside(real, self.roots):
            logger.warning("refused to serve item %d: %s is outside the roots %s", item.id, real, self.roots)
            return None
        try:  # O_NOFOLLOW: a link put in the file's place after the check above is not followed
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return None
        file = os.fdopen(fd, "rb")
        stat = os.fstat(fd)
        identity = file_identity(None, stat)
        recorded = self.index.meta.indexed_identity(item.id)
        if identity is None or (recorded is not None and identity != recorded):
            file.close()
            logger.warning("refused to serve item %d: %s is not the file that was indexed", item.id, real)
            return None
        return file, stat

    def public_path(self, path: str | None) -> str | None:
        """`path` relative to the root it lies in (roots are not disclosed); other paths by their name.
        String operations only: indexed paths are real paths, and this runs for every hit of every search."""
        if not path or not os.path.isabs(path):
            return path
        for root in self.roots:
            if is_inside_folder(path, root):
                return path[len(root) :].lstrip(os.sep) or os.path.basename(path)
        return os.path.basename(path)


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


def _item_json(item: Item | Hit, guard: FileGuard, show_paths: bool) -> dict[str, Any]:
    path = item.path if show_paths else guard.public_path(item.path)
    return {
        "id": item.id,
        "metadata": {"path": path, "caption": item.caption, **item.extra},
        "image_url": f"/items/{item.id}/image",
        "thumbnail_url": f"/items/{item.id}/thumbnail",
    }


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
    thumbnails: _ThumbnailCache
    fields: list[dict[str, Any]]  # filters offered on the page
    transform: Any  # the model's image preprocessing, run in the request's thread
    allowed_hosts: frozenset[str]

    @classmethod
    def start(cls, index: SearchIndex, config: ServiceConfig, model_name: str | None) -> "ServiceState":
        """Loads the model and starts the embedding threads for `index`."""
        model = index.model  # load once, at start-up, not on the first request
        from vlm.embed import embed_texts

        batching = {"window_ms": config.batch_window_ms, "max_batch": config.max_batch}
        return cls(
            index=index,
            config=config,
            model_name=model_name,
            batcher=MicroBatcher(lambda texts: embed_texts(model, texts).numpy(), **batching),
            image_batcher=MicroBatcher(lambda images: _embed_image_batch(model, images), **batching),
            guard=FileGuard(index, config.roots),
            thumbnails=_ThumbnailCache(config.thumbnail_size),
            fields=_filter_fields(index, config.filter_fields),
            transform=image_transform(model),
            allowed_hosts=frozenset(h.lower().strip("[]") for h in config.allowed_hosts),
        )


def create_app(index: SearchIndex, config: ServiceConfig | None = None, *, model_name: str | None = None):
    """The FastAPI app serving `index` (see the module docstring)."""
    config = config or ServiceConfig()
    state = ServiceState.start(index, config, model_name)
    app = FastAPI(
        title="vlm search",
        version="1",
        description="Search an image-text index by text, image or vector.",
        lifespan=_lifespan,
    )
    app.state.service = state
    app.state.index, app.state.batcher, app.state.image_batcher = index, state.batcher, state.image_batcher
    app.middleware("http")(_check_host)
    app.include_router(_router(config.max_k))
    return app


# ---- routes --------------------------------------------------------------------------------------
# The route functions have no docstrings on purpose: FastAPI would publish them in /openapi.json.
ITEM_ID = PathParam(..., ge=0, le=INT64_MAX, description="the item's id")


def _router(max_k: int) -> APIRouter:
    """The service's routes, in the schema's order; built per app because `k`'s upper bound (checked by
    FastAPI and shown in the schema) is the app's `max_k`."""
    search_get = functools.partial(_search_get, k=Query(10, ge=1, le=max_k, description="number of results"))
    search_get.__doc__ = None  # else the schema would describe the route with `partial`'s own docstring
    router = APIRouter()
    router.add_api_route("/", _page, name="page", response_class=HTMLResponse, include_in_schema=False)
    router.add_api_route("/health", _health, name="health")
    router.add_api_route("/info", _info, name="info")
    router.add_api_route("/search", search_get, name="search_get")
    router.add_api_route("/search", _search_post, name="search_post", methods=["POST"])
    router.add_api_route("/items/{item_id}", _item, name="item")
    router.add_api_route("/items/{item_id}/image", _image, name="image")
    router.add_api_route("/items/{item_id}/thumbnail", _thumbnail, name="thumbnail")
    return router


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> Any:
    yield
    app.state.service.index.close()  # interrupts metadata queries still running, so shutdown does not wait on them


async def _check_host(request: Request, call_next: Any) -> Response:
    host = _host_name(request.headers.get("host", ""))
    allowed = request.app.state.service.allowed_hosts
    if "*" not in allowed and host not in allowed:
        return JSONResponse(
            {"detail": f"Host {host!r} is not allowed; start the service with --allow-host {host or 'NAME'}"},
            status_code=400,
        )
    return await call_next(request)


async def _service(request: Request) -> ServiceState:
    return request.app.state.service


def _page() -> HTMLResponse:
    return HTMLResponse((STATIC / "index.html").read_text())


def _health() -> dict[str, str]:
    return {"status": "ok"}


def _info(state: ServiceState = Depends(_service)) -> dict[str, Any]:
    index, manifest = state.index, state.index.manifest
    return {
        "model": state.model_name or _public_model(manifest.model.get("source"), state.config.show_paths)
        or manifest.model["fingerprint"],
        "fingerprint": index.fingerprint,
        "modality": index.modality,
        "index_kind": manifest.spec.get("kind") or manifest.spec.get("factory"),
        "size": len(index),
        "dim": index.dim,
        "tuning": manifest.tuning,
        "filters": state.fields,
    }


def _search_get(
    state: ServiceState = Depends(_service),
    text: str | None = Query(None, description="the query text"),
    like: int | None = Query(None, ge=0, le=INT64_MAX, description="id of an item: find items like it"),
    k: int = Query(10, ge=1, description="number of results"),  # `_router` adds the app's upper bound
    where: str | None = Query(None, description="metadata filter, e.g. label = 'cat' (see the README's grammar)"),
) -> dict[str, Any]:
    if (text is None) == (like is None):
        raise HTTPException(422, "give exactly one of text= or like=")
    if like is not None:
        return _search(state, _vector_of(state, like), k, where)
    if not text.strip():
        raise HTTPException(422, "text is empty")
    if len(text) > state.config.max_text_chars:
        raise HTTPException(422, f"text is longer than {state.config.max_text_chars} characters")
    return _search(state, state.batcher.embed(text), k, where)


async def _search_post(request: Request, state: ServiceState = Depends(_service)) -> dict[str, Any]:
    config = state.config
    kind = request.headers.get("content-type", "")
    if kind.startswith("application/json"):
        body = await _read_limited(request, config.max_json_bytes)
        return _search_embedding(state, _load_json(body, config.max_json_depth))
    if kind.startswith("multipart/form-data"):
        form = await _read_form(request, config.max_upload_bytes + MULTIPART_OVERHEAD)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "multipart body needs an `image` file field")
        data = await upload.read(config.max_upload_bytes + 1)
        k = _form_int(form.get("k"), 10, config.max_k)
        return _search(state, _embed_upload(state, data), k, form.get("where") or None)
    raise HTTPException(415, "send multipart/form-data with an `image` file, or JSON {\"embedding\": [...]}")


def _item(item_id: int = ITEM_ID, state: ServiceState = Depends(_service)) -> dict[str, Any]:
    return _item_json(_item_or_404(state, item_id), state.guard, state.config.show_paths)


def _image(item_id: int = ITEM_ID, state: ServiceState = Depends(_service)) -> StreamingResponse:
    file, stat, kind = _open_file(state, item_id)
    return StreamingResponse(_chunks(file), media_type=kind, headers={"Content-Length": str(stat.st_size)})


def _thumbnail(item_id: int = ITEM_ID, state: ServiceState = Depends(_service)) -> Response:
    file, stat, _ = _open_file(state, item_id)
    with file:
        data = state.thumbnails.get(file, stat)
    if data is None:
        raise HTTPException(404, f"item {item_id}'s image cannot be decoded")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


# ---- what the routes do --------------------------------------------------------------------------
def _search(state: ServiceState, xq: np.ndarray, k: int, where: Any) -> dict[str, Any]:
    """The response of a search for the vector `xq`: hits with scores and metadata, and the time taken."""
    config = state.config
    if where is not None and not isinstance(where, str):
        kind = type(where).__name__
        raise HTTPException(422, f"where must be a string (a filter such as \"label = 'cat'\"), got {kind}")
    if where is not None and len(where) > config.max_where_chars:
        raise HTTPException(422, f"where is longer than {config.max_where_chars} characters")
    started = time.perf_counter()
    try:
        results = state.index.search_vector(np.asarray(xq, dtype=np.float32).reshape(1, -1), k=k, where=where or None)
    except ValueError as err:  # a bad filter (retrieval.filters), or one over its time limit
        raise HTTPException(400, str(err)) from err
    except sqlite3.ProgrammingError as err:  # the metadata was closed under it: the service is stopping
        raise HTTPException(503, "the service is shutting down") from err
    hits = [{"score": round(float(h.score), 6), **_item_json(h, state.guard, config.show_paths)} for h in results[0]]
    return {"results": hits, "took_ms": round(1000 * (time.perf_counter() - started), 2)}


def _item_or_404(state: ServiceState, item_id: int) -> Item:
    item = state.index.get(item_id)
    if item is None:
        raise HTTPException(404, f"no item with id {item_id}")
    return item


def _open_file(state: ServiceState, item_id: int) -> tuple[io.BufferedReader, os.stat_result, str]:
    item = _item_or_404(state, item_id)
    kind = IMAGE_TYPES.get(Path(item.path or "").suffix.lower())
    opened = state.guard.open(item) if kind is not None else None
    if opened is None:
        raise HTTPException(404, f"item {item_id} has no image file this service may serve")
    return (*opened, kind)


def _vector_of(state: ServiceState, item_id: int) -> np.ndarray:
    _item_or_404(state, item_id)
    vectors = state.index.index.vectors
    if vectors is None or vectors.rows(np.array([item_id]))[0] < 0:
        raise HTTPException(404, f"the index keeps no vector for item {item_id}")
    return vectors.get(np.array([item_id]))[0]


def _search_embedding(state: ServiceState, payload: Any) -> dict[str, Any]:
    if not isinstance(payload, dict) or not isinstance(payload.get("embedding"), list):
        raise HTTPException(422, 'JSON body must be {"embedding": [numbers], "k": int, "where": "filter"}')
    numbers = payload["embedding"]
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers):
        raise HTTPException(422, "embedding must be a list of numbers")
    vector = np.asarray(numbers, dtype=np.float32)
    dim = state.index.dim
    if vector.shape != (dim,):
        raise HTTPException(422, f"embedding must have {dim} numbers, got {len(numbers)}")
    if not np.isfinite(vector).all():
        raise HTTPException(422, "embedding holds NaN or infinite numbers")
    k = payload.get("k", 10)
    if isinstance(k, bool) or not isinstance(k, int):
        raise HTTPException(422, f"k must be an integer, got {k!r}")
    return _search(state, vector, _form_int(k, 10, state.config.max_k), payload.get("where"))


def _embed_upload(state: ServiceState, data: bytes) -> np.ndarray:
    config = state.config
    if len(data) > config.max_upload_bytes:
        raise HTTPException(413, f"upload larger than {config.max_upload_bytes} bytes")
    _check_pixels(data, config.max_upload_pixels)
    try:
        image = load_image(data, max_pixels=config.max_upload_pixels)
    except ImageLoadError as err:
        raise HTTPException(400, f"not a readable image: {err.reason}") from err
    # Decoding and resizing happen in the request's thread; the model sees a batch of uploads.
    return state.image_batcher.embed(state.transform(image))


def _host_name(header: str) -> str:
    """The host name of a Host header, lower case, without port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    name, _, port = header.rpartition(":")
    return name if name and port.isdigit() else header


def _public_model(source: str | None, show_paths: bool) -> str | None:
    """The model's name for /info: a directory by its last component unless paths are shown."""
    if source and not show_paths and os.path.isabs(source):
        return os.path.basename(source.rstrip(os.sep))
    return source


def _chunks(file: io.BufferedReader, size: int = 1 << 16) -> Any:
    with file:
        while chunk := file.read(size):
            yield chunk


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
    """The request body, counted while it streams: 413 as soon as it passes `limit` bytes (or declares more)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_form(request: Any, limit: int) -> Any:
    """The multipart form of a body of at most `limit` bytes (413 past it, read no further)."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    body = await _read_limited(request, limit)

    async def stream() -> Any:
        yield body

    try:
        return await MultiPartParser(request.headers, stream(), max_files=1, max_fields=4, max_part_size=limit).parse()
    except MultiPartException as err:
        raise HTTPException(400, f"bad multipart body: {err.message}") from err


_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


def _load_json(body: bytes, max_depth: int) -> Any:
    """The JSON value of `body`; 422 for bad JSON or nesting deeper than `max_depth` (checked before parsing)."""
    import json

    bare = np.frombuffer(_JSON_STRING.sub(b'""', body), dtype=np.uint8)
    nesting = np.cumsum(np.isin(bare, (0x5B, 0x7B)).astype(np.int64) - np.isin(bare, (0x5D, 0x7D)))
    if nesting.size and nesting.max() > max_depth:
        raise HTTPException(422, f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as err:
        raise HTTPException(422, f"body is not JSON: {err}") from err


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


class _ThumbnailCache:
    """JPEG thumbnails of served files, keyed by file identity (a changed file gets a new one)."""

    def __init__(self, size: int, capacity: int = 4096) -> None:
        self.size, self.capacity = size, capacity
        self._cache: collections.OrderedDict[str, bytes | None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, file: io.BufferedReader, stat: os.stat_result) -> bytes | None:
        """The thumbnail of the open `file`, or None when it cannot be decoded."""
        key = file_identity(None, stat) or ""
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        data = self._make(file.read())
        with self._lock:
            self._cache[key] = data
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)
        return data

    def _make(self, encoded: bytes) -> bytes | None:
        try:
            image = load_image(encoded, draft_size=(self.size, self.size))
        except ImageLoadError:
            return None
        image.thumbnail((self.size, self.size))
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
    parser.add_argument(
        "--root",
        action="append",
        default=None,
        help="folder whose files may be served (repeatable; default: the roots the index was built with)",
    )
    parser.add_argument(
        "--allow-host",
        action="append",
        default=[],
        help="a Host name the service answers to besides localhost (repeatable; '*' for any)",
    )
    parser.add_argument("--show-paths", action="store_true", help="absolute file paths in responses")
    parser.add_argument("--max-k", type=int, default=ServiceConfig.max_k)
    args = parser.parse_args(argv)
    import uvicorn

    index = SearchIndex.open(args.index, model=args.model)
    hosts = LOCAL_HOSTS + tuple(args.allow_host) + (() if args.host in ("0.0.0.0", "::") else (args.host,))
    config = ServiceConfig(
        max_k=args.max_k,
        roots=tuple(args.root) if args.root else None,
        allowed_hosts=hosts,
        show_paths=args.show_paths,
    )
    app = create_app(index, config, model_name=args.model)
    if args.host not in LOCAL_HOSTS:
        logger.warning("binding to %s: the service is reachable from other machines", args.host)
    print(f"serving {args.index} ({len(index)} items) at http://{args.host}:{args.port}/")
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_SECONDS
    )
    return 0
