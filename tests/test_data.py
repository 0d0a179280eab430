"""Image collections: unreadable files are skipped, counted and named; embeddings match the model."""

import logging

import numpy as np
import pytest
import torch
from PIL import Image

import vlm
from vlm.data import FailureLog, find_images, iter_image_batches
from vlm.embed import embed_images, embed_texts


def _folder(tmp_path, n_good=5):
    rng = np.random.default_rng(0)
    for i in range(n_good):
        sub = tmp_path / ("a" if i % 2 else "b")
        sub.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(sub / f"{i}.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (tmp_path / "notes.txt").write_text("not an image, and not listed")
    return tmp_path


def test_find_images_recursive_and_sorted(tmp_path):
    _folder(tmp_path)
    found = find_images(tmp_path)
    assert [p.name for p in found] == ["1.png", "3.png", "0.png", "2.png", "4.png", "broken.jpg"]
    assert find_images(tmp_path, recursive=False) == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_images(tmp_path / "missing")


def test_broken_image_is_skipped_counted_and_named(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="vlm.data")
    model = vlm.create_model("tiny").eval()
    sources = find_images(_folder(tmp_path))
    result = embed_images(model, sources, batch_size=4, progress=False)
    assert result.embeddings.shape == (5, 64)
    assert len(result.failures) == 1
    assert result.failures[0].source.endswith("broken.jpg")
    assert sources[result.failures[0].index].name == "broken.jpg"
    assert "broken.jpg" in caplog.text
    # Each embedding belongs to the source its index names.
    transform = vlm.image_transform(model)
    j = 2
    with torch.no_grad():
        expected = model.encode_image(transform(vlm.load_image(sources[result.indices[j]]))[None], normalize=True)
    torch.testing.assert_close(result.embeddings[j], expected[0], atol=1e-5, rtol=1e-5)


def test_workers_give_the_same_batches(tmp_path):
    sources = find_images(_folder(tmp_path))
    transform = vlm.image_transform(vlm.get_preset("tiny"))
    log0, log2 = FailureLog(), FailureLog()
    a = list(iter_image_batches(sources, transform, batch_size=2, failure_log=log0, progress=False))
    b = list(iter_image_batches(sources, transform, batch_size=2, num_workers=2, failure_log=log2, progress=False))
    assert torch.equal(torch.cat([x.indices for x in a]), torch.cat([x.indices for x in b]))
    assert torch.equal(torch.cat([x.images for x in a]), torch.cat([x.images for x in b]))
    assert log0.count == log2.count == 1
    assert log0.summary(len(sources)) == "1 of 6 items skipped (unreadable)"


def test_embed_texts_sorted_batching_matches_one_batch():
    model = vlm.create_model("tiny").eval()
    texts = ["a dog", "a much longer sentence about a cat sitting on a mat", "x", "two words"]
    with torch.no_grad():
        expected = model.encode_text(vlm.get_tokenizer(model)(texts), normalize=True)
    torch.testing.assert_close(embed_texts(model, texts, batch_size=3), expected, atol=1e-5, rtol=1e-5)
    assert embed_texts(model, []).shape == (0, 64)
