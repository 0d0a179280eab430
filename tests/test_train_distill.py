"""Distillation (`distill.*`): open_clip's DistillClipLoss as the oracle (teacher and student of different
widths), the combined loss falls, stored teacher embeddings train exactly as the online teacher does, and
configuration mistakes name their keys."""

import json

import numpy as np
import pytest
import torch
from open_clip.loss import DistillClipLoss
from test_train_data import one_thread, write_pairs  # noqa: F401  (one_thread: fixture)
from test_train_loop import _tiny_run

import vlm
from training.config import load_config
from training.distill import OfflineTeacher, OnlineTeacher, write_teacher_embeddings
from training.loop import prepare, train
from training.losses import distill_loss
from training.run_log import METRICS_NAME, read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


def _overrides(tmp_path, name="run", bad=False, **extra):
    data = tmp_path / ("bad" if bad else "clean") / "pairs.csv"
    if not data.exists():
        write_pairs(data.parent, 16, bad=bad)
        header, *rows = data.read_text().splitlines()
        # The bad rows first: every later row then sits behind a skipped one.
        data.write_text("\n".join([header, *rows[16:], *rows[:16]]) + "\n")
    # Without augmentation the online teacher sees what write_teacher_embeddings embedded.
    run = {"output_dir": tmp_path / name, "data.train": data, "data.augment": False, "schedule.steps": 3}
    return _tiny_run(tmp_path, **{**run, **extra})


@pytest.fixture
def teacher_dir(tmp_path):
    """A tiny teacher 48 wide (the student is 64): logits are compared, never embeddings."""
    torch.manual_seed(1)
    model = vlm.create_model("tiny", embed_dim=48)
    with torch.no_grad():
        model.logit_scale.fill_(3.0)  # a temperature other than the student's (log 1/0.07)
    return vlm.save_pretrained(model, tmp_path / "teacher")


# ---- the loss ------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [0, 3])
def test_distill_loss_equals_open_clip_with_other_widths(chunk_size):
    g = torch.Generator().manual_seed(0)
    unit = lambda *shape: torch.nn.functional.normalize(torch.randn(*shape, generator=g), dim=-1)  # noqa: E731
    image, text = unit(7, 16).requires_grad_(), unit(7, 16).requires_grad_()
    t_image, t_text = unit(7, 24), unit(7, 24)
    scale, t_scale = torch.tensor(20.0), torch.tensor(50.0)
    _, expected = DistillClipLoss()(image, text, scale, t_image, t_text, t_scale)
    ours = distill_loss(image, text, scale, t_image, t_text, t_scale, chunk_size=chunk_size)
    assert ours.item() == pytest.approx(expected.item(), abs=1e-6)
    ours_grads = torch.autograd.grad(ours, (image, text))
    expected_grads = torch.autograd.grad(expected, (image, text))
    for a, b in zip(ours_grads, expected_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ---- training ------------------------------------------------------------------------------------
def _losses(run_dir):
    return [row["loss"] for row in read_metrics(run_dir / METRICS_NAME) if "loss" in row]


def test_combined_loss_falls(tmp_path, teacher_dir):
    steps = {"schedule.steps": 30, "optim.lr": 2e-3, "distill.model": teacher_dir, "distill.weight": 2}
    result = train(load_config(None, _overrides(tmp_path, **steps)))
    losses = _losses(result.run_dir)
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


@pytest.mark.parametrize("bad", [False, True], ids=["clean", "with-bad-rows"])
def test_offline_embeddings_train_as_the_online_teacher(tmp_path, teacher_dir, bad):
    """With bad rows (skipped in their batches) the stored rows must still be the batch's own."""
    online = load_config(None, _overrides(tmp_path, "online", bad=bad, **{"distill.model": teacher_dir}))
    stored = write_teacher_embeddings(vlm.load(teacher_dir), online.data, tmp_path / "emb", batch_size=5)
    image_rows = np.load(stored / "img_emb" / "img_emb_0.npy")
    assert image_rows.shape == (19 if bad else 16, 48)
    assert (np.abs(image_rows).sum(axis=1) == 0).sum() == (3 if bad else 0)  # unreadable rows: zeros
    assert json.loads((stored / "teacher.json").read_text())["logit_scale"] == pytest.approx(np.exp(3.0))
    offline = load_config(None, _overrides(tmp_path, "offline", bad=bad, **{"distill.embeddings": stored}))
    plain = load_config(None, _overrides(tmp_path, "plain", bad=bad))
    runs = {name: train(cfg) for name, cfg in (("online", online), ("offline", offline), ("plain", plain))}
    on, off = _losses(runs["online"].run_dir), _losses(runs["offline"].run_dir)
    np.testing.assert_allclose(off, on, atol=1e-6, rtol=0)
    assert abs(on[0] - _losses(runs["plain"].run_dir)[0]) > 1e-3  # the teacher's term is really there
    weights = {k: vlm.load(r.model_dir).state_dict() for k, r in runs.items()}
    for key, value in weights["online"].items():
        torch.testing.assert_close(weights["offline"][key], value, atol=1e-6, rtol=0)


def test_offline_rows_follow_the_batch(tmp_path, teacher_dir):
    """Each sample's stored row is the one its table row was embedded into (rows are shuffled per epoch)."""
    cfg = load_config(None, _overrides(tmp_path, **{"distill.model": teacher_dir}))
    stored = write_teacher_embeddings(vlm.load(teacher_dir), cfg.data, tmp_path / "emb")
    run = prepare(load_config(None, _overrides(tmp_path, **{"distill.embeddings": stored})))
    online = OnlineTeacher(vlm.load(teacher_dir), run.clip.config)
    assert isinstance(run.teacher, OfflineTeacher)
    from training.loop import restore, training_batches

    batches = training_batches(run, restore(run))
    seen = []
    for _ in range(3):  # two steps per epoch: crosses into the second epoch's order
        batch = next(batches)
        seen += batch.rows
        a, b = run.teacher(batch, batch.images, batch.texts), online(batch, batch.images, batch.texts)
        torch.testing.assert_close(a.image_embeds, b.image_embeds, atol=1e-6, rtol=0)
        torch.testing.assert_close(a.text_embeds, b.text_embeds, atol=1e-6, rtol=0)
    assert sorted(seen[:16]) == list(range(16)) and seen[:8] != sorted(seen[:8])  # one epoch, shuffled


# ---- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"distill.weight": 0.5}, "distill.weight=0.5 needs a teacher; set distill.model or distill.embeddings"),
        ({"distill.wieght": 1}, "distill has no 'wieght' .*did you mean 'weight'"),
        ({"distill.model": "tiny", "distill.embeddings": "x"}, "distill.model .* and distill.embeddings .* both set"),
        ({"distill.model": "tiny", "distill.weight": 0}, "distill.weight must be a number > 0"),
        ({"distill.model": "tiny", "distill.logit_scale": 100}, "distill.logit_scale=100.0 needs .*distill.embeddings"),
    ],
)
def test_config_errors_name_the_keys(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        load_config(None, _overrides(tmp_path, **overrides))


def test_setup_errors_name_the_keys(tmp_path, teacher_dir):
    def prepared(**extra):
        return prepare(load_config(None, _overrides(tmp_path, **extra)))

    with pytest.raises(ValueError, match="loss.accum_steps=1 only, got loss.accum_steps=2"):
        prepared(**{"distill.model": teacher_dir, "loss.accum_steps": 2})
    other = vlm.save_pretrained(vlm.create_model("tiny", vision={"image_size": 64}), tmp_path / "big")
    with pytest.raises(ValueError, match="vision.image_size is 64, the student's 32.*distill.embeddings"):
        prepared(**{"distill.model": other})
    with pytest.raises(ValueError, match="distill.embeddings=.*img_emb/img_emb_0.npy"):
        prepared(**{"distill.embeddings": tmp_path})
    cfg = load_config(None, _overrides(tmp_path))
    stored = write_teacher_embeddings(vlm.load(teacher_dir), cfg.data, tmp_path / "emb")
    run = prepared(**{"distill.embeddings": stored, "data.train": write_pairs(tmp_path / "more", 24)})
    from training.loop import restore, training_batches

    with pytest.raises(ValueError, match="holds 16 rows and .* has 24"):
        training_batches(run, restore(run))
    (stored / "teacher.json").unlink()
    with pytest.raises(ValueError, match="no teacher.json.*set distill.logit_scale"):
        prepared(**{"distill.embeddings": stored})
    assert prepared(**{"distill.embeddings": stored, "distill.logit_scale": 20}).teacher.logit_scale == 20


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["online", "offline"])
def test_two_processes_match_one(tmp_path, teacher_dir, kind):
    """Under a two-process launch each process distils its own rows against the gathered global batch."""
    from test_train_distributed import _torchrun

    from vlm.cli import main

    base = load_config(None, _overrides(tmp_path, bad=True))
    teacher = teacher_dir
    if kind == "offline":
        teacher = write_teacher_embeddings(vlm.load(teacher_dir), base.data, tmp_path / "emb")
    key = "distill.model" if kind == "online" else "distill.embeddings"
    common = [a for a in _overrides(tmp_path, bad=True, **{key: teacher}) if not a.startswith("output_dir=")]
    _torchrun(["-m", "vlm", "train", *common, f"output_dir={tmp_path / 'two'}"])
    assert main(["train", *common, f"output_dir={tmp_path / 'one'}"]) == 0
    two, one = vlm.load(tmp_path / "two" / "model").state_dict(), vlm.load(tmp_path / "one" / "model").state_dict()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=name)
    np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), atol=1e-5, rtol=0)
