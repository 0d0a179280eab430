"""Zero-shot classifiers: class names and prompt templates become one embedding per class.

Each class is described by prompts: its names (the class name, or the aliases given for it) filled into
every template, or a list of prompts of its own. The class embedding is the mean of its prompts'
L2-normalised text embeddings, normalised again: the matrix open_clip's `build_zero_shot_classifier`
returns for the same weights, transposed. open_clip's is (E, C), a column per class; here
`weights` is (C, E), a row per class, so that `image_embeds @ weights.T` gives (B, C) scores.

Building embeds each distinct prompt once (classes that share a prompt share its embedding), in full
batches of prompts sorted by token length, each batch running only the positions its longest prompt
needs (the text tower's short-sequence path), where open_clip runs every prompt at the full context
length.
`bench/bench_zeroshot.py` measures it against open_clip's builder.

A classifier saves as a directory (`classifier.safetensors` + `classifier.json`, with the classes, their
prompts, the templates and the fingerprints of the model and the tokenizer it was built with), and
refuses to be used with another model.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .embed import embed_texts
from .model import CLIP
from .templates import fill_template, resolve_templates
from .tokenizer import get_tokenizer

__all__ = [
    "ClassPrompts",
    "ZeroShotClassifier",
    "as_class_prompts",
    "build_classifier",
    "parse_labels",
    "read_labels_file",
]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "classifier.safetensors"
META_FILE = "classifier.json"
ARTIFACT_TYPE = "vlm-zeroshot-classifier"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ClassPrompts:
    """One class: its `name` (the label reported), and how it is described.

    - neither `aliases` nor `prompts`: the name is filled into every template;
    - `aliases`: each alias is filled into every template instead of the name (list the name among the
      aliases to use it too), e.g. ``ClassPrompts("n02084071", aliases=("dog", "puppy"))``;
    - `prompts`: exactly these texts describe the class, templates are not used for it.
    """

    name: str
    aliases: tuple[str, ...] = ()
    prompts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a class name must be a non-empty string, got {self.name!r}")
        for kind in ("aliases", "prompts"):
            value = getattr(self, kind)
            if isinstance(value, str):
                value = (value,)
            value = tuple(value)
            bad = [v for v in value if not isinstance(v, str) or not v.strip()]
            if bad:
                raise ValueError(f"class {self.name!r}: {kind} must be non-empty strings, got {bad[0]!r}")
            object.__setattr__(self, kind, value)
        if self.aliases and self.prompts:
            raise ValueError(
                f"class {self.name!r} has both aliases and prompts; give aliases (filled into the templates) "
                "or prompts (used as they are), not both"
            )

    def texts(self, templates: Sequence[str]) -> tuple[str, ...]:
        """This class's prompts, in open_clip's order: for each name, every template."""
        if self.prompts:
            return self.prompts
        return tuple(fill_template(t, name) for name in self.aliases or (self.name,) for t in templates)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields, as a saved classifier stores each class."""
        return {"name": self.name, "aliases": list(self.aliases), "prompts": list(self.prompts)}


def as_class_prompts(classes: Any) -> tuple[ClassPrompts, ...]:
    """Classes from any of the forms `build_classifier` takes, checked for duplicates.

    - a sequence of names and/or `ClassPrompts`;
    - a mapping name -> aliases (a string or a list of strings) or -> ``{"aliases": [...]}`` /
      ``{"prompts": [...]}``.
    """
    if isinstance(classes, Mapping):
        items = tuple(_class_from_mapping_item(name, value) for name, value in classes.items())
    elif isinstance(classes, Sequence) and not isinstance(classes, str):
        items = tuple(c if isinstance(c, ClassPrompts) else ClassPrompts(_name(c)) for c in classes)
    else:
        raise TypeError(
            f"classes must be a list of class names, a list of ClassPrompts or a mapping name -> aliases; "
            f"got {type(classes).__name__}"
        )
    if not items:
        raise ValueError("no classes given; a classifier needs at least one class name")
    seen: set[str] = set()
    for item in items:
        if item.name in seen:
            raise ValueError(f"class {item.name!r} is given twice; class names must be unique")
        seen.add(item.name)
    return items


def _name(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"a class name must be a string, got {type(value).__name__} {value!r}")
    return value.strip()


def _class_from_mapping_item(name: Any, value: Any) -> ClassPrompts:
    name = _name(name)
    if value is None:
        return ClassPrompts(name)
    if isinstance(value, str) or (isinstance(value, Sequence) and not isinstance(value, Mapping)):
        return ClassPrompts(name, aliases=value)
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {"aliases", "prompts"})
        if unknown:
            raise ValueError(f"class {name!r}: unknown key(s) {unknown}; a class takes 'aliases' or 'prompts'")
        return ClassPrompts(name, aliases=value.get("aliases", ()), prompts=value.get("prompts", ()))
    raise TypeError(f"class {name!r}: expected aliases (a list of strings) or a dict, got {type(value).__name__}")


def parse_labels(text: str) -> tuple[ClassPrompts, ...]:
    """Comma-separated class names, as `vlm classify --labels "cat,dog,car"` takes them."""
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise ValueError(f"--labels {text!r} has an empty name; separate class names with single commas")
    return as_class_prompts(names)


def read_labels_file(path: str | os.PathLike) -> tuple[ClassPrompts, ...]:
    """Classes from a file.

    A ``.json`` file holds a list of names or a mapping name -> aliases / ``{"aliases": [...]}`` /
    ``{"prompts": [...]}`` (see `as_class_prompts`). Any other file holds one class a line: ``name`` or
    ``name: alias1 | alias2``; blank lines and lines starting with ``#`` are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file {path} does not exist; write one class name a line")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            return as_class_prompts(json.loads(text))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON ({err}); see `vlm classify --help` for the format") from err
    classes = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, aliases = line.partition(":")
        alias_list = tuple(a.strip() for a in aliases.split("|")) if sep else ()
        if not name.strip() or not all(alias_list):
            raise ValueError(f"{path}:{n}: {line!r} is not 'name' or 'name: alias1 | alias2'")
        classes.append(ClassPrompts(name.strip(), aliases=alias_list))
    if not classes:
        raise ValueError(f"{path} holds no class names; write one class name a line")
    return as_class_prompts(classes)


@dataclass(frozen=True, eq=False)
class ZeroShotClassifier:
    """Class embeddings and how to score images against them.

    `weights` (C, E) holds one L2-normalised row per class (open_clip's classifier is its transpose).
    `logit_scale` is the model's, already exponentiated; `logit_bias` is set for sigmoid-loss models.
    """

    weights: Tensor
    classes: tuple[ClassPrompts, ...]
    templates: tuple[str, ...]
    logit_scale: float
    logit_bias: float | None
    model_fingerprint: str
    tokenizer_fingerprint: str

    def __post_init__(self) -> None:
        assert self.weights.shape[0] == len(self.classes), "one row per class"

    @functools.cached_property
    def prompts(self) -> tuple[tuple[str, ...], ...]:
        """Each class's prompts, as they were embedded."""
        return tuple(c.texts(self.templates) for c in self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The class names, in the order of the rows of `weights`."""
        return tuple(c.name for c in self.classes)

    @property
    def sigmoid(self) -> bool:
        """True for sigmoid-loss models: each class is scored on its own, scores do not sum to one."""
        return self.logit_bias is not None

    def logits(self, image_embeds: Tensor) -> Tensor:
        """(B, E) image embeddings -> (B, C) scaled cosine similarities (plus the bias, if any)."""
        x = F.normalize(image_embeds.to(self.weights), dim=-1)
        logits = self.logit_scale * x @ self.weights.T
        return logits if self.logit_bias is None else logits + self.logit_bias

    def probabilities(self, image_embeds: Tensor) -> Tensor:
        """(B, C): softmax over classes for contrastive models, an independent sigmoid per class for
        sigmoid-loss models (as each was trained)."""
        logits = self.logits(image_embeds)
        return logits.sigmoid() if self.sigmoid else logits.softmax(dim=-1)

    def check_model(self, model: CLIP) -> None:
        """Raises ValueError unless `model` (and its tokenizer) is the one this classifier was built with."""
        found = {"model": model.fingerprint(), "tokenizer": get_tokenizer(model).fingerprint()}
        expected = {"model": self.model_fingerprint, "tokenizer": self.tokenizer_fingerprint}
        mismatches = [f"{k} fingerprint {found[k]}, expected {expected[k]}" for k in found if found[k] != expected[k]]
        if mismatches:
            raise ValueError(
                f"this classifier was built with another model ({'; '.join(mismatches)}); its class embeddings "
                "mean nothing to this model's image tower. Use the model it was built with, or rebuild the "
                "classifier with this model (vlm classify --labels ... --save-classifier DIR)"
            )

    def save(self, directory: str | os.PathLike) -> Path:
        """Writes `classifier.safetensors` and `classifier.json` into `directory` (created if needed)."""
        from safetensors.torch import save_file

        from .files import atomic_path, atomic_write_text

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file({"weights": self.weights.contiguous().float().cpu()}, str(tmp))
        atomic_write_text(directory / META_FILE, json.dumps(self._metadata(), indent=2, ensure_ascii=False) + "\n")
        return directory

    def _metadata(self) -> dict[str, Any]:
        return {
            "artifact_type": ARTIFACT_TYPE,
            "format_version": FORMAT_VERSION,
            "class_names": list(self.class_names),
            "classes": [c.to_dict() for c in self.classes],
            "templates": list(self.templates),
            "prompts": [list(p) for p in self.prompts],
            "logit_scale": self.logit_scale,
            "logit_bias": self.logit_bias,
            "model_fingerprint": self.model_fingerprint,
            "tokenizer_fingerprint": self.tokenizer_fingerprint,
        }

    @classmethod
    def load(cls, directory: str | os.PathLike, model: CLIP | None = None) -> "ZeroShotClassifier":
        """Reads a saved classifier; with `model`, refuses (ValueError) unless it was built with that model."""
        from safetensors.torch import load_file

        directory = Path(directory)
        meta_path, weights_path = directory / META_FILE, directory / WEIGHTS_FILE
        if not meta_path.is_file() or not weights_path.is_file():
            raise FileNotFoundError(
                f"{directory} is not a saved classifier (expected {META_FILE} and {WEIGHTS_FILE}); "
                "save one with ZeroShotClassifier.save or `vlm classify ... --save-classifier DIR`"
            )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("artifact_type") != ARTIFACT_TYPE:
            raise ValueError(f"{meta_path} has artifact_type {meta.get('artifact_type')!r}, not {ARTIFACT_TYPE!r}")
        classifier = cls(
            weights=load_file(str(weights_path))["weights"],
            classes=tuple(ClassPrompts(**c) for c in meta["classes"]),
            templates=tuple(meta["templates"]),
            logit_scale=float(meta["logit_scale"]),
            logit_bias=None if meta["logit_bias"] is None else float(meta["logit_bias"]),
            model_fingerprint=meta["model_fingerprint"],
            tokenizer_fingerprint=meta["tokenizer_fingerprint"],
        )
        if model is not None:
            classifier.check_model(model)
        return classifier


def build_classifier(
    model: CLIP,
    classes: Any,
    templates: str | os.PathLike | Sequence[str] = "imagenet80",
    *,
    batch_size: int = 256,
    progress: bool = False,
) -> ZeroShotClassifier:
    """A zero-shot classifier for `classes` (see `as_class_prompts`) with `templates` (see
    `vlm.templates.resolve_templates`: ``"imagenet80"``, ``"simple"``, a file or a list of format strings)."""
    classes = as_class_prompts(classes)
    templates = resolve_templates(templates)
    prompts = tuple(c.texts(templates) for c in classes)
    unique = list(dict.fromkeys(text for texts in prompts for text in texts))
    logger.info(
        "zero-shot classifier: %d classes, %d prompts (%d distinct)", len(classes), sum(map(len, prompts)), len(unique)
    )
    # One pass over all prompts, in batches of similar token length (`embed_texts`), not one batch per
    # exact length: those many small batches are many short parallel regions, and on a busy machine each
    # waits for its descheduled OpenMP thread (3-4x slower at torch's two threads on two shared cores).
    embeds = embed_texts(model, unique, batch_size=batch_size, normalize=True, progress=progress)  # (U, E)
    weights = F.normalize(_class_means(prompts, unique, len(classes)) @ embeds, dim=-1)  # (C, E)
    return ZeroShotClassifier(
        weights=weights,
        classes=classes,
        templates=templates,
        logit_scale=float(model.logit_scale.detach().exp()),
        logit_bias=None if model.logit_bias is None else float(model.logit_bias.detach()),
        model_fingerprint=model.fingerprint(),
        tokenizer_fingerprint=get_tokenizer(model).fingerprint(),
    )


def _class_means(prompts: Sequence[Sequence[str]], unique: list[str], num_classes: int) -> Tensor:
    """Sparse (C, U) averaging matrix: row c holds 1/len(prompts[c]) at each of class c's prompts (a
    prompt listed twice for a class counts twice, as in open_clip)."""
    position = {text: i for i, text in enumerate(unique)}
    rows = [c for c, texts in enumerate(prompts) for _ in texts]
    cols = [position[t] for texts in prompts for t in texts]
    values = [1.0 / len(texts) for texts in prompts for _ in texts]
    indices, values = torch.tensor([rows, cols]), torch.tensor(values)
    return torch.sparse_coo_tensor(indices, values, (num_classes, len(unique)), check_invariants=True)
