"""The service's routes (see `retrieval.service`) on one `APIRouter`, and what they do: searches by text,
item, upload or vector, items' metadata, files and thumbnails."""

from __future__ import annotations

import functools
import io
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, Response, StreamingResponse

from vlm.images import ImageLoadError, load_image

from ..dedup import Diversity
from ..metadata import Item
from ..search import Hit
from .file_guard import IMAGE_TYPES, FileGuard, file_chunks
from .metrics import metrics_text
from .request_checks import INT64_MAX, MULTIPART_OVERHEAD, check_pixels, form_diversity, form_int, load_json
from .request_checks import read_form, read_limited
from .state import ServiceState

__all__ = ["build_router"]

STATIC = Path(__file__).parents[1] / "static"
# The route functions have no docstrings on purpose: FastAPI would publish them in /openapi.json.
ITEM_ID = PathParam(..., ge=0, le=INT64_MAX, description="the item's id")


def build_router(max_k: int) -> APIRouter:
    """The service's routes, in the schema's order; built per app because `k`'s upper bound (checked by
    FastAPI and shown in the schema) is the app's `max_k`."""
    search_get = functools.partial(_search_get, k=Query(10, ge=1, le=max_k, description="number of results"))
    search_get.__doc__ = None  # else the schema would describe the route with `partial`'s own docstring
    router = APIRouter()
    router.add_api_route("/", _page, name="page", response_class=HTMLResponse, include_in_schema=False)
    router.add_api_route("/health", _health, name="health")
    router.add_api_route("/info", _info, name="info")
    router.add_api_route("/metrics", metrics_text, name="metrics", include_in_schema=False)  # Prometheus text
    router.add_api_route("/search", search_get, name="search_get")
    router.add_api_route("/search", _search_post, name="search_post", methods=["POST"])
    router.add_api_route("/items/{item_id}", _item, name="item")
    router.add_api_route("/items/{item_id}/image", _image, name="image")
    router.add_api_route("/items/{item_id}/thumbnail", _thumbnail, name="thumbnail")
    return router


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
    k: int = Query(10, ge=1, description="number of results"),  # `build_router` adds the app's upper bound
    where: str | None = Query(None, description="metadata filter, e.g. label = 'cat' (see the README's grammar)"),
    dedup: float | None = Query(None, description="drop results with at least this cosine, in (0, 1], to a better one"),
    mmr: float | None = Query(None, description="re-rank by maximal marginal relevance with this lambda in [0, 1]"),
) -> dict[str, Any]:
    if (text is None) == (like is None):
        raise HTTPException(422, "give exactly one of text= or like=")
    ranking = form_diversity(dedup, mmr)
    if like is not None:
        return _search(state, _vector_of(state, like), k, where, ranking)
    if not text.strip():
        raise HTTPException(422, "text is empty")
    if len(text) > state.config.max_text_chars:
        raise HTTPException(422, f"text is longer than {state.config.max_text_chars} characters")
    return _search(state, state.batcher.embed(text), k, where, ranking)


async def _search_post(request: Request, state: ServiceState = Depends(_service)) -> dict[str, Any]:
    config = state.config
    kind = request.headers.get("content-type", "")
    if kind.startswith("application/json"):
        body = await read_limited(request, config.max_json_bytes)
        return _search_embedding(state, load_json(body, config.max_json_depth))
    if kind.startswith("multipart/form-data"):
        form = await read_form(request, config.max_upload_bytes + MULTIPART_OVERHEAD)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise HTTPException(422, "multipart body needs an `image` file field")
        data = await upload.read(config.max_upload_bytes + 1)
        k = form_int(form.get("k"), 10, config.max_k)
        ranking = form_diversity(form.get("dedup"), form.get("mmr"))
        return _search(state, _embed_upload(state, data), k, form.get("where") or None, ranking)
    raise HTTPException(415, "send multipart/form-data with an `image` file, or JSON {\"embedding\": [...]}")


def _item(item_id: int = ITEM_ID, state: ServiceState = Depends(_service)) -> dict[str, Any]:
    return _item_json(_item_or_404(state, item_id), state.guard, state.config.show_paths)


def _image(item_id: int = ITEM_ID, state: ServiceState = Depends(_service)) -> StreamingResponse:
    file, stat, kind = _open_file(state, item_id)
    return StreamingResponse(file_chunks(file), media_type=kind, headers={"Content-Length": str(stat.st_size)})


def _thumbnail(item_id: int = ITEM_ID, state: ServiceState = Depends(_service)) -> Response:
    file, stat, _ = _open_file(state, item_id)
    with file:
        data = state.thumbnails.get(file, stat)
    if data is None:
        raise HTTPException(404, f"item {item_id}'s image cannot be decoded")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


# ---- what the routes do --------------------------------------------------------------------------
def _search(state: ServiceState, xq: np.ndarray, k: int, where: Any, ranking: Diversity) -> dict[str, Any]:
    """The response of a search for the vector `xq`: hits with scores and metadata, and the time taken."""
    config = state.config
    if where is not None and not isinstance(where, str):
        kind = type(where).__name__
        raise HTTPException(422, f"where must be a string (a filter such as \"label = 'cat'\"), got {kind}")
    if where is not None and len(where) > config.max_where_chars:
        raise HTTPException(422, f"where is longer than {config.max_where_chars} characters")
    started = time.perf_counter()
    try:
        xq = np.asarray(xq, dtype=np.float32).reshape(1, -1)
        results = state.index.search_vector(xq, k=k, where=where or None, dedup=ranking.dedup, mmr=ranking.mmr)
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
        raise HTTPException(
            422, 'JSON body must be {"embedding": [numbers], "k": int, "where": "filter", "dedup": 0.95, "mmr": 0.5}'
        )
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
    ranking = form_diversity(payload.get("dedup"), payload.get("mmr"))
    return _search(state, vector, form_int(k, 10, state.config.max_k), payload.get("where"), ranking)


def _embed_upload(state: ServiceState, data: bytes) -> np.ndarray:
    config = state.config
    if len(data) > config.max_upload_bytes:
        raise HTTPException(413, f"upload larger than {config.max_upload_bytes} bytes")
    check_pixels(data, config.max_upload_pixels)
    try:
        image = load_image(data, max_pixels=config.max_upload_pixels)
    except ImageLoadError as err:
        raise HTTPException(400, f"not a readable image: {err.reason}") from err
    # Decoding and resizing happen in the request's thread; the model sees a batch of uploads.
    return state.image_batcher.embed(state.transform(image))


def _item_json(item: Item | Hit, guard: FileGuard, show_paths: bool) -> dict[str, Any]:
    path = item.path if show_paths else guard.public_path(item.path)
    return {
        "id": item.id,
        "metadata": {"path": path, "caption": item.caption, **item.extra},
        "image_url": f"/items/{item.id}/image",
        "thumbnail_url": f"/items/{item.id}/thumbnail",
    }


def _public_model(source: str | None, show_paths: bool) -> str | None:
    """The model's name for /info: a directory by its last component unless paths are shown."""
    if source and not show_paths and os.path.isabs(source):
        return os.path.basename(source.rstrip(os.sep))
    return source
