"""SearchIndex by text, image and vector; image-to-text over a caption index; recall@k; reader threads."""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from test_retrieval_support import write_images

import vlm
from retrieval.build import BuildOptions, build_index
from retrieval.embedding_job import EmbedOptions
from retrieval.evaluate import paired_recall, recall_at_k
from retrieval.search import SearchIndex
from vlm.embed import embed_images, embed_texts

QUIET = BuildOptions(embed=EmbedOptions(progress=False, batch_size=8))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vlm.create_model("tiny").eval()


@pytest.fixture(scope="module")
def collection(model, tmp_path_factory):
    """Images in colour folders, a table captioning each one, an image index and a caption index."""
    root = tmp_path_factory.mktemp("search")
    paths = write_images(root / "images", 30, broken=0)
    table = root / "captions.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "label"])
        for i, p in enumerate(paths):
            writer.writerow(
                [p, f"a {p.parent.name if p.parent.name != 'deep' else 'red'} square number {i}", p.parent.name]
            )
    build_index(table, root / "images.index", model, options=QUIET)
    build_index(table, root / "captions.index", model, options=QUIET, modality="text")
    return root, paths, table


def test_search_text_image_and_vector_return_ids_scores_metadata(model, collection):
    root, paths, _ = collection
    index = SearchIndex.open(root / "images.index", model=model)
    texts = ["a red square", "a blue square", "a green square"]
    results = index.search_text(texts, k=5)
    assert len(results) == 3 and results.I.shape == (3, 5)
    xq = embed_texts(model, texts).numpy()
    xb = index.index.vectors.get(results.I.ravel()).reshape(3, 5, -1)
    np.testing.assert_allclose(results.D, np.einsum("qd,qkd->qk", xq, xb), atol=1e-5)  # scores are cosines
    assert (np.diff(results.D, axis=1) <= 1e-6).all()  # best first
    hit = results[0][0]
    assert hit.path in {str(p) for p in paths} and hit.caption.startswith("a ") and "label" in hit.extra
    assert index.get(hit.id) is not None and index.get(hit.id).path == hit.path
    assert index.contains_path(hit.path) and not index.contains_path(root / "elsewhere.png")
    # an image finds itself first
    by_image = index.search_image([paths[3], paths[7]], k=3)
    assert [h[0].path for h in by_image.hits] == [str(paths[3]), str(paths[7])]
    assert by_image[0][0].score == pytest.approx(1.0, abs=1e-4)
    by_vector = index.search_vector(torch.tensor(index.index.vectors.xb[5]), k=1)
    assert by_vector.I[0, 0] == index.index.vectors.ids[5]


def test_filters_restrict_results(model, collection):
    root, paths, _ = collection
    index = SearchIndex.open(root / "images.index", model=model)
    results = index.search_text(["a square"] * 2, k=30, where="label = 'blue'")
    blue = {str(p) for p in paths if p.parent.name == "blue"}
    assert {h.path for h in results[0]} == blue and len(results[0]) == len(blue)
    allowed = index.ids_where("label = 'green'")[:3]
    only = index.search_text("a square", k=10, where="label = 'green'")
    assert {h.id for h in index.search_vector(index.index.vectors.xb[0], k=10, ids=allowed)[0]} == set(allowed.tolist())
    assert all(h.extra["label"] == "green" for h in only[0])


def test_image_to_text_over_a_caption_index(model, collection):
    root, paths, _ = collection
    captions = SearchIndex.open(root / "captions.index", model=model)
    assert captions.modality == "text" and len(captions) == 30
    assert captions.manifest.tuning["query_source"] == "collection images (image)"  # tuned for image queries
    results = captions.search_image(paths[:2], k=4)
    image_xq = embed_images(model, paths[:2], progress=False).embeddings
    for i in range(2):
        texts = [h.caption for h in results[i]]
        expected = (embed_texts(model, texts) @ image_xq[i]).numpy()
        np.testing.assert_allclose([h.score for h in results[i]], expected, atol=1e-4)
        all_scores = embed_texts(model, [captions.get(j).caption for j in captions.meta.all_ids()]) @ image_xq[i]
        assert results[i][0].score == pytest.approx(float(all_scores.max()), abs=1e-4)  # the best caption


def test_reader_threads_get_the_same_answers(model, collection):
    root, _, _ = collection
    with pytest.raises(ValueError, match="does not record which model"):  # built from Python without a name
        SearchIndex.open(root / "images.index").search_text("a square")
    index = SearchIndex.open(root / "images.index", model=model)
    queries = [f"a square number {i}" for i in range(24)]
    expected = [index.search_text(q, k=5, where="label != 'red'").I.tolist() for q in queries]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: index.search_text(q, k=5, where="label != 'red'").I.tolist(), queries))
    assert got == expected


def test_recall_at_k_on_a_hand_computed_fixture():
    # 4 queries ranking 8 items; true pairs below. First hit ranks: q0 -> 0, q1 -> 3, q2 -> 6, q3 -> none.
    I = np.array(
        [
            [5, 1, 2, 3, 4, 0, 6, 7],
            [0, 1, 2, 7, 4, 5, 6, 3],
            [1, 2, 3, 4, 5, 0, 6, 7],
            [0, 1, 2, 3, 4, 5, 6, 7],
        ]
    )
    positives = [{5}, {7, 3}, {6}, {9}]
    assert recall_at_k(I, positives, ks=(1, 4, 7, 8)) == {1: 0.25, 4: 0.5, 7: 0.75, 8: 0.75}
    with pytest.raises(ValueError, match="recall@10"):
        recall_at_k(I, positives, ks=(10,))


def test_paired_recall_both_ways():
    rng = np.random.default_rng(0)
    images = rng.standard_normal((6, 8)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    # two captions per image: its own vector (its best match), and a vector near the next image's
    near_next = images[[1, 2, 3, 4, 5, 0]] + 0.05 * rng.standard_normal((6, 8)).astype(np.float32)
    texts = np.concatenate([images, near_next / np.linalg.norm(near_next, axis=1, keepdims=True)])
    owner = list(range(6)) + list(range(6))
    result = paired_recall(images, texts, owner, ks=(1, 6))
    assert result.image_to_text == {1: 1.0, 6: 1.0}  # any of an image's captions counts
    assert result.text_to_image == {1: 0.5, 6: 1.0}  # the second captions point at the wrong image first


def test_a_siglip_model_builds_and_searches_an_index(tmp_path):
    """SigLIP's towers (attention pooling, bidirectional text read at the last position) embed the collection and
    the queries; scores are the cosines of those embeddings."""
    torch.manual_seed(0)
    model = vlm.create_model("tiny-siglip").eval()
    paths = write_images(tmp_path / "images", 12, broken=0)
    build_index(tmp_path / "images", tmp_path / "siglip.index", model, options=QUIET)
    index = SearchIndex.open(tmp_path / "siglip.index", model=model)
    results = index.search_text(["a red square", "a blue square"], k=4)
    xq = embed_texts(model, ["a red square", "a blue square"]).numpy()
    xb = index.index.vectors.get(results.I.ravel()).reshape(2, 4, -1)
    np.testing.assert_allclose(results.D, np.einsum("qd,qkd->qk", xq, xb), atol=1e-5)
    by_image = index.search_image([paths[2]], k=1)
    assert by_image[0][0].path == str(paths[2])
