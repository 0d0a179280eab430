"""The core CLI verbs end to end through main(argv)."""

import numpy as np
from PIL import Image

import vlm
from vlm.cli import main


def test_no_arguments_prints_usage(capsys):
    assert main([]) == 2
    assert "usage: vlm" in capsys.readouterr().out


def test_unknown_verb(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_embed_prints_similarities(tmp_path, capsys):
    vlm.create_model("tiny").save_pretrained(tmp_path / "model")
    path = tmp_path / "x.png"
    Image.fromarray(np.zeros((20, 20, 3), dtype=np.uint8)).save(path)
    assert main(["embed", str(path), "--text", "a black square", "--text", "a dog", "--model", str(tmp_path / "model")]) == 0
    out = capsys.readouterr().out
    assert "a black square" in out and "x.png" in out


def test_user_errors_are_clean(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VLM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VLM_MODEL", raising=False)
    assert main(["info"]) == 1
    assert "no model given and no default model set" in capsys.readouterr().err


def test_info_and_default_model(tmp_path, capsys, monkeypatch):
    from vlm.defaults import set_default_model

    monkeypatch.setenv("VLM_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("VLM_MODEL", raising=False)
    model = vlm.create_model("tiny")
    model.save_pretrained(tmp_path / "model")
    set_default_model(tmp_path / "model")
    assert main(["info"]) == 0
    assert model.fingerprint() in capsys.readouterr().out
    assert main(["presets"]) == 0
    assert "ViT-L-14" in capsys.readouterr().out
