"""`vlm export {onnx,hf,open_clip} MODEL --out DIR`: a model written in the format another tool opens.

    vlm export onnx MODEL --out DIR [--int8] [--int8-sample DATA] [--opset N]   (onnxruntime, no torch needed)
    vlm export hf MODEL --out DIR          (transformers: CLIPModel / pipeline("zero-shot-image-classification"))
    vlm export open_clip MODEL --out DIR   (open_clip.create_model_and_transforms("local-dir:DIR"))
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["export_main"]

_FORMATS = {
    "onnx": "two ONNX graphs (image, text) with their preprocessing and tokenizer, checked against torch",
    "hf": "a transformers directory: config, weights, processor and tokenizer files",
    "open_clip": "open_clip's directory format (open_clip_config.json, open_clip_model.safetensors)",
}


def export_main(argv: list[str]) -> int:
    """`vlm export FORMAT MODEL --out DIR`: writes the model, prints what was written; 1 on a missing package."""
    args = _parser().parse_args(argv)
    from .args import load_model_from_args

    model = load_model_from_args(args)
    try:
        if args.format == "onnx":
            from vlm.export import export_onnx

            spec = export_onnx(
                model, args.out, int8=args.int8, int8_sample=args.int8_sample, opset=args.opset, atol=args.atol
            )
            print(format_onnx_summary(args.out, spec))
            return 0
        from vlm import export

        writer = export.save_hf if args.format == "hf" else export.save_open_clip
        out = writer(model, args.out)
    except ImportError as err:  # a missing optional package: the message names the install command
        print(f"vlm export {args.format}: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out} ({args.format}): " + ", ".join(sorted(p.name for p in Path(out).iterdir())))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm export", description="Write a model in a format another tool opens.")
    formats = parser.add_subparsers(dest="format", required=True, metavar="FORMAT")
    for name, help_ in _FORMATS.items():
        sub = formats.add_parser(name, help=help_, description=f"Write MODEL as {help_}.")
        sub.add_argument("model", help="model directory, preset or open_clip name")
        sub.add_argument("--pretrained", default=None, help="open_clip pretrained tag or weights file for MODEL")
        sub.add_argument("--out", required=True, type=Path, help="the directory to write (replaced as a whole)")
    onnx = formats.choices["onnx"]
    onnx.add_argument(
        "--int8", action="store_true", help="also write int8 graphs (dynamic quantisation) and measure them"
    )
    onnx.add_argument(
        "--int8-sample",
        default=None,
        help="labelled images the int8 agreement is measured on: a folder of class folders, a table or hf:NAME "
        "(at most 300 images; default: scikit-learn's handwritten digits)",
    )
    onnx.add_argument("--opset", type=int, default=None, help="ONNX opset (default 20)")
    onnx.add_argument(
        "--atol", type=float, default=1e-4, help="largest difference from torch accepted at export (default 1e-4)"
    )
    return parser


def format_onnx_summary(directory: Path, spec) -> str:
    """What `vlm export onnx` prints: the files, their parity with torch and the int8 agreement."""
    lines = [f"wrote {directory} (ONNX opset {spec.opset}, embedding size {spec.embed_dim})"]
    diffs = {"visual": spec.parity.get("max_abs_diff_visual"), "textual": spec.parity.get("max_abs_diff_textual")}
    for key, name in spec.files.items():
        size = (Path(directory) / name).stat().st_size / 2**20
        diff = diffs.get(key)
        check = f"max abs diff from torch {diff:.2g}" if diff is not None else "int8"
        lines.append(f"  {name:<20} {size:8.1f} MiB  {check}")
    if spec.int8:
        q = spec.int8
        lines.append(
            f"int8: top-1 agreement with float32 {100 * q['agreement']:.1f}% on {q['n']} images of {q['sample']}; "
            f"zero-shot accuracy float32 {100 * q['accuracy_fp32']:.1f}%, int8 {100 * q['accuracy_int8']:.1f}%"
        )
    return "\n".join(lines)
