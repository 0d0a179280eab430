"""`vlm finetune DATA --model M --mode ...` and `vlm eval classify DATA --model CLASSIFIER_DIR`."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

from vlm.files import atomic_write_text

from .config import PRECISIONS
from .finetune_config import HEAD_INITS, MODES

__all__ = ["FLAGS", "config_from_args", "finetune_main", "eval_classify_main"]

logger = logging.getLogger(__name__)

def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers, e.g. 0,0.5,1") from err


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",")]


# Every flag and the config key it sets: one table, so that flags and config files never disagree.
# A flag given on the command line beats the --config file; a KEY=VALUE override beats both.
FLAGS: tuple[tuple[str, str, dict], ...] = (
    ("--output", "output_dir", dict(help="directory the classifier, metrics.json, sweep.png and checkpoints go to")),
    ("--eval", "data.eval", dict(help="held-out data, any kind DATA can be (default: DATA/test)")),
    ("--split", "data.split", dict(help="training split of a Hugging Face dataset (default train)")),
    ("--eval-split", "data.eval_split", dict(help="held-out split of a Hugging Face dataset (default test)")),
    ("--image-column", "data.image_column", dict(help="image column of a table or a Hugging Face dataset")),
    ("--label-column", "data.label_column", dict(help="label column of a table or a Hugging Face dataset")),
    ("--class-names", "data.class_names", dict(type=_names, help="comma-separated class names, in order: names a "
     "table's integer labels 0, 1, ..., and orders string labels and class folders (an HF ClassLabel names its own)")),
    ("--image-size", "data.image_size", dict(type=int, help="train at this resolution (position embeddings are resampled)")),
    ("--unlocked-blocks", "model.unlocked_blocks", dict(type=int, help="train only the last N blocks of the tower")),
    ("--mode", "recipe.mode", dict(choices=MODES)),
    ("--lora-rank", "model.lora.rank", dict(type=int, help="--mode lora: adapter rank (default 8)")),
    ("--lora-alpha", "model.lora.alpha", dict(type=float, help="--mode lora: update scale alpha/rank (default 16)")),
    ("--lora-dropout", "model.lora.dropout", dict(type=float, help="--mode lora: dropout on the adapters' input")),
    ("--lora-blocks", "model.lora.blocks", dict(type=int, help="--mode lora: adapt the last N blocks (default all)")),
    ("--merge", "model.lora.merge", dict(action="store_true", help="--mode lora: also save the merged classifier")),
    ("--head-init", "recipe.head_init", dict(choices=HEAD_INITS)),
    ("--templates", "recipe.templates", dict(type=lambda t: [t], help="zero-shot head prompts: a set name or a file")),
    ("--epochs", "recipe.epochs", dict(type=int)),
    ("--batch-size", "recipe.batch_size", dict(type=int)),
    ("--label-smoothing", "recipe.label_smoothing", dict(type=float)),
    ("--ema-decay", "recipe.ema_decay", dict(type=float, help="keep and save a weight EMA, e.g. 0.999 (0 = off)")),
    ("--probe-steps", "recipe.probe_steps", dict(type=int)),
    ("--probe-lr", "recipe.probe_lr", dict(type=float)),
    ("--augment", "augment.affine", dict(action="store_true", help="random rotation, scale and shift of training images")),
    ("--mixup-alpha", "augment.mixup_alpha", dict(type=float, help="mixup Beta(alpha, alpha), e.g. 0.2 (0 = off)")),
    ("--cutmix-alpha", "augment.cutmix_alpha", dict(type=float, help="cutmix Beta(alpha, alpha), e.g. 1.0 (0 = off)")),
    ("--lr", "optim.lr", dict(type=float)),
    ("--weight-decay", "optim.weight_decay", dict(type=float)),
    ("--layer-decay", "optim.layer_decay", dict(type=float, help="per-block lr decay, e.g. 0.75 (1 = none)")),
    ("--wise-ft", "wise_ft.alpha", dict(type=float, help="save the WiSE-FT mix at this coefficient (default 1)")),
    ("--sweep", "wise_ft.sweep", dict(type=_floats, help="WiSE-FT coefficients to evaluate, e.g. 0,0.5,1")),
    ("--mixed-precision", "mixed_precision", dict(choices=PRECISIONS, help="auto: bf16/fp16 on GPU, fp32 on CPU")),
    ("--seed", "seed", dict(type=int)),
    ("--no-progress", "logging.progress", dict(action="store_false")),
)
# `--model` and `--pretrained` come from the shared `vlm.cli.args.add_model_argument`.
MODEL_FLAGS = {"model": "model.name", "pretrained": "model.pretrained"}


def _parser() -> argparse.ArgumentParser:
    from vlm.cli.args import add_model_argument

    p = argparse.ArgumentParser(
        prog="vlm finetune",
        description="Fine-tune the image tower on labelled images, sweep WiSE-FT, save the classifier. Rerunning "
        "with the same output resumes from its last epoch's checkpoint.",
        epilog="example: vlm finetune --config training/configs/digits_finetune.yaml recipe.epochs=5",
    )
    p.add_argument(
        "args", nargs="*", metavar="DATA | KEY=VALUE",
        help="training images (data.train): a folder with train/ and test/ class folders; or, with --eval, a class "
        "folder or a table (.csv/.tsv/.jsonl/.json/.parquet) of image paths and labels; or hf:DATASET "
        "(--split, --eval-split). Then dotted config overrides, e.g. optim.lr=3e-4",
    )  # fmt: skip
    p.add_argument("--config", default=None, help="a JSON or YAML file of fine-tuning config keys")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_model_argument(p)  # default None: not given
    for flag, key, kwargs in FLAGS:
        p.add_argument(flag, default=argparse.SUPPRESS, **kwargs)
    return p


def _set(data: dict, key: str, value) -> None:
    *sections, name = key.split(".")
    for section in sections:
        data = data.setdefault(section, {})
    data[name] = value


def config_from_args(args: argparse.Namespace):
    """The FinetuneConfig of --config, the flags given and the KEY=VALUE overrides, in that order."""
    from .config import apply_overrides, config_from_dict, read_config_file
    from .finetune_config import FinetuneConfig

    overrides = [a for a in args.args if re.fullmatch(r"[A-Za-z_][\w.]*=.*", a, re.DOTALL)]
    data_args = [a for a in args.args if a not in overrides]
    if len(data_args) > 1:
        raise ValueError(f"one DATA argument expected, got {data_args}; write overrides as KEY=VALUE")
    data = read_config_file(args.config) if args.config else {}
    given = {k: v for k, v in vars(args).items() if not (k in MODEL_FLAGS and v is None)}
    for dest, key in [*((f[2:].replace("-", "_"), k) for f, k, _ in FLAGS), *MODEL_FLAGS.items()]:
        if dest in given:
            _set(data, key, given[dest])
    if data_args:
        _set(data, "data.train", data_args[0])
    return config_from_dict(apply_overrides(data, overrides, FinetuneConfig), FinetuneConfig)


def finetune_main(argv: list[str]) -> int:
    """`vlm finetune`: runs `training.finetune_job.run_finetune` on the config the arguments give and
    prints the report (main process only under a multi-process launch). Returns 0."""
    from .config import config_to_dict
    from .finetune_job import run_finetune

    # Intermixed: DATA and KEY=VALUE may come before, between or after the flags.
    args = _parser().parse_intermixed_args(argv)
    config = config_from_args(args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
        return 0
    report = run_finetune(config)
    if report is not None:
        print(_summary(report.to_dict(), report.output_dir))
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
    from vlm.cli.args import add_source_arguments

    from .finetune_job import evaluate_saved_classifier

    p = argparse.ArgumentParser(prog="vlm eval classify", description="evaluate a fine-tuned classifier")
    p.add_argument("data", help="a class folder (DATA/<class>/<image>), a table of image paths and labels, or hf:DATASET")
    add_source_arguments(p, label=True, split="test")
    p.add_argument("--model", required=True, help="classifier directory written by `vlm finetune`")
    p.add_argument("--output", default=None, help="write the metrics as JSON here")
    p.add_argument("--seed", type=int, default=0, help="seed of the shifted copy")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    result = evaluate_saved_classifier(
        args.model, args.data, split=args.split, image_column=args.image_column, label_column=args.label_column,
        seed=args.seed, progress=not args.no_progress,
    )  # fmt: skip
    for name, prefix in (("test", ""), ("shifted", "shifted copy: ")):
        m = result.metrics[name]
        print(f"{prefix}top-1 {m.top1:.4f}  top-5 {m.top5:.4f}  mean per-class recall {m.mean_per_class_recall:.4f}")
    if result.failures.count:
        print(result.failures.summary(result.num_images + result.failures.count))
    if args.output:
        atomic_write_text(args.output, json.dumps({k: m.to_dict() for k, m in result.metrics.items()}, indent=2))
    return 0
