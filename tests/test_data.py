"""Image collections: unreadable files are skipped, counted and named; embeddings match the model."""

import logging
from pathlib import Path

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


# ---- the one data layer: tables, columns, labels, datasets, collections ----------------------------
def _table_rows(tmp_path):
    """Three rows naming images relative to the table's folder, with a text and a label column."""
    _folder(tmp_path)
    return [
        {"Image": "a/1.png", "caption": "one", "label": "cat"},
        {"Image": "b/0.png", "caption": "zero", "label": "1"},
        {"Image": "a/3.png", "caption": "", "label": "0"},
    ]


def write_table(path, rows):
    """`rows` (dicts with the same keys) as the table `path` in the format its suffix names."""
    import csv
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            writer.writeheader()
            writer.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".json", ".parquet"])
def test_every_table_format_reads_the_same_collection(tmp_path, suffix):
    from vlm.data import open_images

    rows = _table_rows(tmp_path)
    write_table(tmp_path / f"t{suffix}", rows)
    images = open_images(str(tmp_path / f"t{suffix}"))
    # The image column is found by name whatever its case; paths are taken from the table's folder.
    assert images.sources == [str(tmp_path / r["Image"]) for r in rows] == images.keys
    assert images.captions == ["one", "zero", None] and images.extra == {"label": ["cat", "1", "0"]}
    assert images.folders == [str(tmp_path / "a"), str(tmp_path / "b")]  # the folders its rows name


def test_list_files_folders_and_the_kind_of_a_source(tmp_path):
    from vlm.data import image_files, open_images, source_kind

    (tmp_path / "f").mkdir()
    _folder(tmp_path / "f")
    (tmp_path / "l.txt").write_text("# a comment\nf/a/1.png\tone\n\nf/b/0.png\n")
    listed = open_images(str(tmp_path / "l.txt"))
    assert listed.sources == [str(tmp_path / "f" / "a" / "1.png"), str(tmp_path / "f" / "b" / "0.png")]
    assert listed.captions == ["one", None]
    folder = open_images(str(tmp_path / "f"))
    assert len(folder) == 6 and folder.extra["folder"] == ["a", "a", "b", "b", "b", "b"]
    both = image_files([tmp_path / "f" / "a", tmp_path / "l.txt"])
    assert [Path(n).name for n in both.names] == ["1.png", "3.png", "1.png", "0.png"]
    kinds = {name: source_kind(str(tmp_path / name)) for name in ("f", "l.txt", "x.csv", "s-{0..3}.tar")}
    assert kinds == {"f": "folder", "l.txt": "list", "x.csv": "table", "s-{0..3}.tar": "tar"}
    with pytest.raises(FileNotFoundError, match=r"nope does not exist; .*hf:NAME_OR_DIR"):
        source_kind(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="only `vlm train` reads"):
        open_images(str(tmp_path / "s.tar"))


def test_one_column_picker_and_one_error():
    from vlm.data import pick_column

    assert pick_column(["Caption", "IMG"], "image", where="t") == "IMG"
    assert pick_column(["text", "caption"], "text", where="t") == "caption"  # the table's order of preference
    assert pick_column(["png", "image"], "image", where="t", prefer=["png"]) == "png"
    assert pick_column(["a"], "text", where="t", required=False) is None
    with pytest.raises(ValueError, match=r"t has no column 'x' \(the label column\); its columns are \['a'\]; "
                       r"name it with --label-column \(eval.label_column in a training config\)"):  # fmt: skip
        pick_column(["a"], "label", "x", where="t")
    with pytest.raises(ValueError, match=r"none of the usual image columns \(image, img,.*--image-column"):
        pick_column(["a"], "image", where="t")


@pytest.mark.parametrize(
    "values, names, ids, classes",
    [
        (["cat", "dog", "cat"], None, (0, 1, 0), ("cat", "dog")),  # names, sorted
        ([2, 0.0, "1"], None, (2, 0, 1), ("0", "1", "2")),  # numbers, 3.0 as 3
        (["1", "2"], ["1", "2", "3"], (0, 1), ("1", "2", "3")),  # all names, even numeric ones
        (["1", "2"], ["zero", "one", "two"], (1, 2), ("zero", "one", "two")),  # else all numbers
        (["dog", "0"], ["cat", "dog"], (1, 0), ("cat", "dog")),  # a mixed column without doubt
    ],
)
def test_the_label_rule(values, names, ids, classes):
    from vlm.data import label_ids

    assert label_ids(values, names, where="t") == (ids, classes)


@pytest.mark.parametrize(
    "values, names, message",
    [
        (["cat", "1", "0"], ["cat", "1"], r"mixes class names and class numbers, and \['1'\] could be either"),
        (["cat", "2"], ["cat", "dog"], r"label 2 is outside the 2 class names"),
        (["cat", "cow"], ["cat", "dog"], r"labels \['cow'\] are not among the class names"),
        (["-1"], None, "negative"),
        (["a", " "], None, "row 2 has an empty 'label'"),
        (["a"], ["a", "a"], "repeat a name"),
    ],
)
def test_the_label_rule_refuses(values, names, message):
    from vlm.data import label_ids

    with pytest.raises(ValueError, match=message):
        label_ids(values, names, where="t")


def test_hf_spec_saved_dataset_and_undecoded_images(tmp_path):
    import datasets

    from vlm.data import HFImageColumn, load_hf_dataset, open_images, open_labelled

    _folder(tmp_path)
    files = [str(p) for p in sorted(tmp_path.glob("*/*.png"))][:4]
    features = datasets.Features({"picture": datasets.Image(), "label": datasets.ClassLabel(names=["x", "y"])})
    rows = {"picture": [{"bytes": Path(f).read_bytes(), "path": None} for f in files], "label": [1, 0, 1, 1]}
    ds = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"has splits \['train', 'test'\]; choose one with --split"):
        load_hf_dataset(f"hf:{tmp_path / 'hf'}")
    with pytest.raises(ValueError, match="has no split 'dev'"):
        load_hf_dataset(tmp_path / "hf", "dev")  # a saved directory is recognised without the prefix
    images = open_images(f"hf:{tmp_path / 'hf'}", split="test")
    assert isinstance(images.sources, HFImageColumn) and images.sources[0] == Path(files[0]).read_bytes()
    assert images.names[:2] == ["test[0]", "test[1]"] and images.extra == {"label": ["y", "x", "y", "y"]}
    labelled = open_labelled(f"hf:{tmp_path / 'hf'}", split="train")
    assert labelled.class_names == ("x", "y") and labelled.labels == (1, 0, 1, 1)
    # Rows that are files on disk are read from them.
    on_disk = datasets.Dataset.from_dict({"image": files}).cast_column("image", datasets.Image())
    assert open_images(on_disk).sources == files
