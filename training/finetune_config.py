"""The fine-tuning job's configuration: frozen dataclasses nested like the parts they set, read from JSON
or YAML and overridden with dotted keys (``optim.lr=3e-4``) by the loaders of `training.config`.

    vlm finetune --config training/configs/digits_finetune.yaml recipe.epochs=5 output_dir=runs/ft

The command's flags (``--lr``, ``--mode``...) set the same keys through one table in `finetune_cli`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .config import PRECISIONS, LoggingConfig, OptimConfig, load_config
from .config_checks import _choice, _in_range, _positive, _positives
from .lora import LoraConfig

__all__ = [
    "MODES",
    "HEAD_INITS",
    "DEFAULT_SWEEP",
    "FinetuneModelConfig",
    "FinetuneDataConfig",
    "RecipeConfig",
    "AugmentConfig",
    "FinetuneOptimConfig",
    "WiseFTConfig",
    "FinetuneCheckpointConfig",
    "FinetuneConfig",
    "load_finetune_config",
]

MODES = ("linear-probe", "full", "lp-ft", "flyp", "lora")
HEAD_INITS = ("zeroshot", "probe", "random")
RESUME_HELP = "'auto' (the latest checkpoint of output_dir), 'never', or a checkpoints/step_* directory"
DEFAULT_SWEEP = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass(frozen=True)
class FinetuneModelConfig:
    """The CLIP model whose image tower is fine-tuned, and which of its blocks train."""

    # A model directory, preset or open_clip name (with `pretrained`); None: the default model
    # (`vlm.defaults`: $VLM_MODEL, else the one `make demo` set).
    name: str | None = None
    pretrained: str | None = None
    # Train only the last N blocks of the image tower, with the modules that read them (final norm,
    # pooling, projection): the rule of `vlm train`'s model.lock_image. None: every block trains.
    unlocked_blocks: int | None = None
    # The adapters of recipe.mode=lora (`training.lora`).
    lora: LoraConfig = field(default_factory=LoraConfig)

    def __post_init__(self) -> None:
        if self.unlocked_blocks is not None:
            _positives(self, "model", ("unlocked_blocks",), zero_ok=True)


@dataclass(frozen=True)
class FinetuneDataConfig:
    """The labelled images: training and held-out data and how to read them (`vlm.data.open_labelled`)."""

    # A folder with train/ and test/ class folders; or, with `eval`, a class folder, a table
    # (.csv/.tsv/.jsonl/.json/.parquet) of image paths and labels, or hf:DATASET.
    train: str = ""
    # The held-out data, any kind `train` can be. None: train/test of the folder, or the same
    # hf: dataset's `eval_split`.
    eval: str | None = None
    split: str = "train"
    eval_split: str = "test"
    image_column: str = "image"
    label_column: str = "label"
    # Class names in order: they name a table's integer labels 0, 1, ... and order string labels and
    # class folders. Empty: sorted folder names or labels (an HF ClassLabel names its own).
    class_names: tuple[str, ...] = ()
    # Train and evaluate at this resolution (the position embeddings are resampled); None: the model's.
    image_size: int | None = None
    # The job stops, writing nothing, when more than this share of the training or of the held-out
    # images cannot be read (1: never), as `vlm train`'s data.max_skipped_fraction does: losing most
    # images means the paths are wrong, not that a few files are broken. Every image is decoded before
    # training, so the share is over all of them (`vlm train` streams, and counts its first samples).
    max_skipped_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.image_size is not None:
            _positive("data", "image_size", self.image_size)
        _in_range(self, "data", "max_skipped_fraction", 0, 1)


@dataclass(frozen=True)
class RecipeConfig:
    """What is trained and for how long. `epochs` counts passes over the training images for the tower
    (full, lp-ft, flyp); `probe_steps` counts full-batch steps of the head on cached features
    (linear-probe, and lp-ft's first stage)."""

    mode: str = "full"
    head_init: str = "zeroshot"
    # Prompts for the zero-shot head (and FLYP's captions): templates with {} for the class name, or
    # one entry naming a built-in set ("simple", "imagenet80") or a file of templates.
    templates: tuple[str, ...] = ("simple",)
    epochs: int = 5
    batch_size: int = 64
    warmup_steps: int = 10
    label_smoothing: float = 0.0
    # 0: no weight EMA; e.g. 0.999 keeps an exponential moving average of the weights and returns it.
    ema_decay: float = 0.0
    probe_steps: int = 300
    probe_lr: float = 1e-2
    probe_weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _choice("recipe", "mode", self.mode, MODES)
        _choice("recipe", "head_init", self.head_init, HEAD_INITS)
        for name in ("epochs", "batch_size", "probe_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(
                    f"recipe.{name} must be a positive integer, got {value!r}; set recipe.{name}=N with N >= 1 "
                    f"(the default is {getattr(RecipeConfig, name)})"
                )
        _positives(self, "recipe", ("warmup_steps", "probe_weight_decay"), zero_ok=True)
        _positives(self, "recipe", ("probe_lr",))
        if not self.templates:
            raise ValueError("recipe.templates is empty; give a set name such as 'simple' or templates like 'a photo of a {}.'")
        _in_range(self, "recipe", "label_smoothing", 0, 1, high_open=True)
        if not 0 <= self.ema_decay < 1:
            raise ValueError(
                f"recipe.ema_decay must be in [0, 1), got {self.ema_decay!r}; set recipe.ema_decay=0 (off) or e.g. "
                "0.999"
            )

    def resolved_templates(self) -> str | tuple[str, ...]:
        """What `vlm.templates.resolve_templates` takes: the set name or file, or the templates."""
        one = self.templates[0]
        return one if len(self.templates) == 1 and "{}" not in one else self.templates


@dataclass(frozen=True)
class AugmentConfig:
    """Changes to the training images (drawn from the seed and the step, so a resumed run draws alike)."""

    # Random rotation (±10°), scale (0.9-1.1) and shift (±8%) of every training image.
    affine: bool = False
    # 0: off; > 0: mix image pairs with a Beta(alpha, alpha) coefficient (0.2 is usual).
    mixup_alpha: float = 0.0
    # 0: off; > 0: paste boxes of Beta(alpha, alpha)-drawn area (1.0 is usual); with mixup, either per step.
    cutmix_alpha: float = 0.0

    def __post_init__(self) -> None:
        _positives(self, "augment", ("mixup_alpha", "cutmix_alpha"), zero_ok=True)


@dataclass(frozen=True)
class FinetuneOptimConfig(OptimConfig):
    """AdamW as in `vlm train` (the same parameter groups and weight-decay rule), with fine-tuning's
    defaults: PyTorch's betas and eps, no gradient clipping, a small learning rate."""

    lr: float = 1e-4
    weight_decay: float = 0.1
    beta2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 0.0


@dataclass(frozen=True)
class WiseFTConfig:
    """WiSE-FT: the mix of zero-shot and fine-tuned weights that is saved, and the mixes evaluated."""

    # The coefficient of the saved classifier: 0 = zero-shot weights, 1 = fine-tuned weights.
    alpha: float = 1.0
    sweep: tuple[float, ...] = DEFAULT_SWEEP

    def __post_init__(self) -> None:
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"wise_ft.alpha={self.alpha!r} is outside [0, 1]; 0 = zero-shot weights, 1 = fine-tuned")
        bad = [a for a in self.sweep if not 0 <= a <= 1]
        if bad or not self.sweep:
            raise ValueError(
                f"wise_ft.sweep has {bad[0] if bad else 'no value'!r}; give coefficients in [0, 1], "
                "from 0 (zero-shot) to 1 (fine-tuned)"
            )


@dataclass(frozen=True)
class FinetuneCheckpointConfig:
    """A checkpoint after every epoch under output_dir/checkpoints (the format of `vlm train`)."""

    keep: int = 2
    resume: str = "auto"  # see RESUME_HELP

    def __post_init__(self) -> None:
        _positives(self, "checkpoint", ("keep",))
        if not self.resume:
            raise ValueError(f"checkpoint.resume is empty; give {RESUME_HELP}")


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning job; written resolved into its output directory and next to every checkpoint."""

    # Where the classifier, metrics.json, sweep.png, config.yaml and checkpoints go.
    output_dir: str = ""
    seed: int = 0
    # "auto": bf16 on GPUs that have it (else fp16), fp32 on CPU.
    mixed_precision: str = "auto"
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    wise_ft: WiseFTConfig = field(default_factory=WiseFTConfig)
    checkpoint: FinetuneCheckpointConfig = field(default_factory=FinetuneCheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        _choice("", "mixed_precision", self.mixed_precision, PRECISIONS)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}; set e.g. seed=0")
        if self.recipe.mode == "lora" and self.wise_ft.alpha != 1 and not self.model.lora.merge:
            raise ValueError(
                f"wise_ft.alpha={self.wise_ft.alpha!r} with recipe.mode=lora mixes full weights, which the saved "
                "adapters cannot hold; set model.lora.merge=true (--merge) to save the mixed classifier"
            )


def load_finetune_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> FinetuneConfig:
    """The FinetuneConfig of a JSON/YAML file (or the defaults) with dotted `overrides` applied."""
    return load_config(path, overrides, FinetuneConfig)
