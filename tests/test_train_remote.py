"""Training data and run outputs at fsspec URLs (`training.remote`): memory:// stands for an object store."""

import json
import shutil
import uuid
from pathlib import Path

import fsspec
import pytest
import torch
from test_train_data import one_thread, write_pairs  # noqa: F401  (one_thread: fixture)

import vlm
from training.checkpointing import list_checkpoints
from training.config import load_config
from training.loop import train
from training.remote import (
    COMPLETE,
    RemoteTableSource,
    filesystem,
    pull_checkpoint,
    push_checkpoint,
    staging_dir,
)
from vlm.images import load_image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def store():
    """A fresh memory:// folder, removed afterwards (the memory filesystem lives as long as the process)."""
    url = f"memory://vlm-test-{uuid.uuid4().hex[:8]}"
    yield url
    fs, path = filesystem(url)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def _upload(local: Path, url: str) -> None:
    fs, path = filesystem(url)
    fs.put(str(local), path, recursive=True)


def _config(data: str, output_dir: str, steps: int, **extra):
    overrides = {
        "output_dir": output_dir,
        "data.train": data,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "model.name": "tiny",
        "schedule.steps": steps,
        "schedule.warmup_steps": 1,
        # A constant rate after warmup: a 2-step run extended to 4 follows the 4-step run's schedule.
        "schedule.min_lr_ratio": 1.0,
        "logging.progress": False,
        "logging.plot": False,
        "checkpoint.every": 2,
        **extra,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def _losses(metrics_file: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, metrics_file.read_text().splitlines()) if "loss" in r]


def test_remote_run_resumes_on_another_machine(tmp_path, store, monkeypatch, caplog):
    """2 steps to memory://, the local staging folder deleted, resumed to 4: the uninterrupted 4-step run."""
    monkeypatch.setenv("VLM_STAGING", str(tmp_path / "staging"))
    local_table = write_pairs(tmp_path / "data", 16)
    _upload(tmp_path / "data", f"{store}/data")
    straight = train(_config(f"file://{local_table}", f"file://{tmp_path / 'a'}", 4))
    assert straight.run_dir == tmp_path / "a"  # file:// is a local path, no staging

    out = f"{store}/run"
    at_url = {"data.eval": f"{store}/data/pairs.csv", "eval.zeroshot": f"{store}/data/pairs.csv"}
    first = train(_config(f"{store}/data/pairs.csv", out, 2, **at_url))
    assert 0 <= first.metrics["image_to_text_R@1"] <= 1  # held-out pairs at a URL too
    assert 0 <= first.metrics["zeroshot_top1"] <= 1  # and the labelled set
    assert first.run_dir == staging_dir(out) and first.run_dir.is_relative_to(tmp_path / "staging")
    shutil.rmtree(first.run_dir)  # another machine: nothing local
    caplog.set_level("INFO")
    resumed = train(_config(f"{store}/data/pairs.csv", out, 4))
    assert "downloaded" in caplog.text and "at step 2" in caplog.text and resumed.step == 4
    shutil.rmtree(resumed.run_dir)
    with pytest.raises(ValueError, match="already has checkpoints.*step_00000004"):
        train(load_config(None, [f"output_dir={out}", "checkpoint.resume=never", f"data.train={store}/data/pairs.csv",
                                 "model.name=tiny", "data.num_workers=0"]))  # fmt: skip

    fs, root = filesystem(out)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/checkpoints", detail=False)) == [
        "step_00000002",
        "step_00000004",
    ]
    assert fs.isfile(f"{root}/checkpoints/step_00000004/{COMPLETE}")
    local_model = tmp_path / "from-store"
    fs.get(f"{root}/model/", str(local_model), recursive=True)
    a, b = vlm.load(straight.model_dir).state_dict(), vlm.load(local_model).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    fs.get_file(f"{root}/metrics.jsonl", str(tmp_path / "metrics.jsonl"))
    assert _losses(tmp_path / "metrics.jsonl") == _losses(tmp_path / "a" / "metrics.jsonl")
    assert [s for s, _ in _losses(tmp_path / "a" / "metrics.jsonl")] == [1, 2, 3, 4]


def _fake_checkpoint(run_dir: Path, step: int) -> Path:
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step}))
    (path / "model.safetensors").write_bytes(bytes([step]) * 10)
    return path


def test_checkpoints_without_the_marker_are_never_resumed_and_old_ones_go(tmp_path, store):
    out = f"{store}/run"
    for step in (1, 2, 3):
        push_checkpoint(out, tmp_path / "a", _fake_checkpoint(tmp_path / "a", step), keep=2)
    fs, root = filesystem(out)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{root}/checkpoints", detail=False)) == [
        "step_00000002",
        "step_00000003",
    ]
    # A killed upload of step 4: its files but no marker.
    fs.pipe_file(f"{root}/checkpoints/step_00000004/trainer_state.json", b'{"step": 4}')
    pulled = pull_checkpoint(out, tmp_path / "b")
    assert pulled == tmp_path / "b" / "checkpoints" / "step_00000003"
    assert list_checkpoints(tmp_path / "b") == [pulled]
    assert (pulled / "model.safetensors").read_bytes() == bytes([3]) * 10
    assert COMPLETE not in {p.name for p in pulled.iterdir()}
    # Saving step 4 again replaces the partial upload.
    push_checkpoint(out, tmp_path / "a", _fake_checkpoint(tmp_path / "a", 4), keep=2)
    assert fs.cat_file(f"{root}/checkpoints/step_00000004/model.safetensors") == bytes([4]) * 10
    assert pull_checkpoint(out, tmp_path / "b").name == "step_00000004"
    assert pull_checkpoint(str(tmp_path / "local"), tmp_path / "c") is None


def test_remote_table_reads_images_relative_to_its_url(tmp_path, store):
    table = write_pairs(tmp_path / "data", 4)
    rows = table.read_text().splitlines()
    # Row 3: an absolute URL to an image elsewhere in the store; row 4: a missing image.
    rows[3] = rows[3].replace("images/002.png", f"{store}/elsewhere/x.png")
    rows[4] = rows[4].replace("images/003.png", "images/missing.png")
    table.write_text("\n".join(rows) + "\n")
    _upload(tmp_path / "data", f"{store}/data")
    fs, root = filesystem(store)
    fs.put_file(str(tmp_path / "data" / "images" / "002.png"), f"{root}/elsewhere/x.png")
    source = RemoteTableSource(f"{store}/data/pairs.csv")
    assert len(source) == 4 and source.description.startswith(f"{store}/data/pairs.csv")
    for i, name in enumerate(["000", "001", "002"]):
        got = load_image(source[i].image)
        want = load_image(tmp_path / "data" / "images" / f"{name}.png")
        assert (got.tobytes(), got.size) == (want.tobytes(), (32, 32))
    assert source[2].name == f"{store}/elsewhere/x.png"
    with pytest.raises(vlm.images.ImageLoadError, match="missing.png"):
        load_image(source[3].image)
    with pytest.raises(FileNotFoundError, match="nothing.csv.*existing table"):
        RemoteTableSource(f"{store}/data/nothing.csv")


def test_missing_protocol_package_names_it():
    with pytest.raises(ImportError, match="pip install s3fs"):
        staging_dir("s3://bucket/run")
    with pytest.raises(ImportError, match="pip install gcsfs"):
        filesystem("gs://bucket/pairs.parquet")
    assert staging_dir("file:///tmp/run") == Path("/tmp/run")
    assert fsspec  # the memory:// store of these tests is fsspec's own
