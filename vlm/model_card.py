"""Model cards: the ``README.md`` every saved model directory carries, ready to push to a model hub.

The card opens with YAML front matter in the form the Hugging Face hub reads (library_name, pipeline_tag,
tags, license, datasets, base_model, and a model-index with the measured metrics), followed by what the
model is (from its config), how to open the directory with the tool its format is for, the config, the
training run and the metrics. Nothing is invented: a section without data is left out, and a model with
no recorded evaluation says so.

The card also embeds its `ModelCard` as JSON in an HTML comment (invisible once rendered), so
`read_model_card` gets back exactly what was written: a model loaded from a directory carries its card
(`model.card`) into the next format it is saved in. Hand edits of the front matter's license, datasets
and base_model win over the embedded copy; a README that vlm did not write gives those three fields only.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .config import CLIPConfig
from .files import atomic_write_text

__all__ = [
    "CARD_NAME",
    "CLASSIFICATION",
    "FORMATS",
    "RETRIEVAL",
    "ZERO_SHOT",
    "ModelCard",
    "card_for_run",
    "front_matter",
    "read_model_card",
    "write_model_card",
]

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
FORMATS = ("vlm", "transformers", "open_clip", "onnx")
ZERO_SHOT = "zero-shot-image-classification"
# The hub has no task id for image-text retrieval; this one names it the way evaluation leaderboards do.
RETRIEVAL = "image-text-retrieval"
CLASSIFICATION = "image-classification"
_DATA_OPEN, _DATA_CLOSE = "<!-- vlm-model-card ", " -->"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class ModelCard:
    """What a model's card says beyond its architecture (which comes from the model itself).

    `datasets` and `base_model` go into the front matter as they are: give hub ids (``"owner/name"``)
    there; local paths belong in `training`. `metrics` are fractions keyed like the trainer's evaluation
    (``zeroshot_top1``, ``image_to_text_R@1``, ``top1``); only measured, finite figures.
    """

    license: str | None = None
    datasets: tuple[str, ...] = ()
    metrics: Mapping[str, float] = field(default_factory=dict)
    training: Mapping[str, Any] = field(default_factory=dict)  # the run: data, steps, batch size, lr, seed...
    base_model: str | None = None
    # What the metrics were measured on, per task (ZERO_SHOT, RETRIEVAL, CLASSIFICATION): a data spec.
    eval_data: Mapping[str, str] = field(default_factory=dict)
    name: str | None = None  # the card's title and model-index name; default: the directory's name

    def __post_init__(self) -> None:
        if isinstance(self.datasets, str):
            raise TypeError(f"ModelCard.datasets must be a sequence of names, got the string {self.datasets!r}")
        object.__setattr__(self, "datasets", tuple(str(d) for d in self.datasets))
        metrics = {}
        for key, value in dict(self.metrics).items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(
                    f"ModelCard.metrics[{key!r}] is {value!r}; a card lists measured, finite numbers only: "
                    "leave the metric out"
                )
            metrics[str(key)] = float(value)
        object.__setattr__(self, "metrics", metrics)
        object.__setattr__(self, "eval_data", {str(k): str(v) for k, v in dict(self.eval_data).items()})
        try:  # the card must survive its JSON copy unchanged (tuples become lists now, not after a reload)
            training = json.loads(json.dumps(dict(self.training), allow_nan=False))
        except (TypeError, ValueError) as err:
            raise ValueError(f"ModelCard.training must hold JSON values (numbers, strings, lists): {err}") from err
        object.__setattr__(self, "training", training)


def card_for_run(
    *,
    data: str,
    eval_data: Mapping[str, str | None] | None = None,
    metrics: Mapping[str, float] | None = None,
    base_model: str | None = None,
    name: str | None = None,
    **summary: Any,
) -> ModelCard:
    """The card of a model a run trained on `data` (a data spec: table, folder, tar shards, ``hf:NAME``)
    and measured on `eval_data` (task -> data spec; tasks without a metric are dropped): hub dataset ids in
    `datasets` (``hf:owner/name`` specs only; local data stays named in `training`), non-finite metrics
    left out, `summary` (steps, batch_size, lr, seed...) kept in `training`. `base_model` (what the run
    started from) reaches the front matter when it is a hub id, else `training` names it."""
    kept = {k: float(v) for k, v in (metrics or {}).items() if math.isfinite(v)}
    measured = {_metric_kind(k, ZERO_SHOT)[0] for k in kept}
    evaluated = {task: spec for task, spec in (eval_data or {}).items() if spec and task in measured}
    training = {"data": data, **summary}
    if base_model and not _hub_id(base_model):
        training["initialised_from"], base_model = base_model, None
    datasets = tuple(dict.fromkeys(d for d in map(_hub_dataset, (data, *evaluated.values())) if d))
    return ModelCard(
        datasets=datasets,
        metrics=kept,
        training={k: v for k, v in training.items() if v is not None},
        base_model=base_model,
        eval_data=evaluated,
        name=name,
    )


def _hub_id(name: str) -> bool:
    """Whether `name` reads as a hub repo id rather than a local path or a preset."""
    return "/" in name and bool(_HUB_ID.match(name)) and not Path(name).exists()


def _hub_dataset(spec: str | None) -> str | None:
    if not spec or not spec.startswith("hf:"):
        return None
    name = spec[3:].split(":")[0]  # a split or config may follow
    return name if _HUB_ID.match(name) and not Path(name).exists() else None


# ---- writing -------------------------------------------------------------------------------------
def write_model_card(directory: str | Path, model: Any, *, fmt: str, card: ModelCard | None = None) -> Path:
    """Writes `directory/README.md` for `model` saved there in format `fmt` (one of `FORMATS`), atomically,
    replacing any README already there (it is the model's card); returns its path.

    `card` defaults to ``model.card`` (set by `vlm.load` on a directory with a card), else an empty card.
    `model` is a vlm `CLIP`, or a fine-tuned classifier (anything with `clip_config` and `class_names`).
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown model card format {fmt!r}; expected one of {', '.join(FORMATS)}")
    card = card if card is not None else getattr(model, "card", None) or ModelCard()
    if not isinstance(card, ModelCard):
        raise TypeError(f"card must be a vlm.model_card.ModelCard, got {type(card).__name__}")
    directory = Path(directory)
    name = card.name or _final_name(directory)
    text = _front_matter_text(model, card, fmt, name) + _body(model, card, fmt, name, directory) + _embed(card)
    return atomic_write_text(directory / CARD_NAME, text)


def _final_name(directory: Path) -> str:
    """The directory's name; for a staging directory of `vlm.files.atomic_directory` (``.NAME.xxxxxxxx.tmp``,
    where the exporters write before renaming), the name it will have."""
    name = directory.resolve().name
    staged = re.fullmatch(r"\.(.+)\.\w{8}\.tmp", name)
    return staged.group(1) if staged else name


def _embed(card: ModelCard) -> str:
    data = {k: v for k, v in card.__dict__.items() if v not in (None, (), {})}
    # "<" and ">" only occur inside JSON strings, where escapes keep "-->" from closing the comment.
    payload = json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e")
    return f"\n{_DATA_OPEN}{payload}{_DATA_CLOSE}\n"


# ---- reading -------------------------------------------------------------------------------------
def read_model_card(directory: str | Path) -> ModelCard | None:
    """The card in `directory/README.md`: None without the file, or when it is a README without front
    matter nor vlm's embedded card. A damaged part is logged and left out, never an error (a README is
    documentation; loading the model must not depend on it)."""
    path = Path(directory) / CARD_NAME
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8", errors="replace")
    meta, data = front_matter(text, path), _embedded(text, path)
    if not meta and not data:
        return None
    fields = dict(data)
    for key in ("license", "base_model"):
        if isinstance(meta.get(key), str):
            fields[key] = meta[key]
    datasets = meta.get("datasets")
    if isinstance(datasets, (str, list)):
        fields["datasets"] = [datasets] if isinstance(datasets, str) else [str(d) for d in datasets]
    known = {k: v for k, v in fields.items() if k in ModelCard.__dataclass_fields__}
    try:
        return ModelCard(**known)
    except (TypeError, ValueError) as err:
        logger.warning("ignored the model card in %s: %s", path, err)
        return None


def front_matter(text: str, where: Path | str = "README.md") -> dict[str, Any]:
    """The YAML front matter of a Markdown text as a dict ({} without one, or when it is not valid YAML)."""
    import yaml

    match = re.match(r"---\r?\n(.*?)\r?\n---\r?\n", text, flags=re.DOTALL)
    if match is None:
        return {}
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        logger.warning("the front matter of %s is not valid YAML (%s); it is ignored", where, err)
        return {}
    return meta if isinstance(meta, dict) else {}


def _embedded(text: str, where: Path) -> dict[str, Any]:
    start = text.rfind(_DATA_OPEN)
    if start < 0:
        return {}
    end = text.find(_DATA_CLOSE, start)
    try:
        data = json.loads(text[start + len(_DATA_OPEN) : end])
    except json.JSONDecodeError as err:
        logger.warning("the embedded model card of %s is damaged (%s); it is ignored", where, err)
        return {}
    return data if isinstance(data, dict) else {}


def model_config(model: Any) -> CLIPConfig:
    """The `CLIPConfig` a card describes: `model.config` (CLIP) or `model.clip_config` (a fine-tuned classifier)."""
    for attr in ("config", "clip_config"):
        config = getattr(model, attr, None)
        if isinstance(config, CLIPConfig):
            return config
    raise TypeError(f"a model card describes a vlm CLIP or a fine-tuned classifier, not a {type(model).__name__}")


# ---- what the card says --------------------------------------------------------------------------
# Metric keys (as the trainers record them) -> (hub task type, task name, hub metric id, label).
_METRICS = (
    (r"zeroshot_top(\d+)", ZERO_SHOT, "Zero-shot image classification", "accuracy", "zero-shot top-{} accuracy"),
    (r"image_to_text_R@(\d+)", RETRIEVAL, "Image-text retrieval", "recall", "image-to-text recall@{}"),
    (r"text_to_image_R@(\d+)", RETRIEVAL, "Image-text retrieval", "recall", "text-to-image recall@{}"),
    (r"top(\d+)", CLASSIFICATION, "Image classification", "accuracy", "top-{} accuracy"),
    (r"shifted_top(\d+)", CLASSIFICATION, "Image classification", "accuracy", "top-{} accuracy, shifted copy"),
    (r"mean_per_class_recall", CLASSIFICATION, "Image classification", "recall", "mean per-class recall"),
)
_LIBRARY = {"vlm": "vlm", "transformers": "transformers", "open_clip": "open_clip", "onnx": "onnx"}
_LAYOUT = {
    "vlm": "its own layout: `config.json` and `model.safetensors` (plus `tokenizer/` for a Hugging Face tokenizer)",
    "transformers": "a transformers directory: config, safetensors weights, processor and tokenizer files",
    "open_clip": "open_clip's directory format: `open_clip_config.json` and `open_clip_model.safetensors`",
    "onnx": "ONNX graphs (`visual.onnx`: pixels to embedding, `textual.onnx`: token ids to embedding) with their "
    "preprocessing and tokenizer settings, for onnxruntime without torch",
}
_CLASSIFIER_LAYOUT = "vlm's classifier layout: `image_classifier.json` and `classifier.safetensors`"


def _metric_kind(key: str, pipeline: str) -> tuple[str, str, str, str]:
    for pattern, task, task_name, metric, label in _METRICS:
        match = re.fullmatch(pattern, key)
        if match:
            return task, task_name, metric, label.format(*match.groups())
    return pipeline, pipeline.replace("-", " ").capitalize(), key, key


def _is_classifier(model: Any) -> bool:
    config = getattr(model, "clip_config", None)
    return getattr(model, "class_names", None) is not None and isinstance(config, CLIPConfig)


def _family(config: CLIPConfig) -> str | None:
    """The transformers family with this architecture (clip, siglip, siglip2, metaclip_2), None outside them."""
    from .convert import hf_family

    try:
        return hf_family(config)
    except ValueError:
        return None


def _metadata(model: Any, card: ModelCard, fmt: str, name: str) -> dict[str, Any]:
    classifier = _is_classifier(model)
    pipeline = CLASSIFICATION if classifier else ZERO_SHOT
    family = _family(model_config(model))
    tags = ["clip", "vision-language", pipeline, family or "", "onnx" if fmt == "onnx" else "", "vlm"]
    meta: dict[str, Any] = {"library_name": _LIBRARY[fmt], "pipeline_tag": pipeline}
    meta["tags"] = [t for t in dict.fromkeys(tags) if t]
    if card.license:
        meta["license"] = card.license
    if card.datasets:
        meta["datasets"] = list(card.datasets)
    if card.base_model:
        meta["base_model"] = card.base_model
    if card.metrics:
        meta["metrics"] = list(dict.fromkeys(_metric_kind(k, pipeline)[2] for k in card.metrics))
        meta["model-index"] = [{"name": name, "results": _results(card, pipeline)}]
    return meta


def _results(card: ModelCard, pipeline: str) -> list[dict[str, Any]]:
    """The model-index results: one per task, each with the metrics measured for it."""
    results: dict[str, dict[str, Any]] = {}
    for key, value in card.metrics.items():
        task, task_name, metric, label = _metric_kind(key, pipeline)
        spec = card.eval_data.get(task)
        dataset = {"type": _hub_dataset(spec) or "custom", "name": spec or "evaluation data (not named)"}
        entry = {"task": {"type": task, "name": task_name}, "dataset": dataset, "metrics": []}
        result = results.setdefault(task, entry)
        result["metrics"].append({"type": metric, "value": value, "name": label})
    return list(results.values())


def _front_matter_text(model: Any, card: ModelCard, fmt: str, name: str) -> str:
    import yaml

    meta = _metadata(model, card, fmt, name)
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000) + "---\n"


def _body(model: Any, card: ModelCard, fmt: str, name: str, directory: Path) -> str:
    sections = [
        f"# {name}\n\n{_summary(model, fmt)}",
        _architecture(model),
        "## How to use\n\n" + _usage(model, fmt, f"path/to/{_final_name(directory)}"),
        "## Config\n\n```json\n" + json.dumps(_config_dict(model), indent=2) + "\n```",
        _training(card),
        _evaluation(card),
    ]
    return "\n" + "\n\n".join(s for s in sections if s) + "\n"


def _summary(model: Any, fmt: str) -> str:
    config = model_config(model)
    v, t = config.vision, config.text
    image = f"a ViT image tower ({v.image_size}×{v.image_size} px images in {v.patch_size}×{v.patch_size} patches)"
    if _is_classifier(model):
        what = (
            f"An image classifier over {len(model.class_names)} classes: {image} from a CLIP-style model and a "
            f"linear head over its normalised {config.embed_dim}-dimensional embedding."
        )
        layout = _CLASSIFIER_LAYOUT
    else:
        text = "causal" if t.causal else "bidirectional"
        score = "softmax over scaled cosine similarities (CLIP)" if config.init_logit_bias is None else (
            "a sigmoid with a learned bias (SigLIP)"
        )
        what = (
            f"A CLIP-style vision-language model: {image} and a {text} Transformer text tower, both projected "
            f"into one {config.embed_dim}-dimensional embedding space; image-text pairs are scored with {score}."
        )
        if config.share_transformer:
            what += " Both towers use one set of Transformer weights."
        layout = _LAYOUT[fmt]
    family, preset = _family(config), _preset(config)
    if family:
        what += f" The architecture is transformers' `{family}` family."
    if preset:
        what += f" Its config is vlm's preset `{preset}`."
    return f"{what}\n\nSaved by vlm in {layout}."


def _preset(config: CLIPConfig) -> str | None:
    from .presets import PRESETS

    return next((name for name, preset in PRESETS.items() if preset == config), None)


def _count(module: Any) -> int | None:
    parameters = getattr(module, "parameters", None)
    return sum(p.numel() for p in parameters()) if callable(parameters) else None


def _architecture(model: Any) -> str:
    config = model_config(model)
    v, t = config.vision, config.text
    towers = [("image tower", v, getattr(model, "visual", None))]
    if not _is_classifier(model):
        towers.append(("text tower", t, getattr(model, "text", None)))
    rows = [
        ("width", [c.width for _, c, _ in towers]),
        ("depth", [c.depth for _, c, _ in towers]),
        ("attention heads", [c.num_heads for _, c, _ in towers]),
        ("MLP ratio", [c.mlp_ratio for _, c, _ in towers]),
        ("input", [f"{v.image_size}×{v.image_size} px, {v.patch_size}×{v.patch_size} patches",
                   f"{t.context_length} tokens, vocabulary of {t.vocab_size}"][: len(towers)]),
        ("parameters", [_count(module) for _, _, module in towers]),
    ]  # fmt: skip
    lines = ["| | " + " | ".join(n for n, _, _ in towers) + " |", "|---" * (len(towers) + 1) + "|"]
    for label, values in rows:
        if all(value is not None for value in values):
            lines.append(f"| {label} | " + " | ".join(_number(x) for x in values) + " |")
    total = _count(model)
    tail = f"Embedding dimension {config.embed_dim}" + (f"; {_number(total)} parameters in all." if total else ".")
    return "## Architecture\n\n" + "\n".join(lines) + "\n\n" + tail


def _number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _config_dict(model: Any) -> dict[str, Any]:
    config = model_config(model).to_dict()
    if _is_classifier(model):
        return {"class_names": list(model.class_names), "image_size": model.image_size, "clip_config": config}
    return config


def _usage(model: Any, fmt: str, path: str) -> str:
    if _is_classifier(model):
        return (
            "```python\nfrom training.classifier import ImageClassifier\n\n"
            f'classifier = ImageClassifier.from_pretrained("{path}")  # images (B, 3, H, W) -> logits (B, C)\n```\n\n'
            f"or measure it on labelled images: `vlm eval classify {path} DATA`."
        )
    snippets = {
        "vlm": f'import vlm\n\nmodel = vlm.load("{path}")\ntokenizer = vlm.get_tokenizer(model)\n'
        "transform = vlm.image_transform(model)",
        "transformers": 'from transformers import pipeline\n\nclassifier = pipeline("zero-shot-image-classification", '
        f'model="{path}")\nclassifier("photo.jpg", candidate_labels=["a photo of a cat", "a photo of a dog"])',
        "open_clip": "import open_clip\n\nmodel, _, preprocess = "
        f'open_clip.create_model_and_transforms("local-dir:{path}")\n'
        f'tokenizer = open_clip.get_tokenizer("local-dir:{path}")',
        "onnx": f'from vlm.onnx import OnnxCLIP\n\nmodel = OnnxCLIP("{path}")  # numpy in, numpy out; no torch needed'
        '\ntext_embeds = model.encode_text(["a photo of a cat", "a photo of a dog"])',
    }
    tail = {"vlm": f"\n\nor from the command line: `vlm classify photo.jpg --labels \"cat,dog\" --model {path}`."}
    return f"```python\n{snippets[fmt]}\n```" + tail.get(fmt, "")


def _training(card: ModelCard) -> str:
    if not card.training and not card.datasets and not card.base_model:
        return ""
    lines = ["## Training", ""]
    if card.base_model:
        lines.append(f"Started from `{card.base_model}`.")
    if card.datasets:
        lines.append("Datasets: " + ", ".join(f"`{d}`" for d in card.datasets) + ".")
    if card.training:
        lines += ["", "| | |", "|---|---|"] + [f"| {k} | {_cell(v)} |" for k, v in card.training.items()]
    return "\n".join(lines).replace("## Training\n\n\n", "## Training\n\n")


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return "`" + text.replace("|", "\\|").replace("`", "'") + "`"


def _evaluation(card: ModelCard) -> str:
    if not card.metrics:
        return "## Evaluation\n\nNot measured: no evaluation was recorded with this model."
    lines = ["## Evaluation", "", "| metric | value | measured on |", "|---|---|---|"]
    for key, value in card.metrics.items():
        task, _, _, label = _metric_kind(key, ZERO_SHOT)
        where = _cell(card.eval_data[task]) if task in card.eval_data else "not named"
        lines.append(f"| {label} (`{key}`) | {value:.4f} | {where} |")
    return "\n".join(lines)
