"""Running an ONNX export of a vlm model without torch: `OnnxCLIP`, and the `OnnxSpec` file that describes an export.

An export directory (written by `vlm.export.export_onnx`) holds:

- `visual.onnx`: `pixels` float32 (B, 3, S, S) -> `embedding` float32 (B, E), not normalised;
- `textual.onnx`: `input_ids` int64 (B, L) -> `embedding` float32 (B, E), not normalised; L may be shorter
  than the context length for a causal text tower (`tokenizer["dynamic_length"]`), else it is exactly that;
- optionally `visual.int8.onnx` and `textual.int8.onnx` (dynamic int8 quantisation);
- `vlm_onnx.json`: the `OnnxSpec` (what `preprocess_settings` and `tokenizer_settings` give, the logit scale and
  bias, the model's fingerprint, the files, the parity measured at export);
- `tokenizer/`: CLIP's vocabulary file, or the Hugging Face tokenizer files plus the Rust pipeline vlm built
  from them (`pipeline.json`), so that the runtime needs neither open_clip nor transformers.

Nothing here imports torch, torchvision or open_clip: images are prepared with PIL and numpy exactly as
`vlm.transforms.ImageTransform` prepares them, and texts go through the same tokenizer code as `vlm.get_tokenizer`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SPEC_FILE",
    "TOKENIZER_DIR",
    "OnnxCLIP",
    "OnnxSpec",
    "preprocess_settings",
    "tokenizer_settings",
    "write_tokenizer",
]

logger = logging.getLogger(__name__)

FORMAT = "vlm-onnx"
FORMAT_VERSION = 1
SPEC_FILE = "vlm_onnx.json"
TOKENIZER_DIR = "tokenizer"
# The Rust pipeline of a Hugging Face tokenizer as transformers builds it (see `vlm.hf_tokenizer`), saved so the
# runtime reproduces the ids with `tokenizers` alone.
PIPELINE_FILE = "pipeline.json"
INSTALL = "pip install 'vlm[onnx]'"

_PREPROCESS_KEYS = ("image_size", "mean", "std", "interpolation", "resize_mode")
_TOKENIZER_KEYS = ("kind", "context_length", "dynamic_length", "pool", "eot_id")
_TOKENIZER_KINDS = ("clip_bpe", "hf")
_REQUIRED_FILES = ("visual", "textual")


@dataclass(frozen=True)
class OnnxSpec:
    """What `vlm_onnx.json` says about an export: enough to prepare inputs and score outputs without torch.

    preprocess: image_size, mean, std, interpolation ("bicubic"/"bilinear"), resize_mode ("shortest"/"squash").
    tokenizer: kind ("clip_bpe" or "hf"), context_length, dynamic_length (a causal tower: rows are cut after
        the batch's last pooled position, as `vlm.text.TextTower` does), pool and eot_id (where the tower pools,
        from `TextConfig`); for "clip_bpe" also `vocabulary` (the file name under `tokenizer/`); for "hf" also
        clean, strip_sep_token and `framing` (`HFTokenizer.framing()`: the special ids around each text, pad and
        sep ids, padding and truncation sides), and `pipeline`: "pipeline.json" under `tokenizer/`, or
        "transformers" for a tokenizer without a Rust pipeline (SigLIP's sentencepiece; needs transformers).
    files: file names inside the export directory: visual, textual, and optionally visual_int8, textual_int8.
    parity: what the exporter measured against torch (max abs difference per tower, ...).
    int8: the int8 quantisation settings and the accuracy change measured, or None without int8 files.
    logit_scale: the multiplier of the cosine similarities (exp already applied); logit_bias: SigLIP's bias.
    """

    embed_dim: int
    logit_scale: float
    logit_bias: float | None
    fingerprint: str
    opset: int
    preprocess: dict[str, Any]
    tokenizer: dict[str, Any]
    files: dict[str, str]
    parity: dict[str, Any]
    int8: dict[str, Any] | None = None
    format: str = FORMAT
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self._validate(SPEC_FILE)

    def to_json(self) -> str:
        """The spec as indented JSON, as `vlm_onnx.json` holds it."""
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str | os.PathLike = SPEC_FILE) -> "OnnxSpec":
        """The spec in `text` (read from `source`, named in errors). ValueError on invalid JSON, another format,
        a newer format_version, or a missing or ill-typed field, naming the file and the field."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source} is not valid JSON ({error}); it should hold a vlm ONNX spec") from error
        if not isinstance(data, dict):
            raise ValueError(f"{source} holds a JSON {type(data).__name__}, not an object; it is not a vlm ONNX spec")
        if data.get("format") != FORMAT:
            found = data.get("format")
            raise ValueError(f"{source}: format is {found!r}, expected {FORMAT!r}; it is not a vlm ONNX export")
        version = data.get("format_version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"{source}: format_version must be a positive integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{source}: format_version {version} is newer than this vlm reads ({FORMAT_VERSION}); upgrade vlm"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(name for name in names if name not in data and name != "int8")
        if missing:
            raise ValueError(f"{source}: missing field(s) {missing}; re-export the model with vlm.export.export_onnx")
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown field(s) {unknown}; known fields are {sorted(names)}")
        spec = cls.__new__(cls)
        for name in names:
            object.__setattr__(spec, name, data.get(name))
        spec._validate(source)
        return spec

    def _validate(self, source: str | os.PathLike) -> None:
        def bad(field: str, value: Any, expected: str) -> ValueError:
            return ValueError(f"{source}: field {field} must be {expected}, got {value!r}")

        if self.format != FORMAT or self.format_version != FORMAT_VERSION:
            raise bad("format/format_version", (self.format, self.format_version), f"({FORMAT!r}, {FORMAT_VERSION})")
        for name in ("embed_dim", "opset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise bad(name, value, "a positive integer")
        if isinstance(self.logit_scale, bool) or not isinstance(self.logit_scale, (int, float)):
            raise bad("logit_scale", self.logit_scale, "a number")
        if self.logit_bias is not None and (
            isinstance(self.logit_bias, bool) or not isinstance(self.logit_bias, (int, float))
        ):
            raise bad("logit_bias", self.logit_bias, "a number or null")
        if not isinstance(self.fingerprint, str) or not self.fingerprint:
            raise bad("fingerprint", self.fingerprint, "the model's fingerprint (a non-empty string)")
        required = {"preprocess": _PREPROCESS_KEYS, "tokenizer": _TOKENIZER_KEYS, "files": _REQUIRED_FILES}
        for name, keys in required.items():
            value = getattr(self, name)
            if not isinstance(value, Mapping):
                raise bad(name, value, "an object")
            for key in keys:
                if key not in value:
                    raise ValueError(f"{source}: field {name}.{key} is missing; re-export the model")
        if self.tokenizer["kind"] not in _TOKENIZER_KINDS:
            raise bad("tokenizer.kind", self.tokenizer["kind"], f"one of {_TOKENIZER_KINDS}")
        if not isinstance(self.parity, Mapping):
            raise bad("parity", self.parity, "an object")
        if self.int8 is not None and not isinstance(self.int8, Mapping):
            raise bad("int8", self.int8, "an object or null")


def preprocess_settings(model: Any) -> dict[str, Any]:
    """`OnnxSpec.preprocess` for a vlm model (anything with a `.config` CLIPConfig): its evaluation transform."""
    vision = model.config.vision
    return {
        "image_size": vision.image_size,
        "mean": list(vision.image_mean),
        "std": list(vision.image_std),
        "interpolation": vision.interpolation,
        "resize_mode": vision.resize_mode,
    }


def tokenizer_settings(model: Any) -> dict[str, Any]:
    """`OnnxSpec.tokenizer` for a vlm model: how `OnnxCLIP` rebuilds `vlm.get_tokenizer(model)` from `tokenizer/`."""
    from .config import CLIP_TOKENIZER
    from .tokenizer import _VOCAB_FILE, get_tokenizer

    text = model.config.text
    # A causal tower's rows may be cut after the batch's last pooled position (`TextTower.embed` does so).
    settings = dict(context_length=text.context_length, dynamic_length=text.causal, pool=text.pool, eot_id=text.eot_id)
    if text.tokenizer == CLIP_TOKENIZER:
        return dict(kind="clip_bpe", **settings, vocabulary=_VOCAB_FILE)
    tokenizer = get_tokenizer(model)
    pipeline = PIPELINE_FILE if tokenizer.pipeline_json() is not None else "transformers"
    hf = dict(clean=text.tokenizer_clean, strip_sep_token=text.strip_sep_token, framing=tokenizer.framing())
    return dict(kind="hf", **settings, **hf, pipeline=pipeline)


def write_tokenizer(model: Any, directory: str | os.PathLike) -> dict[str, Any]:
    """Write the files of the model's tokenizer into `directory/tokenizer/`; returns `tokenizer_settings(model)`."""
    import shutil

    from .tokenizer import _vocab_path, get_tokenizer

    settings = tokenizer_settings(model)
    folder = Path(directory) / TOKENIZER_DIR
    folder.mkdir(parents=True, exist_ok=True)
    if settings["kind"] == "clip_bpe":
        shutil.copyfile(_vocab_path(), folder / settings["vocabulary"])
        return settings
    tokenizer = get_tokenizer(model)
    tokenizer.save(folder)
    pipeline = tokenizer.pipeline_json()
    if pipeline is not None:
        (folder / PIPELINE_FILE).write_text(pipeline, encoding="utf-8")
    return settings


def read_spec(directory: str | os.PathLike) -> OnnxSpec:
    """The spec of the export in `directory`; ValueError naming the directory and what it lacks."""
    directory = Path(directory)
    path = directory / SPEC_FILE
    if not path.is_file():
        lacks = "does not exist" if not directory.exists() else f"lacks {SPEC_FILE}"
        raise ValueError(f"{directory} is not a vlm ONNX export: it {lacks}; {_EXPORT_HINT}")
    return OnnxSpec.from_json(path.read_text(encoding="utf-8"), path)


_EXPORT_HINT = "write one with `vlm export onnx MODEL --out DIR` (or vlm.export.export_onnx(model, DIR))"


def preprocess_image(image: Any, preprocess: Mapping[str, Any]) -> np.ndarray:
    """A PIL image -> (3, S, S) float32, the values `vlm.transforms.ImageTransform` (evaluation) gives.

    torchvision on PIL images is PIL's `resize` at a size computed by `_compute_resized_output_size` (the shorter
    side to S, the longer to int(S * long / short); skipped when the size is already right), a crop at
    int(round((side - S) / 2)), then `to_tensor` (uint8 / 255 in float32) and `normalize` ((x - mean) / std in
    float32); the same operations in the same order give the same bits.
    """
    from .images import to_rgb

    if not isinstance(image, Image.Image):
        raise TypeError(
            f"preprocess takes a PIL image, got {type(image).__name__}; load paths and bytes with vlm.images.load_image"
        )
    image = to_rgb(image)
    S = preprocess["image_size"]
    width, height = image.size
    if preprocess["resize_mode"] == "squash":
        size = (S, S)
    else:
        short, long = sorted((width, height))
        size = (S, int(S * long / short)) if width <= height else (int(S * long / short), S)
    if image.size != size:
        image = image.resize(size, _RESAMPLE[preprocess["interpolation"]])
    if image.size != (S, S):
        top, left = int(round((image.size[1] - S) / 2.0)), int(round((image.size[0] - S) / 2.0))
        image = image.crop((left, top, left + S, top + S))
    pixels = np.asarray(image, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(preprocess["mean"], dtype=np.float32)[:, None, None]
    std = np.asarray(preprocess["std"], dtype=np.float32)[:, None, None]
    return (pixels - mean) / std  # (3, S, S)


_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}  # torchvision's mapping


def _normalize(x: np.ndarray) -> np.ndarray:
    # torch.nn.functional.normalize's eps, so that a zero vector stays zero, as in vlm.
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), np.float32(1e-12))


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise ImportError(f"running an ONNX export needs onnxruntime; install it: {INSTALL}") from error
    return onnxruntime


class OnnxCLIP:
    """An ONNX export of a vlm model run with onnxruntime: images and texts in, numpy embeddings out, no torch.

    `directory` is what `vlm.export.export_onnx` wrote. `int8` runs the int8 graphs (the export must have them).
    `providers` are onnxruntime execution providers (default: the CPU); `threads` caps onnxruntime's intra-op
    threads (default: onnxruntime's choice). Each tower's session is created on first use. Embeddings equal
    the torch model's within the parity the export measured (`spec.parity`); ids and pixels are computed by the
    same code and rules as `vlm.get_tokenizer` and `vlm.image_transform`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        int8: bool = False,
        providers: list[str] | None = None,
        threads: int | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.spec = read_spec(self.directory)
        self.int8 = int8
        self._ort = _onnxruntime()
        self._graphs = {tower: self._graph_path(tower) for tower in ("visual", "textual")}
        self._providers = providers or ["CPUExecutionProvider"]
        self._threads = threads
        self._sessions: dict[str, Any] = {}
        self._lock = threading.Lock()
        self.tokenizer = _load_tokenizer(self.spec.tokenizer, self.directory)

    def __repr__(self) -> str:
        return f"OnnxCLIP({str(self.directory)!r}, int8={self.int8}, fingerprint={self.fingerprint!r})"

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the model exported (`CLIP.fingerprint()`): indexes and classifiers built with that
        model accept these embeddings."""
        return self.spec.fingerprint

    @property
    def embed_dim(self) -> int:
        """E, the length of the embeddings both towers return."""
        return self.spec.embed_dim

    def preprocess(self, image: Image.Image) -> np.ndarray:
        """A PIL image -> (3, S, S) float32, exactly as `vlm.image_transform(model)` prepares it."""
        return preprocess_image(image, self.spec.preprocess)

    def tokenize(self, texts: str | Sequence[str]) -> np.ndarray:
        """(B, context_length) int64 ids, the ids `vlm.get_tokenizer(model)` gives."""
        return self.tokenizer.ids(texts)

    def encode_image(self, images: Any, *, normalize: bool = True, batch_size: int = 32) -> np.ndarray:
        """(B, E) float32 embeddings of `images`: a PIL image, a path or anything `vlm.load_image` loads, a list of
        those, or a preprocessed float32 array (B, 3, S, S). Normalised to unit length unless `normalize` is False."""
        pixels = self._pixels(images)
        return self._run("visual", "pixels", pixels, batch_size, normalize)

    def encode_text(self, texts: str | Sequence[str], *, normalize: bool = True, batch_size: int = 256) -> np.ndarray:
        """(B, E) float32 embeddings of a text or a list of texts, normalised unless `normalize` is False."""
        return self._run("textual", "input_ids", self.tokenize(texts), batch_size, normalize)

    def logits(self, image_embeds: np.ndarray, text_embeds: np.ndarray) -> np.ndarray:
        """(B, T) logits of images against texts, as `CLIPOutput.logits_per_image`: the model's logit scale
        times the cosine similarities (the embeddings are normalised here), plus the logit bias if it has one."""
        image_embeds = _normalize(np.asarray(image_embeds, dtype=np.float32))
        text_embeds = _normalize(np.asarray(text_embeds, dtype=np.float32))
        logits = np.float32(self.spec.logit_scale) * image_embeds @ text_embeds.T
        return logits if self.spec.logit_bias is None else logits + np.float32(self.spec.logit_bias)

    def _graph_path(self, tower: str) -> Path:
        key = f"{tower}_int8" if self.int8 else tower
        name = self.spec.files.get(key)
        if name is None:
            raise ValueError(
                f"{self.directory} has no int8 {tower} graph (files: {sorted(self.spec.files)}); export with "
                "`vlm export onnx MODEL --int8`, or use OnnxCLIP(directory) for the float32 graphs"
            )
        path = self.directory / name
        if not path.is_file():
            raise ValueError(f"{self.directory} is not a complete vlm ONNX export: it lacks {name}; {_EXPORT_HINT}")
        return path

    def _session(self, tower: str) -> Any:
        with self._lock:
            if tower not in self._sessions:
                options = self._ort.SessionOptions()
                if self._threads is not None:
                    options.intra_op_num_threads = self._threads
                path = str(self._graphs[tower])
                self._sessions[tower] = self._ort.InferenceSession(path, options, providers=self._providers)
            return self._sessions[tower]

    def _pixels(self, images: Any) -> np.ndarray:
        S = self.spec.preprocess["image_size"]
        if isinstance(images, np.ndarray) and images.ndim == 4:
            if images.dtype != np.float32 or images.shape[1:] != (3, S, S):
                raise ValueError(
                    f"a batch of preprocessed images must be float32 (B, 3, {S}, {S}), got {images.dtype} "
                    f"{images.shape}; pass PIL images or paths to have them preprocessed"
                )
            return images
        from .images import load_image

        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        prepared = [self.preprocess(image if isinstance(image, Image.Image) else load_image(image)) for image in batch]
        return np.stack(prepared) if prepared else np.zeros((0, 3, S, S), dtype=np.float32)

    def _run(self, tower: str, name: str, inputs: np.ndarray, batch_size: int, normalize: bool) -> np.ndarray:
        out = np.zeros((len(inputs), self.spec.embed_dim), dtype=np.float32)
        session = self._session(tower) if len(inputs) else None
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            if tower == "textual":
                chunk = self._trim(chunk)
            (out[start : start + batch_size],) = session.run(["embedding"], {name: chunk})
        return _normalize(out) if normalize else out

    def _trim(self, ids: np.ndarray) -> np.ndarray:
        """A causal tower's rows up to the batch's last pooled position: what `vlm.text.TextTower.embed` runs."""
        settings = self.spec.tokenizer
        if not settings["dynamic_length"]:
            return ids
        return ids[:, : _last_pooled(ids, settings["pool"], settings["eot_id"]) + 1]


def _last_pooled(ids: np.ndarray, pool: str, eot_id: int | None) -> int:
    """The batch's last pooled position, by `vlm.text.TextTower.pool_positions`' rule."""
    if pool == "first":
        return 0
    if pool == "last":
        return ids.shape[1] - 1
    # argmax returns the first of equal maxima, as torch's does.
    return int((ids.argmax(axis=1) if eot_id is None else (ids == eot_id).argmax(axis=1)).max())


def _load_tokenizer(settings: Mapping[str, Any], directory: Path) -> Any:
    """The tokenizer of the export in `directory`, from its own files: CLIP's BPE with the copied vocabulary, a
    Hugging Face tokenizer from the saved Rust pipeline (`tokenizers` alone), or through transformers where it
    has none. The overflow policy is the caller's (`vlm.overflow.overflow_policy`), as in `vlm.get_tokenizer`."""
    from .overflow import resolve_overflow

    folder = directory / TOKENIZER_DIR

    overflow, overflow_setting = resolve_overflow(None, None)
    policy = dict(overflow=overflow, overflow_setting=overflow_setting)
    context_length = settings["context_length"]
    if settings["kind"] == "clip_bpe":
        from .tokenizer import Tokenizer

        vocabulary = _required(folder / settings["vocabulary"], directory)
        return Tokenizer(context_length, vocabulary=vocabulary, **policy)
    from .hf_tokenizer import HFTokenizer

    hf = dict(clean=settings["clean"], strip_sep_token=settings["strip_sep_token"], **policy)
    if settings["pipeline"] == "transformers":
        return HFTokenizer(_required(folder, directory), context_length, local_files_only=True, **hf)
    _required(folder / settings["pipeline"], directory)
    return HFTokenizer.from_pipeline(folder, settings["framing"], context_length, pipeline=settings["pipeline"], **hf)


def _required(path: Path, directory: Path) -> Path:
    if not path.exists():
        lacks = path.relative_to(directory)
        raise ValueError(f"{directory} is not a complete vlm ONNX export: it lacks {lacks}; {_EXPORT_HINT}")
    return path
