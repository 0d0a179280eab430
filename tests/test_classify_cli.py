"""`vlm classify`, `vlm eval zeroshot` and `vlm explain` end to end through main(argv) on tiny data."""

import csv
import io
import json
import shlex

import numpy as np
import pytest
from PIL import Image

import vlm
from vlm.cli import main


def _png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), color, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def setup(tmp_path):
    """A saved tiny model, and a folder of good images with one broken image among them."""
    vlm.create_model("tiny").save_pretrained(tmp_path / "model")
    for i in range(3):
        _png(tmp_path / "imgs" / "dark" / f"{i}.png", 20 * i)
        _png(tmp_path / "imgs" / "light" / f"{i}.png", 255 - 20 * i)
    (tmp_path / "imgs" / "light" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return tmp_path


def _run(capsys, command: str) -> tuple[int, str, str]:
    """Runs `vlm <command>` (split like a shell; the temporary paths have no spaces)."""
    code = main(shlex.split(command))
    out, err = capsys.readouterr()
    return code, out, err


def test_classify_table_with_a_broken_image(setup, capsys):
    code, out, err = _run(
        capsys,
        f"classify {setup}/imgs --labels dark,light,blue --model {setup}/model --top-k 2 --templates simple "
        "--no-progress",
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["image", "top-1", "top-2"] and len(lines) == 1 + 6
    assert "broken.jpg" not in out
    assert "skipped 1 of 7 images" in err and "broken.jpg" in err


def test_classify_says_how_scores_are_made(setup, capsys):
    """Sigmoid-loss models score each label on its own with the bias; vlm classify says which it printed."""
    vlm.create_model("tiny-siglip").save_pretrained(setup / "siglip")
    args = f"classify {setup}/imgs/dark --labels dark,light --no-progress --format jsonl --model"
    code, out, err = _run(capsys, f"{args} {setup}/siglip")
    assert code == 0 and "scores: sigmoid(scale * cosine + bias)" in err
    assert all(abs(sum(json.loads(line)["scores"]) - 1) > 1e-3 for line in out.splitlines())
    code, _, err = _run(capsys, f"{args} {setup}/model")
    assert code == 0 and "scores: softmax over the labels" in err


def test_classify_jsonl_and_csv(setup, capsys):
    args = f"classify {setup}/imgs/dark {setup}/imgs/light/0.png --labels dark,light --model {setup}/model"
    args += " --no-progress"
    code, out, _ = _run(capsys, f"{args} --format jsonl --top-k 5")
    rows = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(rows) == 4
    assert str(setup / "imgs" / "light" / "0.png") in {r["image"] for r in rows}
    assert all(sorted(r["labels"]) == ["dark", "light"] and abs(sum(r["scores"]) - 1) < 1e-4 for r in rows)
    code, out, _ = _run(capsys, f"{args} --format csv --top-k 1")
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(table) == 4 and {r["rank"] for r in table} == {"1"}
    # The top-1 rows agree with the JSON lines.
    assert {(r["image"], r["label"]) for r in table} == {(r["image"], r["labels"][0]) for r in rows}


def test_classify_labels_file_templates_file_and_saved_classifier(setup, capsys):
    (setup / "labels.txt").write_text("# classes\ndark: dark | black\nlight: white\n")
    (setup / "templates.txt").write_text("a photo of a {} square.\na {c} thing\n")
    common = f"--model {setup}/model --no-progress --format jsonl"
    code, first, err = _run(
        capsys,
        f"classify {setup}/imgs/dark --labels-file {setup}/labels.txt --templates {setup}/templates.txt "
        f"--save-classifier {setup}/clf {common}",
    )
    assert code == 0 and "classifier saved" in err
    meta = json.loads((setup / "clf" / "classifier.json").read_text())
    dark = ["a photo of a dark square.", "a dark thing", "a photo of a black square.", "a black thing"]
    assert meta["prompts"][0] == dark
    code, again, _ = _run(capsys, f"classify {setup}/imgs/dark --classifier {setup}/clf {common}")
    assert code == 0 and again == first
    # A classifier saved with one model is refused with another.
    vlm.create_model("tiny-siglip").save_pretrained(setup / "other")
    code, _, err = _run(capsys, f"classify {setup}/imgs/dark --classifier {setup}/clf --model {setup}/other")
    assert code == 1 and "built with another model" in err


def test_classify_list_file_and_hf_dataset_with_a_worker(setup, capsys, tmp_path):
    import datasets

    (setup / "list.txt").write_text(f"{setup / 'imgs' / 'dark' / '0.png'}\n\n{setup / 'imgs' / 'light' / '1.png'}\n")
    code, out, _ = _run(
        capsys, f"classify --list {setup}/list.txt --labels a,b --model {setup}/model --no-progress --format csv"
    )
    assert code == 0 and len(out.splitlines()) == 1 + 2 * 2

    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    images = [{"bytes": buffer.getvalue(), "path": None}, {"bytes": b"not an image", "path": None}]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    dataset = datasets.Dataset.from_dict({"image": images, "label": [0, 1]}, features=features)
    datasets.DatasetDict({"test": dataset}).save_to_disk(str(tmp_path / "hf"))
    # One DataLoader worker: the dataset travels to it and the broken row comes back as a failure.
    code, out, err = _run(
        capsys,
        f"classify hf:{tmp_path}/hf --split test --labels a,b --model {setup}/model --no-progress --format jsonl "
        "--workers 1",
    )
    assert code == 0 and [json.loads(line)["image"] for line in out.splitlines()] == ["test[0]"]
    assert "test[1]" in err


def test_classify_user_errors(setup, capsys):
    code, _, err = _run(capsys, f"classify {setup}/missing --labels a --model {setup}/model")
    assert code == 1 and "missing does not exist" in err
    code, _, err = _run(capsys, f"classify {setup}/imgs --labels a --templates no-such-set --model {setup}/model")
    assert code == 1 and "neither a built-in set" in err
    with pytest.raises(SystemExit):  # argparse: a class source is required
        main(["classify", str(setup / "imgs")])
    (setup / "broken_only").mkdir()
    (setup / "broken_only" / "x.png").write_bytes(b"")
    code, _, err = _run(capsys, f"classify {setup}/broken_only --labels a,b --model {setup}/model --no-progress")
    assert code == 1 and "none of the 1 images could be read" in err


@pytest.mark.slow
def test_eval_zeroshot_folder(setup, capsys):
    code, out, err = _run(
        capsys, f"eval zeroshot {setup}/imgs --model {setup}/model --templates simple --out {setup}/eval --no-progress"
    )
    assert code == 0, err
    assert "zero-shot" in out and "linear probe" in out and "broken.jpg" in err
    results = json.loads((setup / "eval" / "results.json").read_text())
    assert results["class_names"] == ["dark", "light"]
    assert results["zeroshot"]["num_samples"] == 6 and len(results["skipped"]) == 1
    assert 0 <= results["zeroshot"]["top1"] <= 1 and results["zeroshot"]["top5"] == 1.0
    assert results["linear_probe"]["protocol"].startswith("3-fold cross-validation")
    for name in ("confusion_zeroshot.png", "confusion_linear_probe.png"):
        with Image.open(setup / "eval" / name) as image:
            assert image.format == "PNG"


def test_eval_zeroshot_with_labels_file_and_train_split(setup, capsys):
    (setup / "labels.txt").write_text("light: white | bright\ndark: black\nextra\n")
    common = f"--model {setup}/model --templates simple --no-progress"
    code, _, err = _run(
        capsys,
        f"eval zeroshot {setup}/imgs --labels-file {setup}/labels.txt --train {setup}/imgs --out {setup}/eval {common}",
    )
    assert code == 0, err
    results = json.loads((setup / "eval" / "results.json").read_text())
    assert results["class_names"] == ["light", "dark", "extra"]
    # Trained and tested on the same images, the probe separates black from white.
    assert results["linear_probe"]["top1"] == 1.0 and "separate split" in results["linear_probe"]["protocol"]
    code, _, _ = _run(capsys, f"eval zeroshot {setup}/imgs --no-probe --labels light,dark --out {setup}/eval2 {common}")
    assert code == 0 and json.loads((setup / "eval2" / "results.json").read_text())["linear_probe"] is None
    code, _, err = _run(capsys, f"eval zeroshot {setup}/imgs --labels light --out {setup}/eval3 {common}")
    assert code == 1 and "no class for ['dark']" in err

    # A table with integer labels: they number the --labels classes.
    rows = [f"imgs/{name}/{i}.png,{label}" for label, name in enumerate(["light", "dark"]) for i in range(3)]
    (setup / "t.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    code, _, err = _run(capsys, f"eval zeroshot {setup}/t.csv --no-probe --labels light,dark --out {setup}/eval4 {common}")
    assert code == 0, err
    results = json.loads((setup / "eval4" / "results.json").read_text())
    assert results["class_names"] == ["light", "dark"] and results["zeroshot"]["num_samples"] == 6


def test_explain(setup, capsys):
    image = setup / "imgs" / "dark" / "0.png"
    code, out, err = _run(
        capsys,
        f"explain {image} --text 'a dark square' --text 'a white square' --out {setup}/map.png --model {setup}/model",
    )
    assert code == 0, err
    assert "attention rollout" in out and "'a dark square'  cosine" in out
    with Image.open(setup / "map.png") as png:
        assert png.format == "PNG"
    code, _, err = _run(capsys, f"explain {setup}/imgs/light/broken.jpg --out {setup}/map.png --model {setup}/model")
    assert code == 1 and "broken.jpg" in err
