"""Fine-tuning recipes on tiny models and tiny generated data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.finetune import (
    FinetuneConfig,
    ImageClassifier,
    evaluate_classifier,
    finetune,
    layer_decay_groups,
    load_images,
    predict_logits,
    shift_images,
    wise_ft,
    zeroshot_head,
)
from vlm.cli import main
from vlm.evaluation import labelled_folder
from vlm.model import create_model
from vlm.zeroshot import build_classifier

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny").eval()


def _write_colours(root, per_class: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i}.png")


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    _write_colours(root / "train", 8, seed=0)
    _write_colours(root / "test", 4, seed=1)
    (root / "test" / "red" / "broken.png").write_bytes(b"not a png")
    return root


@pytest.fixture(scope="module")
def train_images(model, colours):
    return load_images(labelled_folder(colours / "train"), model.config)


def test_zeroshot_head_predicts_like_the_zeroshot_classifier(model, train_images):
    names = list(train_images.class_names)
    classifier = ImageClassifier.from_clip(model, names)
    classifier.head.load_state_dict(zeroshot_head(model, names, "simple").state_dict())
    zs = build_classifier(model, names, "simple")
    with torch.no_grad():
        expected = zs.logits(model.encode_image(train_images.images))
    logits = predict_logits(classifier, train_images.images)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(logits.argmax(1), expected.argmax(1))


def test_untrained_full_finetune_starts_from_zeroshot(model, train_images):
    """finetune() with zero steps of change (lr tiny) must not move the head away from zero-shot at init."""
    names = list(train_images.class_names)
    zs = build_classifier(model, names, "simple")
    probe = finetune(model, train_images, FinetuneConfig(mode="full", epochs=1, lr=1e-12, warmup_steps=0))
    with torch.no_grad():
        expected = zs.logits(model.encode_image(train_images.images)).argmax(1)
    assert torch.equal(predict_logits(probe.classifier, train_images.images).argmax(1), expected)


def test_linear_probe_separable_reaches_100_percent(model, colours, train_images):
    result = finetune(model, train_images, FinetuneConfig(mode="linear-probe", head_init="random", probe_steps=300))
    assert evaluate_classifier(result.classifier, train_images).top1 == 1.0
    test = load_images(labelled_folder(colours / "test"), model.config)
    assert test.failures.count == 1 and len(test) == 12  # the broken file is reported, the rest kept
    assert evaluate_classifier(result.classifier, test).top1 == 1.0
    # only the head moved: the tower is the model's
    for k, v in model.visual.state_dict().items():
        assert torch.equal(result.classifier.visual.state_dict()[k], v)


def test_full_finetune_trains_and_leaves_the_model_alone(model, train_images):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(model, train_images, FinetuneConfig(mode="lp-ft", epochs=3, lr=1e-3, batch_size=8, probe_steps=50))
    assert len(result.losses) == 9
    assert evaluate_classifier(result.classifier, train_images).top1 == 1.0
    assert any(not torch.equal(result.classifier.visual.state_dict()[k], v) for k, v in model.visual.state_dict().items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_resume_is_exact(model, train_images, tmp_path, monkeypatch):
    import training.finetune as ft

    # EMA, augmentation, mixup and cutmix on: their state (the EMA weights, the draws) must survive too.
    config = FinetuneConfig(
        mode="full", epochs=3, lr=1e-3, batch_size=8, warmup_steps=2, ema_decay=0.9, mixup_alpha=0.2, cutmix_alpha=1.0,
        augment=True,
    )  # fmt: skip
    reference = finetune(model, train_images, config)

    save = ft._save_epoch

    def save_then_die(directory, epoch, *args):
        save(directory, epoch, *args)
        if epoch == 1:
            raise KeyboardInterrupt  # killed right after the first epoch's checkpoint

    monkeypatch.setattr(ft, "_save_epoch", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(model, train_images, config, checkpoint_dir=tmp_path)
    monkeypatch.setattr(ft, "_save_epoch", save)
    # Another run's checkpoint (here: another learning rate) is refused, not resumed.
    with pytest.raises(ValueError, match="different fine-tuning run .*config"):
        finetune(model, train_images, dataclasses.replace(config, lr=2e-3), checkpoint_dir=tmp_path)
    resumed = finetune(model, train_images, config, checkpoint_dir=tmp_path)
    assert resumed.losses == reference.losses
    for k, v in reference.classifier.state_dict().items():
        assert torch.equal(resumed.classifier.state_dict()[k], v), k


def test_flyp_learns_with_the_contrastive_loss(model, train_images):
    before = evaluate_classifier(_zeroshot_classifier(model, train_images), train_images).top1
    result = finetune(model, train_images, FinetuneConfig(mode="flyp", epochs=4, lr=1e-3, batch_size=12, warmup_steps=1))
    assert result.losses[-1] < result.losses[0]
    assert evaluate_classifier(result.classifier, train_images).top1 == 1.0 > before


def test_flyp_with_a_sigmoid_model_learns_with_the_sigmoid_loss(train_images, monkeypatch):
    """SigLIP's towers: FLYP trains with the sigmoid loss (the model has a logit_bias) and learns."""
    import training.step

    torch.manual_seed(0)
    siglip = create_model("tiny-siglip").eval()
    kinds = []
    original = training.step.loss_and_gradients
    monkeypatch.setattr(
        training.step, "loss_and_gradients", lambda *a, **kw: kinds.append(a[3].kind) or original(*a, **kw)
    )
    result = finetune(siglip, train_images, FinetuneConfig(mode="flyp", epochs=4, lr=1e-3, batch_size=12, warmup_steps=1))
    assert set(kinds) == {"siglip"}
    assert result.losses[-1] < result.losses[0]


def _zeroshot_classifier(model, data):
    classifier = ImageClassifier.from_clip(model, data.class_names)
    classifier.head.load_state_dict(zeroshot_head(model, data.class_names, "simple").state_dict())
    return classifier


def test_wise_ft_endpoints_are_exact(model, train_images):
    names = list(train_images.class_names)
    a = ImageClassifier.from_clip(model, names)
    torch.manual_seed(1)
    b = ImageClassifier.from_clip(create_model("tiny"), names)
    for alpha, end in ((0.0, a), (1.0, b)):
        mixed = wise_ft(a, b, alpha)
        for k, v in end.state_dict().items():
            assert torch.equal(mixed.state_dict()[k], v), (alpha, k)
    half = wise_ft(a, b, 0.5).state_dict()
    k = "head.weight"
    torch.testing.assert_close(half[k], (a.state_dict()[k] + b.state_dict()[k]) / 2)
    with pytest.raises(ValueError, match="coefficient"):
        wise_ft(a, b, 1.5)


def test_layer_decay_assigns_the_intended_rates(model):
    classifier = ImageClassifier.from_clip(model, ["a", "b"])
    depth = len(classifier.visual.transformer.blocks)  # 2 for tiny
    lr, decay = 1e-3, 0.5
    rates = {}
    for group in layer_decay_groups(classifier, lr, decay, weight_decay=0.1):
        for name, param in zip(group["names"], group["params"]):
            rates[name] = group["lr"]
            # the training weight-decay rule: matrices decay, vectors and embeddings do not
            expected_wd = 0.1 if param.ndim >= 2 and name not in classifier.no_weight_decay() else 0.0
            assert group["weight_decay"] == expected_wd, name
    assert set(rates) == {n for n, _ in classifier.named_parameters()}
    assert rates["head.weight"] == lr and rates["visual.proj.weight"] == lr
    assert rates["visual.pos_embed"] == pytest.approx(lr * decay ** (depth + 1))
    assert rates["visual.patch_embed.proj.weight"] == pytest.approx(lr * decay ** (depth + 1))
    assert rates["visual.class_token"] == pytest.approx(lr * decay ** (depth + 1))
    for i in range(depth):
        block = [n for n in rates if n.startswith(f"visual.transformer.blocks.{i}.")]
        assert block and all(rates[n] == pytest.approx(lr * decay ** (depth - i)) for n in block)


def test_shifted_copy_changes_every_image(train_images):
    shifted = shift_images(train_images.images)
    assert shifted.shape == train_images.images.shape
    assert all(not torch.equal(s, x) for s, x in zip(shifted, train_images.images))
    assert torch.equal(shifted, shift_images(train_images.images))  # deterministic


def test_classifier_saves_loads_and_goes_back_into_clip(model, train_images, tmp_path):
    classifier = ImageClassifier.from_clip(model, train_images.class_names)
    torch.nn.init.normal_(classifier.head.weight)
    loaded = ImageClassifier.from_pretrained(classifier.save_pretrained(tmp_path / "clf"))
    torch.testing.assert_close(predict_logits(loaded, train_images.images), predict_logits(classifier, train_images.images))
    torch.nn.init.normal_(classifier.visual.proj.weight)
    clip = classifier.into_clip(create_model("tiny"))
    torch.testing.assert_close(clip.encode_image(train_images.images), classifier.visual(train_images.images))
    with pytest.raises(FileNotFoundError, match="vlm finetune"):
        ImageClassifier.from_pretrained(tmp_path)


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="'fly'"):
        FinetuneConfig(mode="fly")
    with pytest.raises(ValueError, match="layer_decay"):
        FinetuneConfig(layer_decay=0)


def test_cli_finetune_and_eval_classify_end_to_end(model, colours, tmp_path, capsys):
    model_dir = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    argv = ["finetune", str(colours), "--model", str(model_dir), "--output", str(out), "--mode", "lp-ft",
            "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--probe-steps", "50", "--layer-decay", "0.75",
            "--sweep", "0,0.5,1", "--wise-ft", "0.5", "--image-size", "48", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "WiSE-FT sweep" in printed and "1 unreadable image(s) skipped" in printed
    report = json.loads((out / "metrics.json").read_text())
    assert [p["alpha"] for p in report["sweep"]] == [0.0, 0.5, 1.0]
    assert report["finetuned"]["test"]["top1"] == report["sweep"][1]["accuracy"]  # the saved one is alpha 0.5
    assert (out / "sweep.png").stat().st_size > 0
    assert ImageClassifier.from_pretrained(out).image_size == 48  # trained at a new resolution, evaluated at it

    assert main(["eval", "classify", str(colours / "test"), "--model", str(out), "--output", str(tmp_path / "m.json"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["test"]["top1"] == report["finetuned"]["test"]["top1"]
    assert again["shifted"]["top1"] == report["finetuned"]["shifted"]["top1"]

    assert main(["finetune", str(colours / "train"), "--model", str(model_dir), "--output", str(out)]) == 1
    assert "--eval" in capsys.readouterr().err


def test_augmentation_identity_and_change(train_images):
    from training.finetune import augment_images, augment_params

    images = train_images.images[:4]
    identity = torch.tensor([[0.0, 1.0, 0.0, 0.0]] * 4)
    torch.testing.assert_close(augment_images(images, identity), images, atol=1e-5, rtol=0)
    params = augment_params(4, seed=0, step=3)
    assert torch.equal(params, augment_params(4, seed=0, step=3))  # resumable: drawn from (seed, step)
    assert not torch.equal(params, augment_params(4, seed=0, step=4))
    moved = augment_images(images, params)
    assert moved.shape == images.shape and not torch.allclose(moved, images)
    # Pixels from outside repeat the edge (the background): a moved uniform image stays uniform.
    flat = torch.full((1, 3, 32, 32), 0.7)
    torch.testing.assert_close(augment_images(flat, torch.tensor([[10.0, 0.9, 0.05, -0.05]])), flat)


def test_cutmix_pastes_the_area_it_reports():
    import numpy as np

    from training.finetune import _cutmix

    images = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    for seed in range(20):
        rng = np.random.default_rng(seed)
        mixed, lam = _cutmix(images, images.flip(0), float(rng.beta(1.0, 1.0)), rng)
        # Image 0 received a box from image 1 (its mirror): the ones it holds are the pasted area.
        assert abs(float(mixed[0].mean()) - (1 - lam)) < 1e-6


def test_cli_reads_tables_and_hf_datasets(model, colours, tmp_path, capsys):
    import datasets

    from vlm.evaluation import labelled_hf_dataset, labelled_table, open_labelled

    names = sorted(COLOURS)
    for split in ("train", "test"):
        rows = [(p.relative_to(colours), names.index(p.parent.name)) for p in sorted((colours / split).rglob("*.png"))]
        (colours / f"{split}.csv").write_text("image,label\n" + "".join(f"{p},{y}\n" for p, y in rows))
    ordered = labelled_folder(colours / "test", class_names=names[::-1])  # the order given, not sorted
    assert ordered.class_names == tuple(names[::-1])
    assert all(ordered.class_names[y] == Path(p).parent.name for p, y in zip(ordered.images.sources, ordered.labels))
    with pytest.raises(ValueError, match="class folders"):
        labelled_folder(colours / "test", class_names=["red", "green"])
    table = labelled_table(colours / "test.csv", class_names=names)
    folder = labelled_folder(colours / "test")
    assert table.class_names == folder.class_names and sorted(table.labels) == sorted(folder.labels)
    assert labelled_table(colours / "test.csv").class_names == ("0", "1", "2")  # unnamed integer labels
    with pytest.raises(ValueError, match="--class-names"):
        labelled_table(colours / "test.csv", class_names=["only", "two"])
    with pytest.raises(ValueError, match="'caption'"):
        labelled_table(colours / "test.csv", label_column="caption")

    model_dir = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    common = ["--model", str(model_dir), "--mode", "full", "--epochs", "1", "--batch-size", "8", "--augment",
              "--cutmix-alpha", "1.0", "--sweep", "0,1", "--no-progress"]  # fmt: skip
    argv = ["finetune", str(colours / "train.csv"), "--eval", str(colours / "test.csv"), "--class-names", ",".join(names)]
    assert main([*argv, *common, "--output", str(out)]) == 0
    assert "1 unreadable image(s) skipped" in capsys.readouterr().out  # the broken file listed in the table
    assert ImageClassifier.from_pretrained(out).class_names == tuple(names)
    assert main(["eval", "classify", str(colours / "test.csv"), "--model", str(out), "--no-progress"]) == 0
    assert "top-1" in capsys.readouterr().out

    # A Hugging Face dataset saved to disk, with a ClassLabel column: train and test splits.
    def split(name):
        data = open_labelled(colours / name)
        rows = {"image": [str(p) for p in data.images.sources], "label": list(data.labels)}
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
        return datasets.Dataset.from_dict(rows, features=features)

    hf_dir = tmp_path / "hf"
    datasets.DatasetDict({"train": split("train"), "test": split("test")}).save_to_disk(str(hf_dir))
    assert labelled_hf_dataset(datasets.load_from_disk(str(hf_dir))["test"]).class_names == tuple(names)
    assert main(["finetune", f"hf:{hf_dir}", *common, "--output", str(tmp_path / "hf-run")]) == 0
    assert "1 unreadable image(s) skipped" in capsys.readouterr().out  # the broken file, in the test split
    assert (tmp_path / "hf-run" / "metrics.json").is_file()


def test_table_labels_names_numbers_and_errors(tmp_path):
    from vlm.evaluation import labelled_table

    table = tmp_path / "t.csv"
    table.write_text("image,label\na.png,1\nb.png,2\n")
    # Labels that are class names are matched by name, even when the names are numbers.
    assert labelled_table(table, class_names=["1", "2", "3"]).labels == (0, 1)
    assert labelled_table(table, class_names=["zero", "one", "two"]).labels == (1, 2)  # else: indices
    assert labelled_table(table).class_names == ("0", "1", "2")
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text('{"image": "a.png", "label": 1.0}\n{"image": "b.png", "label": 0}\n')
    assert labelled_table(jsonl).labels == (1, 0)  # 1.0 is the integer label 1
    for body, message in [("a.png,\n", "row 1 has an empty 'label'"), ("a.png,-1\n", "negative")]:
        table.write_text("image,label\n" + body)
        with pytest.raises(ValueError, match=message):
            labelled_table(table)
    table.write_text("image,label\na.png,cat\n")
    with pytest.raises(ValueError, match="repeat"):
        labelled_table(table, class_names=["cat", "cat"])
