"""ONNX export of a vlm model: two graphs, the spec that says how to feed them, and the checks that they are right.

`export_onnx(model, directory)` writes `visual.onnx` (pixels -> embedding) and `textual.onnx` (token ids ->
embedding), the tokenizer files, `vlm_onnx.json` (`vlm.onnx.OnnxSpec`) and a model card; with ``int8=True`` also
dynamically quantised copies and the zero-shot agreement they keep with the float32 graphs. The layout is the one
`vlm.onnx.OnnxCLIP` reads (see that module).

The exporter is torch's `torch.export`-based one (``torch.onnx.export(..., dynamo=True)``), not the TorchScript
tracer: its batch and text-length axes are symbolic dimensions checked by `torch.export` (the tracer records
Python ints, and froze four shape checks of our towers into constants with only a warning), it is the one torch
maintains (the tracer is deprecated since torch 2.9), and its ViT-B-32 image graph ran about 1.5x faster in
onnxruntime 1.32 on CPU than the tracer's (batch 1 and 32; one run on a shared machine). Its cost is export
time: seconds for a tiny model, ~30 s for ViT-B-32, against ~1/5 of that for the tracer.

Opset 20 by default: torch's exporter's own default, the best-tested translation, and what onnxruntime reads
from 1.17 on (the `onnx` extra's floor). Opset 23, which turns attention into ONNX's `Attention` op, ran no
faster in onnxruntime 1.32 (ViT-B-32, CPU, batch 1 and 8); `opset=` picks another.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn

from ..files import atomic_directory

if TYPE_CHECKING:
    from ..data import LabelledImages
    from ..model import CLIP
    from ..model_card import ModelCard
    from ..onnx import OnnxSpec

__all__ = ["DEFAULT_OPSET", "TextualGraph", "VisualGraph", "export_onnx", "export_tower", "quantize_int8"]

logger = logging.getLogger(__name__)

DEFAULT_OPSET = 20
# The oldest opset torch's exporter writes; the newest is what the installed onnx knows (checked at export).
MIN_OPSET = 18
FILES = {"visual": "visual.onnx", "textual": "textual.onnx"}
INT8_FILES = {"visual_int8": "visual.int8.onnx", "textual_int8": "textual.int8.onnx"}
# Only the matrix products are quantised: they hold >95% of a ViT's weights and time. onnxruntime's quantiser
# would also rewrite opset 23's `Attention` node into its own `QAttention`, which rejects ONNX's attributes.
INT8_OP_TYPES = ("MatMul", "Gemm")
# Enough images for an agreement figure to 1/300 without the check costing more than the export.
INT8_SAMPLE_SIZE = 300
DIGITS_PROMPT = "a photo of the number {}."
FOLDER_PROMPT = "a photo of a {}."
# Batch sizes checked against torch: the export's example batch and two others, so a graph whose batch axis
# came out fixed (or specialised to 1) is caught at export time, not by the first user.
PARITY_BATCHES = (2, 1, 3)


class VisualGraph(nn.Module):
    """`visual.onnx`: pixels (B, 3, S, S) -> embedding (B, E), `model.encode_image(pixels)`, not normalised."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.visual = model.visual

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, 3, S, S) -> (B, E)."""
        return self.visual(pixels)


class TextualGraph(nn.Module):
    """`textual.onnx`: token ids (B, L) -> embedding (B, E), `model.encode_text(input_ids)`, not normalised.

    `TextTower.forward` cuts a causal tower's rows after the batch's last pooled position, a length read from the
    ids' values; a graph cannot depend on a value for a shape, so here every given position runs (the runtime
    does that cut before calling the graph). Under the causal mask the result is the same, which the export's
    parity check confirms at two lengths.
    """

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.text = model.text

    def forward(self, input_ids: Tensor) -> Tensor:
        """(B, L) -> (B, E)."""
        t = self.text
        x = t.token_embed(input_ids) + t.pos_embed[: input_ids.shape[1]]  # (B, L, C)
        index = t.pool_positions(input_ids)[:, None]  # (B, 1)
        x = t.transformer.forward_queries(x, index, is_causal=t.config.causal)  # (B, 1, C)
        return t.project(t.norm(x)[:, 0])


def export_onnx(
    model: CLIP,
    directory: str | os.PathLike,
    *,
    int8: bool = False,
    int8_sample: str | os.PathLike | LabelledImages | None = None,
    opset: int | None = None,
    atol: float = 1e-4,
    card: ModelCard | None = None,
) -> OnnxSpec:
    """Writes `model` as an ONNX export into `directory` (replaced as a whole, or left untouched on any error).

    Both graphs are checked against the torch model with onnxruntime on random inputs at batch sizes 2, 1 and 3
    (and, for a causal text tower, a shorter text length): a max abs difference above `atol` is a ValueError
    giving it. `int8` adds dynamically quantised graphs and measures the zero-shot top-1 agreement between them
    and the float32 graphs on `int8_sample`: labelled images (a folder of class folders, a table, ``hf:...``, or
    a `vlm.data.LabelledImages`; at most 300 are used), or by default scikit-learn's handwritten digits.
    `opset`: the ONNX opset (default 20). `card`: the model card's contents (default: ``model.card``, as
    `vlm.model_card.write_model_card`). ValueError for an op the exporter cannot translate (naming it);
    ImportError with the install command without onnx, onnxruntime or onnxscript.
    """
    _require_onnx()
    from ..model_card import write_model_card
    from ..onnx import SPEC_FILE, OnnxSpec, preprocess_settings, write_tokenizer

    opset = _check_opset(DEFAULT_OPSET if opset is None else opset)
    if not atol >= 0:
        raise ValueError(f"atol must be a non-negative number, got {atol!r}")
    with _eval_mode(model), _quiet_libraries(), atomic_directory(directory) as tmp:
        parity = {"atol": atol}
        for tower in FILES:
            path = export_tower(model, tower, tmp / FILES[tower], opset=opset)
            parity[f"max_abs_diff_{tower}"] = _check_parity(model, tower, path, atol)
        files = dict(FILES)
        int8_stats = None
        if int8:
            for tower in FILES:
                quantize_int8(tmp / FILES[tower], tmp / INT8_FILES[f"{tower}_int8"])
            files.update(INT8_FILES)
            int8_stats = _int8_agreement(model, tmp, files, int8_sample)
        spec = OnnxSpec(
            embed_dim=model.config.embed_dim,
            logit_scale=float(model.logit_scale.detach().exp()),
            logit_bias=None if model.logit_bias is None else float(model.logit_bias.detach()),
            fingerprint=model.fingerprint(),
            opset=opset,
            preprocess=preprocess_settings(model),
            tokenizer=write_tokenizer(model, tmp),
            files=files,
            parity=parity,
            int8=int8_stats,
        )
        (tmp / SPEC_FILE).write_text(spec.to_json() + "\n", encoding="utf-8")
        write_model_card(tmp, model, fmt="onnx", card=card)
    logger.info("ONNX export written to %s (parity %s)", directory, parity)
    return spec


# ---- the graphs ------------------------------------------------------------------------------------
def export_tower(model: CLIP, tower: str, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET) -> Path:
    """Writes one tower's graph, "visual" (`VisualGraph`) or "textual" (`TextualGraph`), to `path` as
    `export_onnx` does, without its parity check; returns `path`. ValueError naming an op it cannot translate."""
    if tower not in FILES:
        raise ValueError(f"tower must be one of {sorted(FILES)}, got {tower!r}")
    graph = VisualGraph(model) if tower == "visual" else TextualGraph(model)
    path = Path(path)
    with _eval_mode(model), _quiet_libraries():
        graph.eval()  # the wrapper's own flag: torch warns about exporting a module in training mode
        _export_graph(graph, _example(model, tower), _dynamic_shapes(model, tower), path, opset, tower)
    return path


def quantize_int8(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Writes `source`'s graph with int8 weights (onnxruntime's dynamic quantisation of `INT8_OP_TYPES`, activations
    quantised at run time) to `target`; returns `target`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # 7-bit weights (reduce_range): without VNNI, onnxruntime's AVX2 int8 kernels add pairs of u8 x s8 products
    # in 16 bits, which full-range weights can saturate; an export may run on such a CPU. On the tiny model
    # trained on the digits' captions it kept 99.7% top-1 agreement against 98.7% with 8 bits (per-channel
    # scales: 96.3%), 300 held-out digits, measured here.
    with _quiet_libraries():
        quantize_dynamic(
            source, target, weight_type=QuantType.QInt8, op_types_to_quantize=list(INT8_OP_TYPES), reduce_range=True
        )
    return Path(target)


def _require_onnx() -> None:
    """ImportError naming the missing package and the install command, before any work is done."""
    for name in ("onnx", "onnxruntime", "onnxscript"):
        try:
            importlib.import_module(name)
        except ImportError as err:
            from ..onnx import INSTALL

            raise ImportError(
                f"ONNX export needs onnx, onnxruntime and onnxscript, and {name} is not installed; "
                f"install them with: {INSTALL}  (or: pip install onnx onnxruntime onnxscript)",
                name=name,
            ) from err


def _check_opset(opset: int) -> int:
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int) or not MIN_OPSET <= opset <= newest:
        raise ValueError(
            f"opset must be an integer from {MIN_OPSET} (torch's exporter) to {newest} (the installed onnx), "
            f"got {opset!r}; the default is {DEFAULT_OPSET}"
        )
    return opset


@contextmanager
def _quiet_libraries() -> Iterator[None]:
    """The exporter's optimiser logs every constant it folds at INFO, and onnxruntime's quantiser warns through
    the root logger about a pre-processing pass that only helps static quantisation: both would flood the CLI
    (which logs at INFO). Their warnings and errors still come through; everything is restored afterwards."""
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.WARNING)
    root_filter = _DropQuantizerAdvice()
    logging.getLogger().addFilter(root_filter)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(root_filter)
        for log, level in zip(loggers, levels):
            log.setLevel(level)


class _DropQuantizerAdvice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        inside = f"onnxruntime{os.sep}quantization" in record.pathname
        return not inside or record.levelno >= logging.ERROR


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode for the block, then back in the mode it was in."""
    training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(training)


def _example(model: CLIP, tower: str) -> Tensor:
    return _visual_inputs(model, PARITY_BATCHES[0]) if tower == "visual" else _text_inputs(model, PARITY_BATCHES[0])


def _dynamic_shapes(model: CLIP, tower: str) -> dict[str, dict[int, Any]]:
    batch = torch.export.Dim("batch")
    if tower == "visual":
        return {"pixels": {0: batch}}
    text = model.config.text
    if not text.causal:
        # A bidirectional tower pooled at the last position reads the padding: it needs the whole context.
        return {"input_ids": {0: batch}}
    return {"input_ids": {0: batch, 1: torch.export.Dim("length", max=text.context_length)}}


def _export_graph(graph: nn.Module, example: Tensor, dynamic: dict, path: Path, opset: int, tower: str) -> None:
    """Exports `graph` to `path` with the output named "embedding"; ValueError naming an op it cannot translate."""
    import onnxscript.optimizer

    # With autograd on, `Attention` concatenates q/k/v weights in the graph instead of reading its no-grad
    # cache, which keys on storage pointers that `torch.export`'s fake tensors do not have; the fold below
    # turns that concatenation back into one constant.
    with torch.enable_grad():
        try:
            program = torch.onnx.export(
                graph, (example,), dynamo=True, dynamic_shapes=dynamic, opset_version=opset, optimize=False,
                verbose=False,
            )
        except Exception as err:  # the exporter raises many types; each becomes one message naming the op
            raise _unsupported(err, tower) from err
    # The default size limits leave weight-sized constants unfolded: concatenated q/k/v weights would stay
    # Concat nodes, which the int8 quantiser cannot quantise and onnxruntime recomputes at every load.
    onnxscript.optimizer.optimize(program.model, input_size_limit=1 << 40, output_size_limit=1 << 40)
    _name_output(program.model.graph, "embedding")
    program.save(str(path))


def _name_output(graph: Any, name: str) -> None:
    """Names the graph's output `name`. torch names values after the ops that make them, so the token
    embedding lookup's value is already called "embedding": it is renamed first (the ONNX would be invalid)."""
    output = graph.outputs[0]
    for node in graph:
        for value in node.outputs:
            if value.name == name and value is not output:
                value.name = f"{name}_{node.op_type.lower()}"
    output.name = name


_OP_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)>"),
    re.compile(r"target=torch\.ops\.([\w.]+?)\.(\w+)\]"),
)


def _unsupported(err: BaseException, tower: str) -> ValueError:
    """The exporter's error as a ValueError naming the op it could not translate (found in the error chain)."""
    chain, seen = [], set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        chain.append(err)
        err = err.__cause__ or err.__context__
    text = "\n".join(str(e) for e in chain)
    for pattern in _OP_PATTERNS:
        match = pattern.search(text)
        if match:
            op = match.group(1) + ("" if match.group(2) == "default" else f".{match.group(2)}")
            return ValueError(
                f"the {tower} tower uses the op {op}, which torch's ONNX exporter cannot translate "
                f"({_reason(chain)}); replace it in the model with ops ONNX has, or register a translation "
                "(torch.onnx.export's custom_translation_table)"
            )
    return ValueError(f"torch could not export the {tower} tower to ONNX: {_reason(chain)}")


def _reason(chain: list[BaseException]) -> str:
    """The innermost error's first line, without the exporter's colour codes."""
    inner = chain[-1]
    line = next((line for line in str(inner).splitlines() if line.strip()), type(inner).__name__)
    return re.sub(r"\x1b\[[0-9;]*m", "", f"{type(inner).__name__}: {line.strip()}")


# ---- parity ----------------------------------------------------------------------------------------
def _visual_inputs(model: CLIP, batch: int, seed: int = 0) -> Tensor:
    S = model.config.vision.image_size
    return torch.randn(batch, 3, S, S, generator=torch.Generator().manual_seed(seed))


def _text_inputs(model: CLIP, batch: int, length: int | None = None, seed: int = 0) -> Tensor:
    """Ids shaped like a tokenizer's: a random body, the end-of-text id (the highest id where the tower pools at
    the highest), then padding; texts of different lengths."""
    text = model.config.text
    L = length or text.context_length
    g = torch.Generator().manual_seed(seed)
    eot = text.vocab_size - 1 if text.eot_id is None else text.eot_id
    ids = torch.full((batch, L), text.pad_id, dtype=torch.long)
    for row in range(batch):
        n = min(L, 2 + (5 + 7 * row + seed) % max(1, L - 1))
        ids[row, : n - 1] = torch.randint(1, max(2, text.vocab_size - 2), (n - 1,), generator=g)
        ids[row, n - 1] = eot
    return ids


def _parity_inputs(model: CLIP, tower: str) -> list[Tensor]:
    if tower == "visual":
        return [_visual_inputs(model, b, seed=i) for i, b in enumerate(PARITY_BATCHES)]
    text = model.config.text
    # A causal graph also runs at a shorter length: what the runtime feeds after cutting the padding off.
    short = min(text.context_length, 7) if text.causal else None
    return [_text_inputs(model, b, None if i == 0 else short, seed=i) for i, b in enumerate(PARITY_BATCHES)]


def _session(path: Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: onnxruntime warns about unused initializers it removes
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _check_parity(model: CLIP, tower: str, path: Path, atol: float) -> float:
    """The largest |onnxruntime - torch| over the parity inputs; ValueError above `atol`."""
    session = _session(path)
    name = session.get_inputs()[0].name
    encode = model.encode_image if tower == "visual" else model.encode_text
    worst = 0.0
    for x in _parity_inputs(model, tower):
        with torch.inference_mode():
            expected = encode(x).float().numpy()
        shape = "x".join(map(str, x.shape))
        try:
            (got,) = session.run(None, {name: x.numpy()})
        except Exception as err:  # onnxruntime's own error types; a graph that cannot run is not exported
            raise ValueError(f"the ONNX {tower} graph does not run on an input of shape {shape}: {err}") from err
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff)
        if not diff <= atol:  # also catches NaN
            raise ValueError(
                f"the ONNX {tower} graph differs from the torch model by {diff:.3g} (max abs, input {shape}), "
                f"above atol={atol:g}: the export is refused and nothing was written. An op translated with "
                "other numerics (try another opset), or pass a larger atol if this difference is acceptable"
            )
    return worst


# ---- int8 ------------------------------------------------------------------------------------------
def _int8_agreement(model: CLIP, directory: Path, files: dict[str, str], sample: Any) -> dict[str, Any]:
    """Zero-shot top-1 of the int8 graphs against the float32 graphs (and both against the labels) on `sample`."""
    from ..tokenizer import get_tokenizer
    from ..transforms import image_transform

    pixels, labels, class_names, prompt, described = _sample(sample, image_transform(model))
    ids = get_tokenizer(model)([prompt.format(name) for name in class_names]).numpy()
    top1 = {}
    for kind, suffix in (("fp32", ""), ("int8", "_int8")):
        visual, textual = (_session(directory / files[f"{tower}{suffix}"]) for tower in ("visual", "textual"))
        batches = np.array_split(pixels, max(1, len(pixels) // 64))
        image_embeds = np.concatenate([visual.run(None, {"pixels": b})[0] for b in batches])
        text_embeds = textual.run(None, {"input_ids": ids})[0]
        top1[kind] = (_unit(image_embeds) @ _unit(text_embeds).T).argmax(axis=1)
    stats = {
        "agreement": float((top1["fp32"] == top1["int8"]).mean()),
        "sample": described,
        "n": len(labels),
        "accuracy_fp32": float((top1["fp32"] == labels).mean()),
        "accuracy_int8": float((top1["int8"] == labels).mean()),
        "prompt": prompt,
        "weight_type": "QInt8",
        "reduce_range": True,
        "op_types": list(INT8_OP_TYPES),
    }
    logger.info("int8 graphs agree with float32 on %.1f%% of %d images of %s", 100 * stats["agreement"], len(labels), described)
    return stats


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _sample(sample: Any, transform: Any) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], str, str]:
    """(pixels (N, 3, S, S) float32, labels (N,), class names, prompt, description) of the int8 sample."""
    if sample is None:
        images, labels, names = _digits(INT8_SAMPLE_SIZE)
        pixels = torch.stack([transform(image) for image in images]).numpy()
        return pixels, labels, names, DIGITS_PROMPT, "scikit-learn's handwritten digits"
    from ..data import LabelledImages, iter_image_batches, open_labelled

    data = sample if isinstance(sample, LabelledImages) else open_labelled(str(sample))
    if len(data.images) == 0:
        raise ValueError(f"the int8 sample {sample} holds no images; give a folder of class folders with images")
    # Evenly spaced picks keep every class of a sorted folder in the sample.
    picks = sorted(set(np.linspace(0, len(data.images) - 1, min(INT8_SAMPLE_SIZE, len(data.images))).astype(int)))
    images = data.images.subset(picks)
    batches = list(iter_image_batches(images.sources, transform, batch_size=64, progress=False))
    if not batches or not sum(len(b.indices) for b in batches):
        raise ValueError(f"none of the images of the int8 sample {sample} could be read")
    indices = torch.cat([b.indices for b in batches]).numpy()
    pixels = torch.cat([b.images for b in batches]).numpy()
    labels = np.asarray([data.labels[picks[i]] for i in indices])
    return pixels, labels, data.class_names, FOLDER_PROMPT, str(data.images.description or sample)


def _digits(n: int) -> tuple[list[Any], np.ndarray, tuple[str, ...]]:
    """The first `n` of scikit-learn's digits as `demo.sample_data.write_digits` writes them; class names "0".."9"."""
    from ..data.digits import digit_images

    images, labels = digit_images(n)
    return images, labels, tuple(str(d) for d in range(10))
