"""The training run's configuration: frozen dataclasses nested like the parts they build, read from
JSON or YAML and overridden from the command line with dotted keys (``optim.lr=1e-3``).

Unknown keys and values of the wrong type are errors that name the dotted key, what was expected and
the fix; every section validates its own values on construction.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from vlm.files import atomic_write_text
from vlm.overflow import OVERFLOW_POLICIES

# close_match and setting_errors: re-exported, the helpers of every user of the training config.
from .config_checks import (
    check_sources,
    _choice,
    _default,
    _in_range,
    _positives,
    check_batch_split,
    check_model_overrides,
    close_match,
    setting_errors,
)
from .distill_config import DistillConfig
from .lora import LoraConfig
from .patch_dropout import check_unmasked_steps

__all__ = [
    "DataConfig",
    "SourceConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "LossConfig",
    "CheckpointConfig",
    "EvalConfig",
    "LoggingConfig",
    "TrainConfig",
    "load_config",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "close_match",
    "setting_errors",
]

DATA_FORMATS = ("auto", "csv", "tsv", "jsonl", "json", "parquet", "list", "hf", "imagefolder", "webdataset")
LOSSES = ("clip", "siglip")
PRECISIONS = ("auto", "no", "bf16", "fp16")
# (tower, its lock switch, the options that need it)
LOCK_KEYS = (
    ("image", "lock_image", ("unlocked_blocks", "lock_image_freeze_norms")),
    ("text", "lock_text", ("lock_text_unlocked_blocks", "lock_text_freeze_norms")),
)


@dataclass(frozen=True)
class SourceConfig:
    """One of several training sources mixed by weight (`data.sources`), checked by `DataConfig`."""

    train: str = ""  # any spec data.train takes, except tar shards
    weight: float = 1.0  # relative; a small source of large weight is repeated as often as that takes


@dataclass(frozen=True)
class DataConfig:
    """Where the image-text pairs come from and how they are batched."""

    # A table (.csv, .tsv, .jsonl, .json, .parquet, or a list file of "path<TAB>text" lines), a Hugging
    # Face dataset (hf:NAME_OR_DIR, a saved directory, or an imagefolder directory with a metadata file)
    # or tar shards ("shards/{00000..00009}.tar", a glob). Read by `vlm.data`, like every verb's data.
    train: str = ""
    # Instead of `train`: several sources sampled by weight, e.g. [{train: a.csv, weight: 3},
    # {train: hf:b, weight: 1}] (`training.mixing`); format, columns, image_root and split apply to each.
    sources: tuple[SourceConfig, ...] = ()
    format: str = "auto"
    # None picks the first of the usual names (`vlm.data.columns`): image/img/path/... and the image
    # feature of a Hugging Face dataset, jpg/png/... in tar shards; caption/text/txt/title/...
    image_column: str | None = None
    text_column: str | None = None
    # Relative image paths in a table resolve against this folder; None: the table's own folder.
    image_root: str | None = None
    split: str = "train"
    # Held-out pairs for image-text retrieval during evaluation (same kinds of source as `train`).
    eval: str | None = None
    eval_split: str = "test"
    # Global batch: the pairs of one optimiser step, over all processes and accumulation micro-batches.
    batch_size: int = 256
    num_workers: int = 2
    augment: bool = True
    # Streamed sources (tar shards) are shuffled through a buffer of this many samples.
    shuffle_buffer: int = 1000
    # A sample that takes longer than this to load and decode is skipped, so one stuck file (a hung
    # network mount, a pathological image) never stalls the run. 0 turns the limit off.
    sample_timeout: float = 30.0
    # How many skipped samples are logged by name before only the count goes on.
    show_failures: int = 10
    # A caption longer than the model's context: "truncate" keeps its first tokens (open_clip's
    # behaviour; the run logs the total), "error" stops the run naming it.
    text_overflow: str = "truncate"
    # The skip budget: unreadable data (a wrong data.image_root, missing files) stops the run with an
    # error naming the first bad paths, and no model is saved, instead of "training" on nothing.
    # It stops when every sample of this many consecutive steps was skipped (0: never). Five: with
    # batches of 8 or more, a data set with a few broken files never loses five whole batches in a row,
    # and a run whose images are all missing stops within seconds.
    max_skipped_steps: int = 5
    # ... or when more than this share of the first `skip_window` samples (of all of them, in a shorter
    # run) was skipped. 1 turns this rule off. Half: real data sets lose a few percent to broken files;
    # losing most of them means the paths or the columns are wrong.
    max_skipped_fraction: float = 0.5
    skip_window: int = 1000

    def __post_init__(self) -> None:
        _choice("data", "format", self.format, DATA_FORMATS)
        _choice("data", "text_overflow", self.text_overflow, OVERFLOW_POLICIES)
        _positives(self, "data", ("batch_size", "shuffle_buffer", "skip_window"))
        _positives(self, "data", ("num_workers", "sample_timeout", "show_failures", "max_skipped_steps"), zero_ok=True)
        _in_range(self, "data", "max_skipped_fraction", 0, 1)
        check_sources(self.sources, self.train, SourceConfig)


@dataclass(frozen=True)
class ModelConfig:
    """Which model to train: a preset from scratch, a saved or converted checkpoint, or a locked tower."""

    # A preset (`vlm presets`), a directory from save_pretrained, a Hugging Face CLIP directory, or an
    # open_clip name with `pretrained`.
    name: str = "tiny"
    pretrained: str | None = None
    # CLIPConfig changes for a preset, e.g. {"embed_dim": 64, "vision": {"patch_size": 8}}.
    overrides: dict[str, Any] = field(default_factory=dict)
    # LiT: freeze the image tower; its last `unlocked_blocks` blocks (with the final norm and
    # projection) stay trainable; with lock_image_freeze_norms false its LayerNorms train too.
    lock_image: bool = False
    unlocked_blocks: int = 0
    lock_image_freeze_norms: bool = True
    # SigLiT-style: the same rule for the text tower (its embeddings stay frozen).
    lock_text: bool = False
    lock_text_unlocked_blocks: int = 0
    lock_text_freeze_norms: bool = True
    grad_checkpointing: bool = False
    compile: bool = False
    # FLIP patch dropout for any model (VisionConfig.patch_dropout): the share of patch tokens each image
    # drops in training steps; 0.5 trains about twice as fast. 0 keeps the model's own setting.
    patch_dropout: float = 0.0
    # FLIP's unmasked tuning (training.patch_dropout): the run's last N steps train on every patch.
    patch_dropout_unmasked_steps: int = 0
    lora: LoraConfig = field(default_factory=LoraConfig)  # enabled: adapters on both towers (training.lora)

    def __post_init__(self) -> None:
        _in_range(self, "model", "patch_dropout", 0, 1, high_open=True)
        if not self.name:
            raise ValueError("model.name is empty; give a preset name (see `vlm presets`) or a model directory")
        counts = ("unlocked_blocks", "lock_text_unlocked_blocks", "patch_dropout_unmasked_steps")
        _positives(self, "model", counts, zero_ok=True)
        for tower, lock, keys in LOCK_KEYS:
            changed = [k for k in keys if getattr(self, k) != _default(ModelConfig, k)]
            if changed and not getattr(self, lock):
                raise ValueError(
                    f"model.{changed[0]}={getattr(self, changed[0])!r} only applies to a locked {tower} tower; "
                    f"set model.{lock}=true or drop model.{changed[0]}"
                )
        if self.overrides:
            check_model_overrides(self.name, self.overrides)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW; weight decay only on weights with ndim >= 2 outside the model's `no_weight_decay()`."""

    lr: float = 5e-4
    weight_decay: float = 0.2
    # CLIP's betas and eps: a lower beta2 and a larger eps than PyTorch's defaults keep large-batch
    # contrastive training stable.
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    # Gradient-norm clipping; 0 turns it off.
    grad_clip: float = 1.0
    # Layer-wise lr decay of the image tower: block i of D trains at lr * layer_decay ** (D - i), the
    # embeddings at lr * layer_decay ** (D + 1), everything above at lr. 1 = none; 0.65-0.75 is usual
    # when fine-tuning a pretrained tower, whose lower blocks need to move least.
    layer_decay: float = 1.0

    def __post_init__(self) -> None:
        _positives(self, "optim", ("lr",))
        _positives(self, "optim", ("weight_decay", "grad_clip", "eps"), zero_ok=True)
        if not 0 < self.layer_decay <= 1:
            raise ValueError(
                f"optim.layer_decay must be in (0, 1], got {self.layer_decay!r}; set optim.layer_decay=1 for no "
                "decay, or 0.65-0.75 (usual for a pretrained tower)"
            )
        for name in ("beta1", "beta2"):
            _in_range(self, "optim", name, 0, 1, high_open=True)


@dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup to `optim.lr`, then a cosine to `min_lr_ratio * lr` at `steps`."""

    steps: int = 1000
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0

    def __post_init__(self) -> None:
        _positives(self, "schedule", ("steps",))
        _positives(self, "schedule", ("warmup_steps",), zero_ok=True)
        _in_range(self, "schedule", "min_lr_ratio", 0, 1)


@dataclass(frozen=True)
class LossConfig:
    """The contrastive loss over the global batch."""

    kind: str = "clip"
    # Rows of the similarity matrix per chunk: the loss's memory grows linearly with the batch.
    # 0 computes the whole matrix at once.
    chunk_size: int = 1024
    # Each process computes the rows of its own samples against all columns: the same gradients as
    # the full matrix, at 1/world_size of its memory and compute.
    local_loss: bool = True
    # Micro-batches per step. Their features are computed first without gradients, so the loss sees
    # the negatives of the whole step, then each micro-batch is run again with gradients.
    accum_steps: int = 1
    # Consecutive steps with a non-finite loss that are skipped before the run stops with an error.
    max_nonfinite: int = 3
    # The learned temperature exp(logit_scale) is clamped at 100, as in CLIP.
    max_logit_scale: float = 100.0

    def __post_init__(self) -> None:
        _choice("loss", "kind", self.kind, LOSSES)
        _positives(self, "loss", ("chunk_size",), zero_ok=True)
        _positives(self, "loss", ("accum_steps", "max_nonfinite", "max_logit_scale"))


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints every `every` steps (0: none), the newest `keep` kept, and which one a run resumes from."""

    every: int = 500
    keep: int = 2
    # "auto": continue from the latest checkpoint in the run directory if there is one; "never":
    # refuse to start when the run directory already has checkpoints; or a checkpoint directory.
    resume: str = "auto"

    def __post_init__(self) -> None:
        _positives(self, "checkpoint", ("every",), zero_ok=True)
        _positives(self, "checkpoint", ("keep",))


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on the user's data: zero-shot top-1/top-5 and retrieval recall@1/5/10."""

    # Steps between evaluations; 0 evaluates only at the end.
    every: int = 0
    # A labelled set of images: a table or dataset with an image and a label column, a folder of
    # class folders, or tar shards with an integer .cls.
    zeroshot: str | None = None
    # None picks the first of label/labels/class/cls/target.
    label_column: str | None = None
    # Class names in label order; empty: the data's own (the one label rule of `vlm.data.labels`).
    classnames: tuple[str, ...] = ()
    # Prompts with "{}" for the class name; the classifier averages their normalised embeddings.
    templates: tuple[str, ...] = ("a photo of a {}.",)
    batch_size: int = 256
    # Evaluate on at most this many images (0: all).
    max_samples: int = 0

    def __post_init__(self) -> None:
        _positives(self, "eval", ("every", "max_samples"), zero_ok=True)
        _positives(self, "eval", ("batch_size",))
        if not self.templates:
            raise ValueError("eval.templates is empty; give at least one prompt such as 'a photo of a {}.'")
        bad = [t for t in self.templates if "{}" not in t]
        if bad:
            raise ValueError(f"eval.templates {bad} have no '{{}}' for the class name; write e.g. 'a photo of a {{}}.'")


@dataclass(frozen=True)
class LoggingConfig:
    """What the run reports: progress bar, metrics.jsonl rows, TensorBoard, the curves.png plot."""

    progress: bool = True
    # Steps between rows of metrics.jsonl (and TensorBoard points).
    every: int = 1
    tensorboard: bool = False
    plot: bool = True

    def __post_init__(self) -> None:
        _positives(self, "logging", ("every",))


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; written resolved into the run directory and next to every checkpoint."""

    output_dir: str = "runs/train"
    seed: int = 0
    # "auto": bf16 on GPUs that have it (else fp16), fp32 on CPU.
    mixed_precision: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)  # training.distill

    def __post_init__(self) -> None:
        _choice("", "mixed_precision", self.mixed_precision, PRECISIONS)
        if not self.output_dir:
            raise ValueError("output_dir is empty; give the directory the run writes to")
        if self.schedule.warmup_steps > self.schedule.steps:
            raise ValueError(
                f"schedule.warmup_steps ({self.schedule.warmup_steps}) exceeds schedule.steps "
                f"({self.schedule.steps}); lower the warmup or train longer"
            )
        check_batch_split(self.data.batch_size, self.loss.accum_steps, "loss.accum_steps")
        check_unmasked_steps(self.model, self.schedule)


# ---- dicts, files and overrides -------------------------------------------------------------------
def config_to_dict(config: Any) -> dict[str, Any]:
    """Plain dicts, lists and scalars (tuples become lists), ready for JSON or YAML."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(data: Mapping[str, Any], cls: type = TrainConfig, prefix: str = "") -> Any:
    """Builds `cls` from `data`, checking every key and type; errors name the dotted key."""
    if not isinstance(data, Mapping):
        if not prefix:
            raise TypeError(f"the config must be a mapping of keys to values, got {type(data).__name__}")
        section = prefix.rstrip(".")
        raise TypeError(
            f"config key {section} is a section, got {data!r} ({type(data).__name__}); set its keys instead, "
            f"e.g. {prefix}{fields(cls)[0].name}=..."
        )
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        names = ", ".join(prefix + k + close_match(k, known) for k in unknown)
        raise ValueError(
            f"unknown config key(s) {names}; known keys here are {', '.join(prefix + k for k in sorted(known))}"
        )
    values = {name: _leaf(value, hints[name], cls, prefix + name) for name, value in data.items()}
    return cls(**values)


def _leaf(value: Any, hint: Any, cls: type, key: str) -> Any:
    """`_convert`, with the field's default as the example of a TypeError's fix."""
    try:
        return _convert(value, hint, key)
    except TypeError as err:
        default = _default(cls, key.rpartition(".")[2])
        if dataclasses.is_dataclass(hint) or default in (None, "") or isinstance(default, tuple):
            raise
        raise TypeError(f"{err}; write it like {key}={default!r} (the default)") from None


def _convert(value: Any, hint: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return config_from_dict(value, hint, key + ".")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(value, inner[0], key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"config key {key} takes a list, got {value!r} ({type(value).__name__})")
        return tuple(_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, Mapping):
            raise TypeError(f"config key {key} takes a mapping, got {value!r} ({type(value).__name__})")
        return dict(value)
    return _scalar(value, hint, key)


def _scalar(value: Any, hint: Any, key: str) -> Any:
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept any spelling Python reads as a float.
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    article = "an" if hint.__name__[0] in "aeiou" else "a"
    raise TypeError(f"config key {key} takes {article} {hint.__name__}, got {value!r} ({type(value).__name__})")


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: Mapping[str, Any], overrides: Sequence[str], cls: type = TrainConfig) -> dict[str, Any]:
    """`data` with each ``key.sub=value`` applied; the value is read as YAML (numbers, lists, null...).

    The key must exist in `cls`: a typo is an error naming the key, never a silently new setting.
    """
    out = json.loads(json.dumps(data))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not key=value; write e.g. optim.lr=1e-3")
        parts = key.split(".")
        _check_key(cls, parts, key)
        node = out
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                section = ".".join(parts[: i + 1])
                raise ValueError(
                    f"override {item!r}: {section} holds the value {node!r}, not a section; set {section} itself, "
                    f"or remove its value from the config file"
                )
        node[parts[-1]] = _parse_value(text)
    return out


def _check_key(cls: Any, parts: list[str], key: str) -> None:
    for i, part in enumerate(parts):
        if not (dataclasses.is_dataclass(cls) and isinstance(cls, type)):
            if cls is dict or typing.get_origin(cls) is dict:
                return  # free-form mapping (model.overrides): its keys are checked by what consumes it
            value = ".".join(parts[:i])
            raise ValueError(f"override key {key}: {value} is a value, not a section; write {value}=VALUE")
        hints = typing.get_type_hints(cls)
        if part not in hints:
            where = ".".join(parts[:i]) or "the top level"
            raise ValueError(
                f"unknown config key {key}: {where} has no {part!r}{close_match(part, hints)}; "
                f"known: {', '.join(sorted(hints))}"
            )
        cls = hints[part]


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A JSON (.json) or YAML (.yaml, .yml) file as a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    text = path.read_text()
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
    elif path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{path} is not valid YAML: {err}") from err
    else:
        raise ValueError(f"config file {path} must end in .json, .yaml or .yml")
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of config keys, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), cls: type = TrainConfig) -> Any:
    """The `cls` (TrainConfig, or another config such as fine-tuning's) of a JSON/YAML file (or the
    defaults) with dotted `overrides` applied."""
    data = read_config_file(path) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides, cls), cls)


def write_config(config: Any, path: str | Path) -> Path:
    """The resolved config as YAML, written atomically and durably (`vlm.files.atomic_write_text`)."""
    import yaml

    return atomic_write_text(path, yaml.safe_dump(config_to_dict(config), sort_keys=False))

