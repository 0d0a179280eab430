"""`vlm train`, `vlm finetune` and `vlm index build` never report success for a run that learned (or
indexed) nothing, write nothing before their config and data are checked, and name the setting of every
config error (issue 18)."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_train_data import one_thread, write_pairs  # noqa: F401  (one_thread: fixture)

from training.config import DataConfig, load_config
from training.data_skips import SkipBudget, UnreadableDataError
from training.finetune_config import load_finetune_config
from vlm.cli import main
from vlm.data import Failure

REPO = Path(__file__).parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _train_args(tmp_path: Path, data: Path, **extra) -> list[str]:
    overrides = {
        "output_dir": tmp_path / "run",
        "data.train": data,
        "data.batch_size": 8,
        "data.num_workers": 0,
        "model.name": "tiny",
        "schedule.steps": 2,
        "schedule.warmup_steps": 1,
        "checkpoint.every": 0,
        "logging.progress": False,
        "logging.plot": False,
    }
    overrides.update(extra)
    return ["train", *(f"{k}={v}" for k, v in overrides.items())]


def _error(capsys) -> str:
    """The one error line the command printed (stderr without log lines); asserts there was no traceback."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1, err
    return lines[0]


def _table(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption", "label"])
        writer.writerows((image, f"a {label} square", label) for image, label in rows)
    return path


# ---- the skip budget of `vlm train` -----------------------------------------------------------------
@pytest.mark.parametrize(
    "steps,why",
    [(8, "every sample of the last 5 steps was skipped"), (2, "16 of the first 16 samples were skipped")],
    ids=["five-empty-steps", "short-run-share"],
)
def test_a_wrong_image_root_stops_the_run_without_a_model(tmp_path, capsys, steps, why):
    data = write_pairs(tmp_path / "data", 16)
    elsewhere = tmp_path / "elsewhere"
    argv = _train_args(tmp_path, data, **{"data.image_root": elsewhere, "schedule.steps": steps})
    assert main(argv) == 1
    message = _error(capsys)
    assert why in message and "data.image_root" in message and "without saving a final model" in message
    assert f"{elsewhere}/images/0" in message  # the first unreadable paths, by name
    assert not (tmp_path / "run" / "model").exists()


def test_mostly_unreadable_data_stops_and_the_share_is_a_setting(tmp_path, capsys):
    write_pairs(tmp_path / "data", 8)
    good = [(f"images/{i:03d}.png", "red") for i in range(8)]
    table = _table(tmp_path / "data" / "mostly_missing.csv", good + [(f"gone/{i}.png", "red") for i in range(16)])
    argv = _train_args(tmp_path, table, **{"schedule.steps": 3})
    assert main(argv) == 1
    message = _error(capsys)
    assert "data.max_skipped_fraction=0.5" in message and "gone/" in message
    assert not (tmp_path / "run" / "model").exists()
    # The same data is accepted when the user says so.
    assert main([*argv, "data.max_skipped_fraction=1", "data.max_skipped_steps=0"]) == 0
    assert (tmp_path / "run" / "model").is_dir()


def _data(**changes) -> DataConfig:
    return DataConfig(**{"max_skipped_steps": 0, **changes})


def _fails(n: int) -> list[Failure]:
    return [Failure(i, f"/data/img{i}.png", "file not found") for i in range(n)]


def test_the_budget_counts_streaks_and_the_first_window():
    # Consecutive empty steps: a usable step in between restarts the count.
    budget = SkipBudget(_data(max_skipped_steps=3, max_skipped_fraction=1.0))
    for usable in (0, 0, 5, 0, 0):
        budget.step(0, usable, 3, _fails(3))
    with pytest.raises(UnreadableDataError, match=r"last 3 steps.*/data/img0\.png \(file not found\)"):
        budget.step(5, 0, 3, [])
    # The share is decided as soon as it is certain: 600 skipped are more than half of any first 1,000.
    budget = SkipBudget(_data())
    for step in range(5):
        budget.step(step, 0, 100, _fails(100))  # 500: not yet more than half of 1,000
    with pytest.raises(UnreadableDataError, match="600 of the first 600 samples"):
        budget.step(5, 0, 100, [])
    # Only the first window counts: 40% there, then any amount later on is not the share rule's.
    budget = SkipBudget(_data())
    for step in range(10):
        budget.step(step, 60, 40, [])
    for step in range(10, 20):
        budget.step(step, 1, 99, [])
    budget.finish(20)
    # A short run is judged on all its samples at its end; a resumed run past the window is not.
    short = SkipBudget(_data())
    short.step(0, 4, 6, _fails(6))
    with pytest.raises(UnreadableDataError, match="6 of the first 10"):
        short.finish(1)
    SkipBudget(_data(), seen=5000, skipped=4000).finish(10)


# ---- nothing written before the config and the data are checked -------------------------------------
@pytest.mark.parametrize(
    "case",
    ["batch-larger-than-data", "empty-table", "missing-zeroshot-table", "missing-eval-pairs", "no-text-column", "overrides-typo"],
)
def test_errors_found_before_training_write_nothing_and_name_the_setting(tmp_path, capsys, case):
    data = write_pairs(tmp_path / "data", 16)
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("image,caption\n")
    missing = tmp_path / "nowhere" / "labels.csv"
    extra, expected, unexpected = {
        "batch-larger-than-data": ({"data.batch_size": 64}, ["16 samples", "set data.batch_size to at most 16"], []),
        "empty-table": ({"data.train": header_only}, [f"data.train={header_only}", "is empty"], ["lower data.batch_size"]),
        "missing-zeroshot-table": ({"eval.zeroshot": missing}, [f"eval.zeroshot={missing}", "does not exist"], []),
        "missing-eval-pairs": ({"data.eval": missing}, [f"data.eval={missing}", "does not exist"], []),
        "no-text-column": ({"data.text_column": "txt"}, [f"data.train={data}", "'txt'", "data.text_column"], []),
        "overrides-typo": (
            {"model.overrides.vision.patchsize": 8},
            ["model.overrides.vision.patchsize", "'patchsize'", "did you mean 'patch_size'", "known: activation, class_token"],
            ["unexpected keyword"],
        ),
    }[case]
    assert main(_train_args(tmp_path, data, **extra)) == 1
    message = _error(capsys)
    assert all(part in message for part in expected), message
    assert not any(part in message for part in unexpected), message
    assert not (tmp_path / "run").exists()  # not even config.yaml


# ---- every config error: the dotted key, the bad value, the valid names or range, a fix -------------
@pytest.mark.parametrize(
    "overrides,parts",
    [
        (["data.batch_size=-1"], ["data.batch_size", "-1", "> 0", "the default is 256"]),
        (["data.batch_size=abc"], ["data.batch_size takes an int", "'abc'", "data.batch_size=256"]),
        (["data.format=cvs"], ["data.format", "'cvs'", "csv, tsv", "did you mean 'csv'"]),
        (["data.fromat=csv"], ["data.fromat", "did you mean 'format'", "image_root"]),
        (["optim.lrr=1"], ["optim.lrr", "did you mean 'lr'", "known: beta1"]),
        (["mixed_precision=fp17"], ["mixed_precision must be one of auto, no, bf16, fp16", "'fp17'", "did you mean 'fp16'"]),
        (["optim.beta2=1"], ["optim.beta2", "1", "[0, 1)", "the default is 0.98"]),
        (["schedule.min_lr_ratio=2"], ["schedule.min_lr_ratio", "2", "[0, 1]", "the default is 0.0"]),
        (["data.max_skipped_fraction=1.5"], ["data.max_skipped_fraction", "1.5", "[0, 1]", "the default is 0.5"]),
        (["data.batch_size=10", "loss.accum_steps=3"], ["data.batch_size (10)", "loss.accum_steps (3)", "data.batch_size=9 or 12"]),
        (["data=5"], ["config key data is a section", "5", "data.train="]),
        (["optim.lr.x=1"], ["optim.lr", "is a value, not a section", "optim.lr=VALUE"]),
        (["model.overrides.vision.patch_size=64"], ["model.overrides.vision.patch_size", "64", "image_size"]),
        (["model.overrides.embeddim=8"], ["model.overrides.embeddim", "did you mean 'embed_dim'"]),
    ],
)
def test_train_config_errors_name_the_key_the_value_and_a_fix(overrides, parts):
    with pytest.raises((ValueError, TypeError)) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert all(part in message for part in parts), message
    assert "TrainConfig." not in message and "VisionConfig." not in message


@pytest.mark.parametrize(
    "override,parts",
    [
        ("recipe.label_smoothing=1", ["recipe.label_smoothing", "[0, 1)", "the default is 0.0"]),
        ("recipe.epochs=0", ["recipe.epochs", "0", "the default is 5"]),
        ("mixed_precision=fp17", ["mixed_precision must be one of", "did you mean 'fp16'"]),
        ("data.max_skipped_fraction=-1", ["data.max_skipped_fraction", "[0, 1]"]),
        ("recipe.mdoe=full", ["recipe.mdoe", "did you mean 'mode'"]),
    ],
)
def test_finetune_config_errors_name_the_key_the_value_and_a_fix(override, parts):
    with pytest.raises((ValueError, TypeError)) as err:
        load_finetune_config(None, [override])
    message = str(err.value)
    assert all(part in message for part in parts), message
    assert "FinetuneConfig." not in message


# ---- vlm finetune -----------------------------------------------------------------------------------
@pytest.fixture()
def tiny_model_dir(tmp_path):
    import vlm

    torch.manual_seed(0)
    return vlm.create_model("tiny").save_pretrained(tmp_path / "model")


@pytest.mark.parametrize("good", [0, 8], ids=["none-readable", "mostly-unreadable"])
def test_finetune_on_unreadable_images_fails_naming_them_and_writes_nothing(tmp_path, capsys, tiny_model_dir, good):
    held_out = write_pairs(tmp_path / "data", 8)
    rows = [(f"images/{i:03d}.png", ("red", "green", "blue", "black")[i % 4]) for i in range(good)]
    rows += [(f"gone/{i}.png", ("red", "green", "blue", "black")[i % 4]) for i in range(12)]
    table = _table(tmp_path / "data" / "train.csv", rows)
    out = tmp_path / "ft"
    argv = ["finetune", str(table), "--eval", str(held_out), "--model", str(tiny_model_dir), "--output", str(out)]
    assert main([*argv, "--mode", "linear-probe", "--probe-steps", "2", "--sweep", "0,1", "--no-progress"]) == 1
    message = _error(capsys)
    assert f"data.train={table}" in message and f"{tmp_path}/data/gone/0.png (file not found)" in message
    assert not out.exists()


# ---- vlm index build --------------------------------------------------------------------------------
def test_index_build_where_every_item_failed_is_an_error_and_writes_no_index(tmp_path, capsys, tiny_model_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"photo{i}.png").write_bytes(b"not a png")
    out = tmp_path / "index"
    argv = ["index", "build", str(photos), "--out", str(out), "--model", str(tiny_model_dir), "--no-progress"]
    assert main(argv) == 1
    message = _error(capsys)
    assert "none of the 3 items could be read" in message and f"{photos}/photo0.png" in message
    assert not (out / "manifest.json").exists() and not (out / ".jobs").exists()
    # Once the files are readable the same build runs afresh (the failures were not kept as done work).
    for i in range(3):
        Image.new("RGB", (32, 32), (60 * i, 90, 200)).save(photos / f"photo{i}.png")
    assert main(argv) == 0
    assert "build: 3 items" in capsys.readouterr().out


# ---- several processes ------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_processes_take_the_same_decision_on_the_global_counts(tmp_path):
    """Rank 1's share of each global batch is unreadable, rank 0's is fine: the global share (half) is
    over data.max_skipped_fraction=0.4, so both processes stop at the same step, and each names the
    unreadable paths, which only rank 1 met (they are gathered)."""
    write_pairs(tmp_path / "data", 16)
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0)).tolist()  # epoch 0, seed 0
    rank1 = {i for step in range(2) for i in order[step * 8 + 4 : step * 8 + 8]}
    rows = [(f"gone/{i}.png" if i in rank1 else f"images/{i:03d}.png", "red") for i in range(16)]
    table = _table(tmp_path / "data" / "split.csv", rows)
    argv = _train_args(tmp_path, table, **{"data.max_skipped_fraction": 0.4, "data.max_skipped_steps": 2})[1:]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}", OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "vlm", "train", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    # One message per process; two processes' prints may share a line (each message is one write).
    errors = re.findall(r"vlm train: error: .*? set how much skipping is tolerated", proc.stderr)
    assert len(errors) == 2, proc.stderr[-8000:]
    assert all("8 of the first 16 samples" in e and f"samples: {tmp_path}/data/gone/" in e for e in errors), errors
    assert not (tmp_path / "run" / "model").exists()
