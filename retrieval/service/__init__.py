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

The modules: `app` (the app and `vlm serve`), `routes` (the routes and what they do), `request_checks` (the
checks above, before any work), `file_guard` (which files are served, and their thumbnails), `state` (the
limits, the batching embedders, what the routes share).
"""

from .app import SHUTDOWN_SECONDS, create_app, serve_main
from .state import MicroBatcher, ServiceConfig, ServiceState

__all__ = ["SHUTDOWN_SECONDS", "ServiceConfig", "ServiceState", "MicroBatcher", "create_app", "serve_main"]
