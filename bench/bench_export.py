"""ONNX export: onnxruntime against torch on CPU, and the zero-shot agreement int8 keeps, in one run.

    .venv/bin/python bench/bench_export.py [--rounds 3] [--threads N] [--model DIR] [--steps 100]

1. Speed: the ViT-B-32 image tower (seeded random weights: speed does not depend on their values), written as
   `vlm export onnx` writes it (the same exporter, constant folding and int8 quantisation), timed against the
   torch model's `encode_image` under inference_mode at batch 1 (latency) and batch 32 (throughput), in
   interleaved rounds, onnxruntime's intra-op threads set to torch's. Targets (issue 15): onnxruntime fp32 at
   least 1.0x torch at batch 32 and faster at batch 1; int8 at least 1.5x fp32.
2. Agreement: a model that has learned the digits (`--model`, or the tiny preset trained here on the digits'
   captions for `--steps` steps, as the tests' `digits_run`) exported with int8; the zero-shot top-1 agreement
   of the int8 graphs with the float32 ones on the held-out digits, as `export_onnx` measures it. Target: 99%.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import interleaved_best_times, print_table  # noqa: E402

import vlm  # noqa: E402
from vlm.export import export_onnx  # noqa: E402
from vlm.export.onnx_export import export_tower, quantize_int8  # noqa: E402

BATCHES = (1, 32)
# The quick digits run the tests' `digits_run` trains too.
DIGITS_TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "digits_tiny.yaml"


def bench_speed(directory: Path, rounds: int) -> None:
    torch.manual_seed(0)
    model = vlm.create_model("ViT-B-32").eval()
    fp32, int8 = directory / "visual.onnx", directory / "visual.int8.onnx"
    quantize_int8(export_tower(model, "visual", fp32), int8)
    threads = torch.get_num_threads()
    sessions = {name: _session(path, threads) for name, path in (("fp32", fp32), ("int8", int8))}
    rows = []
    for batch in BATCHES:
        x = torch.randn(batch, 3, 224, 224)
        feed = {"pixels": x.numpy()}
        with torch.inference_mode():
            diff = float((model.encode_image(x) - torch.from_numpy(sessions["fp32"].run(None, feed)[0])).abs().max())
            assert diff <= 1e-4, f"onnxruntime fp32 differs from torch by {diff}"
            # Latency calls are short: more rounds for the same confidence.
            times = interleaved_best_times(
                {
                    "torch": lambda: model.encode_image(x),
                    "ort fp32": lambda: sessions["fp32"].run(None, feed),
                    "ort int8": lambda: sessions["int8"].run(None, feed),
                },
                rounds * (5 if batch == 1 else 1),
            )
        rows.append(
            (
                batch,
                *(f"{batch / times[name]:.1f}" for name in ("torch", "ort fp32", "ort int8")),
                f"{times['torch'] / times['ort fp32']:.2f}x",
                f"{times['ort fp32'] / times['ort int8']:.2f}x",
            )
        )
    header = ("batch", "torch img/s", "ort fp32 img/s", "ort int8 img/s", "fp32 vs torch", "int8 vs fp32")
    title = f"ViT-B-32 image tower on CPU, onnxruntime {_ort_version()} at {threads} intra-op threads"
    print_table(title, rows, header)
    print("targets: fp32 vs torch >= 1.0x at batch 32 and > 1.0x at batch 1; int8 vs fp32 >= 1.5x")


def trained_model(model_dir: str | None, steps: int, folder: Path) -> tuple[vlm.CLIP, Path]:
    """The model the agreement is measured with and the held-out digits folder (written under `folder`)."""
    from demo.sample_data import write_digits
    from training.config import load_config
    from training.loop import train

    data = write_digits(folder / "digits")
    if model_dir:
        return vlm.load(model_dir), data.root / "test"
    overrides = {
        "output_dir": folder / "run",
        "data.train": data.train.table,
        "eval.zeroshot": data.test.table,
        "schedule.steps": steps,
    }
    torch.manual_seed(0)
    result = train(load_config(DIGITS_TINY, [f"{key}={value}" for key, value in overrides.items()]))
    print(f"\ntrained the tiny preset for {steps} steps on the digits' captions: zero-shot {result.metrics}")
    return vlm.load(result.model_dir), data.root / "test"


def bench_agreement(model: vlm.CLIP, sample: Path, directory: Path) -> None:
    spec = export_onnx(model, directory, int8=True, int8_sample=sample)
    q = spec.int8
    rows = [
        ("top-1 agreement int8 vs fp32", f"{100 * q['agreement']:.1f}%"),
        ("zero-shot accuracy fp32", f"{100 * q['accuracy_fp32']:.1f}%"),
        ("zero-shot accuracy int8", f"{100 * q['accuracy_int8']:.1f}%"),
    ]
    print_table(f"int8 against fp32 on {q['n']} held-out digits (prompt {q['prompt']!r})", rows, ("measure", "value"))
    print("target: agreement >= 99%")


def _session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads  # torch's: the comparison is at equal threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch's (and onnxruntime's) threads")
    parser.add_argument("--model", default=None, help="a model trained on the digits (default: train the tiny preset)")
    parser.add_argument("--steps", type=int, default=100, help="training steps when no --model is given")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        bench_speed(tmp, args.rounds)
        model, sample = trained_model(args.model, args.steps, tmp)
        bench_agreement(model, sample, tmp / "digits-onnx")


if __name__ == "__main__":
    main()
