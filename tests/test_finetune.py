"""Fine-tuning recipes on tiny models and tiny generated data."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.augment import shift_images
from training.classifier import ImageClassifier, evaluate_classifier, load_images, predict_logits, zeroshot_head
from training.finetune import finetune
from training.finetune_config import FinetuneConfig, load_finetune_config
from training.optim import param_groups
from training.wise_ft import wise_ft
from vlm.cli import main
from vlm.data import labelled_folder
from vlm.model import create_model
from vlm.zeroshot import build_classifier

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}


def _config(*overrides: str) -> FinetuneConfig:
    """A fine-tuning config from dotted overrides, without progress bars."""
    return load_finetune_config(None, ["logging.progress=false", *overrides])


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
    probe = finetune(model, train_images, _config("recipe.mode=full", "recipe.epochs=1", "optim.lr=1e-12", "recipe.warmup_steps=0"))
    with torch.no_grad():
        expected = zs.logits(model.encode_image(train_images.images)).argmax(1)
    assert torch.equal(predict_logits(probe.classifier, train_images.images).argmax(1), expected)


def test_linear_probe_separable_reaches_100_percent(model, colours, train_images):
    result = finetune(model, train_images, _config("recipe.mode=linear-probe", "recipe.head_init=random", "recipe.probe_steps=300"))
    assert evaluate_classifier(result.classifier, train_images).top1 == 1.0
    test = load_images(labelled_folder(colours / "test"), model.config)
    assert test.failures.count == 1 and len(test) == 12  # the broken file is reported, the rest kept
    assert evaluate_classifier(result.classifier, test).top1 == 1.0
    # only the head moved: the tower is the model's
    for k, v in model.visual.state_dict().items():
        assert torch.equal(result.classifier.visual.state_dict()[k], v)


def test_full_finetune_trains_and_leaves_the_model_alone(model, train_images):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = _config("recipe.mode=lp-ft", "recipe.epochs=3", "optim.lr=1e-3", "recipe.batch_size=8", "recipe.probe_steps=50")
    result = finetune(model, train_images, config)
    assert len(result.losses) == 9
    assert evaluate_classifier(result.classifier, train_images).top1 == 1.0
    assert any(not torch.equal(result.classifier.visual.state_dict()[k], v) for k, v in model.visual.state_dict().items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def finetune_killed_after(step: int, monkeypatch, *args, **kwargs) -> None:
    """`finetune(*args, **kwargs)` killed (KeyboardInterrupt) right after it wrote the checkpoint of `step`."""
    import training.finetune_loop as loop

    save = loop.save_checkpoint

    def save_then_die(accelerator, run_dir, state, *rest):
        path = save(accelerator, run_dir, state, *rest)
        if state.step == step:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(*args, **kwargs)
    monkeypatch.setattr(loop, "save_checkpoint", save)


def test_resume_is_exact(model, train_images, tmp_path, monkeypatch):
    # EMA, augmentation, mixup and cutmix on: their state (the EMA weights, the draws) must survive too.
    config = _config(
        "recipe.mode=full", "recipe.epochs=3", "optim.lr=1e-3", "recipe.batch_size=8", "recipe.warmup_steps=2",
        "recipe.ema_decay=0.9", "augment.mixup_alpha=0.2", "augment.cutmix_alpha=1.0", "augment.affine=true",
    )  # fmt: skip
    reference = finetune(model, train_images, config)
    finetune_killed_after(3, monkeypatch, model, train_images, config, run_dir=tmp_path)  # after the first epoch
    # The checkpoint format of `vlm train`: a step directory with the resolved config, and the EMA,
    # shuffling generator and losses as plain tensors.
    (checkpoint,) = (tmp_path / "checkpoints").iterdir()
    assert checkpoint.name == "step_00000003"
    assert {"trainer_state.json", "config.yaml", "extra.safetensors", "model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    # Another run's checkpoint (here: another learning rate) is refused, not resumed.
    with pytest.raises(ValueError, match="different fine-tuning run .*config"):
        finetune(model, train_images, dataclasses.replace(config, optim=dataclasses.replace(config.optim, lr=2e-3)), run_dir=tmp_path)
    resumed = finetune(model, train_images, config, run_dir=tmp_path)
    assert resumed.losses == reference.losses
    for k, v in reference.classifier.state_dict().items():
        assert torch.equal(resumed.classifier.state_dict()[k], v), k
    from training.run_log import read_metrics

    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == list(range(1, 10))  # one row a step
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_old_checkpoint_is_refused(model, train_images, tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "finetune_state.pt").write_bytes(b"old")
    with pytest.raises(ValueError, match="older `vlm finetune`.*delete"):
        finetune(model, train_images, _config("recipe.epochs=1"), run_dir=tmp_path)


def test_flyp_learns_with_the_contrastive_loss(model, train_images):
    before = evaluate_classifier(_zeroshot_classifier(model, train_images), train_images).top1
    result = finetune(model, train_images, _flyp())
    assert result.losses[-1] < result.losses[0]
    assert evaluate_classifier(result.classifier, train_images).top1 == 1.0 > before


def test_flyp_with_a_sigmoid_model_learns_with_the_sigmoid_loss(train_images, monkeypatch):
    """SigLIP's towers: FLYP trains with the sigmoid loss (the model has a logit_bias) and learns."""
    import training.grad_cache

    torch.manual_seed(0)
    siglip = create_model("tiny-siglip").eval()
    kinds = []
    original = training.grad_cache.loss_and_gradients
    monkeypatch.setattr(
        training.grad_cache, "loss_and_gradients", lambda *a, **kw: kinds.append(a[3].kind) or original(*a, **kw)
    )
    result = finetune(siglip, train_images, _flyp())
    assert set(kinds) == {"siglip"}
    assert result.losses[-1] < result.losses[0]


def _flyp() -> FinetuneConfig:
    # beta2 0.98 and eps 1e-6: CLIP's own, which the FLYP tests were tuned with.
    return _config("recipe.mode=flyp", "recipe.epochs=4", "optim.lr=1e-3", "recipe.batch_size=12", "recipe.warmup_steps=1",
                   "optim.beta2=0.98", "optim.eps=1e-6")  # fmt: skip


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
    names = {id(p): n for n, p in classifier.named_parameters()}
    for group in param_groups(classifier, 0.1, lr=lr, layer_decay=decay):
        for param in group["params"]:
            name = names[id(param)]
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
    with pytest.raises(ValueError, match="recipe.mode .*'fly'"):
        _config("recipe.mode=fly")
    with pytest.raises(ValueError, match="optim.layer_decay"):
        _config("optim.layer_decay=0")
    with pytest.raises(ValueError, match="unknown config key recipe.epoch"):
        _config("recipe.epoch=3")
    with pytest.raises(ValueError, match="wise_ft.alpha=1.5"):
        _config("wise_ft.alpha=1.5")


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
    from training.augment import augment_images, augment_params

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

    from training.augment import cutmix

    images = torch.stack([torch.zeros(3, 32, 32), torch.ones(3, 32, 32)])
    for seed in range(20):
        rng = np.random.default_rng(seed)
        mixed, lam = cutmix(images, images.flip(0), float(rng.beta(1.0, 1.0)), rng)
        # Image 0 received a box from image 1 (its mirror): the ones it holds are the pasted area.
        assert abs(float(mixed[0].mean()) - (1 - lam)) < 1e-6


def test_cli_reads_tables_and_hf_datasets(model, colours, tmp_path, capsys):
    import datasets

    from vlm.data import labelled_hf_dataset, labelled_table, open_labelled

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
    from vlm.data import labelled_table

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


# ---- EMA, label smoothing and --unlocked-blocks are not no-ops ----------------------------------------
def test_ema_is_the_hand_computed_average_of_the_steps(model, train_images, monkeypatch):
    """Two steps with ema_decay 0.5: the returned weights are 0.25 w0 + 0.25 w1 + 0.5 w2 of the raw
    weights after 0, 1 and 2 steps, not the raw weights w2."""
    import training.finetune_loop as loop

    raw, update = [], loop._update_ema
    monkeypatch.setattr(loop, "_update_ema", lambda ema, module, d: raw.append(
        {k: v.detach().clone() for k, v in module.state_dict().items()}) or update(ema, module, d))  # fmt: skip
    decay = 0.5
    config = _config("recipe.epochs=1", "recipe.batch_size=12", "optim.lr=1e-2", "recipe.warmup_steps=0", f"recipe.ema_decay={decay}")
    result = finetune(model, train_images, config)
    assert len(result.losses) == len(raw) == 2
    w0 = _zeroshot_classifier(model, train_images).state_dict()
    got = result.classifier.state_dict()
    for k in w0:
        expected = decay * (decay * w0[k] + (1 - decay) * raw[0][k]) + (1 - decay) * raw[1][k]
        torch.testing.assert_close(got[k], expected, rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.allclose(got["head.weight"], raw[1]["head.weight"])  # the EMA, not the last weights
    assert not torch.allclose(got["visual.proj.weight"], raw[1]["visual.proj.weight"])


def test_label_smoothing_changes_the_loss_by_the_formula(model, train_images):
    """One step over the whole batch: the logged loss is (1 - e) CE + e * mean over classes of -log p,
    so it moves from the plain cross-entropy by e * (mean -log p - CE)."""
    eps = 0.2
    common = ("recipe.epochs=1", f"recipe.batch_size={len(train_images)}", "optim.lr=1e-3")
    plain = finetune(model, train_images, _config(*common)).losses[0]
    smoothed = finetune(model, train_images, _config(*common, f"recipe.label_smoothing={eps}")).losses[0]
    logp = torch.log_softmax(predict_logits(_zeroshot_classifier(model, train_images), train_images.images), dim=1)
    ce = float(-logp[torch.arange(len(logp)), train_images.labels].mean())
    uniform = float(-logp.mean())
    assert plain == pytest.approx(ce, rel=1e-5)
    assert smoothed - plain == pytest.approx(eps * (uniform - ce), rel=1e-4)
    assert abs(smoothed - plain) > 1e-3


def test_unlocked_blocks_trains_exactly_the_last_blocks(model, train_images):
    """--unlocked-blocks 1 on a 2-block tower: the embeddings and block 0 are the model's bit for bit;
    every weight of block 1 and of the projection moved."""
    from training.finetune_cli import _parser, config_from_args

    args = ["data", "--unlocked-blocks", "1", "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--no-progress"]
    config = config_from_args(_parser().parse_intermixed_args(args))
    assert config.model.unlocked_blocks == 1
    tuned = finetune(model, train_images, config).classifier.state_dict()
    before = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    frozen = [k for k in before if not k.startswith(("visual.transformer.blocks.1.", "visual.proj", "visual.norm."))]
    assert "visual.transformer.blocks.0.attn.q_proj.weight" in frozen and "visual.pos_embed" in frozen
    for k in frozen:
        assert torch.equal(tuned[k], before[k]), k
    moved = [k for k in before if k.startswith(("visual.transformer.blocks.1.", "visual.proj")) and before[k].ndim >= 2]
    assert moved
    for k in moved:
        assert not torch.equal(tuned[k], before[k]), k


def test_lock_rule_refuses_a_shared_transformer_only_where_it_is_shared():
    from training.optim import lock_image_tower

    torch.manual_seed(0)
    shared = create_model("tiny", share_transformer=True)
    with pytest.raises(ValueError, match="share_transformer"):
        lock_image_tower(shared, 1)  # FLYP trains both towers of this model: locking one would lock both
    classifier = ImageClassifier.from_clip(shared, ["a", "b"])
    lock_image_tower(classifier, 1)  # the classifier has no text tower to share with
    assert not classifier.visual.transformer.blocks[0].attn.q_proj.weight.requires_grad


# ---- config file, flags and the resolved config --------------------------------------------------------
def test_every_flag_sets_a_config_key():
    from training.finetune_cli import FLAGS, MODEL_FLAGS

    for key in [k for _, k, _ in FLAGS] + list(MODEL_FLAGS.values()):
        node = FinetuneConfig()
        for part in key.split("."):
            assert hasattr(node, part), key
            node = getattr(node, part)


def test_cli_config_file_flags_overrides_and_resolved_config(model, colours, tmp_path, capsys):
    import yaml

    model_dir = model.save_pretrained(tmp_path / "model")
    out = tmp_path / "run"
    (tmp_path / "ft.yaml").write_text(yaml.safe_dump({
        "model": {"name": str(model_dir)}, "data": {"train": str(colours)},
        "recipe": {"mode": "full", "epochs": 3, "batch_size": 8}, "optim": {"lr": 1e-3}, "wise_ft": {"sweep": [0, 1]},
    }))  # fmt: skip
    # The flag beats the file (epochs 3 -> 2), the KEY=VALUE beats both (lr).
    argv = ["finetune", "--config", str(tmp_path / "ft.yaml"), "--epochs", "2", "optim.lr=2e-3", "--output", str(out), "--no-progress"]
    assert main([*argv, "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["recipe"]["epochs"] == 2 and printed["optim"]["lr"] == 2e-3 and printed["output_dir"] == str(out)
    assert main(argv) == 0
    resolved = load_finetune_config(out / "config.yaml")
    assert resolved.recipe.epochs == 2 and resolved.optim.lr == 2e-3 and resolved.data.train == str(colours)
    assert resolved.optim.beta2 == 0.999  # fine-tuning's optimiser defaults, written out
    assert len(json.loads((out / "metrics.json").read_text())["sweep"]) == 2
    assert main(["finetune", "--config", str(tmp_path / "ft.yaml"), "--output", str(out), "recipe.epochs=x"]) == 1
    assert "recipe.epochs takes an int" in capsys.readouterr().err


def test_example_config_loads():
    import training

    config = load_finetune_config(Path(training.__file__).parent / "configs" / "digits_finetune.yaml")
    assert config.recipe.mode == "lp-ft" and config.optim.layer_decay == 0.75
