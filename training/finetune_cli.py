"""`vlm finetune DATA --model M --mode ...` and `vlm eval classify DATA --model CLASSIFIER_DIR`."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from vlm.files import atomic_write_text

__all__ = ["finetune_main", "eval_classify_main"]

logger = logging.getLogger(__name__)

DEFAULT_SWEEP = "0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1"


def _splits(args: argparse.Namespace) -> tuple[str, str]:
    """The training and held-out data specs: DATA and --eval, or DATA/train and DATA/test, or one HF
    dataset's --split and --eval-split."""
    data = str(args.data)
    if args.eval is not None:
        return data, args.eval
    if data.startswith("hf:"):
        return data, data
    root = Path(data)
    if (root / "train").is_dir() and (root / "test").is_dir():
        return str(root / "train"), str(root / "test")
    raise ValueError(
        f"{data} has no train/ and test/ subfolders; lay it out as {data}/{{train,test}}/<class>/<image>, "
        "or give the held-out data with --eval (a class folder, a table or hf:DATASET)"
    )


def _labelled(spec: str, split: str | None, args: argparse.Namespace, class_names=None):
    """The labelled images `spec` names; classes ordered by `class_names`, else by --class-names."""
    from vlm.evaluation import open_labelled

    names = class_names or ([n.strip() for n in args.class_names.split(",")] if args.class_names else None)
    return open_labelled(
        spec, split=split, image_column=args.image_column, label_column=args.label_column, class_names=names
    )


def _alphas(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError as err:
        raise ValueError(f"--sweep {text!r} is not a comma-separated list of numbers in [0, 1], e.g. {DEFAULT_SWEEP}") from err
    bad = [v for v in values if not 0 <= v <= 1]
    if bad:
        raise ValueError(f"--sweep has {bad[0]!r}, outside [0, 1]; WiSE-FT coefficients go from 0 (zero-shot) to 1")
    return values


def _parser() -> argparse.ArgumentParser:
    from vlm.cli import add_model_argument

    from .config import PRECISIONS
    from .finetune import HEAD_INITS, MODES

    p = argparse.ArgumentParser(prog="vlm finetune", description="fine-tune the image tower on labelled images")
    p.add_argument(
        "data",
        help="training images: a folder with train/ and test/ class folders; or, with --eval, a class folder or a "
        "table (.csv/.tsv/.jsonl/.json/.parquet) of image paths and labels; or hf:DATASET (--split, --eval-split)",
    )
    add_model_argument(p)
    p.add_argument("--eval", default=None, help="held-out data, any kind DATA can be (default: DATA/test)")
    p.add_argument("--split", default="train", help="training split of a Hugging Face dataset")
    p.add_argument("--eval-split", default="test", help="held-out split of a Hugging Face dataset")
    p.add_argument("--image-column", default="image", help="image column of a table or a Hugging Face dataset")
    p.add_argument("--label-column", default="label", help="label column of a table or a Hugging Face dataset")
    p.add_argument(
        "--class-names",
        default=None,
        help="comma-separated class names, in order: names a table's integer labels 0, 1, ..., and orders string "
        "labels and class folders (a Hugging Face dataset's ClassLabel names its own)",
    )
    p.add_argument("--output", required=True, help="directory the classifier, metrics.json and sweep.png go to")
    p.add_argument("--mode", choices=MODES, default="full")
    p.add_argument("--head-init", choices=HEAD_INITS, default="zeroshot")
    p.add_argument("--templates", default="simple", help="prompt templates for the zero-shot head: a set name or a file")
    p.add_argument("--image-size", type=int, default=None, help="train at this resolution (position embeddings are resampled)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--layer-decay", type=float, default=1.0, help="per-block lr decay, e.g. 0.75 (1 = none)")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.0, help="keep and save a weight EMA, e.g. 0.999 (0 = off)")
    p.add_argument("--mixup-alpha", type=float, default=0.0, help="mixup Beta(alpha, alpha), e.g. 0.2 (0 = off)")
    p.add_argument("--cutmix-alpha", type=float, default=0.0, help="cutmix Beta(alpha, alpha), e.g. 1.0 (0 = off)")
    p.add_argument("--augment", action="store_true", help="random rotation, scale and shift of training images")
    p.add_argument("--mixed-precision", choices=PRECISIONS, default="auto", help="auto: bf16/fp16 on GPU, fp32 on CPU")
    p.add_argument("--unlocked-blocks", type=int, default=None, help="train only the last N blocks")
    p.add_argument("--probe-steps", type=int, default=300)
    p.add_argument("--probe-lr", type=float, default=1e-2)
    p.add_argument("--wise-ft", type=float, default=None, help="save the WiSE-FT mix at this coefficient (default: 1)")
    p.add_argument("--sweep", default=DEFAULT_SWEEP, help="WiSE-FT coefficients to evaluate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    return p


def finetune_main(argv: list[str]) -> int:
    """`vlm finetune`: fine-tunes, sweeps WiSE-FT, and writes the chosen classifier, metrics.json and
    sweep.png to --output (on the main process only under a multi-process launch). Returns 0."""
    from vlm.cli import load_model_from_args

    from .distributed import rank
    from .finetune import FinetuneConfig, LoadedImages, evaluate_classifier, finetune, load_images, save_sweep_png
    from .finetune import ImageClassifier, shift_images, sweep_to_json, wise_ft, wise_ft_sweep, zeroshot_head

    args = _parser().parse_args(argv)
    train_spec, test_spec = _splits(args)
    alphas = _alphas(args.sweep)
    if args.wise_ft is not None and not 0 <= args.wise_ft <= 1:
        raise ValueError(f"--wise-ft {args.wise_ft!r} is outside [0, 1]; 0 = zero-shot weights, 1 = fine-tuned")
    config = FinetuneConfig(
        mode=args.mode, head_init=args.head_init, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        weight_decay=args.weight_decay, layer_decay=args.layer_decay, label_smoothing=args.label_smoothing,
        ema_decay=args.ema_decay, mixup_alpha=args.mixup_alpha, cutmix_alpha=args.cutmix_alpha, augment=args.augment,
        mixed_precision=args.mixed_precision, unlocked_blocks=args.unlocked_blocks, probe_steps=args.probe_steps,
        probe_lr=args.probe_lr, seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    model = load_model_from_args(args)
    progress = not args.no_progress
    size = args.image_size
    train = load_images(_labelled(train_spec, args.split, args), model.config, image_size=size, progress=progress)
    # The held-out data takes the training classes' order (a table may lack a class, or list them otherwise).
    held_out = _labelled(test_spec, args.eval_split, args, class_names=train.class_names)
    test = load_images(held_out, model.config, image_size=size, progress=progress)
    if test.class_names != train.class_names:
        raise ValueError(
            f"the held-out data {test_spec} has classes {list(test.class_names)} and the training data {train_spec} "
            f"has {list(train.class_names)}; use data with the same classes"
        )
    shifted = LoadedImages(shift_images(test.images, seed=args.seed), test.labels, test.class_names)

    zeroshot = ImageClassifier.from_clip(model, train.class_names)
    zeroshot.head.load_state_dict(zeroshot_head(model, train.class_names, args.templates).state_dict())
    output = Path(args.output)
    # Rerunning the same command after a kill resumes from the last epoch's checkpoint.
    tuned = finetune(model, train, config, templates=args.templates, checkpoint_dir=output / "checkpoint").classifier
    if rank() != 0:
        return 0  # under a multi-process launch, the main process evaluates and writes
    points = wise_ft_sweep(zeroshot.eval(), tuned, test, shifted, alphas)
    alpha = 1.0 if args.wise_ft is None else args.wise_ft
    chosen = wise_ft(zeroshot, tuned, alpha)
    chosen.image_size = size or chosen.image_size

    chosen.save_pretrained(output)
    save_sweep_png(points, output / "sweep.png")
    report = {
        "mode": args.mode,
        "wise_ft": alpha,
        "zeroshot": {"test": evaluate_classifier(zeroshot, test).to_dict(), "shifted": evaluate_classifier(zeroshot, shifted).to_dict()},
        "finetuned": {"test": evaluate_classifier(chosen, test).to_dict(), "shifted": evaluate_classifier(chosen, shifted).to_dict()},
        "sweep": sweep_to_json(points),
        "skipped_images": train.failures.count + test.failures.count,
    }
    atomic_write_text(output / "metrics.json", json.dumps(report, indent=2))
    print(_summary(report, output))
    return 0


def _summary(report: dict, output: Path) -> str:
    lines = [f"{'':<10} {'top-1':>7} {'top-5':>7} {'recall':>7} {'shifted':>8}"]
    for name in ("zeroshot", "finetuned"):
        t, s = report[name]["test"], report[name]["shifted"]
        lines.append(f"{name:<10} {t['top1']:7.4f} {t['top5']:7.4f} {t['mean_per_class_recall']:7.4f} {s['top1']:8.4f}")
    lines.append("WiSE-FT sweep (alpha: top-1 / shifted): " + ", ".join(
        f"{p['alpha']:g}: {p['accuracy']:.4f}/{p['robustness']:.4f}" for p in report["sweep"]
    ))  # fmt: skip
    if report["skipped_images"]:
        lines.append(f"{report['skipped_images']} unreadable image(s) skipped")
    lines.append(f"classifier (WiSE-FT {report['wise_ft']:g}) saved to {output}")
    return "\n".join(lines)


def eval_classify_main(argv: list[str]) -> int:
    """`vlm eval classify`: top-1, top-5 and mean per-class recall of a saved classifier on labelled
    images and on their shifted copy; prints them (and writes JSON with --output). Returns 0."""
    from vlm.evaluation import open_labelled

    from .finetune import ImageClassifier, LoadedImages, evaluate_classifier, load_images, shift_images

    p = argparse.ArgumentParser(prog="vlm eval classify", description="evaluate a fine-tuned classifier")
    p.add_argument("data", help="a class folder (DATA/<class>/<image>), a table of image paths and labels, or hf:DATASET")
    p.add_argument("--split", default="test", help="split of a Hugging Face dataset")
    p.add_argument("--image-column", default="image", help="image column of a table or a Hugging Face dataset")
    p.add_argument("--label-column", default="label", help="label column of a table or a Hugging Face dataset")
    p.add_argument("--model", required=True, help="classifier directory written by `vlm finetune`")
    p.add_argument("--output", default=None, help="write the metrics as JSON here")
    p.add_argument("--seed", type=int, default=0, help="seed of the shifted copy")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    classifier = ImageClassifier.from_pretrained(args.model)
    # A table's integer labels index the classifier's classes; its string labels are matched to them.
    labelled = open_labelled(
        args.data, split=args.split, image_column=args.image_column, label_column=args.label_column,
        class_names=classifier.class_names,
    )  # fmt: skip
    data = load_images(labelled, classifier.clip_config, image_size=classifier.image_size, progress=not args.no_progress)
    shifted = LoadedImages(shift_images(data.images, seed=args.seed), data.labels, data.class_names)
    report = {"test": evaluate_classifier(classifier, data).to_dict(), "shifted": evaluate_classifier(classifier, shifted).to_dict()}
    t, s = report["test"], report["shifted"]
    print(f"top-1 {t['top1']:.4f}  top-5 {t['top5']:.4f}  mean per-class recall {t['mean_per_class_recall']:.4f}")
    print(f"shifted copy: top-1 {s['top1']:.4f}  top-5 {s['top5']:.4f}  mean per-class recall {s['mean_per_class_recall']:.4f}")
    if data.failures.count:
        print(data.failures.summary(len(data) + data.failures.count))
    if args.output:
        atomic_write_text(args.output, json.dumps(report, indent=2))
    return 0
