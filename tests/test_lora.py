"""LoRA through peft: identity at initialisation, merge exactness, what trains, the saved adapters, the
CLI, and two processes against one (this file is also the torchrun worker of that test)."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from training.classifier import ImageClassifier, load_images, predict_logits
from training.finetune import finetune
from training.finetune_config import FinetuneConfig, load_finetune_config
from training.lora import (
    LoraConfig,
    apply_lora,
    load_lora_classifier,
    lora_state_dict,
    lora_target_names,
    merge_lora,
    save_lora_adapter,
    trainable_summary,
)
from vlm.cli import main
from vlm.data import labelled_folder
from vlm.model import create_model

from test_finetune import _write_colours, finetune_killed_after
from test_train_data import one_thread, write_pairs  # noqa: F401  (one_thread: fixture)
from test_train_distributed import _torchrun


def _config(*overrides: str) -> FinetuneConfig:
    return load_finetune_config(None, ["logging.progress=false", "recipe.mode=lora", *overrides])


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("tiny").eval()


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    _write_colours(root / "train", 6, seed=0)
    _write_colours(root / "test", 3, seed=1)
    return root


@pytest.fixture(scope="module")
def train_images(model, colours):
    return load_images(labelled_folder(colours / "train"), model.config)


def _randomise_b(module: torch.nn.Module) -> None:
    """peft starts B at zero; a nonzero B makes the merge test measure something."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


def test_adapted_model_equals_the_base_model_at_initialisation(model, train_images):
    base = ImageClassifier.from_clip(model, train_images.class_names)
    adapted = apply_lora(copy.deepcopy(base), LoraConfig(rank=4))
    assert sum("lora_A" in n for n, _ in adapted.named_parameters()) == 2 * 6  # 2 blocks x q/k/v/out/fc1/fc2
    assert torch.equal(predict_logits(adapted, train_images.images), predict_logits(base, train_images.images))


def test_merged_weights_equal_the_adapted_model(model, train_images):
    adapted = apply_lora(ImageClassifier.from_clip(model, train_images.class_names), LoraConfig(rank=4, alpha=8))
    _randomise_b(adapted)
    merged = ImageClassifier(model.config, train_images.class_names)
    merged.load_state_dict(merge_lora(copy.deepcopy(adapted)).state_dict())  # strict: the plain key names
    expected = predict_logits(adapted, train_images.images)
    assert not torch.allclose(expected, predict_logits(ImageClassifier.from_clip(model, train_images.class_names).eval(), train_images.images))
    torch.testing.assert_close(predict_logits(merged, train_images.images), expected, rtol=1e-5, atol=1e-5)


def test_targets_follow_blocks_and_towers(model):
    names = lora_target_names(model, ("visual", "text"), LoraConfig(blocks=1, targets=("q_proj", "fc2")))
    assert names == [
        "visual.transformer.blocks.1.attn.q_proj", "visual.transformer.blocks.1.mlp.fc2",
        "text.transformer.blocks.1.attn.q_proj", "text.transformer.blocks.1.mlp.fc2",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="lora.targets has 'qkv'"):
        LoraConfig(targets=("qkv",))
    with pytest.raises(ValueError, match="lora.rank"):
        LoraConfig(rank=0)


def test_only_adapters_and_head_change_and_the_model_is_left_alone(model, train_images):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = _config("recipe.epochs=2", "recipe.batch_size=6", "optim.lr=1e-2", "recipe.warmup_steps=0")
    result = finetune(model, train_images, config)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert result.losses and all(k.startswith("head.") or "lora_" in k for k in result.adapters)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in result.adapters.items())  # the adapters trained
    # Merged weights differ from the base exactly where an adapter sits (the adapted linear layers).
    base = ImageClassifier.from_clip(model, train_images.class_names).state_dict()
    changed = {k for k, v in result.classifier.state_dict().items() if k.startswith("visual.") and not torch.equal(v, base[k])}
    assert changed == {f"{n}.weight" for n in lora_target_names(result.classifier, ("visual",), LoraConfig())}


def test_summary_counts_trainable_parameters_and_optimizer_state(model, train_images):
    adapted = apply_lora(ImageClassifier.from_clip(model, train_images.class_names), LoraConfig(rank=2))
    trainable = sum(v.numel() for v in lora_state_dict(adapted).values())
    optimizer = torch.optim.AdamW([p for p in adapted.parameters() if p.requires_grad])
    adapted(train_images.images[:2]).sum().backward()
    optimizer.step()
    text = trainable_summary(adapted, optimizer)
    # AdamW keeps two fp32 moments per trainable parameter, plus one step counter per tensor.
    tensors = len(lora_state_dict(adapted))
    assert text.startswith(f"{trainable:,} trainable of ")
    assert f"optimizer state {2 * 4 * trainable + 4 * tensors:,} bytes" in text


def test_adapter_save_is_small_and_reloads_to_the_merged_classifier(model, train_images, tmp_path):
    adapted = apply_lora(ImageClassifier.from_clip(model, train_images.class_names), LoraConfig(rank=2, blocks=1))
    _randomise_b(adapted)
    adapters = {**lora_state_dict(adapted), **{f"head.{k}": v for k, v in adapted.head.state_dict().items()}}
    model_dir = model.save_pretrained(tmp_path / "model")
    path = save_lora_adapter(tmp_path / "run", adapters, LoraConfig(rank=2, blocks=1), str(model_dir), train_images.class_names)
    full = sum(v.numel() * 4 for v in adapted.visual.state_dict().values())
    assert path.stat().st_size < full / 5
    reloaded = load_lora_classifier(tmp_path / "run")
    torch.testing.assert_close(
        predict_logits(reloaded, train_images.images), predict_logits(adapted, train_images.images), rtol=1e-5, atol=1e-5
    )


def test_wise_ft_below_one_needs_merge():
    with pytest.raises(ValueError, match="model.lora.merge=true"):
        _config("wise_ft.alpha=0.5")
    assert _config("wise_ft.alpha=0.5", "model.lora.merge=true").model.lora.merge


@pytest.mark.slow
def test_cli_finetune_lora_end_to_end(model, colours, tmp_path, capsys, caplog):
    model_dir = model.save_pretrained(tmp_path / "model")
    common = ["finetune", str(colours), "--model", str(model_dir), "--mode", "lora", "--epochs", "2", "--batch-size", "6",
              "--lr", "1e-2", "--lora-rank", "2", "--lora-blocks", "1", "--sweep", "0,1", "--no-progress"]  # fmt: skip
    with caplog.at_level("INFO", logger="training.lora"):
        assert main([*common, "--output", str(tmp_path / "a")]) == 0
    assert "WiSE-FT sweep" in capsys.readouterr().out
    assert "trainable of" in caplog.text and "optimizer state" in caplog.text
    assert (tmp_path / "a" / "lora_adapter.safetensors").is_file()
    assert not (tmp_path / "a" / "classifier.safetensors").exists()  # adapters only unless --merge
    meta = json.loads((tmp_path / "a" / "lora_adapter.json").read_text())
    assert meta["lora"]["rank"] == 2 and meta["lora"]["blocks"] == 1
    # `vlm eval classify` reads the adapters on the base model and measures what the job measured.
    assert main(["eval", "classify", str(colours / "test"), "--model", str(tmp_path / "a"), "--output",
                 str(tmp_path / "a.json"), "--no-progress"]) == 0  # fmt: skip
    measured = json.loads((tmp_path / "a" / "metrics.json").read_text())["finetuned"]["test"]["top1"]
    assert json.loads((tmp_path / "a.json").read_text())["test"]["top1"] == measured

    assert main([*common, "--output", str(tmp_path / "b"), "--merge", "--wise-ft", "0.5"]) == 0
    capsys.readouterr()
    merged = ImageClassifier.from_pretrained(tmp_path / "b")  # the WiSE-FT 0.5 mix of the merged model
    assert main(["eval", "classify", str(colours / "test"), "--model", str(tmp_path / "b"), "--output",
                 str(tmp_path / "m.json"), "--no-progress"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert json.loads((tmp_path / "m.json").read_text())["test"]["top1"] == report["finetuned"]["test"]["top1"]
    # Same seed and data, so the same adapters; the saved classifier is halfway from zero-shot to them.
    test = load_images(labelled_folder(colours / "test"), model.config)
    adapted = load_lora_classifier(tmp_path / "a")
    torch.testing.assert_close(
        predict_logits(adapted, test.images), predict_logits(load_lora_classifier(tmp_path / "b"), test.images)
    )
    name = "visual.transformer.blocks.1.attn.q_proj.weight"
    base = model.state_dict()[name]
    torch.testing.assert_close(merged.state_dict()[name], (base + adapted.state_dict()[name]) / 2)
    assert not torch.equal(adapted.state_dict()[name], base)


@pytest.mark.usefixtures("one_thread")
def test_vlm_train_with_lora_trains_only_adapters_and_saves_them_merged(tmp_path, caplog):
    import vlm

    torch.manual_seed(0)
    start = tmp_path / "start"
    vlm.save_pretrained(vlm.create_model("tiny"), start)
    base = vlm.load(start)
    keys = {
        "output_dir": tmp_path / "run", "data.train": write_pairs(tmp_path / "data", 16), "data.batch_size": 8,
        "data.num_workers": 0, "model.name": start, "schedule.steps": 2, "schedule.warmup_steps": 1,
        "logging.progress": False, "logging.plot": False, "checkpoint.every": 0, "optim.lr": 1e-2,
        "model.lora.enabled": True, "model.lora.rank": 2, "model.lora.blocks": 1,
    }  # fmt: skip
    with caplog.at_level("INFO", logger="training.lora"):
        assert main(["train"] + [f"{k}={v}" for k, v in keys.items()]) == 0
    assert "optimizer state" in caplog.text
    after = vlm.load(tmp_path / "run" / "model").state_dict()
    changed = {k for k, v in base.state_dict().items() if not torch.equal(v, after[k])}
    config = LoraConfig(rank=2, blocks=1)
    assert changed == {f"{n}.weight" for n in lora_target_names(base, ("visual", "text"), config)}
    # The saved adapters on the base model, merged, are the final model.
    from safetensors.torch import load_file

    adapted = apply_lora(base, config, ("visual", "text"))
    assert not adapted.load_state_dict(load_file(str(tmp_path / "run" / "lora" / "lora_adapter.safetensors")), strict=False).unexpected_keys
    merged = merge_lora(adapted).state_dict()
    assert all(torch.allclose(merged[k], after[k], atol=1e-6) for k in after)



def test_resume_reaches_the_adapters_of_an_uninterrupted_run(model, train_images, tmp_path, monkeypatch):
    import dataclasses

    config = _config("recipe.epochs=2", "optim.lr=1e-2", "recipe.batch_size=6", "model.lora.rank=2")
    reference = finetune(model, train_images, config)
    finetune_killed_after(3, monkeypatch, model, train_images, config, run_dir=tmp_path)  # after the first epoch
    other_rank = dataclasses.replace(config.model, lora=LoraConfig(rank=4))
    with pytest.raises(ValueError, match="different fine-tuning run .*config"):
        finetune(model, train_images, dataclasses.replace(config, model=other_rank), run_dir=tmp_path)
    resumed = finetune(model, train_images, config, run_dir=tmp_path)
    assert resumed.losses == reference.losses
    assert all(torch.equal(resumed.adapters[k], v) for k, v in reference.adapters.items())


# batch 10 over 18 images: the last global batch of each epoch has 8 rows, 4 per process. CLIP's beta2 and
# eps, as in test_finetune_distributed: Adam would magnify the round-off of near-zero gradients otherwise.
TWO_PROCESS = ("recipe.epochs=2", "optim.lr=1e-2", "recipe.batch_size=10", "recipe.warmup_steps=1",
               "model.lora.rank=2", "optim.beta2=0.98", "optim.eps=1e-6")  # fmt: skip


def _run_lora(data: Path):
    torch.manual_seed(0)
    model = create_model("tiny").eval()
    return finetune(model, load_images(labelled_folder(data), model.config), _config(*TWO_PROCESS))


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_two_processes_train_the_adapters_of_one(tmp_path):
    _write_colours(tmp_path / "data", 6, seed=0)
    _torchrun([__file__, str(tmp_path / "data"), str(tmp_path)])
    one, two = _run_lora(tmp_path / "data"), torch.load(tmp_path / "two.pt")
    assert len(two["losses"]) == len(one.losses) == 4
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one.losses), atol=1e-5, rtol=1e-5)
    assert two["adapters"].keys() == one.adapters.keys()
    for key, value in one.adapters.items():
        torch.testing.assert_close(two["adapters"][key], value, atol=2e-5, rtol=1e-4, msg=key)


if __name__ == "__main__":
    from training.distributed import rank, world_size

    result = _run_lora(Path(sys.argv[1]))
    assert world_size() == 2
    if rank() == 0:
        torch.save({"losses": result.losses, "adapters": result.adapters}, Path(sys.argv[2]) / "two.pt")
