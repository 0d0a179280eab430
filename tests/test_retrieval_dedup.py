"""Results without near-duplicates and MMR re-ranking (`retrieval.dedup`): hand-derived fixtures for the
pure functions, a brute-force oracle for the over-fetching search, then the library, `vlm search` and the
service on an index holding three copies of each image."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from test_retrieval_support import vector_store, write_images

import vlm
from retrieval import dedup
from retrieval.build import BuildOptions, build_index
from retrieval.embedding_job import EmbedOptions
from retrieval.dedup import Diversity, dedup_positions, diverse_search, mmr_positions, select_positions
from retrieval.index import VectorIndex, exact_search
from retrieval.kinds import make_spec
from retrieval.search import SearchIndex
from vlm.cli import main

QUIET = BuildOptions(embed=EmbedOptions(progress=False, batch_size=8))


def _angles(*degrees: float) -> np.ndarray:
    """Unit vectors in the plane at these angles: cos(a, b) = cos(angle between them)."""
    rad = np.deg2rad(degrees)
    return np.stack([np.cos(rad), np.sin(rad)], axis=1).astype(np.float32)


# ---- pure functions -----------------------------------------------------------------------------------
# 0°, 14°, 28°, 90°: cos(0°,14°) = cos(14°,28°) = 0.970, cos(0°,28°) = 0.883, the rest below 0.47.
CHAIN = _angles(0, 14, 28, 90)
CHAIN_SCORES = np.array([0.9, 0.8, 0.7, 0.6])


def test_dedup_is_greedy_by_score_and_never_drops_for_a_dropped_one():
    # 14° repeats 0° and goes; 28° only resembles 14°, which is not shown, so it stays. clip-back's
    # connected components would drop it too.
    assert dedup_positions(CHAIN_SCORES, CHAIN, 0.95).tolist() == [0, 2, 3]
    assert dedup_positions(CHAIN_SCORES, CHAIN, 0.96).tolist() == [0, 2, 3]
    assert dedup_positions(CHAIN_SCORES, CHAIN, 0.971).tolist() == [0, 1, 2, 3]  # just above 0.970: all stay
    assert dedup_positions(CHAIN_SCORES, CHAIN, 0.88).tolist() == [0, 3]  # 28° now repeats 0° (0.883)
    # The best score wins whatever the input order; the limit stops early.
    reordered = [3, 1, 0, 2]
    assert dedup_positions(CHAIN_SCORES[reordered], CHAIN[reordered], 0.95).tolist() == [2, 3, 0]
    assert dedup_positions(CHAIN_SCORES, CHAIN, 0.95, limit=2).tolist() == [0, 2]


def test_dedup_threshold_one_catches_identical_vectors_despite_rounding():
    # A vector whose self-cosine, as dedup computes it in float32, rounds below 1.
    rows = np.random.default_rng(0).normal(size=(200, 64)).astype(np.float32)
    v = next(r for r in rows if float((dedup._unit(r[None]) @ dedup._unit(r[None])[0])[0]) < 1.0)
    xb = np.stack([v, v, v])
    assert dedup_positions(np.array([0.5, 0.7, 0.7]), xb, 1.0).tolist() == [1]
    distinct = np.concatenate([xb, np.eye(2, 64, dtype=np.float32)])  # two more, unlike each other and v
    assert dedup_positions(np.arange(5.0), distinct, 1.0).tolist() == [4, 3, 2]


@pytest.mark.parametrize("block", [7, 256])  # candidates met in blocks, or all in one
def test_dedup_against_its_definition_on_random_vectors(block, monkeypatch):
    monkeypatch.setattr(dedup, "_BLOCK", block)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(20, 8))
    xb = np.concatenate([base, base[rng.integers(0, 20, 40)] + 0.1 * rng.normal(size=(40, 8))]).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    scores = rng.random(len(xb))
    kept = dedup_positions(scores, xb, 0.95)
    cos = xb @ xb.T
    for i, p in enumerate(kept):  # kept ones are pairwise distinct and come best first
        assert all(cos[p, q] < 0.95 for q in kept[:i]) and (i == 0 or scores[kept[i - 1]] >= scores[p])
    for p in set(range(len(xb))) - set(kept.tolist()):  # each dropped one repeats a better kept one
        assert any(cos[p, q] >= 0.95 - 1e-6 and scores[q] >= scores[p] for q in kept)
    assert 20 <= len(kept) < 60


@pytest.mark.parametrize("gram_max", [0, 8192])  # cosines per pick, or all at once
def test_mmr_hand_computed(gram_max, monkeypatch):
    monkeypatch.setattr(dedup, "_GRAM_MAX", gram_max)
    # lambda 0.5: 0° first (0.45); then 90° (0.3 - 0) beats 14° (0.4 - 0.485) and 28° (0.35 - 0.441);
    # then 14° (-0.085) before 28° (0.35 - 0.5 * 0.883 = -0.0915).
    assert mmr_positions(CHAIN_SCORES, CHAIN, 0.5, 4).tolist() == [0, 3, 1, 2]
    assert mmr_positions(CHAIN_SCORES, CHAIN, 0.5, 2).tolist() == [0, 3]
    assert mmr_positions(CHAIN_SCORES, CHAIN, 1.0, 4).tolist() == [0, 1, 2, 3]  # relevance only
    # lambda 0: the best first, then always the one farthest from those picked: 90°, then 28° (0.883 < 0.970).
    assert mmr_positions(CHAIN_SCORES, CHAIN, 0.0, 3).tolist() == [0, 3, 2]
    # lambda 0.9: 14° (0.72 - 0.097) still beats 90° (0.54 - 0).
    assert mmr_positions(CHAIN_SCORES, CHAIN, 0.9, 2).tolist() == [0, 1]
    assert mmr_positions(CHAIN_SCORES, CHAIN, 0.5, 10).tolist() == [0, 3, 1, 2]  # k past the candidates


def test_dedup_then_mmr_picks_among_the_distinct():
    both = Diversity(dedup=0.95, mmr=0.0)
    assert select_positions(CHAIN_SCORES, CHAIN, 3, both).tolist() == [0, 3, 2]
    assert select_positions(CHAIN_SCORES, CHAIN, 2, Diversity(dedup=0.95)).tolist() == [0, 2]
    # MMR still sees past the best k distinct ones: 90° is 4th, yet second for lambda 0.
    close = _angles(0, 5, 10, 90)
    assert select_positions(CHAIN_SCORES, close, 2, Diversity(dedup=0.999, mmr=0.0)).tolist() == [0, 3]
    assert select_positions(CHAIN_SCORES, CHAIN, 3, Diversity()).tolist() == [0, 1, 2]


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"dedup": 0}, ValueError, "(0, 1]"),
        ({"dedup": -0.5}, ValueError, "(0, 1]"),
        ({"dedup": 1.01}, ValueError, "got 1.01"),
        ({"dedup": float("nan")}, ValueError, "finite"),
        ({"dedup": True}, TypeError, "number"),
        ({"dedup": "0.9"}, TypeError, "number"),
        ({"mmr": -0.1}, ValueError, "[0, 1]"),
        ({"mmr": 1.5}, ValueError, "lambda"),
        ({"mmr": float("inf")}, ValueError, "finite"),
    ],
)
def test_bad_parameters_are_refused_with_the_range(kwargs, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace("[", r"\[").replace("]", r"\]")):
        Diversity(**kwargs)


def test_edges_of_the_ranges_are_accepted():
    assert Diversity(dedup=1, mmr=0).active and Diversity(mmr=1.0).active and not Diversity().active


# ---- over-fetching search against a brute-force oracle --------------------------------------------------
D_SYN = 16
CLUSTER = 150  # more than the first fetch for k up to 16


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    """A flat index where the 150 best matches of the query e0 are near-copies of one vector, then 10
    distinct items, then 30 far ones: dedup must fetch past the cluster to fill k."""
    rng = np.random.default_rng(1)
    e0 = np.eye(D_SYN, dtype=np.float32)[0]
    centre = e0 + 0.05 * np.eye(D_SYN, dtype=np.float32)[1]
    cluster = centre + 0.002 * rng.normal(size=(CLUSTER, D_SYN))
    distinct = np.array([0.6 - 0.02 * j for j in range(10)])[:, None] * e0 + np.eye(D_SYN)[2:12]
    far = rng.normal(size=(30, D_SYN)) - 3 * e0
    xb = np.concatenate([cluster, distinct, far]).astype(np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    store = vector_store(tmp_path_factory.mktemp("clustered"), xb)
    index = VectorIndex.build(make_spec("flat", len(store), D_SYN), store, tmp_path_factory.mktemp("flat"))
    return index, e0[None]


def _oracle(index: VectorIndex, xq: np.ndarray, k: int, diversity: Diversity, ids=None, pool: int | None = None):
    """The whole ranking by brute force (or its top `pool`), then the pure functions."""
    full = exact_search(xq, index.vectors, pool or len(index.vectors), ids)
    valid = full.I[0] >= 0
    cand, scores = full.I[0][valid], full.D[0][valid]
    keep = select_positions(scores, index.vectors.get(cand), k, diversity)
    return cand[keep].tolist()


def test_dedup_fetches_past_a_cluster_of_copies(clustered):
    index, xq = clustered
    cluster = set(index.vectors.ids[:CLUSTER].tolist())
    distinct = set(index.vectors.ids[CLUSTER : CLUSTER + 10].tolist())
    plain = index.search(xq, dedup.first_fetch(5))
    assert set(plain.I[0].tolist()) <= cluster  # the first fetch holds only copies of one item
    found = diverse_search(index, xq, 5, Diversity(dedup=0.95))
    assert found.I[0].tolist() == _oracle(index, xq, 5, Diversity(dedup=0.95))
    assert found.I[0, 0] in cluster and set(found.I[0, 1:].tolist()) <= distinct
    np.testing.assert_allclose(found.D[0], xq[0] @ index.vectors.get(found.I[0]).T, atol=1e-5)  # the cosines


def test_fewer_than_k_distinct_results_are_padded(clustered, monkeypatch):
    index, xq = clustered  # 41 distinct items: the cluster's best, the 10 distinct, the 30 far ones
    found = diverse_search(index, xq, 60, Diversity(dedup=0.95))
    expected = _oracle(index, xq, 60, Diversity(dedup=0.95))
    assert len(expected) == 41 and found.I[0, : len(expected)].tolist() == expected
    assert (found.I[0, len(expected) :] == -1).all() and np.isneginf(found.D[0, len(expected) :]).all()
    # The candidate cap bounds the search: with room for only the cluster, one result remains.
    monkeypatch.setattr(dedup, "MAX_CANDIDATES", 20)  # below the first fetch, which then is the cap
    assert (diverse_search(index, xq, 5, Diversity(dedup=0.95)).I[0] >= 0).sum() == 1


def test_filters_restrict_the_candidates(clustered):
    index, xq = clustered
    allowed = index.vectors.ids[1::2]  # every other item, the cluster's best included or not
    found = diverse_search(index, xq, 6, Diversity(dedup=0.95), allowed=allowed)
    assert set(found.I[0][found.I[0] >= 0].tolist()) <= set(allowed.tolist())
    assert found.I[0].tolist() == _oracle(index, xq, 6, Diversity(dedup=0.95), ids=allowed)


def test_mmr_search_reranks_the_fetched_candidates(clustered):
    index, xq = clustered
    k = 4
    assert diverse_search(index, xq, k, Diversity(mmr=1.0)).I.tolist() == index.search(xq, k).I.tolist()
    found = diverse_search(index, xq, k, Diversity(mmr=0.5))
    assert found.I[0].tolist() == _oracle(index, xq, k, Diversity(mmr=0.5), pool=dedup.first_fetch(k))
    assert found.I[0].tolist() != index.search(xq, k).I[0].tolist()  # the cluster's most spread members
    # MMR alone picks among the first 64 candidates, all in the cluster; after dedup the search looks further.
    both = Diversity(dedup=0.95, mmr=0.5)
    found = diverse_search(index, xq, k, both)
    assert found.I[0].tolist() == _oracle(index, xq, k, both)
    assert len(set(index.vectors.ids[:CLUSTER].tolist()) & set(found.I[0].tolist())) == 1


# ---- library, CLI and service on an index with copies ----------------------------------------------------
@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """Four distinct images, each saved three times: 12 items, every vector shared by three of them."""
    root = tmp_path_factory.mktemp("copies")
    originals = write_images(root / "originals", 4, broken=0)
    table = root / "table.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "group"])
        for g, original in enumerate(originals):
            for c in range(3):
                copy = root / "images" / f"g{g}_c{c}.png"
                copy.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(original, copy)
                writer.writerow([copy, f"a square, group {g} copy {c}", f"g{g}"])
    torch.manual_seed(0)
    model = vlm.create_model("tiny").eval()
    model.save_pretrained(root / "model")
    build_index(table, root / "index", model, options=QUIET, model_source=str(root / "model"))
    return root, SearchIndex.open(root / "index", model=model)


def _groups(hits) -> list[str]:
    return [h.extra["group"] for h in hits]


def test_library_search_collapses_copies_and_keeps_filters(copies):
    _, index = copies
    plain = index.search_text("a square", k=10)[0]
    assert len(plain) == 10 and len(set(_groups(plain))) == 4
    once = index.search_text("a square", k=10, dedup=1.0)[0]
    assert len(once) == 4 and sorted(_groups(once)) == ["g0", "g1", "g2", "g3"]  # one per image
    assert [h.score for h in once] == sorted((h.score for h in once), reverse=True)
    assert once[0].id == plain[0].id  # the best-scored of each group is the one kept
    filtered = index.search_text("a square", k=10, where="\"group\" IN ('g1', 'g2')", dedup=1.0)[0]
    assert sorted(_groups(filtered)) == ["g1", "g2"]
    mmr = index.search_text("a square", k=4, mmr=0.0)[0]
    assert len(set(_groups(mmr))) == 4  # lambda 0 never repeats a vector while a new one is left
    with pytest.raises(ValueError, match="dedup"):
        index.search_text("a square", dedup=2)


def test_cli_dedup_and_mmr(copies, capsys):
    root, _ = copies
    base = ["search", str(root / "index"), "--text", "a square", "-k", "10", "--json"]
    assert main(base + ["--dedup", "1"]) == 0
    hits = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hits"]
    assert len(hits) == 4 and len({h["extra"]["group"] for h in hits}) == 4
    assert main(base + ["--dedup", "1", "--mmr", "0.5"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hits"]) == 4
    assert main(base + ["--mmr", "3"]) == 1
    assert "mmr must be MMR's lambda in [0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not a number
        main(base + ["--dedup", "high"])


@pytest.fixture(scope="module")
def client(copies):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from retrieval.service import ServiceConfig, create_app

    root, index = copies
    config = ServiceConfig(max_k=50, roots=(str(root / "images"),))
    return TestClient(create_app(index, config, model_name="tiny"), base_url="http://localhost")


def groups(body: dict) -> list[str]:
    """The sorted groups of a service response's results."""
    return sorted(r["metadata"]["group"] for r in body["results"])


def test_service_dedup_and_mmr_on_every_search_route(client, copies):
    _, index = copies
    body = client.get("/search", params={"text": "a square", "k": 10, "dedup": 1}).json()
    assert groups(body) == ["g0", "g1", "g2", "g3"]
    first = body["results"][0]["id"]
    like = client.get("/search", params={"like": first, "k": 10, "dedup": 0.999999, "where": "\"group\" != 'g0'"})
    assert like.status_code == 200 and len(like.json()["results"]) == 3
    vector = index.index.vectors.get(np.array([first]))[0]
    by_vector = client.post("/search", json={"embedding": vector.tolist(), "k": 6, "dedup": 1, "mmr": 0.5}).json()
    assert groups(by_vector) == ["g0", "g1", "g2", "g3"]
    image = (copies[0] / "images" / "g2_c0.png").read_bytes()
    upload = client.post("/search", files={"image": ("q.png", image, "image/png")}, data={"k": "5", "dedup": "1"})
    assert upload.status_code == 200 and groups(upload.json()) == ["g0", "g1", "g2", "g3"]
    assert client.get("/search", params={"text": "a square", "k": 5, "mmr": 0}).json()["results"]


@pytest.mark.parametrize(
    "params, words",
    [
        ({"dedup": 0}, "dedup must be a cosine similarity in (0, 1]"),
        ({"dedup": 1.5}, "got 1.5"),
        ({"dedup": "nan"}, "finite"),
        ({"mmr": -1}, "mmr must be MMR's lambda in [0, 1]"),
        ({"dedup": "lots"}, "valid number"),  # FastAPI's own type check, as for k=ten
    ],
)
def test_service_refuses_bad_values(client, params, words):
    response = client.get("/search", params={"text": "a square", **params})
    assert response.status_code == 422 and words in json.dumps(response.json()["detail"]).replace('\\"', '"')


def test_service_refuses_bad_values_in_bodies(client):
    bad_json = client.post("/search", json={"embedding": [0.0] * 63 + [1.0], "mmr": "half"})
    assert bad_json.status_code == 422 and "mmr must be a number" in bad_json.json()["detail"]
    assert client.post("/search", json={"embedding": [0.0] * 63 + [1.0], "dedup": True}).status_code == 422
    image = _png_bytes()
    form = client.post("/search", files={"image": ("q.png", image, "image/png")}, data={"dedup": "1.2"})
    assert form.status_code == 422 and "(0, 1]" in form.json()["detail"]
    form = client.post("/search", files={"image": ("q.png", image, "image/png")}, data={"mmr": "x"})
    assert form.status_code == 422 and "mmr must be a number, got 'x'" in form.json()["detail"]


def _png_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()
