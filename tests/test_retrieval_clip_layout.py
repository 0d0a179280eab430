"""clip-retrieval's img_emb/ text_emb/ metadata/ layout: `vlm index build --embeddings` and
`vlm index export`, on shards generated here the way `clip-retrieval inference` writes them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_retrieval_support import write_images

import vlm
from retrieval import build_from_embeddings, remove_from_index
from retrieval.index_directory import IndexDirectory
from retrieval.metadata import METADATA_FILE, MetadataStore
from retrieval.vectors import VectorStore
from vlm.cli import main
from vlm.embed import embed_texts

SHARD_ROWS = (7, 5, 6)
COMMON = ["--no-progress", "--kind", "flat"]


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_layout(
    root: Path, text_emb: np.ndarray, *, dtype=np.float16, pad: int = 2, seed: int = 0, captions=None
) -> dict:
    """img_emb = the caption's embedding plus noise (so a caption's text query finds its own image),
    text_emb as given, metadata with clip-retrieval's columns; shards of SHARD_ROWS rows."""
    rng = np.random.default_rng(seed)
    n, d = text_emb.shape
    img = _unit(text_emb + 0.3 * rng.standard_normal((n, d)) / np.sqrt(d)).astype(dtype)
    for sub in ("img_emb", "text_emb", "metadata"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    start = 0
    for i, rows in enumerate(SHARD_ROWS):
        part = slice(start, start + rows)
        name = str(i).zfill(pad)
        np.save(root / "img_emb" / f"img_emb_{name}.npy", img[part])
        np.save(root / "text_emb" / f"text_emb_{name}.npy", text_emb[part].astype(dtype))
        table = {
            "image_path": [f"/data/images/{j:05d}.jpg" for j in range(start, start + rows)],
            "caption": captions[part],
            "url": [f"http://example.com/{j}.jpg" for j in range(start, start + rows)],
            "key": [f"{j:09d}" for j in range(start, start + rows)],  # webdataset's key: a reserved name here
            "width": list(range(start, start + rows)),
        }
        pq.write_table(pa.table(table), root / "metadata" / f"metadata_{name}.parquet")
        start += rows
    return {"img": img, "captions": captions}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("clip_layout")
    torch.manual_seed(0)
    model = vlm.create_model("tiny").eval()
    model.save_pretrained(root / "model")
    colours = ("red", "green", "blue", "yellow", "black", "white")
    things = ("car", "cat", "boat")
    captions = [f"a {c} {t}" for c in colours for t in things]
    assert len(captions) == sum(SHARD_ROWS)
    text_emb = embed_texts(model, captions).numpy()
    data = write_layout(root / "emb", text_emb, captions=captions)
    return root, model, text_emb, data


def _manifest(capsys, index: Path) -> dict:
    capsys.readouterr()
    assert main(["index", "info", str(index), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def _contents(index: Path) -> tuple[np.ndarray, np.ndarray, list]:
    store_dir = IndexDirectory(index)
    vdir = store_dir.version_path(store_dir.read_manifest())
    store = VectorStore.open(vdir, mmap=False)
    meta = MetadataStore(vdir / METADATA_FILE)
    items = meta.get_many(store.ids.tolist())
    meta.close()
    return np.array(store.ids), np.array(store.xb), items


def test_import_records_the_model_so_text_queries_and_updates_work(setup, capsys):
    root, _, _, data = setup
    index = root / "imported.index"
    model = ["--model", str(root / "model")]
    assert main(["index", "build", "--embeddings", str(root / "emb"), "--out", str(index), *model, *COMMON]) == 0
    assert "build: 18 items" in capsys.readouterr().out
    manifest = _manifest(capsys, index)
    assert manifest["tuning"]["query_source"] == "text_emb (text)" and manifest["model"]["source"]
    ids, xb, items = _contents(index)
    np.testing.assert_array_equal(ids, np.arange(18))  # shard order is id order
    np.testing.assert_allclose(xb, _unit(data["img"].astype(np.float32)), atol=1e-6)  # fp16 -> normalised fp32
    assert items[9].path == "/data/images/00009.jpg" and items[9].caption == data["captions"][9]
    assert items[9].extra == {"url": "http://example.com/9.jpg", "key_": "000000009", "width": 9}

    for i in (0, 8, 17):  # the recorded model embeds the text; the caption's own image comes first
        assert main(["search", str(index), "--text", data["captions"][i], "-k", "1", "--json"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hits"][0]["id"] == i

    again = ["index", "build", "--embeddings", str(root / "emb"), "--out", str(index), *model, *COMMON]
    assert main(again) == 0 and "unchanged" in capsys.readouterr().out
    write_images(root / "more", 3, broken=0)
    assert main(["index", "add", str(index), str(root / "more"), "--no-progress"]) == 0
    assert "added 3" in capsys.readouterr().out
    assert _manifest(capsys, index)["count"] == 21 and _contents(index)[0][-1] == 20


def test_caption_index_from_text_emb_tunes_on_images(setup, capsys):
    root, *_ = setup
    index = root / "captions.index"
    argv = ["index", "build", "--embeddings", str(root / "emb"), "--modality", "text", "--out", str(index)]
    assert main([*argv, *COMMON]) == 0
    manifest = _manifest(capsys, index)
    assert manifest["modality"] == "text" and manifest["tuning"]["query_source"] == "img_emb (image)"
    assert manifest["model"]["source"] is None  # no --model: vector queries only


def test_import_export_import_round_trip(setup, tmp_path, capsys):
    root, model, text_emb, _ = setup
    captions = [f"caption {i}" for i in range(18)]
    data = write_layout(tmp_path / "emb", text_emb, dtype=np.float32, pad=0, captions=captions)
    first = tmp_path / "first.index"
    build_from_embeddings(tmp_path / "emb", first, options=_flat())
    ids, xb, _ = _contents(first)
    np.testing.assert_array_equal(xb, data["img"])  # unit float32 rows are kept bit for bit
    remove_from_index(first, ids=[2, 9])  # ids with gaps must survive the round trip

    assert main(["index", "export", str(first), str(tmp_path / "out"), "--shard-size", "4"]) == 0
    assert "exported 16 image vectors" in capsys.readouterr().out
    exported = sorted(p.name for p in (tmp_path / "out" / "img_emb").iterdir())
    assert exported == [f"img_emb_{i}.npy" for i in range(4)]  # padded to the digits of the shard count (4)
    columns = pq.read_schema(tmp_path / "out" / "metadata" / "metadata_0.parquet").names
    assert {"id", "image_path", "caption", "url", "key", "width"} <= set(columns)

    second = tmp_path / "second.index"
    assert main(["index", "build", "--embeddings", str(tmp_path / "out"), "--out", str(second), *COMMON]) == 0
    ids1, xb1, items1 = _contents(first)
    ids2, xb2, items2 = _contents(second)
    np.testing.assert_array_equal(ids1, ids2)
    assert 2 not in ids2 and 9 not in ids2
    np.testing.assert_array_equal(xb1, xb2)
    assert items1 == items2
    assert _manifest(capsys, second)["next_id"] == 18


def _flat():
    from retrieval import BuildOptions
    from retrieval.embedding_job import EmbedOptions

    return BuildOptions(kind="flat", embed=EmbedOptions(progress=False))


def _break_rows(emb: Path) -> str:
    table = pq.read_table(emb / "metadata" / "metadata_01.parquet")
    pq.write_table(table.slice(0, 3), emb / "metadata" / "metadata_01.parquet")
    return "img_emb_01.npy holds 5 rows but .*metadata_01.parquet holds 3"


def _break_dim(emb: Path) -> str:
    np.save(emb / "img_emb" / "img_emb_02.npy", np.ones((6, 4), np.float16))
    return "img_emb_02.npy holds 4-dimensional vectors but .*img_emb_00.npy holds 64"


def _break_nan(emb: Path) -> str:
    x = np.load(emb / "img_emb" / "img_emb_01.npy")
    x[3] = np.nan
    np.save(emb / "img_emb" / "img_emb_01.npy", x)
    return "img_emb_01.npy row 3 is not finite"


def _not_npy(emb: Path) -> str:
    (emb / "img_emb" / "img_emb_02.npy").write_text("not an array")
    return "img_emb_02.npy is not a readable .npy file"


def _stray(emb: Path) -> str:
    (emb / "img_emb" / "img_emb_3.npz").write_bytes(b"")
    return "img_emb_3.npz is not a shard"


def _no_metadata(emb: Path) -> str:
    (emb / "metadata" / "metadata_02.parquet").unlink()
    return "img_emb_02.npy has no counterpart .*metadata_2.parquet"


def _text_only(emb: Path) -> str:
    for path in (emb / "img_emb").iterdir():
        path.unlink()
    (emb / "img_emb").rmdir()
    return "has no img_emb/ folder; it has text_emb/: pass --modality text"


@pytest.mark.parametrize("damage", [_break_rows, _break_dim, _break_nan, _not_npy, _stray, _no_metadata, _text_only])
def test_bad_layouts_are_clear_errors(setup, tmp_path, capsys, damage):
    root, model, text_emb, data = setup
    emb = tmp_path / "emb"
    write_layout(emb, text_emb, captions=data["captions"])
    message = damage(emb)
    with pytest.raises(ValueError, match=message):
        build_from_embeddings(emb, tmp_path / "bad.index", options=_flat())
    assert not (tmp_path / "bad.index" / "manifest.json").exists()
    assert main(["index", "build", "--embeddings", str(emb), "--out", str(tmp_path / "bad.index"), *COMMON]) == 1
    assert "vlm index: error:" in capsys.readouterr().err  # one line, no traceback


def test_a_model_that_did_not_make_the_embeddings_is_refused(setup, tmp_path):
    root, model, text_emb, data = setup
    other = _unit(np.random.default_rng(1).standard_normal(text_emb.shape)).astype(np.float32)
    write_layout(tmp_path / "emb", other, captions=data["captions"])
    with pytest.raises(ValueError, match="does not reproduce the caption embeddings"):
        build_from_embeddings(tmp_path / "emb", tmp_path / "x.index", model=model, options=_flat())
    write_layout(tmp_path / "narrow", other[:, :8].copy(), captions=data["captions"])
    with pytest.raises(ValueError, match="makes 64-dimensional embeddings but .* holds 8"):
        build_from_embeddings(tmp_path / "narrow", tmp_path / "y.index", model=model, options=_flat())


def test_import_streams_one_chunk_at_a_time(tmp_path):
    """float16 shards convert chunk by chunk (same vectors as converting the whole), the import's Python
    heap stays far below the whole set (6 shards, peak under half their float32 size), and every row is
    kept when paths repeat (LAION lists some images twice)."""
    import tracemalloc

    from retrieval.clip_retrieval import open_layout, read_vectors
    from retrieval.embeddings_build import _write_vectors_and_metadata

    rows, d, shards = 1500, 384, 6
    rng = np.random.default_rng(0)
    for sub in ("img_emb", "metadata"):
        (tmp_path / sub).mkdir()
    for i in range(shards):
        np.save(tmp_path / "img_emb" / f"img_emb_{i}.npy", _unit(rng.standard_normal((rows, d))).astype(np.float16))
        paths = pa.table({"image_path": [f"/x/{i % 2}/{j}.jpg" for j in range(rows)]})  # shards repeat paths
        pq.write_table(paths, tmp_path / "metadata" / f"metadata_{i}.parquet")
    layout = open_layout(tmp_path)
    whole = _unit(np.load(layout.shards[0].vectors).astype(np.float32))
    chunked = np.concatenate(list(read_vectors(layout.shards[0], chunk=7)))
    np.testing.assert_array_equal(chunked, next(read_vectors(layout.shards[0])))
    np.testing.assert_allclose(chunked, whole, atol=1e-5)  # rows within 1e-5 of unit norm are kept as they are

    (tmp_path / "v").mkdir()
    tracemalloc.start()
    try:
        store = _write_vectors_and_metadata(tmp_path / "v", layout, False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(store) == rows * shards and peak < rows * shards * d * 4 / 2, peak
    meta = MetadataStore(tmp_path / "v" / METADATA_FILE)
    first, repeat = meta.get_many([5, rows * 2 + 5])  # a repeated path keeps its row, under a key of its own
    assert first.path == repeat.path == "/x/0/5.jpg"
    assert (first.key, repeat.key) == ("/x/0/5.jpg", f"/x/0/5.jpg#{rows * 2 + 5}")
    meta.close()
