"""Every route of the search service through FastAPI's test client, bad inputs included."""

from __future__ import annotations

import csv
import io
import os
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import vlm

fastapi = pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from retrieval.build import BuildOptions, build_index  # noqa: E402
from retrieval.embedding_job import EmbedOptions  # noqa: E402
from retrieval.search import SearchIndex  # noqa: E402
from retrieval.service import MicroBatcher, ServiceConfig, create_app  # noqa: E402

QUIET = BuildOptions(embed=EmbedOptions(progress=False, batch_size=8))
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("service")
    images = root / "collection"
    rows = []
    for i in range(12):
        label = list(COLOURS)[i % 3]
        path = images / label / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (40 + i, 36), COLOURS[label]).save(path)
        rows.append([str(path), f"a {label} square number {i}", label])
    (root / "secret.txt").write_text("outside the collection")
    # A symlink inside the collection that points outside it: indexed, but never served.
    Image.new("RGB", (30, 30), (1, 2, 3)).save(root / "outside.png")
    os.symlink(root / "outside.png", images / "red" / "escape.png")
    rows.append([str(images / "red" / "escape.png"), "a link that escapes", "red"])
    table = root / "table.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "label"])
        writer.writerows(rows)
    torch.manual_seed(0)
    model = vlm.create_model("tiny").eval()
    build_index(table, root / "index", model, options=QUIET)
    index = SearchIndex.open(root / "index", model=model)
    config = ServiceConfig(max_k=50, max_upload_bytes=200_000, max_upload_pixels=1_000_000, roots=(str(images),))
    client = TestClient(create_app(index, config, model_name="tiny"))
    return client, index, root, images


def _png(size=(32, 32), colour=(220, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_info_page_and_schema(served):
    client, index, _, _ = served
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["size"] == len(index) == 13 and info["dim"] == 64 and info["model"] == "tiny"
    assert {"name": "label", "values": ["blue", "green", "red"]} in info["filters"]
    page = client.get("/")
    assert page.status_code == 200 and "search-form" in page.text and "http" not in page.text.split("<script>")[1]
    schema = client.get("/openapi.json").json()
    assert {"/search", "/items/{item_id}", "/items/{item_id}/image", "/health", "/info"} <= set(schema["paths"])


def test_text_search_returns_ids_scores_metadata(served):
    client, index, _, _ = served
    body = client.get("/search", params={"text": "a red square", "k": 5}).json()
    assert len(body["results"]) == 5
    first = body["results"][0]
    assert set(first) == {"id", "score", "metadata", "image_url", "thumbnail_url"}
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    expected = index.search_text("a red square", k=5)
    assert [r["id"] for r in body["results"]] == [h.id for h in expected[0]]


def test_filter_where(served):
    client, _, _, _ = served
    body = client.get("/search", params={"text": "a square", "k": 50, "where": "label = 'green'"}).json()
    assert body["results"] and all(r["metadata"]["label"] == "green" for r in body["results"])
    bad = client.get("/search", params={"text": "x", "where": "label = 'green'; DROP TABLE items"})
    assert bad.status_code == 400


def test_image_upload_embedding_and_more_like_this(served):
    client, index, _, _ = served
    body = client.post("/search", files={"image": ("q.png", _png(), "image/png")}, data={"k": "3"}).json()
    assert len(body["results"]) == 3
    vector = np.zeros(64, dtype=np.float32)
    vector[0] = 1
    by_vector = client.post("/search", json={"embedding": vector.tolist(), "k": 4}).json()
    assert [r["id"] for r in by_vector["results"]] == [h.id for h in index.search_vector(vector[None], k=4)[0]]
    first = body["results"][0]["id"]
    like = client.get("/search", params={"like": first, "k": 2}).json()
    # Solid squares of one colour embed alike, so the item itself may tie with its twins: score ~1.
    assert like["results"][0]["score"] > 0.9999
    assert first in [r["id"] for r in client.get("/search", params={"like": first, "k": 5}).json()["results"]]


@pytest.mark.parametrize(
    "params, status",
    [
        ({"text": "a", "k": 0}, 422),
        ({"text": "a", "k": 51}, 422),
        ({"text": "a", "k": "ten"}, 422),
        ({"text": "x" * 501}, 422),
        ({"text": "   "}, 422),
        ({}, 422),
        ({"like": 999999}, 404),
    ],
)
def test_bad_queries(served, params, status):
    client, _, _, _ = served
    assert client.get("/search", params=params).status_code == status


def test_bad_uploads(served):
    client, _, _, _ = served
    big = client.post("/search", files={"image": ("big.png", os.urandom(300_000), "image/png")})
    assert big.status_code == 413
    text = client.post("/search", files={"image": ("x.png", b"not an image at all", "image/png")})
    assert text.status_code == 400
    # Small on disk, huge in pixels: refused from the header, before decoding.
    bomb = io.BytesIO()
    Image.new("1", (2000, 2000)).save(bomb, format="PNG")
    assert len(bomb.getvalue()) < 200_000
    assert client.post("/search", files={"image": ("bomb.png", bomb.getvalue(), "image/png")}).status_code == 413
    assert client.post("/search", json={"embedding": [1, 2, 3]}).status_code == 422
    assert client.post("/search", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/search", files={"other": ("q.png", _png(), "image/png")}).status_code == 422


def test_items_images_and_thumbnails(served):
    client, index, _, images = served
    item = client.get("/items/0").json()
    assert item["metadata"]["label"] in COLOURS
    image = client.get("/items/0/image")
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content == open(item["metadata"]["path"], "rb").read()
    thumb = client.get("/items/0/thumbnail")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    assert client.get("/items/123456").status_code == 404
    assert client.get("/items/123456/image").status_code == 404
    assert client.get("/items/abc").status_code == 422


def test_symlink_escape_is_not_served(served):
    client, index, _, images = served
    [escape] = index.ids_for_path(images / "red" / "escape.png")
    assert client.get(f"/items/{escape}").status_code == 200  # its metadata is public
    assert client.get(f"/items/{escape}/image").status_code == 404
    assert client.get(f"/items/{escape}/thumbnail").status_code == 404


@pytest.mark.parametrize(
    "url",
    [
        "/items/../secret.txt",
        "/items/%2e%2e/secret.txt",
        "/items/%2e%2e%2fsecret.txt",
        "/items/..%2f..%2fsecret.txt/image",
        "/items/0/../../secret.txt",
        "/static/../../secret.txt",
        "/..%2fsecret.txt",
        "/items/0%2f..%2f..%2fsecret.txt/image",
    ],
)
def test_traversal_attempts_serve_nothing(served, url):
    client, _, root, _ = served
    response = client.get(url)
    assert response.status_code in (404, 405, 422)
    assert b"outside the collection" not in response.content


def test_micro_batcher_batches_concurrent_requests():
    seen = []
    release = threading.Event()

    def embed(texts):
        release.wait(5)
        seen.append(list(texts))
        return np.stack([np.full(2, len(t), dtype=np.float32) for t in texts])

    batcher = MicroBatcher(embed, window_ms=50, max_batch=16)
    futures = [batcher.submit("x" * i) for i in range(1, 9)]
    release.set()
    results = [f.result(timeout=5) for f in futures]
    assert [r[0] for r in results] == list(range(1, 9))
    assert len(seen) < 8  # at least some requests shared a batch


def test_concurrent_image_uploads_share_batches(served):
    from concurrent.futures import ThreadPoolExecutor

    client, index, _, _ = served
    before = list(client.app.state.image_batcher.batches)
    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 220)] * 4
    upload = lambda c: client.post("/search", files={"image": ("q.png", _png(colour=c), "image/png")}, data={"k": "1"})  # noqa: E731
    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(upload, colours))
    assert all(r.status_code == 200 for r in responses)
    # Each upload finds an image of its own colour, whatever batch it was embedded in.
    for colour, response in zip(colours, responses):
        label = [k for k, v in COLOURS.items() if v == colour][0]
        assert response.json()["results"][0]["metadata"]["label"] == label
    assert sum(client.app.state.image_batcher.batches) - sum(before) == len(colours)


def test_service_config_validation():
    with pytest.raises(ValueError, match="max_k must be positive"):
        ServiceConfig(max_k=0)
