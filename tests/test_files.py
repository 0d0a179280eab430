"""vlm.files: atomic, durable writes (complete content, no temporary file left behind, the file flushed before
its rename and the folder after it), and the writers of configs, state and records that go through it."""

import json
import os
from pathlib import Path

import pytest

import vlm
from vlm.files import atomic_directory, atomic_path, atomic_write_text, fsync_tree

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="names fsynced files through /proc")


@pytest.fixture
def disk_log(monkeypatch) -> list[tuple]:
    """Records, in order, ("fsync", path) for every os.fsync and ("rename", src, dst) for every os.replace
    and os.rename, still doing them."""
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def renamer(real):
        def rename(src, dst, *args, **kwargs):
            events.append(("rename", os.path.realpath(src), os.path.realpath(dst)))
            real(src, dst, *args, **kwargs)

        return rename

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", renamer(real_replace))
    monkeypatch.setattr(os, "rename", renamer(real_rename))
    return events


def assert_durable(events: list[tuple], final: Path) -> None:
    """`final` was renamed into place from a file that was fsynced first, and its folder fsynced after."""
    final = os.path.realpath(final)
    renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == final]
    assert renames, f"{final} was not renamed into place: {events}"
    i = renames[-1]
    tmp = events[i][1]
    assert ("fsync", tmp) in events[:i], f"{tmp} was renamed onto {final} without an fsync"
    assert ("fsync", os.path.dirname(final)) in events[i + 1 :], f"the folder of {final} was not fsynced"
    assert not os.path.exists(tmp)


# ---- the helper -----------------------------------------------------------------------------------
def test_atomic_write_text_is_complete_durable_and_leaves_no_temp_file(tmp_path, disk_log):
    target = tmp_path / "state.json"
    target.write_text("old")
    text = "é∑ line\n" * 100_000
    assert atomic_write_text(target, text) == target
    assert target.read_text(encoding="utf-8") == text
    assert os.listdir(tmp_path) == ["state.json"]
    assert_durable(disk_log, target)


def test_a_failed_write_keeps_the_old_file_and_removes_the_temp_file(tmp_path, disk_log):
    target = tmp_path / "state.json"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["state.json"]
    assert not [e for e in disk_log if e[0] == "rename"]


def test_the_written_file_has_ordinary_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600


def test_fsync_tree_flushes_every_file_before_its_folder(tmp_path, disk_log):
    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    for name in ("a.bin", "sub/b.bin"):
        (tmp_path / "ckpt" / name).write_bytes(b"x")
    fsync_tree(tmp_path / "ckpt")
    flushed = [os.path.relpath(e[1], os.path.realpath(tmp_path)) for e in disk_log]
    assert sorted(flushed) == sorted(["ckpt", "ckpt/a.bin", "ckpt/sub", "ckpt/sub/b.bin"])
    assert flushed.index("ckpt/sub/b.bin") < flushed.index("ckpt/sub") < flushed.index("ckpt")


def test_atomic_directory_replaces_the_old_one_whole_and_durably(tmp_path, disk_log):
    out = tmp_path / "export"
    out.mkdir()
    (out / "stale.onnx").write_text("old")
    with atomic_directory(out) as tmp:
        assert tmp.parent == tmp_path and tmp != out
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.json").write_text("new")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["sub", "sub/a.json"]
    assert os.listdir(tmp_path) == ["export"]  # neither the temporary nor the old directory is left
    assert_durable(disk_log, out)
    assert any(e[0] == "fsync" and e[1].endswith("/sub/a.json") for e in disk_log)  # the files, under their temporary name


def test_a_failed_atomic_directory_keeps_the_old_one_and_leaves_nothing(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.onnx").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            (tmp / "model.onnx").write_text("half")
            raise RuntimeError("export failed")
    assert (out / "model.onnx").read_text() == "old"
    assert os.listdir(tmp_path) == ["export"]
    with pytest.raises(RuntimeError):
        with atomic_directory(tmp_path / "new"):
            raise RuntimeError("export failed")
    assert os.listdir(tmp_path) == ["export"]


def test_retrieval_uses_the_core_helper():
    from retrieval import embedding_job, index_directory
    from vlm import files

    assert index_directory.atomic_write_text is files.atomic_write_text
    assert embedding_job.atomic_path is files.atomic_path


# ---- the writers ----------------------------------------------------------------------------------
def test_default_model_record(tmp_path, monkeypatch, disk_log):
    from vlm.defaults import get_default_model, set_default_model

    monkeypatch.setenv("VLM_HOME", str(tmp_path))
    monkeypatch.delenv("VLM_MODEL", raising=False)
    set_default_model("ViT-B-32")
    assert get_default_model() == "ViT-B-32"
    assert_durable(disk_log, tmp_path / "default_model")
    assert os.listdir(tmp_path) == ["default_model"]


def test_model_config_and_weights(tmp_path, disk_log):
    vlm.create_model("tiny").save_pretrained(tmp_path)
    assert_durable(disk_log, tmp_path / "config.json")
    assert_durable(disk_log, tmp_path / "model.safetensors")


def test_training_config_and_metrics_rewrite(tmp_path, disk_log):
    from training.config import TrainConfig, load_config, write_config
    from training.run_log import MetricsLog, read_metrics

    write_config(TrainConfig(), tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == TrainConfig()
    assert_durable(disk_log, tmp_path / "config.yaml")
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    MetricsLog(tmp_path, enabled=True, resume_step=2)
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1}, {"step": 2}]
    assert_durable(disk_log, tmp_path / "metrics.jsonl")


class _OneProcess:
    """The part of accelerate's Accelerator that save_checkpoint uses, for one process."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

    def save_state(self, directory: str) -> None:
        (Path(directory) / "model.safetensors").write_bytes(b"weights")


def test_training_checkpoint_is_flushed_before_its_rename(tmp_path, disk_log):
    from training.checkpointing import TrainerState, list_checkpoints, save_checkpoint
    from training.config import TrainConfig

    final = save_checkpoint(_OneProcess(), tmp_path, TrainerState(step=7), TrainConfig())
    assert list_checkpoints(tmp_path) == [final]
    rename = next(i for i, e in enumerate(disk_log) if e[0] == "rename" and e[2] == os.path.realpath(final))
    tmp = Path(disk_log[rename][1])
    before = {e[1] for e in disk_log[:rename] if e[0] == "fsync"}
    assert {str(tmp / n) for n in ("model.safetensors", "trainer_state.json", "config.yaml")} | {str(tmp)} <= before
    assert ("fsync", os.path.realpath(final.parent)) in disk_log[rename + 1 :]
