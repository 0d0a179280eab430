"""Fine-tuning recipes on scikit-learn's digits, from the model `make demo` trains (or any CLIP dir).

    .venv/bin/python bench/bench_finetune.py [--model runs/demo/train/model] [--data runs/demo/data]

For each mode (linear probe, full, LP-FT, FLYP) prints top-1 on the 360 held-out digits and on their
shifted copy (rotated, blurred, noisy, rescaled), the training time, and the WiSE-FT sweep between the
zero-shot classifier and the fine-tuned one. The issue's targets: fine-tuned top-1 >= 98%, and a
WiSE-FT point that beats both endpoints on the shifted copy or matches the best of them.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from common import print_table  # noqa: E402

import vlm  # noqa: E402
from demo.sample_data import write_digits  # noqa: E402
from training.augment import shift_images  # noqa: E402
from training.classifier import ImageClassifier, LoadedImages, evaluate_classifier, load_images, zeroshot_head  # noqa: E402
from training.finetune import finetune  # noqa: E402
from training.finetune_config import load_finetune_config  # noqa: E402
from training.wise_ft import wise_ft_sweep  # noqa: E402
from vlm.data import labelled_folder  # noqa: E402

TEMPLATES = ["a photo of the number {}.", "an image of a handwritten {}.", "a drawing of the digit {}."]
# The recipes (config overrides): 20 epochs of the 1,437 training images, layer decay, label smoothing,
# augmentation.
COMMON = ("recipe.epochs=20", "optim.layer_decay=0.75", "recipe.label_smoothing=0.1", "augment.affine=true")
RECIPES = {
    "linear probe": ("recipe.mode=linear-probe",),
    "full": ("recipe.mode=full", "optim.lr=3e-4", *COMMON),
    # Without augmentation the tuned model has seen no rotated or shrunk digit: WiSE-FT's case.
    "full, no augmentation": ("recipe.mode=full", "optim.lr=3e-4", *COMMON, "augment.affine=false"),
    "full + EMA, lr 1e-3": ("recipe.mode=full", "optim.lr=1e-3", "recipe.ema_decay=0.99", *COMMON, "optim.layer_decay=0.65"),
    "LP-FT": ("recipe.mode=lp-ft", "optim.lr=3e-4", *COMMON),
    "FLYP": ("recipe.mode=flyp", "optim.lr=1e-4", "recipe.epochs=10", "augment.affine=true"),
}
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="runs/demo/train/model", help="a CLIP trained on digits (make demo)")
    parser.add_argument("--data", default="runs/demo/data", help="where the digits are (written if missing)")
    args = parser.parse_args()
    if not os.path.isdir(args.model):
        sys.exit(f"{args.model} does not exist: run `make demo` first, or pass --model")
    data = write_digits(args.data)
    model = vlm.load(args.model).eval()
    train = load_images(labelled_folder(data.root / "train"), model.config)
    test = load_images(labelled_folder(data.root / "test"), model.config)
    shifted = LoadedImages(shift_images(test.images, seed=0), test.labels, test.class_names)
    zeroshot = ImageClassifier.from_clip(model, test.class_names)
    zeroshot.head.load_state_dict(zeroshot_head(model, test.class_names, TEMPLATES).state_dict())
    rows = [("zero-shot", f"{evaluate_classifier(zeroshot, test).top1:.4f}", f"{evaluate_classifier(zeroshot, shifted).top1:.4f}", "-", "-")]
    for name, recipe in RECIPES.items():
        start = time.perf_counter()
        config = load_finetune_config(None, [*recipe, f"recipe.templates={TEMPLATES}", "logging.progress=false"])
        tuned = finetune(model, train, config).classifier
        seconds = time.perf_counter() - start
        points = wise_ft_sweep(zeroshot.eval(), tuned, test, shifted, ALPHAS)
        end = points[-1]
        best_mix = max(points[1:-1], key=lambda p: p.robustness)
        verdict = "beats both" if best_mix.robustness > max(points[0].robustness, end.robustness) else (
            "matches best" if best_mix.robustness >= max(points[0].robustness, end.robustness) else "below best")
        sweep = " ".join(f"{p.alpha:g}:{p.accuracy:.3f}/{p.robustness:.3f}" for p in points)
        rows.append((name, f"{end.accuracy:.4f}", f"{end.robustness:.4f}", f"{seconds:.0f}", f"{sweep} ({verdict})"))
    print_table(
        "digits fine-tuning, 360 held-out images (top-1 held-out / shifted copy)",
        rows,
        ("mode", "held-out", "shifted", "seconds", "WiSE-FT sweep alpha:held-out/shifted"),
    )


if __name__ == "__main__":
    main()
