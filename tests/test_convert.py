"""Parity with open_clip and transformers on identical (seeded random) weights, and exact round trips."""

import pytest
import torch

import vlm

from conftest import make_text

ATOL = 1e-4


def _hf_features(out):
    # transformers 5 returns an output object whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def open_clip_b32():
    import open_clip

    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-32").eval()


@pytest.mark.slow
def test_open_clip_vit_b32_parity(open_clip_b32):
    model = vlm.from_open_clip(open_clip_b32).eval()
    images = torch.randn(2, 3, 224, 224)
    text = make_text(3, 77, lengths=[4, 12, 77])
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), open_clip_b32.encode_image(images), atol=ATOL, rtol=0)
        torch.testing.assert_close(model.encode_text(text), open_clip_b32.encode_text(text), atol=ATOL, rtol=0)
        torch.testing.assert_close(
            model.encode_image(images, normalize=True),
            open_clip_b32.encode_image(images, normalize=True),
            atol=ATOL,
            rtol=0,
        )


@pytest.mark.slow
def test_open_clip_round_trips_are_exact(open_clip_b32):
    model = vlm.from_open_clip(open_clip_b32)
    back = vlm.to_open_clip(model)
    original, returned = open_clip_b32.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for key in original:
        assert torch.equal(original[key], returned[key]), key
    again = vlm.from_open_clip(back)
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key


def test_open_clip_bare_state_dict_needs_config(open_clip_b32):
    with pytest.raises(ValueError, match="pass config="):
        vlm.from_open_clip(open_clip_b32.state_dict())
    model = vlm.from_open_clip(open_clip_b32.state_dict(), config=vlm.get_preset("ViT-B-32"))
    assert torch.equal(model.visual.class_token, open_clip_b32.visual.class_embedding)


def test_open_clip_wrong_config_is_named(open_clip_b32):
    with pytest.raises(ValueError, match="expected key"):
        vlm.from_open_clip(open_clip_b32.state_dict(), config=vlm.get_preset("ViT-L-14"))


@pytest.mark.parametrize("name", ["tiny", "tiny-siglip"])
def test_tiny_to_open_clip_and_back(name):
    model = vlm.create_model(name).eval()
    oc = vlm.to_open_clip(model)
    images = torch.randn(2, 3, 32, 32)
    text = make_text(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(oc.encode_image(images), model.encode_image(images), atol=1e-5, rtol=0)
        torch.testing.assert_close(oc.encode_text(text), model.encode_text(text), atol=1e-5, rtol=0)
    if model.logit_bias is not None:
        assert torch.equal(oc.logit_bias, model.logit_bias)
    back = vlm.from_open_clip(oc)
    assert back.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_open_clip_unsupported_variant_is_refused():
    import open_clip

    oc = open_clip.create_model("ViT-B-32")
    oc.visual.pool_type = "avg"  # supported (CLIPA's pooling): read as such
    assert vlm.from_open_clip(oc).config.vision.pool == "avg"
    oc.visual.transformer.resblocks[0].attn = torch.nn.Identity()
    with pytest.raises(ValueError, match="custom attention blocks in the image tower"):
        vlm.from_open_clip(oc)


def _hf_pair(hf_config=None):
    from transformers import CLIPConfig as HFConfig
    from transformers import CLIPModel

    torch.manual_seed(0)
    return CLIPModel(hf_config or HFConfig()).eval()


def _check_hf_parity(hf, image_size, context_length):
    model = vlm.from_hf(hf).eval()
    images = torch.randn(2, 3, image_size, image_size)
    text = make_text(3, context_length, lengths=[4, 9, context_length])
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images), _hf_features(hf.get_image_features(pixel_values=images)), atol=ATOL, rtol=0
        )
        torch.testing.assert_close(
            model.encode_text(text), _hf_features(hf.get_text_features(input_ids=text)), atol=ATOL, rtol=0
        )
    back = vlm.to_hf(model)
    original, returned = hf.state_dict(), back.state_dict()
    for key in original:
        assert torch.equal(original[key], returned[key]), key
    return model


@pytest.mark.slow
def test_hf_default_config_parity():
    model = _check_hf_parity(_hf_pair(), 224, 77)
    assert model.config.vision.activation == "quick_gelu"


def test_hf_small_non_default_config_parity():
    from transformers import CLIPConfig as HFConfig

    config = HFConfig(
        text_config=dict(
            hidden_size=96, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
            max_position_embeddings=40, hidden_act="gelu", layer_norm_eps=1e-6, eos_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
            image_size=48, patch_size=12, hidden_act="gelu", layer_norm_eps=1e-6,
        ),
        projection_dim=48,
        logit_scale_init_value=2.0,
    )
    model = _check_hf_parity(_hf_pair(config), 48, 40)
    assert model.config.text.mlp_ratio == 200 / 96
    assert model.config.vision.norm_eps == 1e-6


def test_vlm_to_hf_to_vlm_is_exact():
    model = vlm.create_model("tiny")
    back = vlm.from_hf(vlm.to_hf(model))
    assert back.config == model.config
    for key, value in model.state_dict().items():
        assert torch.equal(value, back.state_dict()[key]), key


def test_hf_refuses_sigmoid_models_without_siglip_towers():
    """A CLIP-shaped model with a logit_bias has no transformers class: CLIPModel has no bias, SiglipModel
    other towers."""
    config = vlm.get_preset("tiny").replace(init_logit_bias=-10.0)
    with pytest.raises(ValueError, match="transformers has no class for this architecture"):
        vlm.to_hf(vlm.create_model(config))


def test_hf_directory_with_preprocessor_config(tmp_path):
    import json

    model = vlm.create_model("tiny")
    vlm.to_hf(model).save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5] * 3, "image_std": [0.25] * 3}))
    loaded = vlm.from_hf(tmp_path)
    assert loaded.config.vision.image_mean == (0.5, 0.5, 0.5)
    assert loaded.config.vision.image_std == (0.25, 0.25, 0.25)


def test_state_dict_format_detection():
    from vlm.convert import detect_state_dict_format

    model = vlm.create_model("tiny")
    assert detect_state_dict_format(model.state_dict()) == "vlm"
    assert detect_state_dict_format(vlm.to_open_clip(model).state_dict()) == "open_clip"
    assert detect_state_dict_format(vlm.to_hf(model).state_dict()) == "hf"
    with pytest.raises(ValueError, match="unrecognised checkpoint"):
        detect_state_dict_format({"foo": torch.zeros(1)})
