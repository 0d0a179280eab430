"""save_pretrained / load round trips, and loading that never executes code."""

import json
import pickle

import pytest
import torch

import vlm
from vlm.checkpoint import load_state_dict_file


@pytest.mark.parametrize("name", ["tiny", "tiny-shared", "tiny-siglip"])
def test_save_load_is_bit_exact(tmp_path, name):
    model = vlm.create_model(name)
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["model_type"] == "vlm-clip"
    loaded = vlm.load(tmp_path / "m")
    assert loaded.config == model.config
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    if model.config.share_transformer:
        assert loaded.visual.transformer is loaded.text.transformer
    assert loaded.fingerprint() == model.fingerprint()
    assert not list((tmp_path / "m").glob("*.tmp"))


def test_fingerprint_changes_with_weights():
    model = vlm.create_model("tiny")
    before = model.fingerprint()
    with torch.no_grad():
        model.logit_scale += 1e-3
    assert model.fingerprint() != before


def test_load_weights_file_with_config(tmp_path):
    model = vlm.create_model("tiny")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    loaded = vlm.load(tmp_path / "weights.pt", config=model.config)
    assert torch.equal(loaded.logit_scale, model.logit_scale)
    with pytest.raises(ValueError, match="bare weights file: pass config="):
        vlm.load(tmp_path / "weights.pt")


class _Evil:
    """A pickle that writes `target` when unpickled."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({self.target!r}).write_text('x')",))


def test_the_evil_pickle_really_writes_its_target(tmp_path):
    pickle.loads(pickle.dumps(_Evil(tmp_path / "pwned")))  # the check below looks where the payload writes
    assert (tmp_path / "pwned").exists()


def test_pickled_objects_are_refused_not_executed(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil(tmp_path / "pwned")}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_state_dict_file(path)
    assert not (tmp_path / "pwned").exists()


def test_a_transformers_folder_with_pickled_weights_is_an_error_line(tmp_path, capsys):
    from vlm.cli import main

    vlm.to_hf(vlm.create_model("tiny")).save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    with open(tmp_path / "hf" / "pytorch_model.bin", "wb") as f:
        pickle.dump({"text_model.embeddings.token_embedding.weight": _Evil(tmp_path / "pwned")}, f)
    with pytest.raises(ValueError, match="pickled weights that are not a plain state dict"):
        vlm.load(tmp_path / "hf")
    assert main(["info", str(tmp_path / "hf")]) != 0
    assert "pickled weights" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_damaged_files_give_clear_errors(tmp_path):
    model = vlm.create_model("tiny")
    model.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        vlm.load(tmp_path / "m")
    with pytest.raises(ValueError, match="does not exist"):
        load_state_dict_file(tmp_path / "nope.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        vlm.load(tmp_path / "empty")


def test_load_preset_name_and_unknown_name():
    assert vlm.load("tiny").config == vlm.get_preset("tiny")
    with pytest.raises(ValueError, match="cannot load 'no-such-model'"):
        vlm.load("no-such-model")


@pytest.mark.slow
def test_load_open_clip_name_with_local_weights_file(tmp_path):
    """`vlm.load(name, pretrained=FILE)` reads an open_clip checkpoint file, as open_clip writes them."""
    import open_clip

    oc = open_clip.create_model("ViT-B-32")
    torch.save(oc.state_dict(), tmp_path / "open_clip_pytorch_model.bin")
    model = vlm.load("ViT-B-32", pretrained=tmp_path / "open_clip_pytorch_model.bin")
    images = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), oc.encode_image(images), atol=1e-4, rtol=1e-4)


def test_load_open_clip_pretrained_tag_offline_gives_clear_error():
    with pytest.raises(ValueError, match="open_clip could not provide"):
        vlm.load("ViT-B-32", pretrained="laion2b_s34b_b79k")


def test_load_hf_directory(tmp_path):
    model = vlm.create_model("tiny")
    vlm.to_hf(model).save_pretrained(tmp_path / "hf")
    loaded = vlm.load(tmp_path / "hf")
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
