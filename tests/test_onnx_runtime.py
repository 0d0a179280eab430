"""`vlm.onnx.OnnxCLIP`: an ONNX export run without torch gives the torch model's embeddings, pixels and ids.

The oracles are vlm's own torch paths on the same inputs: `vlm.image_transform` (pixels bit for bit),
`vlm.get_tokenizer` (ids exactly, for CLIP's BPE and for every Hugging Face tokenizer layout of
`tests/vocabularies.py`), `CLIP.encode_image` / `encode_text` / `forward` (embeddings and logits within 1e-4).
Torch-freeness is checked in a fresh interpreter where importing torch, torchvision, open_clip or transformers
fails, and which must give the same embeddings as this process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_hf_tokenizer import LAYOUTS, SPECIAL_IDS, UNICODE_CASES
from test_tokenizer import EDGE_CASES, random_texts

import vlm
from vlm.onnx import SPEC_FILE, OnnxCLIP, OnnxSpec, preprocess_settings, write_tokenizer

TEXTS = ["a photo of a dog", "cat", "", "a red bicycle leaning on a wall by the sea, at dusk; two gulls overhead"]
PRESETS = ["tiny", "tiny-siglip", "tiny-clipa", "tiny-worldwide"]


def sample_images() -> list[Image.Image]:
    """Shapes that exercise every branch of the resize and crop: wide, tall, square, already the size, odd
    margins, smaller than the model's input, and a grey and a transparent image."""
    rng = np.random.default_rng(0)
    shapes = [(40, 50), (77, 33), (32, 32), (101, 100), (9, 13), (33, 64)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in shapes]
    images.append(Image.fromarray(rng.integers(0, 256, (45, 60), dtype=np.uint8), mode="L"))
    images.append(Image.fromarray(rng.integers(0, 256, (50, 40, 4), dtype=np.uint8), mode="RGBA"))
    return images


class _Exports(dict):
    """preset -> (model, export directory), each exported with `vlm.export.export_onnx` on first use (seconds each)."""

    def __init__(self, root: Path) -> None:
        super().__init__()
        self.root = root

    def __missing__(self, preset: str) -> tuple[vlm.CLIP, Path]:
        torch.manual_seed(0)
        model = vlm.create_model(preset).eval()
        vlm.export_onnx(model, self.root / preset)
        self[preset] = (model, self.root / preset)
        return self[preset]


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> _Exports:
    return _Exports(tmp_path_factory.mktemp("onnx"))


@pytest.mark.parametrize("preset", [p if p == "tiny" else pytest.param(p, marks=pytest.mark.slow) for p in PRESETS])
def test_embeddings_and_logits_match_the_torch_model(exports, preset):
    model, directory = exports[preset]
    runtime = OnnxCLIP(directory)
    images = sample_images()
    pixels = torch.stack([vlm.image_transform(model)(image) for image in images])
    tokens = vlm.get_tokenizer(model)(TEXTS)
    with torch.no_grad():
        expected = model(pixels, tokens)
    image_embeds, text_embeds = runtime.encode_image(images), runtime.encode_text(TEXTS)
    np.testing.assert_allclose(image_embeds, expected.image_embeds.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(text_embeds, expected.text_embeds.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(runtime.logits(image_embeds, text_embeds), expected.logits_per_image.detach().numpy(), atol=1e-3)
    with torch.no_grad():
        raw = model.encode_text(tokens[:1]).numpy()
    np.testing.assert_allclose(runtime.encode_text(TEXTS[0], normalize=False), raw, atol=1e-4, rtol=0)
    # A preprocessed batch, a path and a one-at-a-time call give the same rows.
    np.testing.assert_allclose(runtime.encode_image(pixels.numpy()), image_embeds, atol=1e-6)
    images[0].save(directory.parent / "first.png")
    np.testing.assert_allclose(runtime.encode_image(directory.parent / "first.png"), image_embeds[:1], atol=1e-6)
    np.testing.assert_allclose(runtime.encode_text(TEXTS, batch_size=1), text_embeds, atol=1e-6)
    assert runtime.fingerprint == model.fingerprint()
    assert runtime.encode_text([]).shape == runtime.encode_image([]).shape == (0, model.config.embed_dim)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("resize_mode", ["shortest", "squash"])
@pytest.mark.parametrize("image_size", [32, 57])
def test_preprocess_gives_image_transform_bits(interpolation, resize_mode, image_size):
    from vlm.onnx import preprocess_image
    from vlm.transforms import ImageTransform

    mean, std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    transform = ImageTransform(image_size, mean, std, interpolation=interpolation, resize_mode=resize_mode)
    settings = dict(image_size=image_size, mean=mean, std=std, interpolation=interpolation, resize_mode=resize_mode)
    for image in sample_images():
        expected = transform(image).numpy()
        got = preprocess_image(image, settings)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.array_equal(got, expected), (image.size, image.mode)


def test_clip_ids_equal_vlm_tokenizer(exports):
    model, directory = exports["tiny"]
    texts = TEXTS + EDGE_CASES + UNICODE_CASES + random_texts(300, seed=3)
    assert np.array_equal(OnnxCLIP(directory).tokenize(texts), vlm.get_tokenizer(model)(texts).numpy())


def _hf_model(layouts, layout: str) -> vlm.CLIP:
    kwargs, _ = LAYOUTS[layout]
    _, eot, _, vocab_size = SPECIAL_IDS[layout]
    text = dict(tokenizer=str(layouts[layout]), vocab_size=vocab_size, eot_id=eot, context_length=kwargs["context_length"],
                tokenizer_clean=kwargs.get("clean", "whitespace"), strip_sep_token=kwargs.get("strip_sep_token", False))
    if eot is None:
        text.update(pool="last", causal=False)
    return vlm.create_model(vlm.get_preset("tiny").replace(text=text)).eval()


def _tokenizer_only_export(model: vlm.CLIP, directory: Path) -> Path:
    """An export whose graphs are empty files: enough for `tokenize`, which opens no session."""
    directory.mkdir(parents=True)
    tokenizer = write_tokenizer(model, directory)
    files = {"visual": "visual.onnx", "textual": "textual.onnx"}
    for name in files.values():
        (directory / name).write_bytes(b"")
    spec = OnnxSpec(embed_dim=64, logit_scale=1.0, logit_bias=None, fingerprint=model.fingerprint(), opset=18,
                    preprocess=preprocess_settings(model), tokenizer=tokenizer, files=files, parity={})
    (directory / SPEC_FILE).write_text(spec.to_json())
    return directory


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_hf_ids_equal_vlm_tokenizer(layouts, doc_corpus, tmp_path, layout):
    model = _hf_model(layouts, layout)
    runtime = OnnxCLIP(_tokenizer_only_export(model, tmp_path / "export"))
    # Layouts with a Rust pipeline need neither transformers nor the original folder at run time.
    assert (runtime.tokenizer._hf is None) == (layout != "siglip-google")  # SiglipTokenizer has no Rust pipeline
    texts = TEXTS + EDGE_CASES + UNICODE_CASES + doc_corpus[1::50] + random_texts(200, seed=4)
    expected = vlm.get_tokenizer(model)(texts).numpy()
    assert np.array_equal(runtime.tokenize(texts), expected)
    assert runtime.tokenizer.fingerprint() == vlm.get_tokenizer(model).fingerprint()


_TORCH_FREE = textwrap.dedent("""
    import json, sys
    for name in ("torch", "torchvision", "open_clip", "transformers", "open_clip_train"):
        sys.modules[name] = None  # importing any of them now raises ImportError
    import numpy as np
    from vlm.onnx import OnnxCLIP
    clip_dir, hf_dir, image, out = sys.argv[1:]
    runtime = OnnxCLIP(clip_dir)
    np.save(out + "/image.npy", runtime.encode_image([image]))
    with open(out + "/texts.json") as f:
        np.save(out + "/text.npy", runtime.encode_text(json.load(f)))
    np.save(out + "/hf_ids.npy", OnnxCLIP(hf_dir).tokenize(["a photo of a cat", "Ünïcödé text!"]))
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "open_clip", "transformers")
                    and sys.modules[m] is not None)
    print(json.dumps(loaded))
""")


def test_runs_without_torch(exports, layouts, tmp_path):
    model, directory = exports["tiny"]
    hf_dir = _tokenizer_only_export(_hf_model(layouts, "siglip2-timm"), tmp_path / "hf")
    image = tmp_path / "photo.png"
    sample_images()[3].save(image)
    (tmp_path / "texts.json").write_text(json.dumps(TEXTS))
    env = dict(os.environ, PYTHONPATH=str(Path(vlm.__file__).parent.parent))
    result = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE, str(directory), str(hf_dir), str(image), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == []
    runtime = OnnxCLIP(directory)
    np.testing.assert_allclose(np.load(tmp_path / "image.npy"), runtime.encode_image([image]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "text.npy"), runtime.encode_text(TEXTS), atol=1e-5, rtol=0)
    with torch.no_grad():
        pixels = vlm.image_transform(model)(vlm.load_image(image))[None]
        expected = model.encode_image(pixels, normalize=True).numpy()
        expected_text = model.encode_text(vlm.get_tokenizer(model)(TEXTS), normalize=True).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "image.npy"), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "text.npy"), expected_text, atol=1e-4, rtol=0)
    hf_model = _hf_model(layouts, "siglip2-timm")
    expected_ids = vlm.get_tokenizer(hf_model)(["a photo of a cat", "Ünïcödé text!"]).numpy()
    assert np.array_equal(np.load(tmp_path / "hf_ids.npy"), expected_ids)


def _spec_dict(**changes) -> dict:
    spec = dict(
        format="vlm-onnx", format_version=1, embed_dim=64, logit_scale=14.3, logit_bias=None, fingerprint="abc", opset=18,
        preprocess=dict(image_size=32, mean=[0.5] * 3, std=[0.5] * 3, interpolation="bicubic", resize_mode="shortest"),
        tokenizer=dict(kind="clip_bpe", context_length=32, dynamic_length=True, pool="eot", eot_id=None,
                       vocabulary="bpe_simple_vocab_16e6.txt.gz"),
        files=dict(visual="visual.onnx", textual="textual.onnx"), parity={}, int8=None,
    )
    spec.update(changes)
    return spec


def test_spec_round_trips_and_names_what_is_wrong():
    spec = OnnxSpec.from_json(json.dumps(_spec_dict()), "x/vlm_onnx.json")
    assert OnnxSpec.from_json(spec.to_json()) == spec
    cases = {
        "format is 'onnx'": _spec_dict(format="onnx"),
        "format_version 2 is newer .* upgrade vlm": _spec_dict(format_version=2),
        r"missing field\(s\) \['fingerprint'\]": {k: v for k, v in _spec_dict().items() if k != "fingerprint"},
        r"field tokenizer.context_length is missing": _spec_dict(tokenizer=dict(kind="clip_bpe")),
        "field tokenizer.kind must be one of": _spec_dict(tokenizer=dict(_spec_dict()["tokenizer"], kind="bpe")),
        "field embed_dim must be a positive integer": _spec_dict(embed_dim="64"),
        r"unknown field\(s\) \['extra'\]": _spec_dict(extra=1),
    }
    for message, data in cases.items():
        with pytest.raises(ValueError, match=f"x/vlm_onnx.json: .*{message}"):
            OnnxSpec.from_json(json.dumps(data), "x/vlm_onnx.json")
    with pytest.raises(ValueError, match="x/vlm_onnx.json is not valid JSON"):
        OnnxSpec.from_json("{", "x/vlm_onnx.json")


def test_a_folder_that_is_not_an_export_is_named_with_what_it_lacks(exports, tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path} is not a vlm ONNX export: it lacks vlm_onnx.json; .*vlm export onnx"):
        OnnxCLIP(tmp_path)
    _, directory = exports["tiny"]
    for lacking in ("textual.onnx", "tokenizer/bpe_simple_vocab_16e6.txt.gz"):
        broken = tmp_path / lacking.replace("/", "_")
        for path in directory.rglob("*"):
            if path.is_file() and path.relative_to(directory).as_posix() != lacking:
                (broken / path.relative_to(directory)).parent.mkdir(parents=True, exist_ok=True)
                (broken / path.relative_to(directory)).write_bytes(path.read_bytes())
        with pytest.raises(ValueError, match=f"{broken} is not a complete vlm ONNX export: it lacks {lacking}"):
            OnnxCLIP(broken)
    with pytest.raises(ValueError, match="has no int8 visual graph .* --int8"):
        OnnxCLIP(directory, int8=True)


def test_missing_onnxruntime_names_the_install_command(exports, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"pip install 'vlm\[onnx\]'"):
        OnnxCLIP(exports["tiny"][1])


def test_bad_image_batches_are_refused(exports):
    runtime = OnnxCLIP(exports["tiny"][1])
    with pytest.raises(ValueError, match=r"float32 \(B, 3, 32, 32\), got float64"):
        runtime.encode_image(np.zeros((1, 3, 32, 32)))
    with pytest.raises(TypeError, match="takes a PIL image"):
        runtime.preprocess(np.zeros((32, 32, 3), dtype=np.uint8))


def test_vlm_imports_its_public_names_lazily():
    code = "import sys, vlm; print(sorted(m for m in sys.modules if m.startswith(('vlm.', 'torch'))))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    assert {"save_hf", "save_open_clip", "export_onnx", "OnnxCLIP", "CLIP", "load"} <= set(vlm.__all__) <= set(dir(vlm))
    from vlm import CLIP, OnnxCLIP as Runtime, create_model

    assert Runtime is OnnxCLIP and isinstance(create_model("tiny"), CLIP) and vlm.__version__
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        vlm.nothing_here


@pytest.mark.slow
def test_int8_graphs_run_and_stay_close(exports, tmp_path):
    model, _ = exports["tiny"]
    spec = vlm.export_onnx(model, tmp_path / "int8", int8=True)
    fp32, int8 = OnnxCLIP(tmp_path / "int8"), OnnxCLIP(tmp_path / "int8", int8=True, threads=1)
    assert spec.int8 is not None and int8._graphs["visual"].name == spec.files["visual_int8"]
    images = sample_images()
    # Cosine similarity of each int8 embedding with its float32 one (both unit length).
    assert (np.sum(fp32.encode_image(images) * int8.encode_image(images), axis=1) > 0.99).all()
    assert (np.sum(fp32.encode_text(TEXTS) * int8.encode_text(TEXTS), axis=1) > 0.99).all()
