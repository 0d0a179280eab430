"""TrainConfig: files, dotted overrides, and errors that name the key."""

import json

import pytest

from training.config import TrainConfig, config_from_dict, config_to_dict, load_config, write_config


def test_yaml_file_with_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("output_dir: runs/a\noptim:\n  lr: 1e-3\ndata:\n  train: pairs.csv\n")
    config = load_config(
        path,
        ["optim.lr=2e-3", "loss.kind=siglip", 'eval.templates=["a {}.", "the {}."]', "model.overrides.embed_dim=32"],
    )
    assert config.optim.lr == 2e-3
    assert config.loss.kind == "siglip"
    assert config.data.train == "pairs.csv"
    assert config.eval.templates == ("a {}.", "the {}.")
    assert config.model.overrides == {"embed_dim": 32}
    assert isinstance(config.optim.lr, float)


def test_json_file_and_round_trip(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"schedule": {"steps": 10, "warmup_steps": 2}, "seed": 3}))
    config = load_config(path)
    assert (config.schedule.steps, config.seed) == (10, 3)
    written = write_config(config, tmp_path / "resolved.yaml")
    assert load_config(written) == config
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["optim.lrr=1"], "optim.lrr"),
        (["optimizer.lr=1"], "optimizer"),
        (["optim.lr=fast"], "optim.lr takes a float"),
        (["schedule.steps=1.5"], "schedule.steps takes an int"),
        (["data.num_workers=true"], "data.num_workers takes an int"),
        (["loss.kind=hinge"], "loss.kind must be one of clip, siglip"),
        (["optim.lr=-1"], "optim.lr must be a number > 0"),
        (["schedule.steps=5", "schedule.warmup_steps=10"], "warmup_steps"),
        (["data.batch_size=10", "loss.accum_steps=3"], "multiple of loss.accum_steps"),
        (["model.unlocked_blocks=2"], "model.lock_image=true"),
        (["eval.templates=[a photo]"], "no '{}'"),
        (["optim.lr"], "key=value"),
        (["optim.lr.x=1"], "is a value, not a section"),
    ],
)
def test_errors_name_the_key(overrides, message):
    with pytest.raises(
        (ValueError, TypeError), match=message.replace("{", r"\{").replace("}", r"\}").replace("[", r"\[")
    ):
        load_config(None, overrides)


def test_unknown_key_in_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  trian: pairs.csv\n")
    with pytest.raises(ValueError, match="data.trian"):
        load_config(path)
    path.write_text("- not a mapping\n")
    with pytest.raises(ValueError, match="mapping"):
        load_config(path)
    with pytest.raises(ValueError, match=r"\.json, \.yaml or \.yml"):
        load_config(tmp_path / "x.toml") if (tmp_path / "x.toml").write_text("") is not None else None
    with pytest.raises(FileNotFoundError):
        load_config(tmp_path / "missing.yaml")


def test_frozen():
    config = TrainConfig()
    with pytest.raises(AttributeError):
        config.optim.lr = 1.0  # type: ignore[misc]


def test_demo_config_is_valid():
    from pathlib import Path

    config = load_config(Path(__file__).parents[1] / "training" / "configs" / "digits.yaml")
    assert config.model.name == "small"
    assert config.eval.zeroshot and config.data.eval
