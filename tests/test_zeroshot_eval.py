"""Classification of collections and evaluation: metrics on hand-computed fixtures, the linear probe,
labelled folders and Hugging Face datasets, broken images skipped."""

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import vlm
from vlm.classify import Prediction, classify_images, format_predictions
from vlm.data import HFImageColumn, image_files, labelled_folder, labelled_hf_dataset
from vlm.evaluation import (
    compute_metrics,
    confusion_matrix,
    cross_validated_probe,
    evaluate_zeroshot,
    linear_probe,
    per_class_recall,
    save_confusion_png,
)
from vlm.metrics import topk_accuracy
from vlm.zeroshot import build_classifier

# Five images, three classes. Predictions (argmax) 1, 0, 2, 0, 2 against targets 1, 0, 1, 2, 2.
SCORES = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
TARGETS = torch.tensor([1, 0, 1, 2, 2])


def test_metrics_on_a_hand_computed_fixture():
    # Image 3's target is ranked last: top-2 is 4/5; with 3 classes, top-5 is 1.
    assert topk_accuracy(SCORES, TARGETS, (1, 2, 5)) == pytest.approx({1: 3 / 5, 2: 4 / 5, 5: 1.0})
    confusion = confusion_matrix(SCORES.argmax(1), TARGETS, 3)
    assert confusion.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 1]]
    assert per_class_recall(confusion).tolist() == [1.0, 0.5, 0.5]
    m = compute_metrics(SCORES, TARGETS, ["a", "b", "c"])
    assert (m.top1, m.top5, m.num_samples) == (pytest.approx(0.6), 1.0, 5)
    assert m.mean_per_class_recall == pytest.approx(2 / 3)
    assert m.per_class_accuracy == {"a": 1.0, "b": 0.5, "c": 0.5}


def test_classes_without_images_are_left_out_of_the_mean():
    scores = torch.cat([SCORES, torch.zeros(5, 1)], dim=1)  # a fourth class, no image of it
    m = compute_metrics(scores, TARGETS, ["a", "b", "c", "d"])
    assert math.isnan(per_class_recall(torch.tensor(m.confusion))[3])
    assert m.mean_per_class_recall == pytest.approx(2 / 3)
    assert "d" not in m.per_class_accuracy


def test_metrics_shape_errors():
    with pytest.raises(ValueError, match=r"scores must be \(N, C\) = \(5, 2\)"):
        compute_metrics(SCORES, TARGETS, ["a", "b"])


def test_confusion_png(tmp_path):
    path = save_confusion_png([[3, 1], [0, 4]], ["cat", "dog"], tmp_path / "c.png", "test")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 200


def _blobs(n_per_class, classes=3, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.eye(classes, dim) * 4
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return centers[y] + torch.randn(len(y), dim, generator=g) * 0.5, y


def test_linear_probe_separates_separable_features():
    x, y = _blobs(20)
    xt, yt = _blobs(10, seed=1)
    result = linear_probe(x, y, xt, yt, ["a", "b", "c"])
    assert result.metrics.top1 == 1.0 and result.C in (0.001, 0.01, 0.1, 1.0, 10.0)
    assert "separate split of 60" in result.protocol
    fixed = linear_probe(x, y, xt, yt, ["a", "b", "c"], C=0.5)
    assert fixed.C == 0.5


def test_cross_validated_probe_scores_every_image():
    x, y = _blobs(10)
    y_noise = y.clone()
    y_noise[::7] = (y_noise[::7] + 1) % 3  # mislabelled points cannot be predicted from the others
    result = cross_validated_probe(x, y_noise, ["a", "b", "c"])
    assert result.metrics.num_samples == 30
    assert 0.6 < result.metrics.top1 < 1.0
    with pytest.raises(ValueError, match="at least two classes"):
        cross_validated_probe(x[:5], torch.zeros(5, dtype=torch.long), ["a"])


# ---- collections --------------------------------------------------------------------------------
def _png(path, color):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 12, 3), color, dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def tiny():
    return vlm.create_model("tiny").eval()


def test_classify_skips_broken_images_and_keeps_the_rest(tiny, tmp_path):
    good = [_png(tmp_path / "a" / f"{i}.png", 40 * i) for i in range(3)]
    (tmp_path / "a" / "sub").mkdir()
    broken = tmp_path / "a" / "sub" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 this is not a jpeg")
    good.append(_png(tmp_path / "a" / "sub" / "deep.png", 200))
    images = image_files([tmp_path / "a"])
    assert len(images) == 5  # recursive
    classifier = build_classifier(tiny, ["red", "green", "blue"], "simple")
    result = classify_images(tiny, classifier, images, batch_size=2, progress=False)
    assert [f.source for f in result.failures] == [str(broken)]
    predictions = result.top_k(2)
    assert sorted(p.source for p in predictions) == sorted(map(str, good))
    assert all(len(p.labels) == 2 and p.scores[0] >= p.scores[1] for p in predictions)
    # Top-k scores are the classifier's probabilities of those images.
    probs = result.probabilities()
    assert torch.allclose(probs.sum(dim=1), torch.ones(len(good)))
    assert predictions[0].scores[0] == pytest.approx(float(probs[0].max()))


def test_classify_refuses_a_classifier_of_another_model(tiny, tmp_path):
    torch.manual_seed(1)
    other = vlm.create_model("tiny")
    classifier = build_classifier(other, ["a", "b"], "simple")
    with pytest.raises(ValueError, match="another model"):
        classify_images(tiny, classifier, [_png(tmp_path / "x.png", 0)], progress=False)


def test_output_formats():
    predictions = [
        Prediction("a.png", ("cat", "dog"), (0.75, 0.25)),
        Prediction("dir/b c.png", ("dog", "cat"), (0.5, 0.5)),
    ]
    lines = format_predictions(predictions, "jsonl").splitlines()
    assert json.loads(lines[0]) == {"image": "a.png", "labels": ["cat", "dog"], "scores": [0.75, 0.25]}
    rows = format_predictions(predictions, "csv").splitlines()
    assert rows[0] == "image,rank,label,score" and rows[1] == "a.png,1,cat,0.750000" and len(rows) == 5
    table = format_predictions(predictions, "table").splitlines()
    assert table[0].split() == ["image", "top-1", "top-2"] and "cat 0.7500" in table[1]
    with pytest.raises(ValueError, match="unknown output format 'xml'"):
        format_predictions(predictions, "xml")


def test_labelled_folder(tmp_path):
    _png(tmp_path / "dog" / "1.png", 0)
    _png(tmp_path / "cat" / "nested" / "2.png", 0)
    _png(tmp_path / "cat" / "3.png", 0)
    data = labelled_folder(tmp_path)
    assert data.class_names == ("cat", "dog")
    assert sorted(zip(data.images.names, data.labels)) == sorted(
        [
            (str(tmp_path / "cat" / "3.png"), 0),
            (str(tmp_path / "cat" / "nested" / "2.png"), 0),
            (str(tmp_path / "dog" / "1.png"), 1),
        ]
    )
    with pytest.raises(ValueError, match="no class subfolders"):
        labelled_folder(tmp_path / "dog")


def _encoded(color):
    buffer = io.BytesIO()
    Image.fromarray(np.full((10, 10, 3), color, dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _hf_dataset():
    import datasets

    images = [{"bytes": _encoded(c), "path": None} for c in (0, 60, 120, 180, 240, 30)]
    images.insert(2, {"bytes": b"broken", "path": None})
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["dark", "light"])})
    return datasets.Dataset.from_dict({"image": images, "label": [0, 0, 0, 0, 1, 1, 1]}, features=features)


def test_hf_dataset_images_and_labels(tiny):
    dataset = _hf_dataset()
    column = HFImageColumn(dataset)
    assert len(column) == 7 and column[2] == b"broken" and column[0].startswith(b"\x89PNG")
    data = labelled_hf_dataset(dataset, prefix="test")
    assert data.class_names == ("dark", "light") and data.labels == (0, 0, 0, 0, 1, 1, 1)
    classifier = build_classifier(tiny, ["dark", "light"], "simple")
    result = classify_images(tiny, classifier, data.images, progress=False)
    assert [f.source for f in result.failures] == ["test[2]"]
    assert len(result.top_k(1)) == 6
    with pytest.raises(ValueError, match="no column 'img'"):
        HFImageColumn(dataset, "img")


def test_evaluate_zeroshot_on_a_folder(tiny, tmp_path):
    for i in range(4):
        _png(tmp_path / "data" / "dark" / f"{i}.png", 10 * i)
        _png(tmp_path / "data" / "light" / f"{i}.png", 255 - 10 * i)
    (tmp_path / "data" / "light" / "broken.png").write_bytes(b"")
    data = labelled_folder(tmp_path / "data")
    # The classifier may hold more classes than the data, in another order.
    classifier = build_classifier(tiny, ["light", "blue", "dark"], "simple")
    evaluation = evaluate_zeroshot(tiny, classifier, data, progress=False)
    assert evaluation.zeroshot.num_samples == 8 and len(evaluation.failures) == 1
    assert evaluation.class_names == ("light", "blue", "dark")
    assert set(evaluation.zeroshot.per_class_accuracy) == {"light", "dark"}
    assert evaluation.linear_probe is not None and evaluation.linear_probe.metrics.num_samples == 8
    written = evaluation.save(tmp_path / "out")
    assert [p.name for p in written] == ["results.json", "confusion_zeroshot.png", "confusion_linear_probe.png"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["zeroshot"]["top1"] == evaluation.zeroshot.top1
    assert saved["skipped"][0]["image"].endswith("broken.png")
    assert "zero-shot" in evaluation.summary() and "linear probe" in evaluation.summary()
    with pytest.raises(ValueError, match=r"no class for \['dark'\]"):
        evaluate_zeroshot(tiny, build_classifier(tiny, ["light"], "simple"), data, progress=False)
