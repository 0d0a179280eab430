"""`vlm index build|add|remove|info|eval` and `vlm search` end to end through `vlm.cli.main(argv)`."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from test_retrieval_support import write_images

import vlm
from vlm.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    vlm.create_model("tiny").save_pretrained(root / "model")
    paths = write_images(root / "photos", 18, broken=1)
    extra = write_images(root / "more", 6, broken=0, start=50)
    table = root / "pairs.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "caption"])
        writer.writerows([p, f"a {p.parent.name} square"] for p in paths)
    return root, paths, extra, table


def test_index_and_search_end_to_end(setup, capsys):
    root, paths, extra, _ = setup
    out = root / "photos.index"
    common = ["--no-progress", "--batch-size", "4"]
    assert index_build(root, root / "photos", out, "--kind", "flat", *common) == 0
    report = capsys.readouterr().out
    assert "build: 18 items" in report and "1 unreadable" in report

    assert main(["index", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "18 image vectors" in info and "fingerprint" in info and "prompts from folder names" in info
    assert main(["index", "info", str(out), "--json", "--verify"]) == 0
    assert json.loads(capsys.readouterr().out)["count"] == 18

    # the model recorded at build time embeds the queries
    assert main(["search", str(out), "--text", "a red square", "-k", "3", "--where", "folder = 'blue'", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hits"]
    assert len(hits) == 3 and all("/blue/" in h["path"] for h in hits)
    assert main(["search", str(out), "--image", str(paths[4]), "-k", "2"]) == 0
    printed = capsys.readouterr().out
    assert "1. 1.0000  id" in printed and str(paths[4]) in printed.splitlines()[1]

    assert main(["index", "add", str(out), str(root / "more"), *common]) == 0
    assert "added 6" in capsys.readouterr().out
    assert main(["index", "remove", str(out), "--paths", str(extra[0]), "--ids", "0"]) == 0
    assert "removed 2" in capsys.readouterr().out
    assert main(["index", "info", str(out), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["count"] == 22 and [h["action"] for h in manifest["history"]] == ["build", "add", "remove"]


def test_caption_index_ivf_and_eval(setup, capsys):
    root, paths, _, table = setup
    out = root / "captions.index"
    args = ["--embed", "text", "--kind", "IVF4,Flat", "--target-recall", "0.9", "--no-progress"]
    assert index_build(root, table, out, *args) == 0
    assert "IVF4,Flat" in capsys.readouterr().out
    assert main(["search", str(out), "--image", str(paths[0]), "-k", "2"]) == 0
    assert " square" in capsys.readouterr().out  # captions come back
    model = ["--model", str(root / "model")]
    assert main(["index", "eval", str(table), *model, "-k", "1", "5", "--json", "--no-progress"]) == 0
    recall = json.loads(capsys.readouterr().out)
    assert recall["images"] == 18 and set(recall["image_to_text"]) == {"1", "5"}


def test_user_mistakes_are_clean_errors(setup, tmp_path, capsys):
    root, *_ = setup
    assert main(["search", str(root / "nowhere"), "--text", "x"]) == 1
    assert "not a search index" in capsys.readouterr().err
    # An index of its own to refuse overwriting: the other tests' may be on another xdist worker, or not run.
    assert index_build(root, root / "more", tmp_path / "taken.index", "--no-progress") == 0
    assert index_build(root, root / "photos", tmp_path / "taken.index", "--no-progress") == 1
    assert "--overwrite" in capsys.readouterr().err
    assert index_build(root, root / "photos", root / "x", "--memory-budget", "lots") == 1
    assert "memory size" in capsys.readouterr().err
    assert main(["index", "frobnicate"]) == 2


def test_pq_code_bytes_are_chosen_at_build(setup, tmp_path, capsys):
    root, *_ = setup
    out = tmp_path / "pq.index"
    assert index_build(root, root / "photos", out, "--kind", "ivfpq", "--pq-m", "8", "--no-progress") == 0
    capsys.readouterr()
    assert main(["index", "info", str(out), "--json"]) == 0
    assert ",PQ8x4np" in json.loads(capsys.readouterr().out)["spec"]["factory"]  # 17 vectors: 4-bit codes
    assert index_build(root, root / "photos", tmp_path / "bad", "--kind", "ivf", "--pq-m", "8") == 1
    assert "pq_m is for --kind ivfpq or ivfpqfs" in capsys.readouterr().err


def index_build(root, source, out, *extra) -> int:
    return main(["index", "build", str(source), "--out", str(out), "--model", str(root / "model"), *extra])


# ---- damaged index files: one clean error naming the file, nothing published -------------------
VERSION_FILES = ("index.faiss", "lists.ivfdata", "metadata.sqlite", "vectors.npy", "ids.npy", "queries.npy")
DAMAGES = {  # what each does to a file's bytes (None: delete the file)
    "truncated": lambda data: data[: len(data) // 2],
    "garbage": lambda data: np.random.default_rng(len(data)).bytes(len(data) // 3 + 17),
    "same-size-edit": lambda data: _flip(data, len(data) // 2),
    "missing": None,
}


def _flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]


VERBS = {
    "add": lambda root, d: ["index", "add", str(d), str(root / "more"), "--no-progress", "--batch-size", "4"],
    "remove": lambda root, d: ["index", "remove", str(d), "--ids", "0"],
    "info": lambda root, d: ["index", "info", str(d), "--verify"],
    "search": lambda root, d: ["search", str(d), "--text", "a red square"],
}
CASES = [
    (verb, name, damage)
    for verb in VERBS
    for name in VERSION_FILES + ("manifest.json",)
    for damage in DAMAGES
    if verb != "search" or damage != "same-size-edit"  # opening promises sizes; sha256 of all is --verify's
]


@pytest.fixture(scope="module")
def on_disk_index(setup):
    """An IVF index with on-disk lists: every file a version can have."""
    root, *_ = setup
    out = root / "on-disk.index"
    assert index_build(root, root / "photos", out, "--kind", "ivf", "--on-disk", "--no-progress") == 0
    assert set(VERSION_FILES) <= {p.name for p in (out / "v000001").iterdir()}
    return out


@pytest.mark.parametrize("verb,name,damage", CASES, ids=["-".join(case) for case in CASES])
def test_damaged_files_give_one_line_errors_naming_them(verb, name, damage, setup, on_disk_index, tmp_path, capsys):
    root, *_ = setup
    directory = tmp_path / "index"
    shutil.copytree(on_disk_index, directory)
    path = directory / name if name == "manifest.json" else directory / "v000001" / name
    if DAMAGES[damage] is None:
        path.unlink()
    else:
        path.write_bytes(DAMAGES[damage](path.read_bytes()))
    capsys.readouterr()
    assert main(VERBS[verb](root, directory)) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if not line.startswith(("INFO ", "WARNING "))]
    assert len(errors) == 1 and "error:" in errors[0] and name in errors[0], err
    assert "Traceback" not in err
    assert not (directory / "v000002").exists()  # nothing written, nothing published
