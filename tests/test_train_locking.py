"""Locked towers (LiT / SigLiT): which parameters train, frozen norms, the share_transformer guard, no
optimizer state for frozen parameters, and `vlm train` with the model.lock_* keys."""

import pytest
import torch
import torch.nn.functional as F
from conftest import make_text
from test_train_data import one_thread, write_pairs  # noqa: F401  (one_thread: fixture)

import vlm
from training.config import ModelConfig, OptimConfig, load_config
from training.optim import build_optimizer, lock_image_tower, lock_tower
from vlm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TOWER = {"image": "visual", "text": "text"}
# The tiny preset's towers, spelled out as the oracle (not derived from the code under test).
EMBEDDINGS = {
    "image": ("visual.patch_embed.", "visual.class_token", "visual.pos_embed", "visual.norm_pre."),
    "text": ("text.token_embed.", "text.pos_embed"),
}


def _expected_trainable(model, tower, unlocked, freeze_norms):
    """Names that train: everything outside the tower; in it, the last `unlocked` of its 2 blocks and, when
    any block is unlocked, what reads them (norm, pooling, projection); every norm with freeze_norms off."""
    prefix = TOWER[tower] + "."
    out = set()
    for name, _ in model.named_parameters():
        if not name.startswith(prefix):
            out.add(name)
        elif ".norm" in name and not freeze_norms:
            out.add(name)
        elif name.startswith(prefix + "transformer.blocks."):
            if int(name.split(".")[3]) >= 2 - unlocked:
                out.add(name)
        elif unlocked and not name.startswith(EMBEDDINGS[tower]):
            out.add(name)
    return out


def _train(model, steps=3):
    """A few AdamW steps of the CLIP loss on random pairs."""
    optimizer = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.1))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        images, texts = torch.randn(8, 3, 32, 32, generator=g), make_text(8, 32)
        out = model(images, texts)
        loss = F.cross_entropy(out.logits_per_image, torch.arange(8))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return optimizer


@pytest.mark.parametrize(
    "tower, unlocked, freeze_norms",
    [("text", 0, True), ("text", 1, True), ("text", 1, False), ("text", 2, True), ("image", 1, False)],
)
def test_exactly_the_unlocked_parameters_change(tower, unlocked, freeze_norms):
    torch.manual_seed(0)
    model = vlm.create_model("tiny")
    lock_tower(model, tower, unlocked, freeze_norms=freeze_norms)
    expected = _expected_trainable(model, tower, unlocked, freeze_norms)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _train(model)
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == expected
    norms = {n for n in changed if n.startswith(f"{TOWER[tower]}.transformer.blocks.0.norm")}
    assert bool(norms) == (not freeze_norms or unlocked == 2)  # block 0 is locked unless both are unlocked


def test_siglip_text_tower_unlocks_its_projection_with_its_last_block():
    siglip = vlm.create_model("tiny-siglip")
    lock_tower(siglip, "text", 1)
    trainable = {n for n, p in siglip.named_parameters() if p.requires_grad}
    assert {"text.transformer.blocks.1.mlp.fc1.weight", "text.norm.weight"} <= trainable
    assert "text.transformer.blocks.0.mlp.fc1.weight" not in trainable and "logit_bias" in trainable


def test_too_many_blocks_and_unknown_towers_are_refused():
    with pytest.raises(ValueError, match=r"model.lock_text_unlocked_blocks=3 but the text tower has 2 blocks"):
        lock_tower(vlm.create_model("tiny"), "text", 3)
    with pytest.raises(ValueError, match="tower must be one of 'image', 'text', got 'vision'"):
        lock_tower(vlm.create_model("tiny"), "vision")


@pytest.mark.parametrize("tower", ["image", "text"])
def test_a_shared_transformer_cannot_be_locked_from_either_tower(tower):
    shared = vlm.create_model("tiny", share_transformer=True)
    with pytest.raises(ValueError, match=f"cannot lock a {tower} tower .*share_transformer=True"):
        lock_tower(shared, tower, 1)
    assert all(p.requires_grad for p in shared.parameters())  # refused before anything froze


def _adam_state(optimizer):
    """Parameters with optimizer state, and the bytes of their moment buffers."""
    params = [p for p, s in optimizer.state.items() if s]
    nbytes = sum(s[k].nbytes for s in optimizer.state.values() for k in ("exp_avg", "exp_avg_sq"))
    return params, nbytes


def test_frozen_parameters_get_no_optimizer_state_and_no_gradient():
    torch.manual_seed(0)
    full, locked = vlm.create_model("tiny"), vlm.create_model("tiny")
    lock_tower(locked, "text", 1)
    lock_image_tower(locked, 0)
    full_params, full_bytes = _adam_state(_train(full, steps=1))
    optimizer = _train(locked, steps=1)
    locked_params, locked_bytes = _adam_state(optimizer)
    trainable = [p for p in locked.parameters() if p.requires_grad]
    assert {id(p) for p in locked_params} == {id(p) for p in trainable}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in trainable}
    assert all(p.grad is None for p in locked.parameters() if not p.requires_grad)
    frozen = sum(p.numel() for p in locked.parameters() if not p.requires_grad)
    # AdamW keeps two fp32 moments per trained parameter: 8 bytes each, none for a frozen one.
    assert full_bytes == 8 * sum(p.numel() for p in full.parameters())
    assert full_bytes - locked_bytes == 8 * frozen and len(full_params) - len(locked_params) > 0


def test_config_keys_need_their_lock():
    assert ModelConfig(lock_text=True, lock_text_unlocked_blocks=1, lock_text_freeze_norms=False).lock_text
    for key, value in (("lock_text_unlocked_blocks", 1), ("lock_text_freeze_norms", False)):
        message = f"model.{key}={value!r} only applies to a locked text tower; set model.lock_text=true"
        with pytest.raises(ValueError, match=message):
            ModelConfig(**{key: value})
    with pytest.raises(ValueError, match="model.lock_image_freeze_norms=False .* set model.lock_image=true"):
        ModelConfig(lock_image_freeze_norms=False)
    with pytest.raises(ValueError, match="model.lock_text_unlocked_blocks must be a number >= 0"):
        ModelConfig(lock_text=True, lock_text_unlocked_blocks=-1)


def test_vlm_train_locks_the_text_tower(tmp_path):
    torch.manual_seed(0)
    start = tmp_path / "start"
    vlm.save_pretrained(vlm.create_model("tiny"), start)
    before = vlm.load(start).state_dict()
    data = write_pairs(tmp_path / "data", 16)
    keys = {
        "output_dir": tmp_path / "run", "data.train": data, "data.batch_size": 8, "data.num_workers": 0,
        "model.name": start, "schedule.steps": 2, "schedule.warmup_steps": 1, "logging.progress": False,
        "logging.plot": False, "checkpoint.every": 0, "optim.lr": 1e-3,
        "model.lock_text": True, "model.lock_text_unlocked_blocks": 1, "model.lock_text_freeze_norms": False,
    }  # fmt: skip
    assert main(["train"] + [f"{k}={v}" for k, v in keys.items()]) == 0
    after = vlm.load(tmp_path / "run" / "model").state_dict()
    same = {k for k in before if torch.equal(before[k], after[k])}
    frozen = {k for k in before if k.startswith(("text.token_embed.", "text.pos_embed", "text.transformer.blocks.0."))}
    frozen -= {k for k in frozen if ".norm" in k}
    assert same == frozen
    saved = load_config(tmp_path / "run" / "config.yaml").model
    assert saved.lock_text and saved.lock_text_unlocked_blocks == 1 and not saved.lock_text_freeze_norms
