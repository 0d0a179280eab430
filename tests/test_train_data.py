"""Training data: every source kind, bad samples skipped and counted, batches that resume exactly."""

import csv
import io
import json
import logging
import os
import tarfile
import time
from itertools import islice

import numpy as np
import pytest
import torch
from PIL import Image

import vlm
from training.data import PairBatchSampler, Position, build_loader
from training.sources import HFSource, StreamSource, TableSource, expand_shards, open_source


@pytest.fixture
def one_thread():
    """Tiny models on one thread: on a busy shared machine two OpenMP threads make their small
    matrix products many times slower (each thread waits for the other to be scheduled)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


COLORS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "black": (10, 10, 10)}


def write_pairs(root, n=16, *, size=32, bad=False):
    """`n` coloured squares with captions in root/images and root/pairs.csv (image, caption, label).

    With `bad`, three more rows: a missing file, a file that is not an image, an empty caption.
    """
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    names = list(COLORS)
    for i in range(n):
        color = names[i % len(names)]
        pixels = np.clip(np.array(COLORS[color]) + rng.integers(-20, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:03d}.png")
        rows.append((f"images/{i:03d}.png", f"a {color} square", color))
    if bad:
        (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        rows += [("images/missing.png", "a red square", "red"), ("images/broken.png", "a blue square", "blue")]
        rows.append(("images/000.png", "  ", "red"))
    with open(root / "pairs.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "label"])
        writer.writerows(rows)
    return root / "pairs.csv"


def _transform(train=False):
    return vlm.image_transform(vlm.get_preset("tiny"), train=train)


def _loader(source, **kw):
    opts = dict(local_batch=4, image_size=32, tokenizer=vlm.get_tokenizer(32), seed=0)
    opts.update(kw)
    return build_loader(source, _transform(train=True), **opts)


# ---- sources -------------------------------------------------------------------------------------
def test_table_formats_agree(tmp_path):
    csv_path = write_pairs(tmp_path, 6)
    rows = list(csv.DictReader(open(csv_path)))
    with open(tmp_path / "pairs.tsv", "w") as f:
        f.write("image\tcaption\n" + "".join(f"{r['image']}\t{r['caption']}\n" for r in rows))
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps({"image": r["image"], "caption": r["caption"]}) + "\n" for r in rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Parquet with the images embedded as bytes, the way Hugging Face exports image datasets.
    blobs = [{"bytes": (tmp_path / r["image"]).read_bytes(), "path": None} for r in rows]
    pq.write_table(pa.table({"img": blobs, "text": [r["caption"] for r in rows]}), tmp_path / "pairs.parquet")
    expected = [(str(tmp_path / r["image"]), r["caption"]) for r in rows]
    for name in ("pairs.csv", "pairs.tsv", "pairs.jsonl"):
        source = open_source(str(tmp_path / name))
        assert isinstance(source, TableSource)
        assert [(r.image, r.text) for r in source.records()] == expected
    parquet = open_source(str(tmp_path / "pairs.parquet"), image_column="img")
    assert [r.text for r in parquet.records()] == [c for _, c in expected]
    assert parquet[0].image == (tmp_path / rows[0]["image"]).read_bytes()


def test_missing_column_names_the_columns(tmp_path):
    path = write_pairs(tmp_path, 2)
    with pytest.raises(ValueError, match=r"no column 'txt' \(the text column\).*\['image', 'caption', 'label'\].*data.text_column"):
        open_source(str(path), text_column="txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(str(tmp_path / "nope.csv"))


def test_hf_imagefolder_and_saved_dataset(tmp_path):
    import datasets

    write_pairs(tmp_path / "folder", 4)
    folder = tmp_path / "folder" / "images"
    with open(folder / "metadata.jsonl", "w") as f:
        for i in range(4):
            f.write(json.dumps({"file_name": f"{i:03d}.png", "text": f"picture {i}"}) + "\n")
    source = open_source(str(tmp_path / "folder" / "images"))
    assert isinstance(source, HFSource)
    assert sorted(r.text for r in source.records()) == [f"picture {i}" for i in range(4)]
    assert vlm.load_image(source[0].image).size == (32, 32)

    ds = datasets.Dataset.from_dict(
        {"picture": [str(folder / f"{i:03d}.png") for i in range(4)], "caption": ["a", "b", "c", "d"]}
    ).cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    saved = open_source(str(tmp_path / "saved"))
    assert [r.text for r in saved.records()] == ["a", "b", "c", "d"]
    assert vlm.load_image(saved[2].image).size == (32, 32)
    # The hf: spec every verb takes: training used to hand "hf:DIR" to load_dataset as a hub name.
    prefixed = open_source(f"hf:{tmp_path / 'saved'}")
    assert isinstance(prefixed, HFSource) and [r.text for r in prefixed.records()] == ["a", "b", "c", "d"]


def _write_shards(root, n_shards=2, per_shard=6, cls=None):
    """Tar shards of PNG + txt samples (the second shard's third image is garbage); with `cls`, each
    sample also has a .cls holding `cls(shard, index)`."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(per_shard):
                key = f"{s}_{i:03d}"
                buf = io.BytesIO()
                Image.fromarray(np.full((16, 16, 3), 20 * i, np.uint8)).save(buf, format="PNG")
                data = b"garbage" if (s, i) == (1, 2) else buf.getvalue()
                fields = [("png", data), ("txt", f"sample {key}".encode())]
                fields += [("cls", str(cls(s, i)).encode())] if cls else []
                for ext, payload in fields:
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    return str(root / ("shard-{00000..%05d}.tar" % (n_shards - 1)))


def test_tar_shards_stream_split_and_resume(tmp_path):
    spec = _write_shards(tmp_path)
    assert len(expand_shards(spec)) == 2
    source = open_source(spec)
    assert isinstance(source, StreamSource)
    everything = [r.text for r in source.iterate(epoch=0, seed=1, rank=0, world_size=1)]
    assert sorted(everything) == sorted(f"sample {s}_{i:03d}" for s in range(2) for i in range(6))
    assert [r.text for r in source.records(3)] == ["sample 0_000", "sample 0_001", "sample 0_002"]  # shard order
    assert [r.text for r in source.iterate(epoch=0, seed=1, rank=0, world_size=1, skip=5)] == everything[5:]
    assert [r.text for r in source.iterate(epoch=1, seed=1, rank=0, world_size=1)] != everything
    halves = [{r.text for r in source.iterate(epoch=0, seed=1, rank=k, world_size=2)} for k in range(2)]
    assert halves[0].isdisjoint(halves[1]) and halves[0] | halves[1] == set(everything)
    # The broken image in the second shard is skipped, named by shard and key.
    batches = list(islice(_loader(source, local_batch=4), 3))
    failures = [f for b in batches for f in b.failures]
    assert [f.source.split(":")[-1] for f in failures] == ["1_002"]
    assert sum(len(b) for b in batches) == 11


def test_a_cls_that_is_not_a_number_names_its_shard_and_key(tmp_path):
    good = open_source(_write_shards(tmp_path / "good", cls=lambda s, i: i % 3), need_text=False, need_label=True)
    assert [r.label for r in good.records(4)] == [0, 1, 2, 0]
    spec = _write_shards(tmp_path / "bad", cls=lambda s, i: "cat" if (s, i) == (1, 4) else i % 3)
    source = open_source(spec, need_text=False, need_label=True)
    with pytest.raises(ValueError, match=r"shard-00001\.tar:1_004 has \.cls 'cat', not an integer"):
        source.records()


# ---- bad samples ---------------------------------------------------------------------------------
def test_bad_samples_are_skipped_counted_and_named(tmp_path, caplog):
    source = open_source(str(write_pairs(tmp_path, 5, bad=True)))
    sampler_len = len(source)  # 8 rows: 5 good, 3 bad
    batches = list(islice(_loader(source, local_batch=sampler_len, num_workers=1), 2))
    for batch in batches:
        assert len(batch) == 5 and batch.images.shape == (5, 3, 32, 32) and batch.texts.shape == (5, 32)
        reasons = {os.path.basename(f.source): f.reason for f in batch.failures}
        assert set(reasons) == {"missing.png", "broken.png", "000.png"}
        assert reasons["missing.png"] == "file not found"
        assert reasons["000.png"] == "empty caption"
    from vlm.data import FailureLog

    caplog.set_level(logging.WARNING, logger="vlm.data")
    log = FailureLog(show=2)
    for batch in batches:
        log.add(batch.failures)
    assert log.count == 6
    assert len([r for r in caplog.records if r.getMessage().startswith("skipped")]) == 2


def test_a_stuck_sample_is_skipped_after_the_timeout(tmp_path):
    path = write_pairs(tmp_path, 3)
    # Opening a named pipe with no writer blocks for ever: a file on a hung network mount.
    os.mkfifo(tmp_path / "images" / "stuck.png")
    with open(path, "a") as f:
        f.write("images/stuck.png,a stuck square,red\n")
    source = open_source(str(path))
    start = time.perf_counter()
    batch = next(iter(_loader(source, local_batch=4, sample_timeout=0.5)))
    assert time.perf_counter() - start < 20
    assert len(batch) == 3
    assert [os.path.basename(f.source) for f in batch.failures] == ["stuck.png"]
    assert "data.sample_timeout" in batch.failures[0].reason


# ---- order and resumption ------------------------------------------------------------------------
def test_batches_resume_exactly_and_ignore_workers(tmp_path):
    source = open_source(str(write_pairs(tmp_path, 12)))
    full = list(islice(_loader(source), 6))  # 3 steps per epoch: crosses two epoch boundaries
    assert [b.position for b in full] == [
        Position(0, 1),
        Position(0, 2),
        Position(0, 3),
        Position(1, 1),
        Position(1, 2),
        Position(1, 3),
    ]
    resumed = list(islice(_loader(source, start=Position(0, 2), num_workers=2), 4))
    for a, b in zip(full[2:], resumed):
        assert a.names == b.names
        assert torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts)
    # Augmentations differ between epochs for the same image.
    first = {
        n: x for n, x in zip(full[0].names + full[1].names + full[2].names, torch.cat([b.images for b in full[:3]]))
    }
    second = {
        n: x for n, x in zip(full[3].names + full[4].names + full[5].names, torch.cat([b.images for b in full[3:]]))
    }
    assert set(first) == set(second) and not all(torch.equal(first[n], second[n]) for n in first)


def test_processes_split_each_global_batch(tmp_path):
    source = open_source(str(write_pairs(tmp_path, 16)))
    one = list(islice(PairBatchSampler(source, local_batch=8, seed=3), 2))
    two = [list(islice(PairBatchSampler(source, local_batch=4, rank=r, world_size=2, seed=3), 2)) for r in range(2)]
    for step in range(2):
        assert [k.index for k in one[step]] == [k.index for k in two[0][step] + two[1][step]]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PairBatchSampler(source, local_batch=9, world_size=2)


def test_the_zeroshot_set_follows_the_one_label_rule(tmp_path):
    from training.config import load_config
    from training.evaluation import load_eval_sets

    path = write_pairs(tmp_path, 4)
    rows = path.read_text().splitlines()
    # A column that mixes names and class numbers: "red" by name, "2" numbering eval.classnames.
    path.write_text("\n".join([rows[0], rows[1], rows[2].rsplit(",", 1)[0] + ",2", *rows[3:]]) + "\n")
    names = "['red','green','blue','black']"
    config = load_config(None, [f"eval.zeroshot={path}", f"eval.classnames={names}", "eval.max_samples=3"])
    zeroshot = load_eval_sets(config).zeroshot
    assert zeroshot.labels.tolist() == [0, 2, 2] and len(zeroshot.images) == 3
    # Without class names: the data's own, sorted.
    assert load_eval_sets(load_config(None, [f"eval.zeroshot={path}"])).zeroshot.classnames == ("2", "black", "blue", "red")
    # Tar shards: an integer .cls.
    shards = _write_shards(tmp_path / "tars", cls=lambda s, i: i % 2)
    tars = load_eval_sets(load_config(None, [f"eval.zeroshot={shards}", "eval.classnames=['a','b']"])).zeroshot
    assert tars.labels.tolist()[:4] == [0, 1, 0, 1] and tars.classnames == ("a", "b")
