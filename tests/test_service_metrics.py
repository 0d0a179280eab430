"""`GET /metrics`: the registry renders Prometheus's text format 0.0.4 exactly, and the service's counts match
the requests it was sent. The output is read back by a strict parser written here (the format's grammar,
plus the rules of histograms), not by string search."""

from __future__ import annotations

import csv
import io
import math
import re
import time
from dataclasses import dataclass, field

import pytest
import torch
from PIL import Image

import vlm

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from retrieval.build import BuildOptions, build_index  # noqa: E402
from retrieval.embedding_job import EmbedOptions  # noqa: E402
from retrieval.search import SearchIndex  # noqa: E402
from retrieval.service import ServiceConfig, create_app  # noqa: E402
from retrieval.service.metrics import CONTENT_TYPE, Counter, Gauge, Histogram, Registry  # noqa: E402
from retrieval.update import add_to_index  # noqa: E402

QUIET = BuildOptions(embed=EmbedOptions(progress=False, batch_size=8))
COLOURS = [(220, 30, 30), (30, 200, 40), (30, 40, 220)]


# ---- a strict parser of the text exposition format 0.0.4 ------------------------------------------
@dataclass
class Family:
    type: str
    help: str | None = None
    samples: dict[tuple[str, frozenset], float] = field(default_factory=dict)

    def get(self, name: str, **labels: str) -> float:
        return self.samples[(name, frozenset(labels.items()))]

    def label_values(self, label: str) -> set[str]:
        return {dict(key)[label] for _, key in self.samples if label in dict(key)}


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')
_VALUE = re.compile(r"[+-]?(?:Inf|NaN|(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)")
_SUFFIXES = {"counter": ("",), "gauge": ("",), "untyped": ("",), "histogram": ("_bucket", "_sum", "_count")}


def parse(text: str) -> dict[str, Family]:
    """Families by name; AssertionError naming the line for anything the format (or a histogram) forbids."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    families: dict[str, Family] = {}
    current, current_name = None, ""
    for number, line in enumerate(text[:-1].split("\n"), 1):
        where = f"line {number}: {line!r}"
        if line.startswith("#"):
            kind, name, rest = (line.split(" ", 3) + [""])[1:4] if line.count(" ") >= 2 else ("", "", "")
            assert kind in ("HELP", "TYPE") and _NAME.fullmatch(name), where
            family = families.get(name)
            if family is None:  # HELP and TYPE open a family, in either order, before its samples
                assert current is None or current.type, f"{where}: the previous family has no TYPE"
                families[name] = current = family = Family("")
                current_name = name
            assert family is current and not family.samples, f"{where}: {kind} after the family's samples"
            if kind == "TYPE":
                assert not family.type and rest in _SUFFIXES, f"{where}: a second TYPE, or an unknown type"
                family.type = rest
            else:
                assert family.help is None, f"{where}: a second HELP"
                assert re.fullmatch(r"(?:[^\\]|\\[\\n])*", rest), f"{where}: HELP escapes only \\\\ and \\n"
                family.help = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), rest)
            continue
        name, labels, value = _sample(line, where)
        assert current is not None and current.type, f"{where}: a sample before its family's TYPE line"
        owner = next((f for f in _SUFFIXES[current.type] if name == current_name + f), None)
        assert owner is not None, f"{where}: not a sample of the family being listed"
        key = (name, frozenset(labels.items()))
        assert key not in current.samples, f"{where}: duplicate series"
        assert ("le" in labels) == (owner == "_bucket"), f"{where}: le belongs on _bucket series only"
        current.samples[key] = value
    for name, family in families.items():
        assert family.type, f"{name}: no TYPE line"
        if family.type == "histogram":
            _check_histogram(name, family)
    return families


def _sample(line: str, where: str) -> tuple[str, dict[str, str], float]:
    match = _NAME.match(line)
    assert match, where
    name, at, labels = match.group(), match.end(), {}
    if line[at : at + 1] == "{":
        at += 1
        while line[at : at + 1] != "}":
            pair = _LABEL.match(line, at)
            assert pair, f"{where}: bad label at column {at}"
            assert pair.group(1) not in labels, f"{where}: label {pair.group(1)} twice"
            labels[pair.group(1)] = re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), pair.group(2))
            at = pair.end()
            if line[at : at + 1] == ",":
                at += 1
            else:
                assert line[at : at + 1] == "}", f"{where}: expected , or }} at column {at}"
        at += 1
    fields = line[at:].split(" ")
    assert fields[0] == "" and len(fields) in (2, 3), f"{where}: expected ' value [timestamp]'"
    assert _VALUE.fullmatch(fields[1]), f"{where}: bad value {fields[1]!r}"
    return name, labels, float(fields[1])


def _check_histogram(name: str, family: Family) -> None:
    series: dict[frozenset, list[tuple[float, float]]] = {}
    for (sample, key), value in family.samples.items():
        if sample.endswith("_bucket"):
            labels = dict(key)
            series.setdefault(frozenset((k, v) for k, v in key if k != "le"), []).append((float(labels["le"]), value))
    for key, buckets in series.items():
        bounds = [b for b, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, f"{name}{dict(key)}: le not ascending to +Inf"
        counts = [c for _, c in buckets]
        assert counts == sorted(counts), f"{name}{dict(key)}: buckets are not cumulative"
        assert family.samples[(f"{name}_count", key)] == counts[-1], f"{name}{dict(key)}: _count != +Inf bucket"
        assert (f"{name}_sum", key) in family.samples, f"{name}{dict(key)}: no _sum"


# ---- the registry --------------------------------------------------------------------------------
def test_registry_renders_the_exact_text_format():
    registry = Registry()
    hits = registry.add(Counter("hits_total", "Hits,\nby path \\ kind.", ("path",)))
    hits.inc(path='a"b\\c\nd')
    hits.inc(2, path="plain")
    registry.add(Gauge("size", "Items.", lambda: 7))
    seconds = registry.add(Histogram("wait_seconds", "Waits.", (1, 2.5), ("kind",)))
    for value in (0.5, 1, 3):
        seconds.observe(value, kind="x")
    expected = (
        "# HELP hits_total Hits,\\nby path \\\\ kind.\n"
        "# TYPE hits_total counter\n"
        'hits_total{path="a\\"b\\\\c\\nd"} 1.0\n'
        'hits_total{path="plain"} 2.0\n'
        "# HELP size Items.\n"
        "# TYPE size gauge\n"
        "size 7.0\n"
        "# HELP wait_seconds Waits.\n"
        "# TYPE wait_seconds histogram\n"
        'wait_seconds_bucket{kind="x",le="1.0"} 2.0\n'  # 1 falls in le="1.0": bounds are inclusive
        'wait_seconds_bucket{kind="x",le="2.5"} 2.0\n'
        'wait_seconds_bucket{kind="x",le="+Inf"} 3.0\n'
        'wait_seconds_sum{kind="x"} 4.5\n'
        'wait_seconds_count{kind="x"} 3.0\n'
    )
    assert registry.render() == expected
    families = parse(expected)
    assert families["hits_total"].get("hits_total", path='a"b\\c\nd') == 1
    assert families["hits_total"].help == "Hits,\nby path \\ kind."


@pytest.mark.parametrize(
    "text, complaint",
    [
        ("x 1\n", "before its family's TYPE"),
        ("# TYPE x counter\nx{a=\"\\t\"} 1\n", "bad label"),
        ("# TYPE x counter\nx 1", "line feed"),
        ("# TYPE x counter\nx one\n", "bad value"),
        ("# TYPE x counter\nx 1\n# TYPE x counter\n", "TYPE after the family's samples"),
        ("# HELP x X.\n# HELP x X.\n# TYPE x gauge\nx 1\n", "second HELP"),
        ("# HELP x X \\t.\n# TYPE x gauge\nx 1\n", "HELP escapes only"),
        ("# TYPE h histogram\nh_bucket{le=\"1.0\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n", "cumulative"),
        ("# TYPE h histogram\nh_bucket{le=\"1.0\"} 1\nh_sum 1\nh_count 1\n", "+Inf"),
        ("# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1\nh_count 1\n", "_count"),
    ],
)
def test_the_parser_is_strict(text, complaint):
    with pytest.raises(AssertionError, match=re.escape(complaint)):
        parse(text)


def test_metrics_refuse_misuse():
    with pytest.raises(ValueError, match=r"takes the labels \['route'\]"):
        Counter("c", "C.", ("route",)).inc(path="/x")
    with pytest.raises(ValueError, match="only goes up"):
        Counter("c", "C.").inc(-1)
    with pytest.raises(ValueError, match="strictly increasing"):
        Histogram("h", "H.", (2, 1))
    registry = Registry()
    registry.add(Gauge("g", "G."))
    with pytest.raises(ValueError, match="already registered"):
        registry.add(Counter("g", "G."))


# ---- the service ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("metrics")
    images = root / "collection"
    images.mkdir()

    def table(name: str, numbers: range) -> str:
        rows = []
        for i in numbers:
            path = images / f"{i}.png"
            Image.new("RGB", (32, 32), COLOURS[i % 3]).save(path)
            rows.append([str(path), f"square number {i}"])
        with open(root / name, "w", newline="") as f:
            csv.writer(f).writerows([["image", "caption"], *rows])
        return str(root / name)

    torch.manual_seed(0)
    model = vlm.create_model("tiny").eval()
    build_index(table("first.csv", range(6)), root / "index", model, options=QUIET)
    return root, model, lambda: add_to_index(root / "index", table("more.csv", range(6, 9)), model, options=QUIET)


@pytest.fixture
def client(built):
    root, model, _ = built
    index = SearchIndex.open(root / "index", model=model)
    app = create_app(index, ServiceConfig(roots=(str(root / "collection"),)))
    return TestClient(app, base_url="http://localhost", raise_server_exceptions=False)


def _scrape(client) -> dict[str, Family]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"] == CONTENT_TYPE
    return parse(response.text)


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), COLOURS[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def test_counts_after_known_requests(client):
    for _ in range(3):
        assert client.get("/health").status_code == 200
    for text in ("a red square", "a blue square"):
        assert client.get("/search", params={"text": text}).status_code == 200
    assert client.post("/search", files={"image": ("q.png", _png(), "image/png")}).status_code == 200
    assert client.get("/items/1").status_code == 200
    assert client.get("/items/99999").status_code == 404
    assert client.get("/items/1/image").status_code == 200
    assert client.get("/health", headers={"host": "evil.example"}).status_code == 400
    families = _scrape(client)

    requests = families["vlm_requests_total"]
    assert requests.get("vlm_requests_total", route="/health", method="GET", status="200") == 3
    assert requests.get("vlm_requests_total", route="/search", method="GET", status="200") == 2
    assert requests.get("vlm_requests_total", route="/search", method="POST", status="200") == 1
    assert requests.get("vlm_requests_total", route="/items/{item_id}", method="GET", status="404") == 1
    assert requests.get("vlm_requests_total", route="/items/{item_id}/image", method="GET", status="200") == 1
    # Refused by the Host check before routing: counted, under the one label of unrouted requests.
    assert requests.get("vlm_requests_total", route="unmatched", method="GET", status="400") == 1
    assert sum(requests.samples.values()) == 10  # the scrape itself is counted after its body is sent
    latency = families["vlm_request_seconds"]
    assert latency.get("vlm_request_seconds_count", route="/health") == 3
    assert latency.get("vlm_request_seconds_count", route="/items/{item_id}") == 2
    assert 0 < latency.get("vlm_request_seconds_sum", route="/search") < 60

    batches = families["vlm_embedding_batch_size"]
    assert batches.type == "histogram"
    # Sequential queries: each one is a batch of one.
    assert batches.get("vlm_embedding_batch_size_count", kind="text") == 2
    assert batches.get("vlm_embedding_batch_size_bucket", kind="text", le="1.0") == 2
    assert batches.get("vlm_embedding_batch_size_sum", kind="image") == 1

    assert families["vlm_index_vectors"].get("vlm_index_vectors") == 6
    assert families["process_start_time_seconds"].get("process_start_time_seconds") <= time.time()
    again = _scrape(client)["vlm_requests_total"]
    assert again.get("vlm_requests_total", route="/metrics", method="GET", status="200") == 1


def test_hostile_paths_and_methods_get_bounded_labels(client):
    for i in range(20):
        assert client.get(f"/no/such/page-{i}").status_code == 404
    assert client.get("/items/not-a-number").status_code == 422
    assert client.request("BREW", "/health").status_code == 405
    requests = _scrape(client)["vlm_requests_total"]
    assert requests.get("vlm_requests_total", route="unmatched", method="GET", status="404") == 20
    assert requests.get("vlm_requests_total", route="/items/{item_id}", method="GET", status="422") == 1
    assert requests.get("vlm_requests_total", route="/health", method="other", status="405") == 1
    assert requests.label_values("route") == {"unmatched", "/items/{item_id}", "/health"}
    assert requests.label_values("method") == {"GET", "other"}


def test_an_exception_in_a_route_counts_as_500(client, monkeypatch):
    def broken(item_id):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(client.app.state.service.index, "get", broken)
    assert client.get("/items/1").status_code == 500
    requests = _scrape(client)["vlm_requests_total"]
    assert requests.get("vlm_requests_total", route="/items/{item_id}", method="GET", status="500") == 1


def test_index_gauges_follow_a_reload(built, client):
    before = _scrape(client)
    version = before["vlm_index_version"].get("vlm_index_version")
    _, _, add_more = built
    add_more()
    client.app.state.service.index.reload()
    after = _scrape(client)
    assert after["vlm_index_vectors"].get("vlm_index_vectors") == 9
    assert after["vlm_index_version"].get("vlm_index_version") == version + 1
