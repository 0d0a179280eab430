"""Every preset: forward, backward, fused vs reference attention, checkpointing, shapes."""

import math

import pytest
import torch

import vlm
from vlm import CLIPConfig, TextConfig, VisionConfig
from vlm.layers import Attention

from conftest import make_text

TINY = [name for name in vlm.list_presets() if name.startswith(("tiny", "small"))]
BIG = [name for name in vlm.list_presets() if name not in TINY]


def _shrunk(name: str) -> CLIPConfig:
    """A big preset with one block per tower: same widths, heads, patch and image size."""
    config = vlm.get_preset(name)
    return config.replace(vision={"depth": 1}, text={"depth": 1})


def _inputs(config: CLIPConfig, batch: int = 2):
    images = torch.randn(batch, 3, config.vision.image_size, config.vision.image_size)
    return images, make_text(batch, config.text.context_length)


def _forward_backward(model, images, text):
    out = model(images, text)
    loss = out.logits_per_image.logsumexp(-1).mean() - out.logits_per_image.diagonal().mean()
    loss = loss + (out.logit_bias or 0)
    loss.backward()
    return out


@pytest.mark.parametrize("name", TINY + BIG)
def test_forward_backward_every_parameter_gets_gradient(name):
    config = vlm.get_preset(name) if name in TINY else _shrunk(name)
    model = vlm.create_model(config)
    images, text = _inputs(config)
    out = _forward_backward(model, images, text)
    assert out.image_embeds.shape == (2, config.embed_dim)
    assert out.text_embeds.shape == (2, config.embed_dim)
    assert torch.allclose(out.image_embeds.norm(dim=-1), torch.ones(2), atol=1e-5)
    for param_name, param in model.named_parameters():
        assert param.grad is not None, f"{param_name} received no gradient"
        assert torch.isfinite(param.grad).all(), f"{param_name} has a non-finite gradient"
        if param_name != "logit_bias":
            assert param.grad.abs().sum() > 0, f"{param_name} has an all-zero gradient"


@pytest.mark.parametrize("name", BIG)
def test_big_presets_match_open_clip_shapes(name):
    """The full-depth presets, built on the meta device, have open_clip's parameter count."""
    import open_clip

    ours = vlm.create_model(name, device="meta")
    oc_name = name
    theirs = open_clip.create_model(oc_name, device="meta")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    assert vlm.convert.config_from_open_clip(theirs) == ours.config


@pytest.mark.parametrize("name", TINY)
def test_fused_attention_equals_reference(name):
    model = vlm.create_model(name).eval()
    images, text = _inputs(model.config, batch=3)
    with torch.no_grad():
        fused_i, fused_t = model.encode_image(images), model.encode_text(text)
        model.set_fused_attention(False)
        ref_i, ref_t = model.encode_image(images), model.encode_text(text)
    torch.testing.assert_close(fused_i, ref_i, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_t, ref_t, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_gradient_checkpointing_changes_nothing(name):
    images, text = _inputs(vlm.get_preset(name))
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = vlm.create_model(name)
        model.set_grad_checkpointing(checkpointing)
        _forward_backward(model, images, text)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5, msg=n)


def test_attention_with_adapter_runs_the_adapter():
    """A LoRA-style wrapper around q_proj must be called, not bypassed by the fused projection."""

    class Scaled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return 2 * self.inner(x)

    attn = Attention(32, 4)
    x = torch.randn(2, 5, 32)
    before = attn(x)
    attn.q_proj = Scaled(attn.q_proj)
    after = attn(x)
    assert not torch.allclose(before, after)
    attn.fused = False
    torch.testing.assert_close(after, attn(x), atol=1e-6, rtol=1e-5)


def test_attention_weights_are_probabilities():
    model = vlm.create_model("tiny")
    images = torch.randn(2, 3, 32, 32)
    tokens, weights = model.visual.forward_with_attention(images)
    n = model.config.vision.num_patches + 1
    assert len(weights) == model.config.vision.depth
    assert weights[0].shape == (2, model.config.vision.num_heads, n, n)
    torch.testing.assert_close(weights[0].sum(-1), torch.ones(2, 4, n))
    torch.testing.assert_close(model.visual.pool(tokens), model.visual.pool(model.visual.forward_features(images)))


def test_text_short_path_matches_full_context():
    """Running only up to the last end-of-text token gives the embeddings of all 77 positions."""
    model = vlm.create_model("tiny").eval()
    text = make_text(4, 32, lengths=[3, 5, 9, 6])
    with torch.no_grad():
        short = model.encode_text(text)
        # Reference: every position through the reference attention with an explicit causal mask.
        t = model.text
        x = t.token_embed(text) + t.pos_embed
        x = t.norm(t.transformer(x, is_causal=True))
        full = t.project(t.pool(x, text))
    assert model.text.embed(text).shape[1] == 9
    torch.testing.assert_close(short, full, atol=1e-5, rtol=1e-5)


def test_position_embeddings_interpolate_to_larger_images():
    model = vlm.create_model("tiny").eval()
    with torch.no_grad():
        out = model.encode_image(torch.randn(2, 3, 48, 48))  # 6x6 patches instead of 4x4
        rect = model.encode_image(torch.randn(2, 3, 32, 64))  # 4x8 patches
    assert out.shape == rect.shape == (2, 64)
    pos = vlm.layers.resample_pos_embed(model.visual.pos_embed, (4, 4))
    assert pos is model.visual.pos_embed  # same grid: untouched


def test_position_embedding_interpolation_matches_transformers():
    """A 32-pixel model run on 48-pixel images equals transformers' interpolate_pos_encoding=True."""
    model = vlm.create_model("tiny").eval()
    hf = vlm.to_hf(model).eval()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ours = model.encode_image(images)
        out = hf.get_image_features(pixel_values=images, interpolate_pos_encoding=True)
    theirs = out if isinstance(out, torch.Tensor) else out.pooler_output
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_share_transformer_uses_one_set_of_weights():
    model = vlm.create_model("tiny-shared")
    assert model.visual.transformer is model.text.transformer
    separate = vlm.create_model("tiny")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    block_params = sum(p.numel() for p in separate.text.transformer.parameters())
    assert count(model) == count(separate) - block_params


def test_share_transformer_requires_equal_towers():
    with pytest.raises(ValueError, match="share_transformer.*width"):
        CLIPConfig(vision=VisionConfig(width=768), text=TextConfig(width=512), share_transformer=True)


def test_logit_scale_and_bias_initialisation():
    model = vlm.create_model("tiny")
    assert math.isclose(model.logit_scale.item(), math.log(1 / 0.07), rel_tol=1e-6)
    assert model.logit_bias is None
    siglip = vlm.create_model("tiny-siglip")
    assert siglip.logit_bias.item() == -10.0


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(width=100, num_heads=3), "divisible"),
        (dict(patch_size=0), "patch_size must be a positive integer"),
        (dict(image_size=100, patch_size=32), "multiple of patch_size"),
        (dict(activation="relu"), "activation must be one of"),
        (dict(image_mean=(0.5, 0.5)), "one value per RGB channel"),
    ],
)
def test_vision_config_validation_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisionConfig(**kwargs)


def test_config_dict_round_trip_and_unknown_keys():
    config = vlm.get_preset("ViT-B-16")
    assert CLIPConfig.from_dict(config.to_dict()) == config
    bad = config.to_dict()
    bad["vision"]["depht"] = 3
    with pytest.raises(ValueError, match="depht"):
        CLIPConfig.from_dict(bad)
    with pytest.raises(ValueError, match="unknown preset 'ViT-X'"):
        vlm.get_preset("ViT-X")


def test_bad_inputs_raise_clear_errors():
    model = vlm.create_model("tiny")
    with pytest.raises(ValueError, match="expected images of shape"):
        model.encode_image(torch.randn(3, 32, 32))
    with pytest.raises(ValueError, match="token ids"):
        model.encode_text(torch.randn(2, 5))
    with pytest.raises(ValueError, match="context_length is 32"):
        model.encode_text(torch.zeros(2, 77, dtype=torch.long))


def test_meta_device_and_dtype_construction():
    model = vlm.create_model("tiny", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())
    half = vlm.create_model("tiny", dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in half.parameters())


def test_no_weight_decay_names_exist():
    model = vlm.create_model("tiny")
    names = dict(model.named_parameters())
    assert model.no_weight_decay() <= set(names)
