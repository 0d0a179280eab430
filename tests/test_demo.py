"""The main job end to end, in its reduced mode: train, zero-shot, fine-tune, search, report, default."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

CHANCE = 0.1  # ten digits


def _printed(label: str, text: str) -> float:
    match = re.search(rf"^{re.escape(label)}\s+([0-9.]+)", text, re.MULTILINE)
    assert match, f"the demo printed no {label!r} line:\n{text[-3000:]}"
    return float(match.group(1))


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, monkeypatch, capsys):
    from vlm.cli import main as vlm_main
    from vlm.defaults import get_default_model

    monkeypatch.setenv("VLM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VLM_MODEL", raising=False)
    out = tmp_path / "demo"
    assert vlm_main(["demo", "--quick", "--output", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out

    # Accuracies on the 360 held-out digits, far above chance even after the reduced training.
    assert _printed("zero-shot top-1", printed) > 4 * CHANCE
    assert _printed("linear probe top-1", printed) > 6 * CHANCE
    assert _printed("fine-tuned top-1", printed) > 4 * CHANCE
    result = json.loads((out / "demo.json").read_text())
    assert result["zeroshot_top1"] == pytest.approx(_printed("zero-shot top-1", printed), abs=1e-4)
    assert [p["alpha"] for p in result["wise_ft"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert result["text_precision_at_5"] > CHANCE

    # The report: one folder, every image it shows inside it.
    report = out / "report" / "index.html"
    assert Path(result["report"]) == report and f"report: {report.resolve()}" in printed
    html = report.read_text()
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) > 20 and all((report.parent / s).is_file() for s in sources)
    assert not re.search(r'(src|href)="(https?:|/)', html)  # nothing outside the folder
    for name in ("curves.png", "confusion_zeroshot.png", "confusion_linear_probe.png", "sweep.png", "seven.png"):
        assert any(s.endswith(name) for s in sources), name
    for heading in ("Training", "Zero-shot classification", "Fine-tuning", "Search", "What the image tower looks at"):
        assert f"<h2>{heading}" in html
    assert f"serve {out / 'index'}" in printed

    # The trained model is the default: classify and search work without naming a model.
    assert Path(get_default_model()) == (out / "train" / "model").resolve()
    seven = next((out / "data" / "test" / "seven").glob("*.png"))
    assert vlm_main(["classify", str(seven), "--labels", "zero,one,two,three,four,five,six,seven,eight,nine"]) == 0
    assert vlm_main(["search", str(out / "index"), "--text", "a handwritten three", "-k", "3"]) == 0
    assert "three" in capsys.readouterr().out
    # The saved classifier's classes are in digit order, the folders' in alphabetical order.
    assert vlm_main(["eval", "classify", str(out / "data" / "test"), "--model", str(out / "classifier"), "--no-progress"]) == 0
    assert "top-1" in capsys.readouterr().out
    from training.classifier import ImageClassifier

    assert ImageClassifier.from_pretrained(out / "classifier").class_names[7] == "seven"


def test_demo_verb_dispatches_to_the_demo_package(capsys):
    from vlm.cli import main as vlm_main

    with pytest.raises(SystemExit) as exit_:
        vlm_main(["demo", "--help"])
    assert exit_.value.code == 0 and "usage: vlm demo" in capsys.readouterr().out


def test_sample_data_and_report_load_without_the_trainer():
    # The core's tests write the digits with demo.sample_data: that must not pull in the layers above the core.
    above = ("training", "retrieval", "accelerate", "faiss", "demo.run")
    code = f"import sys, demo.sample_data, demo.report; print([m for m in {above!r} if m in sys.modules])"
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_report_is_self_contained_and_escaped(tmp_path):
    from PIL import Image

    from demo.report import Figure, Grid, Section, Table, Tile, write_report

    image = tmp_path / "elsewhere" / "a.png"
    image.parent.mkdir()
    Image.new("RGB", (8, 8), "white").save(image)
    sections = [
        Section(
            "<script>x</script>",
            "a & b",
            figures=[Figure(image, "fig")],
            tables=[Table(["k", "v"], [["top-1", 0.5]])],
            grids=[Grid("q", [Tile(image, "one", "0.9", True), Tile(image, "two", "0.1", False)])],
            code="vlm serve runs/demo/index",
        )
    ]
    page = write_report(tmp_path / "report", "title <b>", sections)
    html = page.read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html and "a &amp; b" in html
    assert html.count('src="files/0000-a.png"') == 3  # one copy, linked three times
    assert sorted(p.name for p in (tmp_path / "report" / "files").iterdir()) == ["0000-a.png"]
    assert 'class="tile good"' in html and 'class="tile bad"' in html
    with pytest.raises(FileNotFoundError, match="missing.png"):  # checked before anything is touched
        write_report(tmp_path / "report", "t", [Section("s", figures=[Figure(tmp_path / "missing.png")])])
    assert (tmp_path / "report" / "files" / "0000-a.png").is_file()
    write_report(tmp_path / "report", "again", [Section("text only")])  # rewritten: no stale files left
    assert list((tmp_path / "report" / "files").iterdir()) == []
    (tmp_path / "mine" / "files").mkdir(parents=True)  # a files/ folder no report wrote is left alone
    with pytest.raises(FileExistsError, match="another folder"):
        write_report(tmp_path / "mine", "t", [])
    odd = tmp_path / 'a "b"#?.png'
    Image.new("RGB", (8, 8)).save(odd, format="PNG")
    html = write_report(tmp_path / "odd", "t", [Section("s", figures=[Figure(odd)])]).read_text()
    assert 'src="files/0000-a__b___.png"' in html
