"""The model families people pick today, at reduced depth: SigLIP, SigLIP 2, CLIPA, MetaCLIP 2 worldwide and
MobileCLIP 2's timm ViT, against open_clip and transformers on the same (seeded random) weights.

Each family: normalised embeddings and logits (with `logit_bias`) within 1e-4, and exact round trips both
ways. Then whole pipelines from raw text, tokenizer included, out of the directories open_clip and
transformers write (tokenizer vocabularies from `vocabularies.build_layouts`), and the errors for what vlm
cannot load.
"""

from __future__ import annotations

import copy
import json
import re
import shutil

import pytest
import torch
from torch import nn

import vlm
from vlm.text_clean import get_clean_fn

ATOL = 1e-4
TEXTS = ["A photo of a Dog.", "two cats, sleeping!", "Ein Foto von Hunden", "the_end", "東京の写真", ""]


def _randomize(module: nn.Module, seed: int = 0) -> None:
    """Seeded weights of std 0.02 around 0 (1 for norm scales), so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            scale = 1.0 if name.endswith("weight") and param.ndim == 1 else 0.0
            param.copy_(torch.randn(param.shape, generator=g) * 0.02 + scale)


def reduced_open_clip(name: str, depth: int = 2, **text_cfg) -> nn.Module:
    """open_clip's model `name` with `depth` blocks per tower (text_cfg overrides, e.g. vocab_size), random weights."""
    import open_clip
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = copy.deepcopy(open_clip.get_model_config(name))
    custom = cfg.pop("custom_text", False)
    cfg["text_cfg"].update(layers=depth, **text_cfg)
    timm = bool(cfg["vision_cfg"].get("timm_model_name"))
    if not timm:
        cfg["vision_cfg"]["layers"] = depth
    with torch.device("meta"):
        oc = (CustomTextCLIP if custom else CLIP)(**cfg)
    if timm:
        oc.visual.trunk.blocks = oc.visual.trunk.blocks[:depth]
    oc = oc.to_empty(device="cpu")
    _randomize(oc)
    for module in oc.modules():  # causal masks are buffers, left empty by to_empty
        mask = getattr(module, "attn_mask", None)
        if isinstance(mask, torch.Tensor):
            module.attn_mask = torch.full(mask.shape, float("-inf")).triu(1)
    return oc.eval()


def text_batch(config: vlm.TextConfig, lengths=(5, 12, 30)) -> torch.Tensor:
    """Rows shaped as the family's tokenizer makes them: ids, an end-of-text token, then padding."""
    g = torch.Generator().manual_seed(3)
    L = config.context_length
    eot = config.vocab_size - 1 if config.eot_id is None else config.eot_id
    text = torch.full((len(lengths), L), config.pad_id, dtype=torch.long)
    for row, n in enumerate(lengths):
        n = min(n, L)
        text[row, : n - 1] = torch.randint(5, config.vocab_size - 2, (n - 1,), generator=g)
        text[row, n - 1] = eot
    return text


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ---- open_clip -------------------------------------------------------------------------------------
OPEN_CLIP_FAMILIES = [
    "ViT-B-16-SigLIP",  # timm trunk, MAP head, T5 text read at the last position, projection with bias
    "ViT-B-16-SigLIP2",  # the same with a tanh-GELU text tower
    "ViT-SO400M-16-SigLIP-i18n-256",  # tanh-GELU image tower, no text projection, MLP ratio 3.7362
    "ViT-gopt-16-SigLIP2-256",  # a text tower narrower than the image tower, projected up
    "ViT-L-14-CLIPA",  # open_clip's ViT: no pre-LayerNorm, mean of patches, LayerNorm after pooling
    "ViT-H-14-worldwide",  # causal text pooled at its first end-of-text id (2), not the highest id
    "MobileCLIP2-L-14",  # timm's CLIP ViT with a biased head, bidirectional text pooled at end-of-text
]


@pytest.fixture(scope="module", params=OPEN_CLIP_FAMILIES)
def open_clip_pair(request):
    hf_vocabulary = bool(__import__("open_clip").get_model_config(request.param)["text_cfg"].get("hf_tokenizer_name"))
    oc = reduced_open_clip(request.param, **({"vocab_size": 1000} if hf_vocabulary else {}))
    return request.param, oc, vlm.from_open_clip(oc, model_name=request.param).eval()


def test_open_clip_family_parity(open_clip_pair):
    name, oc, model = open_clip_pair
    size = model.config.vision.image_size
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    text = text_batch(model.config.text)
    with torch.no_grad():
        assert_close(model.encode_image(images, normalize=True), oc.encode_image(images, normalize=True))
        assert_close(model.encode_text(text, normalize=True), oc.encode_text(text, normalize=True))
        ours = model(images, text).logits_per_image
        theirs = oc.get_logits(images, text)[0]
    assert_close(ours, theirs)
    assert (model.logit_bias is not None) == (oc.logit_bias is not None)
    if name in vlm.PRESETS:
        preset = vlm.get_preset(name)
        assert model.config.vision.pool == preset.vision.pool and model.config.text.pool == preset.text.pool


def test_open_clip_family_round_trips_are_exact(open_clip_pair):
    name, oc, model = open_clip_pair
    back = vlm.to_open_clip(model)
    assert type(back).__name__ == type(oc).__name__
    assert_same_state(oc.state_dict(), back.state_dict())
    assert_same_state(model.state_dict(), vlm.from_open_clip(back, model_name=name).state_dict())


def test_open_clip_state_dict_with_another_family_s_config_is_named():
    oc = reduced_open_clip("ViT-B-16-SigLIP", vocab_size=1000)
    clip_config = vlm.get_preset("ViT-B-16").replace(vision={"depth": 2}, text={"depth": 2})
    with pytest.raises(ValueError, match=r"16 parameter\(s\) this config has no place for, e.g. \['text.text_projection.bias'"):
        vlm.from_open_clip(oc.state_dict(), config=clip_config)


def test_open_clip_module_with_another_vocabulary_needs_its_name():
    oc = reduced_open_clip("ViT-B-16-SigLIP", vocab_size=1000)
    with pytest.raises(ValueError, match="model_name='ViT-B-16-SigLIP'"):
        vlm.from_open_clip(oc)


@pytest.mark.parametrize(
    "name, missing",
    [
        ("EVA02-B-16", "timm Eva image tower"),
        ("convnext_base", "timm ConvNeXt image tower"),
        ("RN50", "non-ViT image tower (ModifiedResNet)"),
        ("coca_ViT-B-32", "attentional pooler"),
        ("ViTamin-S", "convolutional stem (HybridEmbed)"),
    ],
)
def test_unsupported_open_clip_architectures_name_what_is_missing(name, missing):
    import open_clip

    with torch.device("meta"):
        oc = open_clip.create_model(name, device="meta")
    with pytest.raises(ValueError, match=f"uses .*{re.escape(missing)}.* which vlm's CLIP does not implement"):
        vlm.from_open_clip(oc, model_name=name)


# ---- transformers ----------------------------------------------------------------------------------
# The tokenizer a transformers model made here (not saved from a repo) is said to have.
TOKENIZERS = {
    "siglip": "google/siglip-base-patch16-224",
    "siglip2": "google/siglip2-base-patch16-256",
    "metaclip_2": "facebook/metaclip-2-worldwide-huge-quickgelu",
}


def _hf_model(family: str):
    import transformers

    text = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000,
                max_position_embeddings=16)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, patch_size=8)
    if family == "siglip2":
        cfg = transformers.Siglip2Config(text_config=text, vision_config=dict(vision, num_patches=16))
    elif family == "siglip":
        cfg = transformers.SiglipConfig(text_config=text, vision_config=dict(vision, image_size=32))
    else:
        text.update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
        cfg = transformers.MetaClip2Config(text_config=text, vision_config=dict(vision, image_size=32), projection_dim=48)
    model = getattr(transformers, vlm.convert.HF_FAMILIES[family])(cfg)
    _randomize(model)
    return model.eval()


def _naflex_inputs(images: torch.Tensor, patch: int = 8):
    """Siglip2Model's inputs for images whose patch grid fills the sequence: patches flattened as its
    processor does (row, column, channel), every one valid."""
    B, C, H, W = images.shape
    rows, cols = H // patch, W // patch
    patches = images.reshape(B, C, rows, patch, cols, patch).permute(0, 2, 4, 3, 5, 1).reshape(B, rows * cols, -1)
    return dict(
        pixel_values=patches,
        pixel_attention_mask=torch.ones(B, rows * cols, dtype=torch.long),
        spatial_shapes=torch.tensor([[rows, cols]] * B),
    )


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.mark.parametrize("family", ["siglip", "siglip2", "metaclip_2"])
def test_transformers_family_parity_and_round_trip(family):
    hf = _hf_model(family)
    model = vlm.from_hf(hf, tokenizer=TOKENIZERS[family]).eval()
    assert vlm.convert.hf_family(model.config) == family
    assert model.config.text.tokenizer == TOKENIZERS[family]
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    text = text_batch(model.config.text, lengths=(4, 9, 16))
    pixels = _naflex_inputs(images) if family == "siglip2" else dict(pixel_values=images)
    with torch.no_grad():
        assert_close(model.encode_image(images), _features(hf.get_image_features(**pixels)))
        assert_close(model.encode_text(text), _features(hf.get_text_features(input_ids=text)))
        out = hf(input_ids=text, **pixels)
        assert_close(model(images, text).logits_per_image, out.logits_per_image)
    back = vlm.to_hf(model)
    assert type(back) is type(hf)
    assert_same_state(hf.state_dict(), back.state_dict())


def test_siglip2_naflex_non_square_images_and_padding_patches():
    """A 3x5 patch grid in a 16-patch sequence: NaFlex resizes the position grid (bilinear, antialiased) and
    masks the padding patch; vlm runs the 24x40 image itself and gets the same embedding."""
    hf = _hf_model("siglip2")
    model = vlm.from_hf(hf, tokenizer=TOKENIZERS["siglip2"]).eval()
    image = torch.randn(1, 3, 24, 40, generator=torch.Generator().manual_seed(2))
    inputs = _naflex_inputs(image)
    pad = torch.zeros(1, 1, inputs["pixel_values"].shape[-1])
    inputs["pixel_values"] = torch.cat([inputs["pixel_values"], pad], dim=1)
    inputs["pixel_attention_mask"] = torch.tensor([[1] * 15 + [0]])
    with torch.no_grad():
        assert_close(model.encode_image(image), _features(hf.get_image_features(**inputs)))
        bicubic = vlm.convert.model_from_state(
            model.config.replace(vision={"pos_embed_resample": "bicubic"}), model.state_dict()
        )
        assert not torch.allclose(bicubic.encode_image(image), model.encode_image(image), atol=ATOL)


@pytest.mark.parametrize("family", ["siglip", "siglip2", "metaclip_2"])
def test_transformers_directories_load_without_naming_the_family(family, tmp_path):
    hf = _hf_model(family)
    hf.save_pretrained(tmp_path)
    model = vlm.load(tmp_path)
    assert vlm.convert.hf_family(model.config) == family
    assert_same_state(vlm.from_hf(hf, tokenizer=str(tmp_path)).state_dict(), model.state_dict())


def test_a_transformers_model_of_unknown_origin_needs_its_tokenizer_named():
    with pytest.raises(ValueError, match="pass tokenizer="):
        vlm.from_hf(_hf_model("siglip"))


def test_architecture_without_a_transformers_class_is_named():
    with pytest.raises(ValueError, match="transformers has no class for this architecture"):
        vlm.to_hf(vlm.create_model("tiny-clipa"))


# ---- whole pipelines from raw text -------------------------------------------------------------------
# (open_clip name, tokenizer layout, text vocabulary size, reduce the image tower to 2 blocks of this width)
LOCAL_DIRS = [
    ("ViT-B-16-SigLIP", "siglip-timm", 1000, None),  # timm's trunk keeps its 12 blocks
    ("ViT-B-16-SigLIP2", "siglip2-timm", 1200, None),
    ("ViT-L-14-CLIPA", "bert", 1600, 256),
    ("ViT-H-14-worldwide", "xlm-v", 1002, 256),
]


def _open_clip_local_dir(tmp_path, layouts, name, layout, vocab_size, vision_width):
    """A `local-dir:` model directory as open_clip's hub repos hold one: open_clip_config.json, the weights and
    the tokenizer files; and the open_clip model it holds."""
    import open_clip
    from safetensors.torch import save_file

    model_cfg = copy.deepcopy(open_clip.get_model_config(name))
    model_cfg["text_cfg"].update(layers=2, vocab_size=vocab_size)
    if vision_width:
        model_cfg["vision_cfg"].update(layers=2, width=vision_width, head_width=64)
    folder = tmp_path / name
    # The tokenizer files as a hub repo keeps them next to the weights; the config.json among them (the text
    # model's) only tells transformers which tokenizer class to build, and open_clip reads its own config.
    shutil.copytree(layouts[layout], folder)
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "resize_mode": "squash"}}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    oc = open_clip.create_model(f"local-dir:{folder}")
    _randomize(oc)
    save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, folder / "open_clip_model.safetensors")
    return folder


@pytest.mark.parametrize("name, layout, vocab_size, vision_width", LOCAL_DIRS)
def test_open_clip_local_dir_from_raw_text(tmp_path, layouts, name, layout, vocab_size, vision_width):
    """`vlm.load` of an open_clip directory: the tokenizer it picks gives open_clip's ids, and raw text gives
    open_clip's embeddings, without the user naming the family or the tokenizer."""
    import open_clip

    folder = _open_clip_local_dir(tmp_path, layouts, name, layout, vocab_size, vision_width)
    oc = open_clip.create_model(f"local-dir:{folder}").eval()
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    model = vlm.load(folder).eval()
    tokenizer = vlm.get_tokenizer(model)
    ids = tokenizer(TEXTS)
    assert torch.equal(ids, oc_tokenizer(TEXTS))
    with torch.no_grad():
        assert_close(model.encode_text(ids, normalize=True), oc.encode_text(oc_tokenizer(TEXTS), normalize=True))
    assert model.config.vision.image_mean == (0.5, 0.5, 0.5) and model.config.vision.resize_mode == "squash"


def test_transformers_siglip_directory_from_raw_text(tmp_path, layouts):
    """A google/siglip-style directory: SiglipModel weights and SiglipTokenizer files. vlm's tokenizer is
    transformers' on canonicalised text, and raw text gives transformers' embeddings."""
    from transformers import AutoTokenizer

    hf = _hf_model("siglip")
    hf.config.text_config.max_position_embeddings = 16
    hf.save_pretrained(tmp_path)
    for path in layouts["siglip-google"].iterdir():
        if path.name != "config.json":
            shutil.copy(path, tmp_path)
    model = vlm.load(tmp_path).eval()
    assert model.config.text.tokenizer_clean == "canonicalize"
    ids = vlm.get_tokenizer(model)(TEXTS)
    clean = get_clean_fn("canonicalize")
    reference = AutoTokenizer.from_pretrained(str(tmp_path))(
        [clean(t) for t in TEXTS], max_length=16, padding="max_length", truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(ids, reference)
    with torch.no_grad():
        assert_close(model.encode_text(ids), _features(hf.get_text_features(input_ids=reference)))


def test_saved_model_keeps_its_tokenizer(tmp_path, layouts):
    """save_pretrained copies the tokenizer files into tokenizer/; the copy loads offline, with the same
    fingerprint, wherever the directory moves."""
    folder = _open_clip_local_dir(tmp_path, layouts, "ViT-H-14-worldwide", "xlm-v", 1002, 256)
    model = vlm.load(folder)
    saved = model.save_pretrained(tmp_path / "saved")
    assert (saved / "tokenizer" / "sentencepiece.bpe.model").is_file()
    moved = shutil.move(saved, tmp_path / "moved")
    again = vlm.load(moved)
    assert again.tokenizer_path == moved / "tokenizer"
    assert vlm.get_tokenizer(again).fingerprint() == vlm.get_tokenizer(model).fingerprint()
    assert again.fingerprint() == model.fingerprint()
    assert torch.equal(vlm.get_tokenizer(again)(TEXTS), vlm.get_tokenizer(model)(TEXTS))


def test_open_clip_weights_file_with_the_tokenizer_next_to_it(tmp_path, layouts):
    """`vlm.load(name, pretrained=file)` as in a hub repo's folder: the tokenizer next to the weights is used."""
    folder = _open_clip_local_dir(tmp_path, layouts, "ViT-L-14-CLIPA", "bert", 1600, 256)
    config = vlm.load(folder).config
    model = vlm.load("ViT-L-14-CLIPA", pretrained=folder / "open_clip_model.safetensors", config=config)
    assert model.tokenizer_path == folder
    assert vlm.get_tokenizer(model)(["[SEP] a dog"])[0, :6].tolist()[0] == 101  # BERT's [CLS] first


def test_missing_tokenizer_files_say_which_and_where(tmp_path):
    hf = _hf_model("siglip")
    hf.save_pretrained(tmp_path)
    model = vlm.load(tmp_path)
    with pytest.raises((FileNotFoundError, ValueError), match=r"tokenizer\.json.*spiece\.model") as err:
        vlm.get_tokenizer(model)
    assert str(tmp_path) in str(err.value)


def test_a_tokenizer_that_ends_texts_with_another_id_is_refused(layouts):
    config = vlm.get_preset("tiny-worldwide").text
    text = config.__class__(**{**config.__dict__, "tokenizer": str(layouts["xlm-v"]), "eot_id": 5, "vocab_size": 1002,
                               "tokenizer_clean": "whitespace"})
    with pytest.raises(ValueError, match="pools at end-of-text id 5 .* ends texts with id 2; set eot_id=2"):
        vlm.get_tokenizer(text)


def test_saving_over_a_saved_model_replaces_its_tokenizer(tmp_path, layouts):
    target = tmp_path / "model"
    config = vlm.get_preset("tiny-worldwide").replace(
        text={"tokenizer": str(layouts["xlm-v"]), "vocab_size": 1002, "eot_id": 2, "tokenizer_clean": "whitespace"}
    )
    vlm.create_model(config).save_pretrained(target)
    assert (target / "tokenizer" / "sentencepiece.bpe.model").is_file()
    bert = config.replace(text={"tokenizer": str(layouts["bert"]), "vocab_size": 1600, "pool": "last", "eot_id": None,
                                "strip_sep_token": True})
    vlm.create_model(bert).save_pretrained(target)
    assert sorted(p.name for p in (target / "tokenizer").iterdir()) == sorted(p.name for p in layouts["bert"].iterdir())
    vlm.create_model("tiny").save_pretrained(target)
    assert not (target / "tokenizer").exists() and vlm.load(target).tokenizer_path is None
