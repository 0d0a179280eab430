"""Patch dropout (FLIP, open_clip's vision_cfg.patch_dropout): fewer patch tokens in training steps only."""

import json

import pytest
import torch
from test_train_data import one_thread, write_pairs  # noqa: F401  (one_thread: fixture)

import vlm
from training.config import ModelConfig
from training.loop import build_model
from vlm.cli import main
from vlm.config import VisionConfig
from vlm.layers import drop_patches, patches_kept

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(name: str, p: float) -> tuple[vlm.CLIP, vlm.CLIP]:
    """The preset without dropout and the same weights with dropout `p`."""
    torch.manual_seed(0)
    plain = vlm.create_model(name)
    dropped = vlm.create_model(name, vision={"patch_dropout": p})
    dropped.load_state_dict(plain.state_dict())
    return plain, dropped


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", ["tiny", "tiny-siglip"])
@pytest.mark.parametrize("p", [0.0, 0.5])
def test_evaluation_is_bit_exact_without_the_option(name, p):
    """In eval mode (and with p = 0 in training mode too) every output equals the model without the option."""
    plain, dropped = _pair(name, p)
    images = _images()
    with torch.no_grad():
        assert torch.equal(plain.eval().encode_image(images), dropped.eval().encode_image(images))
        assert torch.equal(plain.visual.forward_features(images), dropped.visual.forward_features(images))
        if p == 0:
            assert torch.equal(plain.train().encode_image(images), dropped.train().encode_image(images))
    assert plain.fingerprint() == dropped.fingerprint()  # training-only: the same model


@pytest.mark.parametrize("name, prefix", [("tiny", 1), ("tiny-siglip", 0)])
def test_training_keeps_the_right_number_of_tokens_and_gradients_flow(name, prefix):
    """16 patches at 0.5 -> 8 kept per image (plus the class token where there is one); with attention
    pooling (SigLIP, no class token) too; every parameter gets a gradient."""
    _, model = _pair(name, 0.5)
    model.train()
    images = _images()
    assert model.visual.embed(images).shape == (3, prefix + 8, 64)
    assert model.visual.forward_features(images).shape == (3, prefix + 8, 64)
    model.encode_image(images).sum().backward()
    missing = [n for n, q in model.visual.named_parameters() if q.grad is None or not q.grad.abs().sum() > 0]
    assert not missing
    assert model.visual.embed(images).shape[1] == prefix + 8  # a second call: the same count


def test_class_token_survives_and_kept_patches_are_real_rows():
    """The first token is the class token; each kept patch is one of the image's own tokens, none twice;
    two images get different subsets."""
    B, N, C = 4, 16, 8
    x = torch.arange(B * (1 + N) * C, dtype=torch.float32).reshape(B, 1 + N, C)  # (B, 1 + N, C)
    out = drop_patches(x, 0.5, 1, generator=torch.Generator().manual_seed(0))
    assert out.shape == (B, 1 + patches_kept(N, 0.5), C)
    assert torch.equal(out[:, 0], x[:, 0])
    positions = (out[:, 1:, 0] - x[:, :1, 0]).long() // C  # (B, K): where each kept token sat in its image
    assert torch.equal(out[:, 1:], x.gather(1, positions.unsqueeze(-1).expand(-1, -1, C)))
    assert positions.min() >= 1 and all(len(set(row.tolist())) == row.numel() for row in positions)
    assert len({frozenset(row.tolist()) for row in positions}) > 1
    assert drop_patches(x, 0.0) is x


def test_class_token_of_the_tower_is_kept_in_training():
    _, model = _pair("tiny", 0.75)
    model.train()
    images = _images()
    tokens = model.visual.embed(images)
    full = model.visual.eval().embed(images)
    assert tokens.shape[1] == 1 + patches_kept(16, 0.75) == 5
    assert torch.equal(tokens[:, 0], full[:, 0])
    kept = tokens[:, 1:].unsqueeze(2) == full[:, 1:].unsqueeze(1)  # (B, K, N, C)
    assert kept.all(-1).sum(-1).eq(1).all()  # each kept token is exactly one of the image's patches


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, True, "half"])
def test_bad_values_name_the_range(bad):
    with pytest.raises(ValueError, match=r"patch_dropout must be in \[0, 1\)"):
        VisionConfig(patch_dropout=bad)
    with pytest.raises(ValueError, match=r"model.patch_dropout must be in \[0, 1\)"):
        ModelConfig(patch_dropout=bad)


def test_open_clip_config_round_trip(tmp_path):
    """open_clip's vision_cfg.patch_dropout, for its own ViT and for a timm trunk (SigLIP), both ways."""
    import open_clip

    from vlm.convert import config_from_open_clip
    from vlm.export.open_clip_dir import open_clip_config

    for name in ("tiny", "tiny-siglip"):
        _, model = _pair(name, 0.5)
        oc = vlm.to_open_clip(model)
        drop = oc.visual.trunk.patch_drop if name == "tiny-siglip" else oc.visual.patch_dropout
        assert drop.prob == 0.5
        assert config_from_open_clip(oc) == model.config
    cfg = open_clip_config(vlm.create_model("tiny", vision={"patch_dropout": 0.5}).config)["model_cfg"]
    assert cfg["vision_cfg"]["patch_dropout"] == 0.5
    oc = open_clip.model.CLIP(**cfg)
    assert oc.visual.patch_dropout.prob == 0.5 and config_from_open_clip(oc).vision.patch_dropout == 0.5


def test_build_model_applies_model_patch_dropout_to_any_checkpoint(tmp_path):
    """`model.patch_dropout` works on a saved model (no preset overrides), and the config records it."""
    torch.manual_seed(0)
    vlm.create_model("tiny").save_pretrained(tmp_path / "m")
    model = build_model(ModelConfig(name=str(tmp_path / "m"), patch_dropout=0.5))
    assert model.config.vision.patch_dropout == 0.5
    assert model.visual.config.patch_dropout == 0.5
    assert model.train().visual.embed(_images()).shape[1] == 1 + 8


@pytest.mark.parametrize("key", ["model.patch_dropout=0.5", "model.overrides={vision: {patch_dropout: 0.5}}"])
def test_vlm_train_with_patch_dropout(tmp_path, capsys, key):
    data = write_pairs(tmp_path / "data", 16)
    argv = [
        "train", f"output_dir={tmp_path / 'run'}", f"data.train={data}", "data.batch_size=8", "data.num_workers=0",
        "model.name=tiny", "schedule.steps=2", "schedule.warmup_steps=1", "logging.progress=false",
        "logging.plot=false", "checkpoint.every=0", key,
    ]
    assert main(argv) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["vision"]["patch_dropout"] == 0.5
    model = vlm.load(tmp_path / "run" / "model").eval()
    assert model.encode_image(_images()).shape == (3, 64)


# ---- FLIP's unmasked tuning: model.patch_dropout_unmasked_steps ---------------------------------------
def _run_config(tmp_path, out: str, **extra):
    from training.config import load_config

    data = write_pairs(tmp_path / "data", 16)
    overrides = {
        "output_dir": str(tmp_path / out), "data.train": str(data), "data.batch_size": 8, "data.num_workers": 0,
        "model.name": "tiny", "schedule.steps": 4, "schedule.warmup_steps": 1, "logging.progress": False,
        "logging.plot": False, "checkpoint.every": 1, "model.patch_dropout": 0.5,
        "model.patch_dropout_unmasked_steps": 2, **extra,
    }
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


class _Stop(Exception):
    pass


def _train_counting_tokens(monkeypatch, config, stop_at: int | None = None) -> dict[int, list[int]]:
    """Runs `train(config)`; returns, per step (1-based, as checkpoints count), the token counts the image
    tower's Transformer received. With `stop_at`, the run dies as that step begins (after the checkpoint before it)."""
    import training.loop as loop

    seen: dict[int, list[int]] = {}
    real_step = loop.train_step

    def counting_step(run, batch, state):
        if state.step + 1 == stop_at:
            raise _Stop
        tokens = seen.setdefault(state.step + 1, [])
        # norm_pre sees the tokens `embed` hands the Transformer, whichever forward path runs.
        hook = run.clip.visual.norm_pre.register_forward_hook(lambda m, args, out: tokens.append(out.shape[1]))
        try:
            return real_step(run, batch, state)
        finally:
            hook.remove()

    with monkeypatch.context() as patched:
        patched.setattr(loop, "train_step", counting_step)
        try:
            loop.train(config)
        except _Stop:
            pass
    return seen


def test_unmasked_tuning_turns_dropout_off_for_the_last_steps(tmp_path, monkeypatch):
    """4 steps, the last 2 unmasked: 1 + 8 tokens in steps 1-2, all 1 + 16 in steps 3-4; the final model
    records the rate it was last trained with (none)."""
    seen = _train_counting_tokens(monkeypatch, _run_config(tmp_path, "run"))
    assert {step: set(counts) for step, counts in seen.items()} == {1: {9}, 2: {9}, 3: {17}, 4: {17}}
    saved = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert saved["vision"]["patch_dropout"] == 0.0
    model = vlm.load(tmp_path / "run" / "model").train()
    assert model.visual.embed(_images()).shape[1] == 17


@pytest.mark.parametrize("stop_at", [2, 4])
def test_resume_on_either_side_of_the_switch_is_step_exact(tmp_path, monkeypatch, stop_at):
    """Killed before the switch (resumes with dropout, switches at step 3) or after it (the rebuilt model
    has dropout again and must drop it at once): the same tokens per step and the same weights as the
    uninterrupted run."""
    straight = _train_counting_tokens(monkeypatch, _run_config(tmp_path, "a"))
    config = _run_config(tmp_path, "b")
    first = _train_counting_tokens(monkeypatch, config, stop_at=stop_at)
    assert sorted(first) == list(range(1, stop_at)) and not (tmp_path / "b" / "model").exists()
    second = _train_counting_tokens(monkeypatch, config)
    assert sorted(second) == list(range(stop_at, 5))
    assert {**first, **second} == straight
    a, b = (vlm.load(tmp_path / r / "model").state_dict() for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_unmasked_steps_need_dropout_and_steps_left_with_it(tmp_path):
    from training.config import ScheduleConfig, TrainConfig

    with pytest.raises(ValueError, match=r"patch_dropout_unmasked_steps \(4\) leaves no step of schedule.steps \(4\)"):
        TrainConfig(model=ModelConfig(patch_dropout=0.5, patch_dropout_unmasked_steps=4), schedule=ScheduleConfig(4, 1))
    with pytest.raises(ValueError, match=r"model.patch_dropout_unmasked_steps must be a number >= 0"):
        ModelConfig(patch_dropout=0.5, patch_dropout_unmasked_steps=-1)
    with pytest.raises(ValueError, match=r"'tiny' has no patch dropout; set model.patch_dropout"):
        build_model(ModelConfig(name="tiny", overrides={"embed_dim": 64}, patch_dropout_unmasked_steps=2))
    # The model's own rate (a preset override, or a saved model's config) is one to switch off, too.
    model = build_model(ModelConfig(overrides={"vision": {"patch_dropout": 0.5}}, patch_dropout_unmasked_steps=2))
    assert model.visual.config.patch_dropout == 0.5


@pytest.mark.parametrize("seeded", [False, True])
def test_both_passes_of_accumulated_steps_drop_the_same_patches(seeded):
    """GradCache embeds each micro-batch twice (without, then with gradients): both passes must draw the
    same masks, from the tower's own generator (a training run) or the global one (no generator set)."""
    from accelerate import Accelerator

    from training.config import LossConfig
    from training.grad_cache import loss_and_gradients

    _, model = _pair("tiny", 0.5)
    model.train()
    if seeded:
        model.visual.patch_dropout_generator = torch.Generator().manual_seed(3)
    seen = []
    model.visual.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    texts = torch.randint(1, 50, (4, 8))
    loss_and_gradients(model, _images(4), texts, LossConfig(accum_steps=2), Accelerator(cpu=True))
    first, second = seen[:2], seen[2:]
    assert len(seen) == 4
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b)
