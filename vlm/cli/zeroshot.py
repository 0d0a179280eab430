"""The zero-shot verbs: `vlm classify`, `vlm eval zeroshot` and `vlm explain`.

Labels (`--labels-file`): one class a line, ``name`` or ``name: alias1 | alias2`` (each alias is filled
into the templates instead of the name; list the name among the aliases to keep it), ``#`` comments.
A ``.json`` file holds a list of names or a mapping ``{"name": ["alias", ...]}`` or
``{"name": {"prompts": ["a full prompt", ...]}}`` (prompts used as written, without templates).
Templates (`--templates`): ``imagenet80`` (OpenAI's 80 ImageNet prompts), ``simple`` (7 of them), or a
file with one format string a line using ``{}`` or ``{c}`` for the class name.
Images: files, folders (searched recursively), ``--list FILE`` (one path a line, relative to the list's
folder), a table (.csv/.tsv/.jsonl/.json/.parquet, image paths relative to the table's folder), or a
Hugging Face dataset: ``hf:DIR_OR_NAME`` (a `save_to_disk` directory, or anything `datasets.load_dataset`
takes). Columns not named with --image-column/--label-column are found by their usual names.
Labels of a table or dataset (`vlm eval zeroshot`) follow `vlm.data.labels`' rule.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .args import add_model_argument, add_source_arguments, add_text_overflow_argument, load_model_from_args
from .args import text_overflow_from_args

__all__ = ["classify_main", "eval_zeroshot_main", "explain_main"]

def _add_classifier_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument("--labels", help='comma-separated class names, e.g. "cat,dog,car"')
    group.add_argument("--labels-file", help="a file of class names (see the format above)")
    group.add_argument("--classifier", help="a classifier saved with --save-classifier (built with the same model)")
    parser.add_argument(
        "--templates", default="imagenet80", help="imagenet80 (default), simple, or a FILE of templates"
    )
    parser.add_argument("--save-classifier", metavar="DIR", help="also save the classifier built here to DIR")
    add_text_overflow_argument(parser)


def _add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes decoding images")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def _classifier_from_args(args: argparse.Namespace, model: Any, default_classes: Any = None) -> Any:
    from vlm.zeroshot import ZeroShotClassifier, build_classifier, parse_labels, read_labels_file

    if args.classifier:
        return ZeroShotClassifier.load(args.classifier, model)
    if args.labels is not None:
        classes = parse_labels(args.labels)
    elif args.labels_file:
        classes = read_labels_file(args.labels_file)
    else:
        classes = default_classes
    with text_overflow_from_args(args):
        classifier = build_classifier(model, classes, args.templates, progress=not args.no_progress)
    if args.save_classifier:
        print(f"classifier saved to {classifier.save(args.save_classifier)}", file=sys.stderr)
    return classifier


def _collection(args: argparse.Namespace) -> Any:
    from vlm.data import open_images

    inputs = [*args.images, *([args.list] if args.list else [])]
    if not inputs:
        raise ValueError("no images given; name image files, folders, a table or hf:DATASET, or --list FILE")
    images = open_images(inputs, split=args.split, image_column=args.image_column)
    if not len(images):
        raise ValueError(f"no image files found in {', '.join(inputs)}; give image files or folders of images")
    return images


def _report_failures(failures: list, total: int) -> None:
    if failures:
        print(f"skipped {len(failures)} of {total} images (unreadable):", file=sys.stderr)
        for failure in failures:
            print(f"  {failure.source}: {failure.reason}", file=sys.stderr)


def _scoring_note(classifier) -> str:
    if classifier.sigmoid:
        return (
            "scores: sigmoid(scale * cosine + bias) for each label on its own (a sigmoid-loss model such as "
            "SigLIP); they do not sum to 1"
        )
    return "scores: softmax over the labels (a contrastive model); they sum to 1"


def classify_main(argv: list[str]) -> int:
    """`vlm classify`: prints the top-k labels of each image, reports unreadable images on stderr.

    Returns 0; ValueError when no image could be read.
    """
    from vlm.classify import OUTPUT_FORMATS

    parser = argparse.ArgumentParser(
        prog="vlm classify",
        description="Zero-shot classify images with text labels.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("images", nargs="*", help="image files, folders, a table, a list file, or hf:DATASET")
    parser.add_argument("--list", help="a file with one image path a line (relative paths: from its folder)")
    _add_classifier_arguments(parser, required=True)
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--format", choices=OUTPUT_FORMATS, default="table")
    _add_run_arguments(parser)
    add_source_arguments(parser)
    args = parser.parse_args(argv)
    from vlm.classify import classify_images, format_predictions

    images = _collection(args)
    model = load_model_from_args(args)
    classifier = _classifier_from_args(args, model)
    # The classifier was just built with this model, or loaded with the check against it.
    result = classify_images(
        model,
        classifier,
        images,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=not args.no_progress,
        check_model=False,
    )
    predictions = result.top_k(args.top_k)
    if predictions:
        print(format_predictions(predictions, args.format))
        print(_scoring_note(classifier), file=sys.stderr)
    _report_failures(result.failures, len(images))
    if not predictions:
        raise ValueError(f"none of the {len(images)} images could be read")
    return 0


def eval_zeroshot_main(argv: list[str]) -> int:
    """`vlm eval zeroshot`: zero-shot accuracy (and a linear probe) on labelled images; prints a summary
    and writes results.json and confusion-matrix PNGs under `--out`. Returns 0."""
    parser = argparse.ArgumentParser(
        prog="vlm eval zeroshot",
        description="Zero-shot accuracy on labelled images (a folder with one subfolder per class, a table of image "
        "paths and labels, or hf:DATASET), "
        "beside a linear probe on the same image features. Without labels, the classes are the data's own names.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("data", help="a folder of class subfolders, a table (.csv/.tsv/.jsonl/.json/.parquet), or hf:DATASET")
    _add_classifier_arguments(parser, required=False)
    parser.add_argument("--out", default="runs/eval-zeroshot", help="folder for results.json and the confusion PNGs")
    parser.add_argument("--train", help="training data for the linear probe (else it is cross-validated on DATA)")
    parser.add_argument("--train-split", default=None, help="split of --train when it is a Hugging Face dataset")
    parser.add_argument("--no-probe", action="store_true", help="skip the linear probe")
    parser.add_argument(
        "--probe-c", type=float, default=None, help="the probe's C (default: chosen by cross-validation)"
    )
    _add_run_arguments(parser)
    add_source_arguments(parser, label=True)
    args = parser.parse_args(argv)
    from vlm.evaluation import evaluate_zeroshot

    model = load_model_from_args(args)
    classifier = None
    if args.classifier or args.labels is not None or args.labels_file:
        classifier = _classifier_from_args(args, model)
    # A table's integer labels number the classifier's classes; its string labels are matched by name.
    names = list(classifier.class_names) if classifier is not None else None
    data = _labelled(args.data, args.split, args, names)
    train = _labelled(args.train, args.train_split, args, names) if args.train and not args.no_probe else None
    if classifier is None:
        classifier = _classifier_from_args(args, model, default_classes=list(data.class_names))
    evaluation = evaluate_zeroshot(
        model,
        classifier,
        data,
        probe=not args.no_probe,
        probe_train=train,
        probe_C=args.probe_c,
        batch_size=args.batch_size,
        num_workers=args.workers,
        progress=not args.no_progress,
        check_model=False,  # built here with this model, or loaded with the check
    )
    written = evaluation.save(args.out)
    _report_failures(evaluation.failures, len(data.images) + (len(train.images) if train else 0))
    print(evaluation.summary())
    print("written: " + ", ".join(map(str, written)))
    return 0


def _labelled(spec: str, split: str | None, args: argparse.Namespace, table_classes: list[str] | None = None) -> Any:
    from vlm.data import is_table, open_labelled

    # Only a table takes the classifier's names: a folder or dataset names its own classes, which may
    # be a subset of the classifier's.
    names = table_classes if is_table(spec) else None
    return open_labelled(spec, split=split, image_column=args.image_column, label_column=args.label_column, class_names=names)


def explain_main(argv: list[str]) -> int:
    """`vlm explain`: draws the attention rollout and per-prompt relevance maps of one image into the
    `--out` PNG and prints each map's cosine similarity. Returns 0."""
    parser = argparse.ArgumentParser(
        prog="vlm explain",
        description="Attention rollout of the image tower and, for each --text, the patches that raise the "
        "image's similarity to it (Chefer et al. 2021), drawn over the image as a PNG.",
    )
    parser.add_argument("image", help="an image file")
    parser.add_argument("--text", action="append", default=[], help="a prompt to explain the score of (repeatable)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    add_model_argument(parser)
    args = parser.parse_args(argv)
    from vlm.explain import explain_image

    model = load_model_from_args(args)
    maps = explain_image(model, args.image, args.text, args.out)
    for heatmap in maps:
        score = "" if heatmap.score is None else f"  cosine {heatmap.score:.4f}"
        print(f"{heatmap.title}{score}")
    print(f"written: {args.out}")
    return 0
