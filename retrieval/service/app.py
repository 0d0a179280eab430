"""The app (`create_app`) that serves a search index, and the command (`vlm serve`) that runs it."""

from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Any

from fastapi import FastAPI

from ..search import SearchIndex
from .metrics import MetricsMiddleware
from .request_checks import check_host
from .routes import build_router
from .state import LOCAL_HOSTS, ServiceConfig, ServiceState

__all__ = ["SHUTDOWN_SECONDS", "create_app", "serve_main"]

logger = logging.getLogger(__name__)

SHUTDOWN_SECONDS = 5  # after SIGTERM, requests still running get this long before the server stops


def create_app(
    index: SearchIndex, config: ServiceConfig | None = None, *, model_name: str | None = None, onnx: Any = None
):
    """The FastAPI app serving `index` (see `retrieval.service`); with `onnx` (an export directory or a
    `vlm.onnx.OnnxCLIP` of the index's model) queries are embedded by onnxruntime, without the torch model."""
    config = config or ServiceConfig()
    state = ServiceState.start(index, config, model_name, onnx)
    app = FastAPI(
        title="vlm search",
        version="1",
        description="Search an image-text index by text, image or vector.",
        lifespan=_lifespan,
    )
    app.state.service = state
    app.state.index, app.state.batcher, app.state.image_batcher = index, state.batcher, state.image_batcher
    app.middleware("http")(check_host)
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)  # added last: outermost, so refused hosts count too
    app.include_router(build_router(config.max_k))
    return app


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> Any:
    yield
    app.state.service.index.close()  # interrupts metadata queries still running, so shutdown does not wait on them


def serve_main(argv: list[str]) -> int:
    """`vlm serve`: serves the index's web page and JSON API with uvicorn until interrupted; returns 0.
    Imports uvicorn when called."""
    parser = argparse.ArgumentParser(prog="vlm serve", description="Serve a search index over HTTP with a web page.")
    parser.add_argument("index", help="index directory written by `vlm index build`")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=None, help="model for queries (default: the one that built the index)")
    parser.add_argument(
        "--onnx",
        default=None,
        metavar="DIR",
        help="embed queries with this ONNX export of the index's model (the torch model is not loaded)",
    )
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
    if args.model and args.onnx:
        parser.error("give --model or --onnx, not both: the export is the model that embeds queries")
    import uvicorn

    index = SearchIndex.open(args.index, model=args.model)
    hosts = LOCAL_HOSTS + tuple(args.allow_host) + (() if args.host in ("0.0.0.0", "::") else (args.host,))
    config = ServiceConfig(
        max_k=args.max_k,
        roots=tuple(args.root) if args.root else None,
        allowed_hosts=hosts,
        show_paths=args.show_paths,
    )
    app = create_app(index, config, model_name=args.model, onnx=args.onnx)
    if args.host not in LOCAL_HOSTS:
        logger.warning("binding to %s: the service is reachable from other machines", args.host)
    print(f"serving {args.index} ({len(index)} items) at http://{args.host}:{args.port}/")
    uvicorn.run(
        app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=SHUTDOWN_SECONDS
    )
    return 0
