"""The main job (`make demo`, `vlm demo`): the whole library on real data, with nothing downloaded, in minutes.

1. Trains a small CLIP from scratch on scikit-learn's handwritten digits turned into image-caption
   pairs (`training/configs/digits.yaml`), with its progress bar and loss curves.
2. Zero-shot classifies the held-out digits with prompts that never appear in the training captions,
   beside a linear probe on the same frozen features.
3. Fine-tunes the image tower (LP-FT) and mixes it with the zero-shot weights (WiSE-FT), on the
   held-out split and on a shifted copy of it (rotated, blurred, noisy, rescaled)
   (`training/configs/digits_finetune.yaml`, run by the job `vlm finetune` runs).
4. Builds a search index of the held-out images and answers text and image queries.
5. Writes a self-contained HTML report (curves, confusion matrices, attention maps, search results),
   and makes the trained model the default for `vlm classify`, `vlm search` and `vlm serve`.

Everything goes under ``--output`` (default ``runs/demo``); a rerun continues the finished training
run instead of repeating it. ``--quick`` is the reduced run the tests use (60 training steps and 2
fine-tuning epochs: about 35 s against about 80 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vlm.checkpoint import load

from .report import Figure, Grid, Section, Table, Tile, write_report
from .sample_data import DIGIT_NAMES, DigitsData, write_digits

__all__ = ["DemoOptions", "DemoResult", "run_demo", "main"]

logger = logging.getLogger(__name__)

TEXT_QUERIES = ("a handwritten seven", "the number zero", "a drawing of the digit 4")


@dataclass(frozen=True)
class DemoOptions:
    """Where the demo writes, and how much of it runs."""

    output: Path = Path("runs/demo")
    quick: bool = False  # 60 training steps and 2 fine-tuning epochs instead of 120 and 20: for tests
    set_default: bool = True  # make the trained model the default of the other commands
    progress: bool = True


@dataclass
class DemoResult:
    """What the demo measured (accuracies are top-1 fractions on the 360 held-out digits) and wrote."""

    model_dir: Path
    classifier_dir: Path
    index_dir: Path
    report: Path
    zeroshot_top1: float = 0.0
    linear_probe_top1: float = 0.0
    zeroshot_shifted_top1: float = 0.0
    finetuned_top1: float = 0.0
    finetuned_shifted_top1: float = 0.0
    wise_ft: list[dict] = field(default_factory=list)  # {alpha, accuracy, robustness} per coefficient
    text_precision_at_5: float = 0.0  # share of the text queries' top 5 that show the asked digit
    seconds: dict[str, float] = field(default_factory=dict)  # per stage

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def run_demo(options: DemoOptions = DemoOptions()) -> DemoResult:
    """Runs the five stages (see the module docstring), prints what each measured, writes the report and
    `demo.json` under `options.output`, and returns the figures."""
    out = Path(options.output)
    clock = _Clock()
    _banner("data", "scikit-learn's 1,797 handwritten digits, as PNG files and caption tables")
    data = write_digits(out / "data")
    print(f"{len(data.train.paths)} training and {len(data.test.paths)} held-out images under {data.root}")

    _banner("1/5 train", "a small CLIP from scratch on image-caption pairs")
    run = clock.time("train", _train, data, out, options)
    model = load(run.model_dir).eval()
    result = DemoResult(run.model_dir, out / "classifier", out / "index", out / "report" / "index.html")
    sections = [_training_section(run)]

    _banner("2/5 zero-shot", "prompts never seen in training, beside a linear probe")
    sections.append(clock.time("zeroshot", _zeroshot, model, data, out, run.templates, result))

    _banner("3/5 fine-tune", "LP-FT of the image tower, then WiSE-FT")
    sections.append(clock.time("finetune", _finetune, data, out, run.templates, result, options))

    _banner("4/5 search", "an index of the held-out images, queried by text and by image")
    sections.append(clock.time("search", _search, model, data, result))

    _banner("5/5 report", "curves, confusion matrices, attention maps, search results")
    sections.append(clock.time("explain", _explain, model, data, out))
    result.seconds = clock.seconds
    sections.append(_next_steps_section(result, data))
    write_report(
        result.report.parent,
        "vlm demo: handwritten digits",
        sections,
        subtitle=f"{'quick run, ' if options.quick else ''}{sum(clock.seconds.values()):.0f} s in all",
    )
    (out / "demo.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    if options.set_default:
        from vlm.defaults import set_default_model

        set_default_model(run.model_dir)
    _print_summary(result, data, options)
    return result


# ---- stages -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _TrainRun:
    model_dir: Path
    run_dir: Path
    templates: tuple[str, ...]  # the held-out prompts of the config's zero-shot evaluation
    steps: int
    metrics: dict[str, float]


def _train(data: DigitsData, out: Path, options: DemoOptions) -> _TrainRun:
    import training
    from training.config import load_config
    from training.loop import train

    overrides = [
        f"output_dir={out / 'train'}",
        f"data.train={data.train.table}",
        f"data.eval={data.test.table}",
        f"eval.zeroshot={data.test.table}",
        f"logging.progress={str(options.progress).lower()}",
    ]
    if options.quick:
        overrides += ["schedule.steps=60", "schedule.warmup_steps=6", "eval.every=30", "checkpoint.every=30"]
    config = load_config(Path(training.__file__).parent / "configs" / "digits.yaml", overrides)
    result = train(config)
    print(f"trained {result.step} steps in {result.seconds:.0f} s; final loss {result.loss:.3f}; model in {result.model_dir}")
    return _TrainRun(result.model_dir, result.run_dir, tuple(config.eval.templates), result.step, result.metrics)


def _labelled(split) -> Any:
    """A split with the classes in digit order (zero..nine), not the folders' alphabetical order."""
    from vlm.data import ImageCollection
    from vlm.data import LabelledImages

    paths = [str(p) for p in split.paths]
    return LabelledImages(ImageCollection(paths, paths), tuple(split.labels), DIGIT_NAMES)


def _zeroshot(model, data: DigitsData, out: Path, templates: tuple[str, ...], result: DemoResult) -> Section:
    from vlm.evaluation import evaluate_zeroshot
    from vlm.zeroshot import build_classifier

    classifier = build_classifier(model, list(DIGIT_NAMES), list(templates))
    evaluation = evaluate_zeroshot(
        model, classifier, _labelled(data.test), probe_train=_labelled(data.train), progress=False
    )
    files = evaluation.save(out / "zeroshot")
    result.zeroshot_top1 = evaluation.zeroshot.top1
    result.linear_probe_top1 = evaluation.linear_probe.metrics.top1
    print(evaluation.summary())
    return Section(
        "Zero-shot classification",
        "The classifier is built from class names and prompts that never appear in the training captions; "
        "the linear probe is a logistic regression on the same frozen image features, fitted on the training split.",
        figures=[Figure(files[1], "zero-shot confusion matrix"), Figure(files[2], "linear-probe confusion matrix")],
        tables=[
            Table(["prompts"], [[t] for t in templates]),
            Table(
                ["method", "top-1", "top-5", "mean per-class recall"],
                [
                    ["zero-shot", *_metric_cells(evaluation.zeroshot)],
                    ["linear probe", *_metric_cells(evaluation.linear_probe.metrics)],
                ],
            ),
        ],
    )


def _finetune(data: DigitsData, out: Path, templates: tuple[str, ...], result: DemoResult, options: DemoOptions) -> Section:
    import shutil

    import training
    from training.finetune_config import load_finetune_config
    from training.finetune_job import run_finetune
    from vlm.evaluation import save_confusion_png

    overrides = [
        f"output_dir={result.classifier_dir}",
        f"model.name={result.model_dir}",
        f"data.train={data.train.table}",
        f"data.eval={data.test.table}",
        f"recipe.templates={json.dumps(list(templates))}",
        f"logging.progress={str(options.progress).lower()}",
    ]
    if options.quick:
        overrides += ["recipe.epochs=2", "recipe.probe_steps=100"]
    config = load_finetune_config(Path(training.__file__).parent / "configs" / "digits_finetune.yaml", overrides)
    # A rerun fine-tunes again (a minute) rather than resume checkpoints of other settings (--quick).
    shutil.rmtree(result.classifier_dir / "checkpoints", ignore_errors=True)
    report = run_finetune(config)
    points = report.sweep
    result.wise_ft = [asdict(p) for p in points]
    result.zeroshot_shifted_top1 = points[0].robustness
    result.finetuned_top1, result.finetuned_shifted_top1 = points[-1].accuracy, points[-1].robustness

    chosen = config.wise_ft.alpha
    print(f"{'WiSE-FT alpha':<16} {'held-out':>9} {'shifted':>9}")
    for p in points:
        name = {0.0: " (zero-shot)", 1.0: " (fine-tuned)", chosen: " (saved)"}.get(p.alpha, "")
        print(f"{p.alpha:<4g}{name:<12} {p.accuracy:9.4f} {p.robustness:9.4f}")
    print(f"classifier (WiSE-FT {chosen:g}) saved to {result.classifier_dir}")
    confusion = _mkdir(out / "finetune") / "confusion.png"
    save_confusion_png(report.finetuned["test"].confusion, DIGIT_NAMES, confusion, f"WiSE-FT {chosen:g}")
    recipe = config.recipe
    return Section(
        "Fine-tuning: LP-FT and WiSE-FT",
        f"A linear probe first, then the whole image tower ({recipe.epochs} epochs, layer decay {config.optim.layer_decay}, "
        "label smoothing, random rotation/scale/shift). WiSE-FT mixes the zero-shot and fine-tuned weights; "
        "'shifted' is a copy of the held-out split with every image rotated, blurred, noised or shrunk.",
        figures=[
            Figure(report.output_dir / "sweep.png", "accuracy vs robustness per mixing coefficient"),
            Figure(confusion, "saved classifier"),
        ],
        tables=[Table(["WiSE-FT alpha", "held-out top-1", "shifted top-1"], [[p.alpha, _pct(p.accuracy), _pct(p.robustness)] for p in points])],
    )


def _search(model, data: DigitsData, result: DemoResult) -> Section:
    from retrieval.build import BuildOptions, build_index
    from retrieval.embedding_job import EmbedOptions
    from retrieval.search import SearchIndex

    report = build_index(
        data.test.table, result.index_dir, model, overwrite=True, model_source=str(result.model_dir),
        options=BuildOptions(embed=EmbedOptions(progress=False)),
    )  # fmt: skip
    print(f"index of {report.count} held-out images in {result.index_dir} ({report.spec.kind if report.spec else 'flat'})")
    index = SearchIndex.open(result.index_dir, model=model)
    grids, right = [], 0
    for query in TEXT_QUERIES:
        hits = index.search_text(query, k=8)[0]
        wanted = _digit_in(query)
        right += sum(_class_of(h.path) == wanted for h in hits[:5])
        grids.append(_hits_grid(f'"{query}"', hits, wanted))
        print(f'"{query}": ' + _hit_list(hits[:5]))
    result.text_precision_at_5 = right / (5 * len(TEXT_QUERIES))
    probe = data.test.paths[_first_of(data, 4)]
    hits = index.search_image(str(probe), k=8)[0]
    print(f"image {Path(_class_of(str(probe))) / probe.name}: " + _hit_list(hits[:5]))
    grids.append(Grid("query", [Tile(probe, "the query image", _class_of(str(probe)))]))
    grids.append(_hits_grid("its nearest held-out images (the first is itself)", hits, _class_of(str(probe))))
    return Section(
        "Search",
        f"An index of the {report.count} held-out images, queried by text and by image. A green frame marks the "
        f"asked-for digit; {result.text_precision_at_5:.0%} of the text queries' top 5 results show it.",
        grids=grids,
    )


def _explain(model, data: DigitsData, out: Path) -> Section:
    from vlm.explain import explain_image

    figures = []
    for digit in (2, 7):
        path = data.test.paths[_first_of(data, digit)]
        target = out / "explain" / f"{DIGIT_NAMES[digit]}.png"
        explain_image(model, path, [f"a photo of the number {DIGIT_NAMES[digit]}."], target)
        figures.append(Figure(target, f"held-out {DIGIT_NAMES[digit]}: attention rollout, and the patches behind its match to the prompt"))
    return Section(
        "What the image tower looks at",
        "Attention rollout over the image tower's blocks, and the relevance of each patch to the image's "
        "similarity with the prompt (Chefer et al. 2021). Each patch covers 8x8 of the 32x32 pixels.",
        figures=figures,
    )


def _training_section(run: _TrainRun) -> Section:
    figures = [Figure(run.run_dir / "curves.png", "training curves")] if (run.run_dir / "curves.png").is_file() else []
    rows = [[k, round(v, 4)] for k, v in run.metrics.items()]
    return Section(
        "Training",
        f"A small CLIP trained from scratch for {run.steps} steps on image-caption pairs; the metrics are the "
        "final evaluation on the held-out split.",
        figures=figures,
        tables=[Table(["metric", "value"], rows)] if rows else [],
    )


def _next_steps_section(result: DemoResult, data: DigitsData) -> Section:
    example = data.test.paths[_first_of(data, 7)]
    labels = ",".join(DIGIT_NAMES)
    return Section(
        "Keep using it",
        "The trained model is the default of the other commands until you name another one.",
        tables=[Table(["stage", "seconds"], [[k, round(v, 1)] for k, v in result.seconds.items()])],
        code="\n".join(
            [
                f"vlm serve {result.index_dir}            # then open http://127.0.0.1:8000",
                f'vlm search {result.index_dir} --text "a handwritten three"',
                f'vlm classify {example} --labels "{labels}"',
                f"vlm eval classify {data.root / 'test'} --model {result.classifier_dir}",
            ]
        ),
    )


# ---- helpers ------------------------------------------------------------------------------------------
class _Clock:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def time(self, name: str, fn, *args):
        start = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.seconds[name] = time.perf_counter() - start


def _banner(stage: str, what: str) -> None:
    print(f"\n=== {stage}: {what}", flush=True)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _pct(value: float) -> str:
    return f"{100 * value:.2f}%"


def _metric_cells(metrics) -> list[str]:
    return [_pct(metrics.top1), _pct(metrics.top5), _pct(metrics.mean_per_class_recall)]


def _class_of(path: str) -> str:
    return Path(path).parent.name


def _digit_in(query: str) -> str:
    words = query.replace(".", " ").split()
    for name in DIGIT_NAMES:
        if name in words or str(DIGIT_NAMES.index(name)) in words:
            return name
    raise ValueError(f"the demo query {query!r} names no digit")


def _first_of(data: DigitsData, digit: int) -> int:
    return data.test.labels.index(digit)


def _hits_grid(title: str, hits, wanted: str) -> Grid:
    return Grid(title, [Tile(Path(h.path), _class_of(h.path), f"{h.score:.3f}", _class_of(h.path) == wanted) for h in hits])


def _hit_list(hits) -> str:
    """Search hits as "seven/0081.png 0.74, ..." (class folder and file, cosine score)."""
    return ", ".join(f"{Path(_class_of(h.path)) / Path(h.path).name} {h.score:.2f}" for h in hits)


def _vlm_command() -> str:
    """`vlm` as the user can type it: the repo's .venv script when that is the running environment."""
    venv = Path(sys.prefix).resolve()
    if venv == (Path.cwd() / ".venv").resolve():
        return ".venv/bin/vlm"
    return "vlm"


def _print_summary(result: DemoResult, data: DigitsData, options: DemoOptions) -> None:
    vlm_cmd = _vlm_command()
    best_shifted = max(result.wise_ft, key=lambda p: p["robustness"]) if result.wise_ft else None
    print("\n=== results")
    print(f"zero-shot top-1      {result.zeroshot_top1:.4f}   (shifted copy {result.zeroshot_shifted_top1:.4f})")
    print(f"linear probe top-1   {result.linear_probe_top1:.4f}")
    print(f"fine-tuned top-1     {result.finetuned_top1:.4f}   (shifted copy {result.finetuned_shifted_top1:.4f})")
    if best_shifted is not None:
        print(
            f"most robust WiSE-FT  alpha {best_shifted['alpha']:g}: {best_shifted['accuracy']:.4f} "
            f"(shifted copy {best_shifted['robustness']:.4f})"
        )
    print(f"text search          {result.text_precision_at_5:.0%} of the top 5 show the asked digit")
    print("time                 " + ", ".join(f"{k} {v:.0f} s" for k, v in result.seconds.items()))
    print(f"\nreport: {result.report.resolve()}")
    print(f"serve the index in a browser: {vlm_cmd} serve {result.index_dir}   (then open http://127.0.0.1:8000)")
    if options.set_default:
        example = data.test.paths[_first_of(data, 7)]
        print(f"the trained model is now the default: {vlm_cmd} classify {example} --labels \"{','.join(DIGIT_NAMES)}\"")


def main(argv: list[str] | None = None) -> int:
    """`vlm demo [--output DIR] [--quick] [--no-default] [--no-progress]`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="vlm demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=DemoOptions.output, help="where everything goes (default runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a reduced run: 60 training steps, 2 fine-tuning epochs")
    parser.add_argument("--no-default", action="store_true", help="do not make the trained model the default")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it tried is noise here
    start = time.perf_counter()
    run_demo(DemoOptions(args.output, args.quick, not args.no_default, not args.no_progress))
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
