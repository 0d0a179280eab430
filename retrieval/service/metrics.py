"""The service's metrics (`GET /metrics`) in Prometheus's text exposition format 0.0.4.

A small thread-safe registry (`Counter`, `Gauge`, `Histogram` with fixed buckets) rather than a dependency:
the service needs four metric families, and requests update them from the event loop, FastAPI's thread
pool and the embedding threads at once. `ServiceMetrics` holds the service's families:

    vlm_requests_total{route,method,status}   requests answered, by route template
    vlm_request_seconds{route}                time from the request to the last byte of its response
    vlm_embedding_batch_size{kind}            queries per model call ("text" or "image")
    vlm_index_vectors, vlm_index_version      the index's size and manifest version, read at each scrape
    process_start_time_seconds                when the serving process started (Unix time)

Labels are bounded whatever a client sends: `route` is the matched route's template ("/items/{item_id}",
never the raw path) or "unmatched" for any request no route matched (404s, refused Host headers), and
`method` is one of the standard HTTP methods or "other".
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fastapi import Request
from fastapi.responses import Response

__all__ = [
    "BATCH_BUCKETS",
    "CONTENT_TYPE",
    "LATENCY_BUCKETS",
    "UNMATCHED",
    "Counter",
    "Gauge",
    "Histogram",
    "MetricsMiddleware",
    "Registry",
    "ServiceMetrics",
    "metrics_text",
]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Prometheus clients' default latency buckets, minus 0.075/0.75/7.5: fewer series, same decades.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # ServiceConfig.max_batch is 64 by default
UNMATCHED = "unmatched"
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})

_Labels = tuple[str, ...]  # label values, in the order of the metric's label names


class _Metric:
    """One metric family: a name, its help text, its label names, and samples per label values."""

    kind = ""

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        self.name, self.help, self.labels = name, help, tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, Any]) -> _Labels:
        if set(labels) != set(self.labels):
            raise ValueError(f"{self.name} takes the labels {list(self.labels)}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.labels)

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        """(sample name, labels, value) of every series, in a stable order."""
        raise NotImplementedError

    def render(self) -> str:
        """The family in the text format: HELP and TYPE lines, then one line per sample."""
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for name, labels, value in self.samples():
            pairs = ",".join(f'{key}="{_escape_label(val)}"' for key, val in labels.items())
            lines.append(f"{name}{{{pairs}}} {_number(value)}" if pairs else f"{name} {_number(value)}")
        return "\n".join(lines) + "\n"


class Counter(_Metric):
    """A count that only goes up, per label values."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[_Labels, float] = {}

    def inc(self, amount: float = 1.0, **labels: Any) -> None:
        """Adds `amount` (>= 0) to the series of `labels`."""
        if amount < 0:
            raise ValueError(f"{self.name}: a counter only goes up, got inc({amount}); use a Gauge")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        """(sample name, labels, value) of every series, sorted by label values."""
        with self._lock:
            values = sorted(self._values.items())
        return [(self.name, dict(zip(self.labels, key)), value) for key, value in values]


class Gauge(_Metric):
    """A value without labels that goes up and down: set, or read from `function` at each scrape."""

    kind = "gauge"

    def __init__(self, name: str, help: str, function: Callable[[], float] | None = None) -> None:
        super().__init__(name, help)
        self._function = function
        self._value = 0.0

    def set(self, value: float) -> None:
        """The gauge's value from now on (ValueError for a gauge read from a function)."""
        if self._function is not None:
            raise ValueError(f"{self.name} is read from a function at each scrape; it cannot be set")
        self._value = float(value)

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        """The one (name, no labels, value) sample, read from the function when there is one."""
        return [(self.name, {}, float(self._function() if self._function is not None else self._value))]


class Histogram(_Metric):
    """Observations counted into fixed buckets, per label values; rendered as cumulative `_bucket`
    series (the last one `le="+Inf"`), `_sum` and `_count`."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Sequence[float], labels: Sequence[str] = ()) -> None:
        if "le" in labels:
            raise ValueError(f"{name}: 'le' is the bucket label of a histogram; name the label otherwise")
        bounds = [float(b) for b in buckets]
        if not bounds or bounds != sorted(set(bounds)) or not all(map(math.isfinite, bounds)):
            raise ValueError(f"{name}: buckets must be finite and strictly increasing, got {list(buckets)}")
        super().__init__(name, help, labels)
        self.buckets = tuple(bounds)
        self._series: dict[_Labels, list[float]] = {}  # per bucket counts (not cumulative), +Inf, then sum

    def observe(self, value: float, **labels: Any) -> None:
        """Counts `value` into the first bucket whose bound is at least it, for the series of `labels`."""
        key = self._key(labels)
        slot = next((i for i, bound in enumerate(self.buckets) if value <= bound), len(self.buckets))
        with self._lock:
            series = self._series.setdefault(key, [0.0] * (len(self.buckets) + 2))
            series[slot] += 1
            series[-1] += value

    def samples(self) -> list[tuple[str, dict[str, str], float]]:
        """The `_bucket` (cumulative), `_sum` and `_count` samples of every series."""
        with self._lock:
            all_series = sorted((key, list(series)) for key, series in self._series.items())
        samples = []
        for key, series in all_series:
            labels = dict(zip(self.labels, key))
            cumulative = 0.0
            for bound, count in zip((*self.buckets, math.inf), series[:-1]):
                cumulative += count
                samples.append((f"{self.name}_bucket", {**labels, "le": _number(bound)}, cumulative))
            samples.append((f"{self.name}_sum", labels, series[-1]))
            samples.append((f"{self.name}_count", labels, cumulative))
        return samples


class Registry:
    """The metric families of one app, rendered in the order they were added."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def add(self, metric: _Metric) -> Any:
        """Registers `metric` and returns it; ValueError for a name already taken."""
        if metric.name in self._metrics:
            raise ValueError(f"a metric named {metric.name!r} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def render(self) -> str:
        """Every family in the text exposition format 0.0.4."""
        return "".join(metric.render() for metric in self._metrics.values())


@dataclass(frozen=True)
class ServiceMetrics:
    """The service's metric families (see the module docstring), shared by the routes, the middleware
    and the embedding threads."""

    registry: Registry
    requests: Counter
    latency: Histogram
    batch_sizes: Histogram

    @classmethod
    def create(cls, index: Any) -> "ServiceMetrics":
        """The families of a service over `index` (a `SearchIndex`), whose size and version are read
        at each scrape, so that a `reload()` shows."""
        import psutil  # a dependency of accelerate, hence always there

        registry = Registry()
        requests = registry.add(Counter("vlm_requests_total", "Requests answered.", ("route", "method", "status")))
        latency = registry.add(
            Histogram(
                "vlm_request_seconds",
                "Seconds from a request's arrival to the last byte of its response.",
                LATENCY_BUCKETS,
                ("route",),
            )
        )
        batches = registry.add(
            Histogram("vlm_embedding_batch_size", "Queries embedded per model call.", BATCH_BUCKETS, ("kind",))
        )
        registry.add(Gauge("vlm_index_vectors", "Vectors in the served index.", lambda: len(index)))
        version = Gauge("vlm_index_version", "Manifest version of the served index.", lambda: index.manifest.version)
        registry.add(version)
        started = registry.add(Gauge("process_start_time_seconds", "Start time of the process since the Unix epoch."))
        started.set(psutil.Process().create_time())
        return cls(registry, requests, latency, batches)

    def observe_request(self, route: str | None, method: str, status: int, seconds: float) -> None:
        """Counts one answered request; `route` is the matched route's template (None: no route matched)."""
        route = route or UNMATCHED
        method = method if method in _METHODS else "other"
        self.requests.inc(route=route, method=method, status=status)
        self.latency.observe(seconds, route=route)

    def batch_observer(self, kind: str) -> Callable[[int], None]:
        """The callback a `MicroBatcher` calls with the size of each batch it embeds."""
        return lambda size: self.batch_sizes.observe(size, kind=kind)

    def render(self) -> str:
        """All the service's metrics in Prometheus text format 0.0.4."""
        return self.registry.render()


class MetricsMiddleware:
    """ASGI middleware that counts and times every HTTP request. Plain ASGI rather than
    `BaseHTTPMiddleware` so that the time covers streamed bodies (images) to their last byte."""

    def __init__(self, app: Any, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500  # an exception that escapes the app is answered 500 by Starlette's outermost layer
        started = time.perf_counter()

        async def send_and_note(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            # The router records the route it matched in the scope it shares with its middleware.
            route = getattr(scope.get("route"), "path", None)
            self.metrics.observe_request(route, scope["method"], status, time.perf_counter() - started)


async def metrics_text(request: Request) -> Response:
    """GET /metrics: the service's metrics for a Prometheus scrape."""
    return Response(request.app.state.service.metrics.render(), media_type=CONTENT_TYPE)


def _number(value: float) -> str:
    """A sample value or bucket bound as Prometheus's own clients write it ("1.0", "+Inf", "NaN")."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")
