"""Every preset: forward, backward, fused vs reference attention, checkpointing, shapes."""

import dataclasses
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
    """A big preset with one block per tower and at most 1000 token embeddings: same widths, heads, patch
    and image size, pooling and projections."""
    config = vlm.get_preset(name)
    return config.replace(vision={"depth": 1}, text={"depth": 1, "vocab_size": min(1000, config.text.vocab_size)})


def _inputs(config: CLIPConfig, batch: int = 2):
    images = torch.randn(batch, 3, config.vision.image_size, config.vision.image_size)
    text = make_text(batch, config.text.context_length, vocab=config.text.vocab_size)
    if config.text.eot_id is not None:  # end each text with the id the tower pools at
        text[text == config.text.vocab_size - 1] = config.text.eot_id
    return images, text


def _forward_backward(model, images, text):
    out = model(images, text)
    loss = out.logits_per_image.logsumexp(-1).mean() - out.logits_per_image.diagonal().mean()
    loss = loss + (out.logit_bias or 0)
    loss.backward()
    return out


@pytest.mark.parametrize("name", TINY + BIG)
def test_forward_backward_every_parameter_gets_gradient(name):
    config = vlm.get_preset(name)
    if name not in TINY:  # a 4x4 patch grid: every parameter is still used, at a fraction of the cost
        config = _shrunk(name).replace(vision={"image_size": 4 * config.vision.patch_size})
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
def test_big_presets_match_open_clip(name):
    """The full-depth presets, built on the meta device, have open_clip's parameter count, and the config vlm
    reads from open_clip's model (with the preprocessing of its first pretrained tag) is the preset."""
    import open_clip

    ours = vlm.create_model(name, device="meta")
    tags = [tag for model, tag in open_clip.list_pretrained() if model == name]
    pretrained = open_clip.get_pretrained_cfg(name, tags[0]) if tags else {}
    preprocess = {k: pretrained[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pretrained}
    with torch.device("meta"):  # open_clip builds on the CPU and then moves: giant towers would take a minute
        theirs = open_clip.create_model(name, device="meta", force_preprocess_cfg=preprocess)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    assert vlm.convert.config_from_open_clip(theirs, vlm.convert.open_clip_model_config(name)) == ours.config


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
        (dict(image_size=16, patch_size=32), "larger than image_size"),
        (dict(activation="relu"), "activation must be one of"),
        (dict(image_mean=(0.5, 0.5)), "one value per RGB channel"),
        (dict(pool="cls"), "pool must be one of token, avg, map, none"),
        (dict(class_token=False), "pool='token' reads the class token"),
        (dict(proj="mlp"), "proj must be one of linear, linear_bias, none"),
        (dict(norm_pre=1), "norm_pre must be true or false"),
        (dict(layer_scale=0.0), "layer_scale must be None"),
        (dict(pos_embed_resample="nearest"), "pos_embed_resample must be one of"),
    ],
)
def test_vision_config_validation_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisionConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(pool="mean"), "pool must be one of eot, last, first"),
        (dict(eot_id=49408), r"eot_id must be a token id in \[0, vocab_size=49408\)"),
        (dict(pad_id=-1), "pad_id must be a token id"),
        (dict(causal="yes"), "causal must be true or false"),
        (dict(tokenizer_clean="upper"), "tokenizer_clean must be one of lower, canonicalize, whitespace"),
        (dict(tokenizer_clean="canonicalize"), "CLIP's byte-pair tokenizer .* cleans with 'lower'"),
        (dict(tokenizer="google/siglip-base-patch16-224"), "set eot_id to its end-of-text id"),
        (dict(tokenizer=""), "TextConfig.tokenizer must be"),
    ],
)
def test_text_config_validation_names_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextConfig(**kwargs)


def test_projection_none_needs_the_embedding_width():
    with pytest.raises(ValueError, match=r"vision.proj='none' .* vision.width \(64\) must equal embed_dim \(32\)"):
        vlm.get_preset("tiny-siglip").replace(embed_dim=32)


def test_configs_saved_before_the_family_options_load_as_clip(tmp_path):
    """A config.json without the options added for SigLIP and co. reads as the CLIP it was."""
    data = vlm.get_preset("tiny").to_dict()
    for tower, names in vlm.config._ADDED_FIELDS.items():
        for name in names:
            data[tower].pop(name)
    assert CLIPConfig.from_dict(data) == vlm.get_preset("tiny")


def test_bidirectional_text_runs_every_position_and_padding_changes_it():
    """The short path is only for causal towers: without the causal mask, padding after the text is seen."""
    causal, bidirectional = vlm.create_model("tiny").eval(), vlm.create_model("tiny-clipa").eval()
    text = make_text(2, 32, lengths=[4, 7])
    assert causal.text.embed(text).shape[1] == 7
    assert bidirectional.text.embed(text).shape[1] == 32
    padded = text.clone()
    padded[:, 20:] = 5
    with torch.no_grad():
        torch.testing.assert_close(causal.encode_text(text), causal.encode_text(padded))
        assert not torch.allclose(bidirectional.encode_text(text), bidirectional.encode_text(padded))


@pytest.mark.parametrize("pool, expected", [("eot", [3, 6]), ("first", [0, 0]), ("last", [31, 31])])
def test_text_pool_positions(pool, expected):
    config = vlm.get_preset("tiny").text
    tower = vlm.text.TextTower(dataclasses.replace(config, pool=pool), 64)
    text = make_text(2, 32, lengths=[4, 7])
    assert tower.pool_positions(text).tolist() == expected
    explicit = vlm.text.TextTower(dataclasses.replace(config, eot_id=7), 64)
    text[0, 2] = text[1, 5] = 7
    assert explicit.pool_positions(text).tolist() == [2, 5]


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


@pytest.mark.parametrize("name", TINY)
def test_last_block_at_the_pooled_tokens_only_equals_the_full_stack(name):
    """`forward` runs the last block at the pooled positions alone; the embeddings and every gradient are
    those of pooling the full `forward_features`."""
    model = vlm.create_model(name)
    images, text = _inputs(model.config, batch=3)
    text[1, 5:] = 0  # rows of different lengths: the causal mask of the pooled queries matters
    text[1, 4] = model.config.text.eot_id or model.config.text.vocab_size - 1

    def run(full: bool):
        model.zero_grad(set_to_none=True)
        v, t = model.visual, model.text
        if full:
            image = v.project(v.pool(v.forward_features(images)))
            txt = t.project(t.pool(t.forward_features(text), text))
        else:
            image, txt = v(images), t(text)
        (image.square().sum() + txt.square().sum()).backward()
        return image.detach(), txt.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    fast, full = run(False), run(True)
    torch.testing.assert_close(fast[0], full[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], full[1], atol=1e-5, rtol=1e-5)
    assert fast[2].keys() == full[2].keys()
    for n in full[2]:  # the same sums in another order: equal to float32 rounding of the largest entry
        if n.endswith("k_proj.bias"):
            continue  # its true gradient is 0 (softmax ignores a shift shared by every key): round-off only
        error = (fast[2][n] - full[2][n]).abs().max()
        assert error <= 1e-5 * full[2][n].abs().max() + 1e-7, f"{n}: {error}"


def test_stacked_projection_weights_follow_every_change():
    """Without autograd the stacked q/k/v weights are reused; any change to a weight (an optimiser step, a
    loaded state dict, a move) is seen at the next call."""
    model = vlm.create_model("tiny-siglip").eval()
    images, text = _inputs(model.config)
    with torch.inference_mode():
        first = model.encode_image(images)
    other = vlm.create_model("tiny-siglip")
    model.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(model.encode_image(images), other.eval().encode_image(images))
        model.visual.transformer.blocks[0].attn.k_proj.weight.mul_(2)
        changed = model.encode_image(images)
    assert not torch.allclose(changed, first) and not torch.allclose(changed, other.encode_image(images).detach())
    attn = model.visual.transformer.blocks[0].attn
    reference = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
    with torch.no_grad():
        assert torch.equal(attn._fused_weights((attn.q_proj, attn.k_proj, attn.v_proj))[0], reference)
        model.double()
        assert attn._fused_weights((attn.q_proj, attn.k_proj, attn.v_proj))[0].dtype == torch.float64
