"""The service's checks of a request before any work (see `retrieval.service`): the Host allow-list, bodies
counted while they stream, JSON nesting, form integers, and image headers. Each refusal is an HTTP error
naming the limit."""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np
from fastapi import HTTPException, Request
from fastapi.responses import JSONResponse, Response

from ..dedup import Diversity

__all__ = [
    "INT64_MAX",
    "MULTIPART_OVERHEAD",
    "check_host",
    "check_pixels",
    "form_int",
    "form_diversity",
    "host_name",
    "load_json",
    "read_form",
    "read_limited",
]

INT64_MAX = 2**63 - 1  # item ids are SQLite integers
MULTIPART_OVERHEAD = 64 * 1024  # form boundaries and the small fields around an uploaded image
_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')


async def check_host(request: Request, call_next: Any) -> Response:
    """Middleware: 400 for a Host header outside the app's allow-list (DNS rebinding), else the app's response."""
    host = host_name(request.headers.get("host", ""))
    allowed = request.app.state.service.allowed_hosts
    if "*" not in allowed and host not in allowed:
        return JSONResponse(
            {"detail": f"Host {host!r} is not allowed; start the service with --allow-host {host or 'NAME'}"},
            status_code=400,
        )
    return await call_next(request)


def host_name(header: str) -> str:
    """The host name of a Host header, lower case, without port or IPv6 brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    name, _, port = header.rpartition(":")
    return name if name and port.isdigit() else header


def form_int(value: Any, default: int, maximum: int) -> int:
    """`value` (a form field or a JSON number) as k in [1, maximum]; `default` when absent; 422 otherwise."""
    if value is None or value == "":
        return default
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise HTTPException(422, f"k must be an integer, got {value!r}") from None
    if not 1 <= k <= maximum:
        raise HTTPException(422, f"k must be between 1 and {maximum}, got {k}")
    return k


def form_diversity(dedup: Any, mmr: Any) -> Diversity:
    """`dedup=` and `mmr=` (query or form strings, JSON numbers, or absent) as a `Diversity`; 422 with the
    library's message for a value it refuses, as for a bad k."""
    try:
        return Diversity(_form_number("dedup", dedup), _form_number("mmr", mmr))
    except (TypeError, ValueError) as err:
        raise HTTPException(422, str(err)) from None


def _form_number(name: str, value: Any) -> Any:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        return value  # a JSON value: `Diversity` refuses what is not a number
    try:
        return float(value)
    except ValueError:
        raise HTTPException(422, f"{name} must be a number, got {value!r}") from None


async def read_limited(request: Any, limit: int) -> bytes:
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


async def read_form(request: Any, limit: int) -> Any:
    """The multipart form of a body of at most `limit` bytes (413 past it, read no further)."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    body = await read_limited(request, limit)

    async def stream() -> Any:
        yield body

    try:
        return await MultiPartParser(request.headers, stream(), max_files=1, max_fields=4, max_part_size=limit).parse()
    except MultiPartException as err:
        raise HTTPException(400, f"bad multipart body: {err.message}") from err


def load_json(body: bytes, max_depth: int) -> Any:
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


def check_pixels(data: bytes, max_pixels: int) -> None:
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
