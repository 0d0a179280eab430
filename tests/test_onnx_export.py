"""`vlm.export.export_onnx` and `vlm export`: ONNX graphs equal to the torch model (onnxruntime as the oracle) at
several batch sizes and text lengths, the spec the runtime reads, int8 agreement, and the refusals (parity,
unsupported op, missing packages) that leave nothing on disk."""

from __future__ import annotations

import shutil
import sys

import numpy as np
import pytest
import torch
from torch import nn

import vlm
from vlm.cli import main
from vlm.export import export_onnx
from vlm.export import onnx_export
from vlm.onnx import OnnxSpec

onnxruntime = pytest.importorskip("onnxruntime")

# One of each text tower: causal CLIP (dynamic length), bidirectional SigLIP (fixed length), one shared Transformer.
# tiny-shared's graphs are tiny's (the sharing is in the weights): slow, to keep the fast tests fast.
PRESETS = ("tiny", "tiny-siglip", pytest.param("tiny-shared", marks=pytest.mark.slow))


@pytest.fixture(scope="module", params=PRESETS)
def exported(request, tmp_path_factory):
    """(model, directory, spec) of a tiny preset exported once for every test of this module."""
    torch.manual_seed(0)
    model = vlm.create_model(request.param).eval()
    directory = tmp_path_factory.mktemp(request.param) / "onnx"
    return model, directory, export_onnx(model, directory)


def _session(path):
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _small_model(depth: int = 1) -> vlm.CLIP:
    return vlm.create_model("tiny", vision={"depth": depth}, text={"depth": depth}).eval()


def test_export_writes_the_spec_the_runtime_reads(exported):
    model, directory, spec = exported
    names = sorted(p.name for p in directory.iterdir())
    assert names == ["README.md", "textual.onnx", "tokenizer", "visual.onnx", "vlm_onnx.json"]
    assert OnnxSpec.from_json((directory / "vlm_onnx.json").read_text()) == spec
    assert spec.fingerprint == model.fingerprint() and spec.opset == onnx_export.DEFAULT_OPSET
    assert spec.embed_dim == model.config.embed_dim and spec.int8 is None
    assert spec.logit_scale == pytest.approx(float(model.logit_scale.detach().exp()))
    assert (spec.logit_bias is None) == (model.logit_bias is None)
    transform = vlm.image_transform(model)
    assert spec.preprocess == {
        "image_size": transform.image_size,
        "mean": list(transform.mean),
        "std": list(transform.std),
        "interpolation": transform.interpolation,
        "resize_mode": transform.resize_mode,
    }
    assert spec.tokenizer["dynamic_length"] == model.config.text.causal
    assert spec.tokenizer["context_length"] == model.config.text.context_length
    assert 0 < spec.parity["max_abs_diff_visual"] <= 1e-4 and 0 < spec.parity["max_abs_diff_textual"] <= 1e-4
    assert "library_name: onnx" in (directory / "README.md").read_text()


def test_image_graph_has_a_dynamic_batch(exported):
    model, directory, _ = exported
    session = _session(directory / "visual.onnx")
    (pixels,) = session.get_inputs()
    assert pixels.name == "pixels" and isinstance(pixels.shape[0], str)
    assert [o.name for o in session.get_outputs()] == ["embedding"]
    S = model.config.vision.image_size
    for batch in (1, 5):
        x = torch.randn(batch, 3, S, S)
        with torch.inference_mode():
            expected = model.encode_image(x).numpy()
        (got,) = session.run(None, {"pixels": x.numpy()})
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_text_graph_length_is_dynamic_for_causal_towers_only(exported):
    model, directory, _ = exported
    session = _session(directory / "textual.onnx")
    (ids,) = session.get_inputs()
    L = model.config.text.context_length
    assert ids.name == "input_ids" and isinstance(ids.shape[0], str)
    if not model.config.text.causal:
        assert ids.shape[1] == L  # a bidirectional tower reads the padding: the whole context, always
    else:
        assert isinstance(ids.shape[1], str)
    tokenizer = vlm.get_tokenizer(model)
    tokens = tokenizer(["a photo of the number seven.", "a cat", "a handwritten digit on a white page"])
    lengths = (L, int(model.text.pool_positions(tokens).max()) + 1) if model.config.text.causal else (L,)
    for length in lengths:
        cut = tokens[:, :length]
        with torch.inference_mode():
            expected = model.encode_text(cut).numpy()
        (got,) = session.run(None, {"input_ids": cut.numpy()})
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_parity_failure_refuses_and_leaves_the_old_directory(tmp_path, monkeypatch):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "old.txt").write_text("the previous export")
    # A mistranslation, as a wrong graph would show it: the ONNX output off by 1e-3.
    monkeypatch.setattr(onnx_export.VisualGraph, "forward", lambda self, pixels: self.visual(pixels) + 1e-3)
    with pytest.raises(ValueError, match=r"differs from the torch model by 0\.001.*atol=0\.0001"):
        export_onnx(_small_model(), out)
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]  # no staging directory left behind
    assert [p.name for p in out.iterdir()] == ["old.txt"]


class _KthValueNorm(nn.Module):
    """A layer with an op torch's ONNX exporter has no translation for."""

    def forward(self, x):
        return x - x.kthvalue(2, dim=-1, keepdim=True).values


def test_unsupported_op_is_named(tmp_path):
    model = _small_model()
    model.visual.norm = _KthValueNorm()
    with pytest.raises(ValueError, match=r"image|visual") as caught:
        export_onnx(model, tmp_path / "onnx")
    assert "aten.kthvalue" in str(caught.value) and "cannot translate" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_gives_the_install_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    with pytest.raises(ImportError, match=r"onnxruntime is not installed.*pip install 'vlm\[onnx\]'"):
        export_onnx(_small_model(), tmp_path / "onnx")
    assert main(["export", "onnx", "tiny", "--out", str(tmp_path / "cli")]) == 1
    assert "pip install 'vlm[onnx]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_bad_opset_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"opset must be an integer from 18"):
        export_onnx(_small_model(), tmp_path / "onnx", opset=7)


def test_cli_onnx_int8_prints_parity_and_agreement(tmp_path, capsys):
    out = tmp_path / "onnx"
    assert main(["export", "onnx", "tiny", "--out", str(out), "--int8"]) == 0
    printed = capsys.readouterr().out
    print(printed)  # the agreement figure, for the test log
    assert "visual.int8.onnx" in printed and "textual.int8.onnx" in printed and "max abs diff from torch" in printed
    assert "int8: top-1 agreement with float32" in printed
    assert "300 images of scikit-learn's handwritten digits" in printed
    spec = OnnxSpec.from_json((out / "vlm_onnx.json").read_text())
    assert spec.files["visual_int8"] == "visual.int8.onnx" and (out / "textual.int8.onnx").is_file()
    assert spec.int8["n"] == 300 and 0 <= spec.int8["agreement"] <= 1
    assert f"{100 * spec.int8['agreement']:.1f}%" in printed
    # int8 weights: the quantised graph is smaller and its embeddings stay close to float32's.
    assert (out / "visual.int8.onnx").stat().st_size < 0.6 * (out / "visual.onnx").stat().st_size
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32), dtype=np.float32)
    (fp32,), (int8,) = (_session(out / name).run(None, {"pixels": x}) for name in ("visual.onnx", "visual.int8.onnx"))
    cosine = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert cosine.min() > 0.95


@pytest.mark.parametrize("exported", ["tiny"], indirect=True)  # the sample reader is the same for every tower
def test_int8_agreement_on_a_labelled_folder(exported, tmp_path):
    from PIL import Image

    model, directory, _ = exported
    copy = shutil.copytree(directory, tmp_path / "onnx")
    for tower in ("visual", "textual"):
        onnx_export.quantize_int8(copy / f"{tower}.onnx", copy / f"{tower}.int8.onnx")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    files = {**onnx_export.FILES, **onnx_export.INT8_FILES}
    stats = onnx_export._int8_agreement(model, copy, files, tmp_path / "data")
    assert stats["n"] == 6 and stats["prompt"] == "a photo of a {}."
    assert 0 <= stats["agreement"] <= 1 and 0 <= stats["accuracy_int8"] <= 1


@pytest.mark.parametrize("fmt", ["hf", "open_clip"])
def test_cli_writes_the_other_formats(tmp_path, capsys, fmt):
    out = tmp_path / fmt
    assert main(["export", fmt, "tiny", "--out", str(out)]) == 0
    assert f"wrote {out} ({fmt})" in capsys.readouterr().out
    assert (out / "README.md").is_file()


def test_cli_needs_a_format(capsys):
    with pytest.raises(SystemExit):
        main(["export", "tflite", "tiny", "--out", "x"])
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.slow
def test_full_size_model_exports_within_tolerance(tmp_path):
    torch.manual_seed(0)
    model = vlm.create_model("ViT-B-32").eval()
    spec = export_onnx(model, tmp_path / "onnx")  # one forward of each tower per parity batch, checked at 1e-4
    assert spec.parity["max_abs_diff_visual"] <= 1e-4 and spec.parity["max_abs_diff_textual"] <= 1e-4
    session = _session(tmp_path / "onnx" / "visual.onnx")
    assert session.get_outputs()[0].shape[1] == 512


@pytest.mark.slow
def test_int8_keeps_a_trained_models_predictions(digits_run, tmp_path):
    data, result = digits_run
    model = vlm.load(result.model_dir)
    spec = export_onnx(model, tmp_path / "onnx", int8=True, int8_sample=data.test.paths[0].parents[1])
    print("int8 agreement on the held-out digits:", spec.int8)
    assert spec.int8["n"] == 300
    assert spec.int8["agreement"] >= 0.95
    assert abs(spec.int8["accuracy_int8"] - spec.int8["accuracy_fp32"]) <= 0.05
