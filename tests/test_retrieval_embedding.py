"""Sources, resumable sharded embedding (SIGKILL and restart), distributed embedding, draft decoding."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import write_table
from test_retrieval_support import REPO, kill_when, python_process, write_images

import vlm
from retrieval.embedding_job import EmbeddingJob, EmbedOptions
from retrieval.sources import open_source


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return vlm.create_model("tiny").eval()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, write_images(root, 30, broken=2)


# ---- sources -------------------------------------------------------------------------------------
def test_folder_is_recursive_with_folder_column(images):
    root, paths = images
    collection = open_source(root)
    assert len(collection) == len(paths) + 2  # broken files are listed; the embedding job reports them
    assert set(collection.keys) >= {str(p) for p in paths}
    folders = dict(zip(collection.keys, collection.extra["folder"]))
    assert folders[str(paths[0])] == paths[0].parent.relative_to(root).as_posix()
    assert "red/deep" in set(collection.extra["folder"])


def test_list_file_and_tables(images, tmp_path):
    root, paths = images
    listing = tmp_path / "files.txt"
    rel = [os.path.relpath(p, tmp_path) for p in paths[:5]]
    listing.write_text("# a comment\n\n" + "\n".join(rel[:4]) + f"\n{rel[4]}\ta caption\n")
    collection = open_source(listing)
    assert collection.keys == [str(p) for p in paths[:5]]
    assert collection.captions == [None, None, None, None, "a caption"]

    rows = [
        {"filepath": os.path.relpath(p, tmp_path), "text": f"picture {i}", "label": p.parent.name, "score": i}
        for i, p in enumerate(paths[:6])
    ]
    rows.append(dict(rows[0], text="another caption of the first image"))
    for suffix in (".csv", ".tsv", ".jsonl", ".json", ".parquet"):
        table = tmp_path / f"table{suffix}"
        write_table(table, rows)
        images_ = open_source(table)
        assert images_.keys == [str(p) for p in paths[:6]], suffix  # one item per image
        assert images_.captions[:2] == ["picture 0", "picture 1"]
        assert images_.extra["label"] == [p.parent.name for p in paths[:6]]
        captions = open_source(table, modality="text")
        assert len(captions) == 7 and captions.paths[6] == captions.paths[0]  # one item per caption
    with pytest.raises(ValueError, match="--image-column"):
        open_source(tmp_path / "table.csv", image_column="nope")


def test_hugging_face_datasets(images, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    root, paths = images
    pictures = [Image.open(p).convert("RGB") for p in paths[:6]]
    ds = datasets.Dataset.from_dict(
        {"image": pictures, "caption": [f"c{i}" for i in range(6)], "label": [0, 1, 2, 0, 1, 2]},
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "caption": datasets.Value("string"),
                "label": datasets.ClassLabel(names=["red", "green", "blue"]),
            }
        ),
    )
    collection = open_source(ds)
    assert len(collection) == 6 and collection.extra["label"][:3] == ["red", "green", "blue"]
    assert all(k.startswith("hf:") for k in collection.keys) and len(set(collection.keys)) == 6
    assert isinstance(collection.images[0], bytes)  # decoded in the loader, not here
    ds.save_to_disk(tmp_path / "saved")
    saved = open_source(tmp_path / "saved")
    assert saved.captions == collection.captions
    folder = datasets.load_dataset("imagefolder", data_dir=str(root / "green"), split="train")
    from_folder = open_source(folder)
    assert set(from_folder.keys) == {str(p) for p in paths if p.parent.name == "green"}  # real files: their paths
    with pytest.raises(ValueError, match="--split"):
        open_source(datasets.DatasetDict({"a": ds, "b": ds}))


def test_hf_dataset_images_embed_like_files(model, images, tmp_path):
    import datasets

    root, paths = images
    ds = datasets.Dataset.from_dict({"image": [str(p) for p in paths[:4]]}).cast_column("image", datasets.Image())
    ds = datasets.Dataset.from_dict({"image": [ds[i]["image"] for i in range(4)]}, features=ds.features)  # bytes only
    # a DataLoader worker process decodes the bytes: the dataset view must travel to it (pickle)
    job = EmbeddingJob(
        tmp_path / "hf", model, open_source(ds), EmbedOptions(progress=False, draft=False, num_workers=1)
    )
    job.run()
    files = EmbeddingJob(tmp_path / "files", model, open_source(root), EmbedOptions(progress=False, draft=False))
    files.run()
    by_key = {k: i for i, k in enumerate(files.collection.keys)}
    want = next(files.shards())
    rows = [int(np.nonzero(want.positions == by_key[str(p)])[0][0]) for p in paths[:4]]
    np.testing.assert_allclose(next(job.shards()).xb, want.xb[rows], atol=1e-5)


# ---- resumable job -------------------------------------------------------------------------------
def test_failures_are_reported_by_name_and_get_no_vector(model, images, tmp_path):
    root, paths = images
    job = EmbeddingJob(
        tmp_path / "job", model, open_source(root), EmbedOptions(chunk_size=7, batch_size=4, progress=False)
    )
    status = job.run()
    assert status.complete and status.embedded_now == len(paths) and status.failed_now == 2
    failures = [f for s in job.shards() for f in s.failures]
    assert sorted(os.path.basename(f.source) for f in failures) == ["broken0.png", "broken1.png"]
    assert all("not an image" in f.reason for f in failures)
    embedded = np.concatenate([s.positions for s in job.shards()])
    assert not np.isin(embedded, [f.index for f in failures]).any()
    assert job.run().embedded_now == 0  # done is done


KILL_SCRIPT = """
import sys, time, torch, vlm
from retrieval.embedding_job import EmbeddingJob, EmbedOptions
from retrieval.sources import open_source
torch.manual_seed(0)
model = vlm.create_model("tiny").eval()
encode = model.encode_image
def slow(*args, **kwargs):  # slow enough that the kill lands in the middle of the job
    time.sleep(0.15)
    return encode(*args, **kwargs)
model.encode_image = slow
EmbeddingJob(sys.argv[1], model, open_source(sys.argv[2]), EmbedOptions(chunk_size=6, batch_size=3, progress=False)).run()
"""


@pytest.mark.slow
def test_sigkilled_job_restarts_and_embeds_everything_exactly_once(model, images, tmp_path):
    root, paths = images
    job_dir = tmp_path / "job"
    code = f"import sys; sys.argv = ['x', {str(job_dir)!r}, {str(root)!r}]\n" + textwrap.dedent(KILL_SCRIPT)
    process = python_process(code)
    kill_when(process, lambda: len(list(job_dir.glob("chunk-*.npz"))) >= 2)
    job = EmbeddingJob(job_dir, model, open_source(root), EmbedOptions(chunk_size=6, batch_size=3, progress=False))
    done_before = job.done_chunks()
    assert 2 <= len(done_before) < job.num_chunks  # killed mid-job
    status = job.run()
    assert status.complete and status.embedded_now < len(paths)  # only the missing chunks were redone
    positions = np.concatenate([s.positions for s in job.shards()])
    failed = [f.index for s in job.shards() for f in s.failures]
    assert len(positions) == len(np.unique(positions)) == len(paths)  # every item exactly once
    assert sorted(positions.tolist() + failed) == list(range(len(job.collection)))
    clean = EmbeddingJob(
        tmp_path / "clean", model, open_source(root), EmbedOptions(chunk_size=6, batch_size=3, progress=False)
    )
    clean.run()
    np.testing.assert_allclose(
        np.concatenate([s.xb for s in job.shards()]), np.concatenate([s.xb for s in clean.shards()]), atol=1e-6
    )
    assert not list(job_dir.glob("*.tmp"))


def test_restart_with_another_model_is_refused(model, images, tmp_path):
    root, _ = images
    EmbeddingJob(tmp_path / "job", model, open_source(root), EmbedOptions(progress=False)).run()
    other = vlm.create_model("tiny").eval()
    with pytest.raises(ValueError, match="model_fingerprint"):
        EmbeddingJob(tmp_path / "job", other, open_source(root), EmbedOptions(progress=False)).run()


# ---- distributed ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_build_under_accelerate_launch_splits_and_merges(model, images, tmp_path):
    root, paths = images
    model.save_pretrained(tmp_path / "model")
    out = tmp_path / "index"
    launch = "accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no"
    build = ["-m", "vlm", "index", "build", str(root), "--out", str(out), "--model", str(tmp_path / "model")]
    command = [sys.executable, "-m", *launch.split(), *build, *"--chunk-size 4 --batch-size 2 --no-progress".split()]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # On a machine without GPUs, `--multi_gpu` runs torchrun with two CPU processes over gloo (`--cpu`
    # alone would start one process).
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rank 0 of 2" in done.stderr and "rank 1 of 2" in done.stderr  # each process embedded its own chunks
    from retrieval.search import SearchIndex

    index = SearchIndex.open(out, model=model)
    assert len(index) == len(paths)
    assert sorted(index.meta.all_ids().tolist()) == sorted(set(index.meta.all_ids().tolist()))
    assert {index.get(i).path for i in index.meta.all_ids()} == {str(p) for p in paths}
    # one process, same collection: the same vectors under the same ids
    single = EmbeddingJob(tmp_path / "single", model, open_source(root), EmbedOptions(progress=False))
    single.run()
    shard = next(single.shards())
    np.testing.assert_allclose(index.index.vectors.get(shard.positions), shard.xb, atol=1e-5)


# ---- reduced-size JPEG decoding -----------------------------------------------------------------
def test_draft_decoding_changes_little_beyond_the_resize(model, tmp_path):
    from skimage import data as photos

    from vlm.data import iter_image_batches
    from vlm.transforms import image_transform

    paths = []
    for name in ("astronaut", "coffee", "chelsea"):
        image = Image.fromarray(getattr(photos, name)()).resize((2048, 1536), Image.BICUBIC)
        paths.append(tmp_path / f"{name}.jpg")
        image.save(paths[-1], quality=95)
    transform = image_transform(model)
    size = model.config.vision.image_size
    full = next(iter_image_batches(paths, transform, batch_size=3, progress=False)).images
    draft = next(iter_image_batches(paths, transform, batch_size=3, draft_size=(size, size), progress=False)).images
    cos = torch.nn.functional.cosine_similarity(full.flatten(1), draft.flatten(1))
    assert (cos > 0.99).all(), cos
    with torch.inference_mode():
        cos_embed = (model.encode_image(full, normalize=True) * model.encode_image(draft, normalize=True)).sum(-1)
    assert (cos_embed > 0.99).all(), cos_embed
