"""The training loop: `vlm train` end to end, kill-and-resume, NaN handling, optimiser details."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train_data import one_thread, write_pairs  # noqa: F401  (one_thread: fixture)

import vlm
from training.checkpointing import clean_partial, list_checkpoints
from training.config import OptimConfig, ScheduleConfig, load_config
from training.data import PairBatch, Position
from training.loop import NonFiniteLossError, prepare, restore, train_step
from training.optim import build_optimizer, lock_image_tower, lr_at, param_groups
from vlm.cli import main

REPO = Path(__file__).parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_run(tmp_path, n=16, **extra):
    data = write_pairs(tmp_path / "data", n)
    overrides = {
        "output_dir": str(tmp_path / "run"),
        "data.train": str(data),
        "data.batch_size": 8,
        "data.num_workers": 0,
        "model.name": "tiny",
        "schedule.steps": 2,
        "schedule.warmup_steps": 1,
        "logging.progress": False,
        "logging.plot": False,
        "checkpoint.every": 0,
    }
    overrides.update(extra)
    return [f"{k}={v}" for k, v in overrides.items()]


def _weights(model_dir):
    return vlm.load(model_dir).state_dict()


def test_vlm_train_end_to_end(tmp_path, capsys):
    data = write_pairs(tmp_path / "data", 16)
    config = tmp_path / "run.yaml"
    config.write_text(
        "model:\n  name: tiny\n"
        "eval:\n  templates: ['a {} square', 'a photo of something {}']\n"
        "schedule:\n  steps: 2\n  warmup_steps: 1\n"
    )
    argv = ["train", "--config", str(config)] + _tiny_run(
        tmp_path,
        **{
            "data.eval": str(data),
            "eval.zeroshot": str(data),
            "eval.every": 1,
            "checkpoint.every": 1,
            "checkpoint.keep": 1,
            "logging.plot": True,
        },
    )
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "zeroshot_top1" in out and "image_to_text_R@1" in out
    run = tmp_path / "run"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    evals = [r for r in rows if "eval/zeroshot_top1" in r]
    assert [r["step"] for r in evals] == [1, 2] and 0 <= evals[-1]["eval/text_to_image_R@10"] <= 1
    assert (run / "curves.png").stat().st_size > 1000
    assert load_config(run / "config.yaml").eval.templates == ("a {} square", "a photo of something {}")
    assert [p.name for p in list_checkpoints(run)] == ["step_00000002"]  # keep=1
    state = json.loads((run / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["samples_seen"] == 16 and state["positions"] == [{"epoch": 0, "step": 2}]
    trained = _weights(run / "model")
    torch.manual_seed(0)
    initial = vlm.create_model("tiny").state_dict()
    assert not torch.equal(trained["visual.proj.weight"], initial["visual.proj.weight"])


def test_vlm_train_a_siglip_model_with_its_own_sentencepiece_vocabulary(tmp_path, capsys, layouts):
    """SigLIP's towers and loss with a T5 vocabulary: captions go through the model's tokenizer (cleaned,
    padded to the context), and the saved model carries the tokenizer files."""
    vocabulary = layouts["siglip-timm"]
    argv = ["train"] + _tiny_run(
        tmp_path,
        **{
            "model.name": "tiny-siglip",
            "model.overrides.text.tokenizer": str(vocabulary),
            "model.overrides.text.tokenizer_clean": "canonicalize",
            "model.overrides.text.vocab_size": 1000,
            "loss.kind": "siglip",
        },
    )
    assert main(argv) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    model = vlm.load(tmp_path / "run" / "model")
    assert model.tokenizer_path == tmp_path / "run" / "model" / "tokenizer"
    from vlm.hf_tokenizer import HFTokenizer

    expected = HFTokenizer(vocabulary, 32, clean="canonicalize")
    assert vlm.get_tokenizer(model).fingerprint() == expected.fingerprint()


def test_bad_config_is_a_clean_error(tmp_path, capsys):
    assert main(["train", "optim.lrr=1"]) == 1
    assert "optim.lrr" in capsys.readouterr().err
    assert main(["train", f"output_dir={tmp_path}", f"data.train={tmp_path / 'none.csv'}"]) == 1
    assert "none.csv" in capsys.readouterr().err


def _launch(argv, env):
    return subprocess.Popen(
        [sys.executable, "-m", "vlm", "train", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_killed_and_resumed_run_is_bit_exact(tmp_path):
    """SIGKILL after a checkpoint, resume: the same weights as a run never interrupted."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    common = _tiny_run(
        tmp_path,
        n=32,
        **{
            "schedule.steps": 30,
            "schedule.warmup_steps": 3,
            "checkpoint.every": 5,
            "checkpoint.keep": 2,
            "data.num_workers": 1,
        },
    )
    straight = _launch([*common, f"output_dir={tmp_path / 'a'}"], env)
    killed = _launch([*common, f"output_dir={tmp_path / 'b'}"], env)
    target = tmp_path / "b" / "checkpoints" / "step_00000010"
    deadline = time.time() + 240
    while not target.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "b" / "model").exists()
    resumed = _launch([*common, f"output_dir={tmp_path / 'b'}"], env)
    for proc in (straight, resumed):
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    resumed_log = resumed.stderr.read()
    assert "resumed from" in resumed_log
    a, b = _weights(tmp_path / "a" / "model"), _weights(tmp_path / "b" / "model")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    rows = [[json.loads(line) for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab"]
    assert [r["step"] for r in rows[1]] == list(range(1, 31))
    assert [r["loss"] for r in rows[0]] == [r["loss"] for r in rows[1]]
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["step_00000025", "step_00000030"]


# ---- in-process pieces ---------------------------------------------------------------------------
def _prepared(tmp_path, **extra):
    return prepare(load_config(None, _tiny_run(tmp_path, **extra)))


def _batch(n=8, nan=False):
    from conftest import make_text

    images = torch.full((n, 3, 32, 32), float("nan")) if nan else torch.randn(n, 3, 32, 32)
    return PairBatch(images, make_text(n, 32), [], Position(0, 1))


def test_nonfinite_loss_skips_then_stops(tmp_path):
    run = _prepared(tmp_path, **{"loss.max_nonfinite": 2})
    state = restore(run)
    before = {k: v.clone() for k, v in run.clip.state_dict().items()}
    out = train_step(run, _batch(nan=True), state)
    assert not out.updated and math.isnan(out.loss) and state.nonfinite_streak == 1
    assert all(torch.equal(before[k], v) for k, v in run.clip.state_dict().items())
    assert train_step(run, _batch(), state).updated and state.nonfinite_streak == 0
    train_step(run, _batch(nan=True), state)
    with pytest.raises(NonFiniteLossError, match="2 consecutive steps.*optim.lr.*loss.max_nonfinite"):
        train_step(run, _batch(nan=True), state)


def test_logit_scale_is_clamped(tmp_path):
    run = _prepared(tmp_path)
    with torch.no_grad():
        run.clip.logit_scale.fill_(6.0)
    train_step(run, _batch(), restore(run))
    assert run.clip.logit_scale.item() == pytest.approx(math.log(100))


def test_weight_decay_only_on_matrices():
    model = vlm.create_model("tiny-siglip")
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert "text.proj.weight" in decayed and "text.transformer.blocks.0.attn.q_proj.weight" in decayed
    assert "visual.attn_pool.mlp.fc1.weight" in decayed
    for name in (
        "text.token_embed.weight",
        "visual.pos_embed",
        "visual.attn_pool.probe",
        "text.proj.bias",
        "logit_scale",
        "logit_bias",
        "visual.norm.weight",
        "visual.transformer.blocks.0.mlp.fc1.bias",
    ):
        assert name not in decayed
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_lit_locks_the_image_tower(tmp_path):
    model = vlm.create_model("tiny")
    lock_image_tower(model, unlocked_blocks=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual.transformer.blocks.1.attn.q_proj.weight" in trainable and "visual.proj.weight" in trainable
    assert "visual.transformer.blocks.0.attn.q_proj.weight" not in trainable
    assert "visual.patch_embed.proj.weight" not in trainable and "text.proj.weight" in trainable
    assert sum(len(g["params"]) for g in build_optimizer(model, OptimConfig()).param_groups) == len(trainable)
    with pytest.raises(ValueError, match="has 2 blocks"):
        lock_image_tower(vlm.create_model("tiny"), unlocked_blocks=3)
    siglip = vlm.create_model("tiny-siglip")
    lock_image_tower(siglip, unlocked_blocks=1)
    trainable = {n for n, p in siglip.named_parameters() if p.requires_grad}
    assert {"visual.attn_pool.probe", "visual.attn_pool.mlp.fc1.weight", "visual.norm.weight"} <= trainable

    run = _prepared(tmp_path, **{"model.lock_image": True})
    before = {k: v.clone() for k, v in run.clip.state_dict().items()}
    train_step(run, _batch(), restore(run))
    after = run.clip.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("visual."))
    assert not torch.equal(before["text.proj.weight"], after["text.proj.weight"])


def test_warmup_then_cosine():
    s = ScheduleConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, s) == pytest.approx(0.1) and lr_at(9, s) == pytest.approx(1.0)
    assert lr_at(10, s) == pytest.approx(1.0) and lr_at(60, s) == pytest.approx(0.55)
    assert lr_at(110, s) == pytest.approx(0.1)


def test_partial_checkpoints_are_never_resumed(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ".tmp-step_00000009").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000007").mkdir()  # no trainer_state.json: incomplete
    assert list_checkpoints(run_dir) == []
    clean_partial(run_dir)
    assert not (run_dir / "checkpoints" / ".tmp-step_00000009").exists()
    run = _prepared(tmp_path, **{"checkpoint.resume": "never"})
    assert restore(run).step == 0


def test_train_on_tar_shards_from_a_saved_model_then_extend(tmp_path, capsys):
    from test_train_data import _write_shards

    spec = _write_shards(tmp_path / "shards")  # 12 samples in two shards, one broken image
    vlm.create_model("tiny").save_pretrained(tmp_path / "start")
    base = _tiny_run(
        tmp_path,
        **{
            "data.train": spec,
            "data.batch_size": 4,
            "model.name": tmp_path / "start",
            "model.grad_checkpointing": True,
            "schedule.steps": 4,
            "checkpoint.every": 2,
        },
    )
    assert main(["train", *base]) == 0
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000004" / "trainer_state.json").read_text())
    # 3 steps of 4 records per epoch: step 4 is the first of epoch 1.
    assert state["positions"] == [{"epoch": 1, "step": 1}]
    assert state["skipped_samples"] >= 1 and state["samples_seen"] + state["skipped_samples"] == 16
    assert "skipped samples" in capsys.readouterr().out
    assert main(["train", *base, "schedule.steps=6"]) == 0  # continues from step 4
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")
    from training.loop import train

    train(load_config(None, _tiny_run(tmp_path, **{"logging.tensorboard": True})))
    events = list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100


def test_zeroshot_labels_by_name_or_index():
    from vlm.data import label_ids

    ids, names = label_ids(["cat", "1", 0, "dog"], ("cat", "dog"), where="set")
    assert (list(ids), names) == ([0, 1, 0, 1], ("cat", "dog"))
    with pytest.raises(ValueError, match="bird"):
        label_ids(["bird", "cat"], ("cat", "dog"), where="set")