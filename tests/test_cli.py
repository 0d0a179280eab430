"""The core CLI verbs end to end through main(argv)."""

import numpy as np
import torch
from PIL import Image

import vlm
from vlm.cli import main


def test_no_arguments_prints_usage(capsys):
    assert main([]) == 2
    assert "usage: vlm" in capsys.readouterr().out


def test_unknown_verb(capsys):
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_embed_prints_cosine_similarities(tmp_path, capsys):
    vlm.create_model("tiny").save_pretrained(tmp_path / "model")
    rng = np.random.default_rng(0)
    paths = [tmp_path / "x.png", tmp_path / "y.png"]
    for path in paths:
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)
    texts = ["a black square", "a dog", "noise"]
    argv = ["embed", *map(str, paths), *(f"--text={t}" for t in texts), "--model", str(tmp_path / "model")]
    assert main(argv) == 0
    head, *rows = capsys.readouterr().out.splitlines()
    assert head.split() == "a black square a dog noise".split() and [r.split()[0] for r in rows] == list(map(str, paths))
    printed = torch.tensor([[float(v) for v in row.split()[1:]] for row in rows])  # (images, texts)
    # The oracle: the model's own embeddings, normalised here, one dot product per pair.
    model = vlm.load(tmp_path / "model").eval()
    transform = vlm.image_transform(model)
    with torch.inference_mode():
        xb = model.encode_image(torch.stack([transform(vlm.load_image(p)) for p in paths]))
        xq = model.encode_text(vlm.get_tokenizer(model)(texts))
    expected = torch.nn.functional.normalize(xb, dim=-1) @ torch.nn.functional.normalize(xq, dim=-1).T
    torch.testing.assert_close(printed, expected, atol=6e-5, rtol=0)


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
