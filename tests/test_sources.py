"""Every data-taking verb against every source kind, through `vlm.cli.main(argv)` on tiny data.

The matrix (`MATRIX`): each verb reads a folder (class subfolders where labels are needed), a CSV, TSV,
JSON Lines and Parquet table, a `hf:` dataset saved with `save_to_disk`, and webdataset tar shards,
through the one data layer (`vlm.data`). A cell that makes no sense (training on a folder of images
without texts, classifying a tar file) is an error by design, tested to be one clear line. Every verb
reports a bad column with the same message.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data import write_table

import vlm
from vlm.cli import main

KINDS = ("folder", "csv", "tsv", "jsonl", "parquet", "hf", "tar")
VERBS = ("train", "finetune", "eval zeroshot", "eval classify", "classify", "index build", "index add")
TABLES = ("csv", "tsv", "jsonl", "parquet")
# (verb, kind) -> "tested" or "error" (an error by design, tested to be one clear line).
MATRIX = {
    (verb, kind): "error" if (verb, kind) == ("train", "folder") or (verb != "train" and kind == "tar") else "tested"
    for verb in VERBS
    for kind in KINDS
}
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220)}


@dataclass
class Data:
    root: Path
    model: Path
    specs: dict[str, str]


def _png_bytes(colour, i):
    buffer = io.BytesIO()
    pixels = np.clip(np.array(colour) + 10 * i, 0, 255).astype(np.uint8)
    Image.fromarray(np.broadcast_to(pixels, (16, 16, 3)).copy()).save(buffer, "PNG")
    return buffer.getvalue()


def _write_hf(path: Path, rows: list[dict]) -> None:
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "text": datasets.Value("string"), "label": datasets.ClassLabel(names=sorted(COLOURS))}
    )
    images = [{"bytes": (path.parent / r["image"]).read_bytes(), "path": None} for r in rows]
    ds = datasets.Dataset.from_dict(
        {"image": images, "text": [r["text"] for r in rows], "label": [r["label"] for r in rows]}, features=features
    )
    datasets.DatasetDict({"train": ds, "test": ds}).save_to_disk(str(path))


def _write_tar(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    classes = sorted(COLOURS)
    with tarfile.open(path, "w") as tar:
        for i, r in enumerate(rows):
            fields = {"png": (path.parents[1] / r["image"]).read_bytes(), "txt": r["text"].encode()}
            fields["cls"] = str(classes.index(r["label"])).encode()
            for ext, payload in fields.items():
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Data:
    """Six 16x16 squares in two colour classes as every source kind, and a tiny model saved once."""
    root = tmp_path_factory.mktemp("sources")
    torch.manual_seed(0)
    vlm.create_model("tiny").save_pretrained(root / "model")
    rows = []
    for name, colour in COLOURS.items():
        for i in range(3):
            path = root / "images" / name / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_png_bytes(colour, i))
            rows.append({"image": f"images/{name}/{i}.png", "text": f"a {name} square", "label": name})
    for kind in TABLES:
        write_table(root / f"pairs.{kind}", rows)
    _write_hf(root / "hf", rows)
    _write_tar(root / "shards" / "shard-00000.tar", rows)
    specs = {kind: str(root / f"pairs.{kind}") for kind in TABLES}
    specs.update(folder=str(root / "images"), hf=f"hf:{root / 'hf'}", tar=str(root / "shards" / "shard-00000.tar"))
    return Data(root, root / "model", specs)


def _run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _split(kind: str) -> list[str]:
    return ["--split", "test"] if kind == "hf" else []


def _train_argv(data: Data, kind: str, out: Path, *extra: str) -> list[str]:
    overrides = {
        "output_dir": out,
        "data.train": data.specs[kind],
        "data.batch_size": 2,
        "data.num_workers": 0,
        "model.name": "tiny",
        "schedule.steps": 1,
        "schedule.warmup_steps": 0,
        "logging.progress": False,
        "logging.plot": False,
        "checkpoint.every": 0,
    }
    return ["train", *(f"{k}={v}" for k, v in overrides.items()), *extra]


def _finetune_argv(data: Data, kind: str, out: Path) -> list[str]:
    spec = data.specs[kind]
    held_out = [] if kind == "hf" else ["--eval", spec]  # a dataset's train and test splits
    common = ["--epochs", "1", "--batch-size", "6", "--sweep", "0,1", "--probe-steps", "2", "--no-progress"]
    return ["finetune", spec, *held_out, "--model", str(data.model), "--output", str(out), *common]


@pytest.fixture(scope="module")
def classifier(data, tmp_path_factory) -> Path:
    """A classifier fine-tuned (one epoch) on the class folders, for `vlm eval classify`."""
    out = tmp_path_factory.mktemp("classifier") / "ft"
    assert main(_finetune_argv(data, "folder", out)) == 0
    return out


@pytest.fixture(scope="module")
def index(data, tmp_path_factory) -> Path:
    """An index of other images (not in any source), that every `vlm index add` cell copies and adds to."""
    root = tmp_path_factory.mktemp("index")
    for i in range(3):
        path = root / "other" / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_png_bytes((30, 200, 30), i))
    out = root / "index"
    argv = ["index", "build", str(root / "other"), "--out", str(out), "--model", str(data.model), "--no-progress"]
    assert main([*argv, "--kind", "flat"]) == 0
    return out


# ---- the cells that are tested -------------------------------------------------------------------
@pytest.mark.parametrize("kind", [k for k in KINDS if MATRIX["train", k] == "tested"])
def test_train(data, kind, tmp_path, capsys):
    split = ["data.split=train"] if kind == "hf" else []
    code, out, err = _run(capsys, _train_argv(data, kind, tmp_path / "run", *split))
    assert code == 0, err
    assert "trained 1 steps" in out


@pytest.mark.parametrize("kind", [k for k in KINDS if MATRIX["finetune", k] == "tested"])
def test_finetune(data, kind, tmp_path, capsys):
    code, out, err = _run(capsys, _finetune_argv(data, kind, tmp_path / "ft"))
    assert code == 0, err
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["finetuned"]["test"]["num_samples"] == 6


@pytest.mark.parametrize("kind", [k for k in KINDS if MATRIX["eval classify", k] == "tested"])
def test_eval_classify(data, classifier, kind, tmp_path, capsys):
    argv = ["eval", "classify", data.specs[kind], "--model", str(classifier), "--output", str(tmp_path / "m.json")]
    code, out, err = _run(capsys, [*argv, "--no-progress"])
    assert code == 0, err
    assert json.loads((tmp_path / "m.json").read_text())["test"]["num_samples"] == 6


@pytest.mark.parametrize("kind", [k for k in KINDS if MATRIX["eval zeroshot", k] == "tested"])
def test_eval_zeroshot(data, kind, tmp_path, capsys):
    argv = ["eval", "zeroshot", data.specs[kind], *_split(kind), "--model", str(data.model), "--no-probe"]
    code, out, err = _run(capsys, [*argv, "--templates", "simple", "--out", str(tmp_path / "ev"), "--no-progress"])
    assert code == 0, err
    results = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert results["class_names"] == ["blue", "red"] and results["zeroshot"]["num_samples"] == 6


@pytest.mark.parametrize("kind", [k for k in KINDS if MATRIX["classify", k] == "tested"])
def test_classify(data, kind, capsys):
    argv = ["classify", data.specs[kind], *_split(kind), "--labels", "red,blue", "--model", str(data.model)]
    code, out, err = _run(capsys, [*argv, "--format", "jsonl", "--no-progress"])
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 6 and all(sorted(r["labels"]) == ["blue", "red"] for r in rows)


@pytest.mark.parametrize("kind", [k for k in KINDS if MATRIX["index build", k] == "tested"])
def test_index_build(data, kind, tmp_path, capsys):
    argv = ["index", "build", data.specs[kind], *_split(kind), "--out", str(tmp_path / "ix"), "--kind", "flat"]
    code, out, err = _run(capsys, [*argv, "--model", str(data.model), "--no-progress"])
    assert code == 0, err
    assert "build: 6 items" in out


@pytest.mark.parametrize("kind", [k for k in KINDS if MATRIX["index add", k] == "tested"])
def test_index_add(data, index, kind, tmp_path, capsys):
    copy = shutil.copytree(index, tmp_path / "ix")
    code, out, err = _run(capsys, ["index", "add", str(copy), data.specs[kind], *_split(kind), "--no-progress"])
    assert code == 0, err
    assert "added 6" in out


# ---- errors by design, and the same bad-column error from every verb ------------------------------
def _argv(data: Data, verb: str, kind: str, tmp_path: Path, classifier: Path | None = None) -> list[str]:
    spec, model, quiet = data.specs[kind], str(data.model), "--no-progress"
    return {
        "train": lambda: _train_argv(data, kind, tmp_path / "run"),
        "finetune": lambda: _finetune_argv(data, kind, tmp_path / "ft"),
        "eval zeroshot": lambda: ["eval", "zeroshot", spec, "--model", model, "--no-probe", "--out", str(tmp_path), quiet],
        "eval classify": lambda: ["eval", "classify", spec, "--model", str(classifier), quiet],
        "classify": lambda: ["classify", spec, "--labels", "red,blue", "--model", model, quiet],
        "index build": lambda: ["index", "build", spec, "--out", str(tmp_path / "ix"), "--model", model, quiet],
        "index add": lambda: ["index", "add", str(tmp_path / "ix"), spec, "--model", model, quiet],
    }[verb]()


@pytest.mark.parametrize("verb, kind", [cell for cell, state in MATRIX.items() if state == "error"])
def test_cells_that_make_no_sense_are_one_clear_error(data, verb, kind, tmp_path, capsys, request):
    classifier = request.getfixturevalue("classifier") if verb == "eval classify" else None
    if verb == "index add":
        shutil.copytree(request.getfixturevalue("index"), tmp_path / "ix")
    code, _, err = _run(capsys, _argv(data, verb, kind, tmp_path, classifier))
    assert code == 1
    lines = [line for line in err.splitlines() if line.startswith(f"vlm {verb.split()[0]}: error:")]
    assert len(lines) == 1, err
    expected = "folder of images without texts" if verb == "train" else "names webdataset tar shards, which only"
    assert expected in lines[0], lines[0]


@pytest.mark.parametrize("verb", VERBS)
def test_a_bad_column_is_the_same_error_from_every_verb(data, verb, tmp_path, capsys, request):
    classifier = request.getfixturevalue("classifier") if verb == "eval classify" else None
    if verb == "index add":
        shutil.copytree(request.getfixturevalue("index"), tmp_path / "ix")
    argv = _argv(data, verb, "csv", tmp_path, classifier)
    argv += ["data.image_column=nope"] if verb == "train" else ["--image-column", "nope"]
    code, _, err = _run(capsys, argv)
    assert code == 1
    assert f"table {data.specs['csv']} has no column 'nope' (the image column); its columns are " in err
    assert "['image', 'text', 'label']; name it with --image-column (data.image_column in a training config)" in err


def test_the_matrix_covers_every_verb_and_kind():
    assert len(MATRIX) == len(VERBS) * len(KINDS)
    assert [k for k in KINDS if MATRIX["train", k] == "error"] == ["folder"]
    assert all(MATRIX[v, "tar"] == "error" for v in VERBS if v != "train")
