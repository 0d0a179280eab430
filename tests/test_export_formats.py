"""`vlm.save_hf` and `vlm.save_open_clip`: directories that transformers' pipeline, CLIPModel + CLIPProcessor and
open_clip's `local-dir:` loader open offline, giving vlm's scores, embeddings, token ids and pixels, and that
`vlm.load` reads back bit-exactly. Tiny presets with seeded random weights; scikit-image's photos and
scikit-learn's digits as images; tokenizer vocabularies from `vocabularies.build_layouts`.

Tolerances: with the same input tensors, embeddings and probabilities agree within 1e-5 (float32 rounding in
another order of operations). transformers' default image processors (torchvision backend) put a few pixels
one or two 8-bit levels away from PIL's resize (0.03 after normalisation); the scores on raw images then agree
within `PIXEL_ATOL`, measured at most 3.1e-4 on these models. With ``backend="pil"`` the pixels are vlm's exactly.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import vlm
from vlm.export import save_hf, save_open_clip
from vlm.text_clean import get_clean_fn

ATOL = 1e-5
PIXEL_ATOL = 1e-3
LABELS = ["cat", "dog", "rocket", "person"]
# Capitals, punctuation, apostrophes, runs of spaces: the cleaning transformers' tokenizers must reproduce.
TEXTS = ["A photo of a Dog.", "two cats, sleeping", "Hello   WORLD? it's 3 o'clock", "This is a photo of cat.", "Two Dogs on a BEACH"]


@pytest.fixture(scope="module")
def images() -> dict[str, Image.Image]:
    """Square and landscape photos (the crop offset of the landscape one rounds alike in both libraries) and a
    digit, 8x8 pixels upscaled by the processors."""
    from skimage import data
    from sklearn.datasets import load_digits

    digit = (load_digits().images[3] * 255 / 16).astype(np.uint8)
    return {
        "astronaut": Image.fromarray(data.astronaut()),
        "coffee": Image.fromarray(data.coffee()),
        "digit": Image.fromarray(digit).convert("RGB"),
    }


def _model(config: vlm.CLIPConfig, sigmoid_bias: float | None = None) -> vlm.CLIP:
    torch.manual_seed(0)
    model = vlm.create_model(config).eval()
    if sigmoid_bias is not None:  # SigLIP's -10 makes every probability ~1e-5; 0 makes them comparable
        with torch.no_grad():
            model.logit_bias.fill_(sigmoid_bias)
    return model


def _vlm_probs(model: vlm.CLIP, pixels: torch.Tensor, texts: list[str]) -> torch.Tensor:
    """What the pipeline computes: softmax over the labels (CLIP) or each label's sigmoid (SigLIP)."""
    with torch.no_grad():
        logits = model(pixels, vlm.get_tokenizer(model)(texts)).logits_per_image[0]
    return torch.sigmoid(logits) if model.logit_bias is not None else logits.softmax(-1)


def _pipeline_probs(pipe, image: Image.Image, template: str) -> torch.Tensor:
    scores = {r["label"]: r["score"] for r in pipe(image, candidate_labels=LABELS, hypothesis_template=template)}
    return torch.tensor([scores[label] for label in LABELS])


def _assert_weights_equal(a: vlm.CLIP, b: vlm.CLIP) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), [k for k in sa if not torch.equal(sa[k], sb[k])][:3]


def _check_pipeline(model: vlm.CLIP, folder, images, template: str = "This is a photo of {}.") -> float:
    """Pipeline scores == vlm's within ATOL on the pipeline's own pixels and within PIXEL_ATOL on vlm's;
    returns the largest difference on vlm's pixels."""
    from transformers import pipeline

    pipe = pipeline("zero-shot-image-classification", model=str(folder))
    texts = [template.format(label) for label in LABELS]
    transform = vlm.image_transform(model)
    worst = 0.0
    for name, image in images.items():
        got = _pipeline_probs(pipe, image, template)
        theirs = pipe.image_processor(images=[image], return_tensors="pt")
        if "pixel_values" in theirs and theirs["pixel_values"].ndim == 4:  # not SigLIP 2's patch sequences
            assert torch.allclose(got, _vlm_probs(model, theirs["pixel_values"], texts), atol=ATOL), name
        difference = (got - _vlm_probs(model, transform(image)[None], texts)).abs().max().item()
        assert difference <= PIXEL_ATOL, (name, difference)
        worst = max(worst, difference)
    return worst


# ---- transformers --------------------------------------------------------------------------------------
def test_clip_directory_opens_in_the_pipeline_with_vlm_scores(tmp_path, images):
    model = _model(vlm.get_preset("tiny"))
    folder = save_hf(model, tmp_path / "hf")
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "processor_config.json", "tokenizer.json",
            "tokenizer_config.json", "vocab.json", "merges.txt", "README.md"} <= {p.name for p in folder.iterdir()}
    worst = _check_pipeline(model, folder, images)
    print(f"CLIP pipeline vs vlm on raw images: max |dp| = {worst:.2e}")


def test_clip_model_and_processor_give_vlm_embeddings_and_ids(tmp_path, images):
    from transformers import AutoImageProcessor, CLIPModel, CLIPProcessor

    model = _model(vlm.get_preset("tiny"))
    folder = save_hf(model, tmp_path / "hf")
    hf = CLIPModel.from_pretrained(folder).eval()
    processor = CLIPProcessor.from_pretrained(folder)
    context = model.config.text.context_length
    ids = processor.tokenizer(TEXTS, padding="max_length", max_length=context, return_tensors="pt").input_ids
    reference = vlm.get_tokenizer(model)(TEXTS)
    # transformers pads with <|endoftext|>, vlm with 0: the same up to the end-of-text token, which the causal
    # tower pools at (nothing after it is seen).
    ends = (reference == 49407).int().argmax(-1)
    for row, end in enumerate(ends):
        assert torch.equal(ids[row, : end + 1], reference[row, : end + 1]), TEXTS[row]
    pil = AutoImageProcessor.from_pretrained(folder, backend="pil")
    transform = vlm.image_transform(model)
    for name, image in images.items():
        assert torch.equal(pil(images=[image], return_tensors="pt").pixel_values[0], transform(image)), name
    pixels = processor(images=list(images.values()), return_tensors="pt").pixel_values
    with torch.no_grad():  # transformers 5 returns the projected embeddings as pooler_output
        image_features = hf.get_image_features(pixel_values=pixels).pooler_output
        text_features = hf.get_text_features(input_ids=ids).pooler_output
        assert torch.allclose(image_features, model.encode_image(pixels), atol=ATOL)
        assert torch.allclose(text_features, model.encode_text(reference), atol=ATOL)


def _family_config(layouts, case: str) -> vlm.CLIPConfig:
    """A tiny model of each family transformers has, with each kind of tokenizer files. SigLIP ones read 64
    tokens: the pipeline pads SigLIP texts to 64 whatever the model's length."""
    siglip = vlm.get_preset("tiny-siglip").replace(text={"context_length": 64})
    if case == "siglip-clip-bpe":  # CLIP's byte-pair vocabulary, as the preset has it
        return siglip
    if case == "worldwide-xlm-v":  # MetaCLIP 2: CLIP's towers, XLM-V's vocabulary, pooled at its end-of-text id 2
        text = dict(tokenizer=str(layouts["xlm-v"]), vocab_size=1002, eot_id=2, tokenizer_clean="whitespace")
        return vlm.get_preset("tiny-worldwide").replace(text=text)
    layout = case
    vocab_size, pad_id = {"siglip-google": (1000, 1), "siglip-timm": (1000, 1), "siglip2-google": (1200, 0)}[layout]
    text = dict(tokenizer=str(layouts[layout]), vocab_size=vocab_size, pad_id=pad_id, tokenizer_clean="canonicalize")
    vision = {"pos_embed_resample": "bilinear_antialias"} if layout.startswith("siglip2") else {}
    return siglip.replace(text=text, vision=vision)


# (family and tokenizer files, transformers' model_type, the pipeline's template, a text known to tokenize
# otherwise in transformers, as the module docstring of vlm.export.hf says)
FAMILY_CASES = [
    ("siglip-clip-bpe", "siglip", "This is a photo of {}.", "wow!"),  # padding id 0 is "!", special in transformers
    ("siglip-google", "siglip", "This is a photo of {}.", "the_end"),  # SiglipTokenizer deletes "_"; open_clip: " "
    ("siglip-timm", "siglip", "This is a photo of {}.", None),
    ("siglip2-google", "siglip2", "this is a photo of {}", "A photo."),  # Siglip2Tokenizer keeps punctuation
    ("worldwide-xlm-v", "metaclip_2", "This is a photo of {}.", None),
]


@pytest.mark.parametrize("case, family, template, differs", FAMILY_CASES)
def test_each_family_opens_in_the_pipeline_with_vlm_scores(tmp_path, images, layouts, case, family, template, differs):
    from transformers import AutoProcessor

    config = _family_config(layouts, case)
    model = _model(config, sigmoid_bias=0.0 if config.init_logit_bias is not None else None)
    folder = save_hf(model, tmp_path / "hf")
    assert json.loads((folder / "config.json").read_text())["model_type"] == family
    if family == "siglip2":  # NaFlex keeps the aspect ratio where vlm squashes: square images agree
        images = {name: image for name, image in images.items() if image.width == image.height}
    worst = _check_pipeline(model, folder, images, template)
    print(f"{case} pipeline vs vlm on raw images: max |dp| = {worst:.2e}")
    tokenizer = AutoProcessor.from_pretrained(folder).tokenizer
    context = model.config.text.context_length
    # Siglip2Tokenizer only lower-cases: it keeps what open_clip's canonicalisation removes.
    kept = [t for t in TEXTS if family != "siglip2" or get_clean_fn("canonicalize")(t) == t.lower()]
    plain = [template.format(label) for label in LABELS] + kept
    ids = tokenizer(plain, padding="max_length", max_length=context, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, vlm.get_tokenizer(model)(plain))
    if differs:  # the documented exception stays an exception, not a silent change
        theirs = tokenizer([differs], padding="max_length", max_length=context, truncation=True, return_tensors="pt")
        assert not torch.equal(theirs.input_ids, vlm.get_tokenizer(model)([differs]))


@pytest.mark.parametrize("layout", [None, "siglip-timm"])
def test_vlm_reads_a_saved_transformers_directory_back(tmp_path, layouts, layout):
    """Weights bit-exact, and the config, preprocessing included (here a SigLIP tower that crops bilinearly)."""
    preprocessing = {"resize_mode": "shortest", "interpolation": "bilinear"}
    model = _model(vlm.get_preset("tiny") if layout is None else _family_config(layouts, layout).replace(vision=preprocessing))
    folder = save_hf(model, tmp_path / "hf")
    back = vlm.load(folder)
    _assert_weights_equal(back, model)
    if layout is None:
        assert back.config == model.config
    else:  # the tokenizer is now the directory's copy of the files
        assert back.config == model.config.replace(text={"tokenizer": str(folder.resolve())})
        assert torch.equal(vlm.get_tokenizer(back)(TEXTS), vlm.get_tokenizer(model)(TEXTS))


def test_an_architecture_transformers_lacks_is_refused_before_writing(tmp_path):
    with pytest.raises(ValueError, match="transformers has no class for this architecture"):
        save_hf(vlm.create_model("tiny-clipa"), tmp_path / "hf")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("save", [save_hf, save_open_clip])
def test_a_failed_save_leaves_the_old_directory_and_no_debris(tmp_path, monkeypatch, save):
    import vlm.model_card

    target = tmp_path / "out"
    save(_model(vlm.get_preset("tiny")), target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(vlm.model_card, "write_model_card", broken)
    other = _model(vlm.get_preset("tiny").replace(embed_dim=32))
    with pytest.raises(OSError, match="disk full"):
        save(other, target)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    with pytest.raises(OSError, match="disk full"):
        save(other, tmp_path / "fresh")
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---- open_clip -----------------------------------------------------------------------------------------
def _sigmoid_own_vit(layouts) -> vlm.CLIPConfig:
    """SigLIP's text tower, loss and tokenizer (T5 vocabulary, canonicalised text) on open_clip's own ViT."""
    text = dict(causal=False, pool="last", proj="linear_bias", tokenizer=str(layouts["siglip-timm"]), vocab_size=1000,
                pad_id=1, tokenizer_clean="canonicalize", context_length=16)
    return vlm.get_preset("tiny").replace(text=text, init_logit_bias=-10.0)


def _open_clip_case(layouts, kind: str) -> vlm.CLIPConfig:
    tiny = vlm.get_preset("tiny")
    if kind == "quickgelu":  # OpenAI's activation, which open_clip sets for both towers at once
        return tiny.replace(vision={"activation": "quick_gelu"}, text={"activation": "quick_gelu"})
    return tiny if kind == "tiny" else _sigmoid_own_vit(layouts)


@pytest.mark.parametrize("kind", ["tiny", "quickgelu", "sigmoid-own-vit"])
def test_open_clip_local_dir_gives_vlm_outputs(tmp_path, images, layouts, kind):
    import open_clip

    model = _model(_open_clip_case(layouts, kind))
    folder = save_open_clip(model, tmp_path / "oc")
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    oc_tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    oc.eval()
    ids = vlm.get_tokenizer(model)(TEXTS)
    assert torch.equal(oc_tokenizer(TEXTS), ids)
    transform = vlm.image_transform(model)
    pixels = torch.stack([preprocess(image) for image in images.values()])
    assert torch.equal(pixels, torch.stack([transform(image) for image in images.values()]))
    with torch.no_grad():
        assert torch.allclose(oc.encode_image(pixels), model.encode_image(pixels), atol=ATOL)
        assert torch.allclose(oc.encode_text(ids), model.encode_text(ids), atol=ATOL)
    assert (oc.logit_bias is None) == (model.logit_bias is None)
    back = vlm.load(folder)
    _assert_weights_equal(back, model)
    assert back.config == model.config


def test_open_clip_refuses_a_timm_tower_it_cannot_name(tmp_path):
    with pytest.raises(ValueError, match="matches none of open_clip's .*ViT-B-16-SigLIP"):
        save_open_clip(vlm.create_model("tiny-siglip"), tmp_path / "oc")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_open_clip_local_dir_with_a_timm_siglip_trunk(tmp_path, images, layouts):
    """A SigLIP 2 B/32 image tower (open_clip builds it as timm's vit_base_patch32_siglip_256) with a small text
    tower: open_clip's loader builds the trunk by name and gives vlm's embeddings. Its training-only patch
    dropout does not hide the trunk's name and is written for open_clip's trainer."""
    import open_clip

    text = dict(width=64, depth=2, num_heads=4, tokenizer=str(layouts["siglip2-google"]), vocab_size=1200, pad_id=0)
    model = _model(vlm.get_preset("ViT-B-32-SigLIP2-256").replace(text=text, vision={"patch_dropout": 0.5}))
    folder = save_open_clip(model, tmp_path / "oc")
    cfg = json.loads((folder / "open_clip_config.json").read_text())["model_cfg"]
    assert cfg["vision_cfg"]["timm_model_name"] == "vit_base_patch32_siglip_256"
    assert cfg["vision_cfg"]["patch_dropout"] == 0.5
    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    oc.eval()
    pixels = torch.stack([preprocess(image) for image in images.values()])
    assert torch.equal(pixels, torch.stack([vlm.image_transform(model)(image) for image in images.values()]))
    ids = open_clip.get_tokenizer(f"local-dir:{folder}")(TEXTS)
    assert torch.equal(ids, vlm.get_tokenizer(model)(TEXTS))
    with torch.no_grad():
        assert torch.allclose(oc.encode_image(pixels), model.encode_image(pixels), atol=ATOL)
        assert torch.allclose(oc.encode_text(ids), model.encode_text(ids), atol=ATOL)
    _assert_weights_equal(vlm.load(folder), model)
