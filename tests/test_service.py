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
    # A symlink inside the collection that points outside it: left out of the index.
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
    client = TestClient(create_app(index, config, model_name="tiny"), base_url="http://localhost")
    return client, index, root, images


def _png(size=(32, 32), colour=(220, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_info_page_and_schema(served):
    client, index, _, _ = served
    assert client.get("/health").json() == {"status": "ok"}
    info = client.get("/info").json()
    assert info["size"] == len(index) == 12 and info["dim"] == 64 and info["model"] == "tiny"
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
    assert item["metadata"]["path"] == f"{item['metadata']['label']}/0.png"  # relative to its root
    assert image.content == (images / item["metadata"]["path"]).read_bytes()
    thumb = client.get("/items/0/thumbnail")
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) <= 256
    assert client.get("/items/123456").status_code == 404
    assert client.get("/items/123456/image").status_code == 404
    assert client.get("/items/abc").status_code == 422


def test_symlink_escape_is_not_indexed(served):
    _, index, root, images = served
    assert not index.ids_for_path(images / "red" / "escape.png") and not index.ids_for_path(root / "outside.png")


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


# ---- files: roots, links, files changed after indexing -------------------------------------------
@pytest.fixture()
def folder_index(tmp_path):
    """An index of a folder (its own root) holding a link that points outside it, and a file beside it."""
    folder = tmp_path / "photos"
    (folder / "a").mkdir(parents=True)
    for i, colour in enumerate(COLOURS.values()):
        Image.new("RGB", (32, 48), colour).save(folder / "a" / f"{i}.png")
    Image.new("RGB", (30, 30), (1, 2, 3)).save(tmp_path / "private.png")
    os.symlink(tmp_path / "private.png", folder / "a" / "link.png")
    (tmp_path / "notes.png").write_text("a text file named .png, outside the folder")
    torch.manual_seed(0)
    model = vlm.create_model("tiny").eval()
    report = build_index(folder, tmp_path / "index", model, options=QUIET)
    index = SearchIndex.open(tmp_path / "index", model=model)
    client = TestClient(create_app(index, ServiceConfig(), model_name="tiny"), base_url="http://localhost")
    return client, index, folder, report


def _id_of(index, path) -> int:
    [item_id] = index.ids_for_path(path)
    return item_id


def test_a_link_out_of_the_folder_is_left_out_and_reported(folder_index, tmp_path):
    client, index, folder, report = folder_index
    assert report.outside == [str(tmp_path / "private.png")] and "1 outside the roots" in report.summary()
    assert len(index) == 3 and not index.ids_for_path(folder / "a" / "link.png")
    assert index.manifest.roots == [str(folder)]
    # Given as a root, the other folder's file is indexed.
    wider = build_index(folder, tmp_path / "wider", index.model, options=QUIET, roots=[folder, tmp_path])
    assert wider.count == 4 and not wider.outside


def test_served_roots_are_the_recorded_ones_and_never_wider(folder_index, tmp_path):
    client, index, folder, _ = folder_index
    item_id = _id_of(index, folder / "a" / "0.png")
    assert client.get(f"/items/{item_id}/image").status_code == 200
    # A file swapped for a link after start-up is refused, even one pointing inside the parent folder.
    os.replace(folder / "a" / "0.png", tmp_path / "moved.png")
    os.symlink(tmp_path / "notes.png", folder / "a" / "0.png")
    for route in ("image", "thumbnail"):
        response = client.get(f"/items/{item_id}/{route}")
        assert response.status_code == 404 and b"text file" not in response.content


def test_an_indexed_file_outside_the_served_roots_is_refused_by_the_guard(tmp_path):
    # Both folders are indexed (the index's root is their parent); the service serves one of them. The
    # URLs are well-formed ids of real, plain files, so routing lets them through: only the guard refuses.
    photos = tmp_path / "photos"
    for folder, colour in (("served", COLOURS["red"]), ("other", COLOURS["blue"])):
        (photos / folder).mkdir(parents=True)
        Image.new("RGB", (32, 32), colour).save(photos / folder / "0.png")
    torch.manual_seed(0)
    model = vlm.create_model("tiny").eval()
    build_index(photos, tmp_path / "index", model, options=QUIET)
    index = SearchIndex.open(tmp_path / "index", model=model)
    client = TestClient(create_app(index, ServiceConfig(roots=(str(photos / "served"),))), base_url="http://localhost")
    inside, outside = _id_of(index, photos / "served" / "0.png"), _id_of(index, photos / "other" / "0.png")
    for route in ("image", "thumbnail"):
        assert client.get(f"/items/{inside}/{route}").status_code == 200
        assert client.get(f"/items/{outside}/{route}").status_code == 404
    assert client.get(f"/items/{outside}").status_code == 200  # its metadata is still served


def test_a_file_changed_after_indexing_is_refused(folder_index):
    client, index, folder, _ = folder_index
    path = folder / "a" / "1.png"
    item_id = _id_of(index, path)
    assert client.get(f"/items/{item_id}/thumbnail").status_code == 200
    Image.new("RGB", (32, 48), (9, 9, 9)).save(path)  # same name, other content
    assert client.get(f"/items/{item_id}/image").status_code == 404
    assert client.get(f"/items/{item_id}/thumbnail").status_code == 404
    assert client.get(f"/items/{item_id}").status_code == 200  # its metadata is still there


def test_paths_in_responses_are_relative_unless_asked_for(folder_index):
    client, index, folder, _ = folder_index
    item_id = _id_of(index, folder / "a" / "2.png")
    assert client.get(f"/items/{item_id}").json()["metadata"]["path"] == "a/2.png"
    body = client.get("/search", params={"text": "a square", "k": 3}).json()
    assert all(not r["metadata"]["path"].startswith("/") for r in body["results"])
    assert str(folder) not in client.get("/info").text
    shown = TestClient(create_app(index, ServiceConfig(show_paths=True)), base_url="http://localhost")
    assert shown.get(f"/items/{item_id}").json()["metadata"]["path"] == str(folder / "a" / "2.png")


# ---- requests: hosts, ids, types, sizes ----------------------------------------------------------
@pytest.mark.parametrize(
    "host, status",
    [
        ("localhost", 200),
        ("localhost:8000", 200),
        ("127.0.0.1:8000", 200),
        ("[::1]:8000", 200),
        ("LOCALHOST", 200),
        ("evil.example", 400),
        ("evil.example:8000", 400),
        ("localhost.evil.example", 400),
        ("", 400),
    ],
)
def test_host_allow_list(served, host, status):
    client, _, _, _ = served
    assert client.get("/health", headers={"host": host}).status_code == status


def test_host_allow_list_is_configurable(served):
    _, index, _, _ = served
    anyone = TestClient(create_app(index, ServiceConfig(allowed_hosts=("*",))))
    assert anyone.get("/health", headers={"host": "search.example"}).status_code == 200
    named = TestClient(create_app(index, ServiceConfig(allowed_hosts=("search.example",))))
    assert named.get("/health", headers={"host": "search.example:443"}).status_code == 200
    assert named.get("/health", headers={"host": "localhost"}).status_code == 400


@pytest.mark.parametrize(
    "url",
    [
        "/items/9223372036854775808",
        "/items/9223372036854775808/image",
        "/items/-1",
        "/items/99999999999999999999999999/thumbnail",
        "/search?like=9223372036854775808",
        "/search?like=-5",
    ],
)
def test_ids_outside_int64_are_refused(served, url):
    client, _, _, _ = served
    assert client.get(url).status_code == 422


@pytest.mark.parametrize(
    "body",
    [
        {"embedding": [0.1] * 64, "where": 5},
        {"embedding": [0.1] * 64, "where": ["label = 'red'"]},
        {"embedding": [0.1] * 64, "where": {"label": "red"}},
        {"embedding": [0.1] * 64, "k": "3"},
        {"embedding": [0.1] * 64, "k": 2.5},
        {"embedding": [0.1] * 64, "k": True},
        {"embedding": ["0.1"] * 64},
        {"embedding": [True] * 64},
        {"embedding": [[0.1]] * 64},
        {"embedding": "0.1"},
        [0.1] * 64,
        "embedding",
    ],
)
def test_wrongly_typed_json_fields_are_422(served, body):
    client, _, _, _ = served
    assert client.post("/search", json=body).status_code == 422


def test_json_depth_size_and_numbers_are_checked_while_reading(served):
    client, _, _, _ = served
    deep = b"[" * 100_000 + b"]" * 100_000
    assert client.post("/search", content=deep, headers={"content-type": "application/json"}).status_code == 422
    nan = b'{"embedding": [NaN' + b", 0.1" * 63 + b"]}"
    assert client.post("/search", content=nan, headers={"content-type": "application/json"}).status_code == 422
    text = b'{"embedding": [0.1], "where": "' + b"[" * 50 + b'"}'  # brackets inside a string are not nesting
    assert client.post("/search", content=text, headers={"content-type": "application/json"}).status_code == 422
    # With default limits (10 MiB uploads, 256 KiB JSON) the rest of a 4 MiB JSON body is never read.
    defaults = create_app(client.app.state.index, ServiceConfig())
    status, read = _post_chunks(defaults, "application/json", [b" " * 65536] * 64)
    assert status == 413 and read <= 5


def _post_chunks(app, content_type: str, chunks: list[bytes]) -> tuple[int, int]:
    """POSTs `chunks` to /search as a streamed body without Content-Length, straight through ASGI;
    returns the response status and how many chunks the app read."""
    import asyncio

    read, status = [], []

    async def receive():
        if len(read) < len(chunks):
            read.append(1)
            return {"type": "http.request", "body": chunks[len(read) - 1], "more_body": len(read) < len(chunks)}
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])

    headers = [(b"host", b"localhost"), (b"content-type", content_type.encode()), (b"transfer-encoding", b"chunked")]
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/search", "raw_path": b"/search", "query_string": b"", "root_path": "", "headers": headers,
        "client": ("127.0.0.1", 1), "server": ("localhost", 80),
    }
    asyncio.run(app(scope, receive, send))
    return status[0], len(read)


def test_multipart_uploads_are_cut_at_the_limit_while_streaming(served):
    client, _, _, _ = served
    boundary = "xyz"
    head = f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'.encode()
    chunks = [head] + [os.urandom(65536)] * 640  # a chunked 40 MiB upload; the limit here is 200 kB
    status, read = _post_chunks(client.app, f"multipart/form-data; boundary={boundary}", chunks)
    assert status == 413 and read <= 6


# ---- shutdown ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sigterm_stops_the_server_in_bounded_time_with_a_request_in_flight(tmp_path):
    import signal
    import socket
    import time

    from retrieval.service import SHUTDOWN_SECONDS
    from servers import start_server

    folder = tmp_path / "images"
    folder.mkdir()
    for name, colour in COLOURS.items():
        Image.new("RGB", (32, 32), colour).save(folder / f"{name}.png")
    torch.manual_seed(0)
    model = vlm.create_model("tiny").eval()
    model.save_pretrained(tmp_path / "model")
    build_index(folder, tmp_path / "index", model, options=QUIET, model_source=str(tmp_path / "model"))
    proc, url = start_server(tmp_path / "index")
    try:
        # A client that announced a 1 MB upload and sends it a byte at a time keeps a request in flight.
        slow = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
        slow.sendall(b"POST /search HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000\r\n\r\n{")
        time.sleep(0.5)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(SHUTDOWN_SECONDS + 10)
        assert time.monotonic() - started < SHUTDOWN_SECONDS + 5
        slow.close()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def onnx_exports(served, tmp_path_factory):
    """An ONNX export of the model that built `served`'s index, and one of another model."""
    _, index, _, _ = served
    folder = tmp_path_factory.mktemp("onnx")
    vlm.export_onnx(index.model, folder / "same")
    torch.manual_seed(1)
    vlm.export_onnx(vlm.create_model("tiny").eval(), folder / "other")
    return folder / "same", folder / "other"


@pytest.mark.slow
def test_onnx_queries_find_what_the_torch_model_finds(served, onnx_exports):
    client, _, root, images = served
    # Opened without a model, and the manifest records none: loading the torch model would raise.
    index = SearchIndex.open(root / "index")
    config = ServiceConfig(max_k=50, roots=(str(images),))
    onnx_client = TestClient(create_app(index, config, onnx=onnx_exports[0]), base_url="http://localhost")
    for text in ("a red square", "green", "a blue square number 7"):
        params = {"text": text, "k": 12}
        expected, got = client.get("/search", params=params).json(), onnx_client.get("/search", params=params).json()
        _assert_same_ranking(got["results"], expected["results"])
    upload = {"files": {"image": ("q.png", _png(colour=(30, 200, 40)), "image/png")}, "data": {"k": "12"}}
    _assert_same_ranking(onnx_client.post("/search", **upload).json()["results"], client.post("/search", **upload).json()["results"])
    assert index._model is None


@pytest.mark.slow
def test_an_export_of_another_model_is_refused(served, onnx_exports, capsys):
    from vlm.cli import main

    _, index, root, _ = served
    other = vlm.onnx.OnnxCLIP(onnx_exports[1]).fingerprint
    with pytest.raises(ValueError, match=f"fingerprint {other}, but .*fingerprint {index.fingerprint}"):
        create_app(SearchIndex.open(root / "index"), onnx=onnx_exports[1])
    assert main(["serve", str(root / "index"), "--onnx", str(onnx_exports[1])]) == 1
    assert f"fingerprint {other}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", str(root / "index"), "--onnx", str(onnx_exports[0]), "--model", "tiny"])


def _assert_same_ranking(got: list[dict], expected: list[dict]) -> None:
    """Same scores, and the same ids in the same order where the scores are not tied: the squares of one colour
    are the same picture at 32 pixels, so their embeddings, and the order FAISS returns them in, may tie."""
    scores = np.array([r["score"] for r in expected])
    np.testing.assert_allclose([r["score"] for r in got], scores, atol=1e-4)
    starts = np.flatnonzero(np.diff(scores, prepend=np.inf) < -1e-4)  # where a run of tied scores begins
    for start, end in zip(starts, [*starts[1:], len(scores)]):
        assert {r["id"] for r in got[start:end]} == {r["id"] for r in expected[start:end]}
