"""LoRA (Hu et al. 2021) through peft: low-rank adapters on the attention projections (q/k/v/out) and the
MLP (fc1/fc2) of chosen Transformer blocks; everything else stays frozen.

`vlm finetune --mode lora` trains the adapters of the image tower and the linear head, then merges the
adapters into full weights (W + alpha/rank * B A): WiSE-FT, evaluation and the classifier that is saved
all see a plain `ImageClassifier`. The run directory holds the adapters alone (`lora_adapter.safetensors`,
`lora_adapter.json`, a few hundred KB for a ViT-B) and, with `model.lora.merge=true`, the merged
classifier beside them. peft starts B at zero, so the adapted model computes exactly what the base model
did until the first step.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor, nn

from .config_checks import _positives

if TYPE_CHECKING:  # these modules import this one
    from vlm.model import CLIP

    from .classifier import ImageClassifier, LoadedImages
    from .config import ModelConfig
    from .finetune import FinetuneResult
    from .finetune_config import FinetuneConfig

__all__ = [
    "LoraConfig",
    "LORA_TARGETS",
    "apply_lora",
    "lora_target_names",
    "lora_state_dict",
    "merge_lora",
    "trainable_summary",
    "save_lora_adapter",
    "save_run_adapters",
    "load_lora_classifier",
    "finetune_lora",
]

logger = logging.getLogger(__name__)

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
ADAPTER_WEIGHTS = "lora_adapter.safetensors"
ADAPTER_META = "lora_adapter.json"


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters: which layers of which blocks get one, and its size."""

    # Contrastive training (`vlm train` model.lora) adapts both towers when enabled; `vlm finetune`
    # adapts the image tower when recipe.mode=lora, whatever `enabled` says.
    enabled: bool = False
    rank: int = 8
    # The update is scaled by alpha / rank, so changing the rank keeps the learning rate meaningful.
    alpha: float = 16.0
    dropout: float = 0.0
    # Adapt the last N blocks of each adapted tower; None: every block.
    blocks: int | None = None
    targets: tuple[str, ...] = LORA_TARGETS
    # `vlm finetune`: also save the merged classifier (the adapters alone are always saved). `vlm train`
    # always writes its final model/ merged (every later verb reads it) and the adapters to lora/.
    merge: bool = False

    def __post_init__(self) -> None:
        _positives(self, "lora", ("rank", "alpha"))
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout={self.dropout!r} is outside [0, 1); set e.g. lora.dropout=0.05 (0: off)")
        if self.blocks is not None:
            _positives(self, "lora", ("blocks",))
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise ValueError(
                f"lora.targets has {bad[0] if bad else 'no layer'!r}; choose among {', '.join(LORA_TARGETS)}"
            )


def lora_target_names(module: nn.Module, towers: Sequence[str], config: LoraConfig) -> list[str]:
    """The full names of the linear layers of `module` that get adapters: `config.targets` in the last
    `config.blocks` blocks of each tower prefix in `towers` (e.g. "visual", "text")."""
    names = []
    for tower in towers:
        blocks = module.get_submodule(f"{tower}.transformer.blocks")
        chosen = range(len(blocks))[-config.blocks :] if config.blocks else range(len(blocks))
        names += [f"{tower}.transformer.blocks.{i}.{layer}" for i in chosen for layer in _layers(config.targets)]
    return names


def _layers(targets: Sequence[str]) -> list[str]:
    return [f"{'mlp' if t.startswith('fc') else 'attn'}.{t}" for t in targets]


def apply_lora(module: nn.Module, config: LoraConfig, towers: Sequence[str] = ("visual",)) -> nn.Module:
    """Injects peft LoRA adapters into `module` in place (see `lora_target_names`); afterwards only the
    adapters require gradients. Returns `module`."""
    try:
        import peft
    except ImportError as err:
        raise ImportError("LoRA needs peft; install it with `pip install 'vlm[lora]'` (or pip install peft)") from err
    targets = lora_target_names(module, towers, config)
    peft_config = peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets, bias="none"
    )
    peft.inject_adapter_in_model(peft_config, module)
    # Frozen here, not left to peft: what it freezes on injection has changed between its versions.
    for name, param in module.named_parameters():
        param.requires_grad_("lora_" in name)
    return module


def lora_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The adapter weights of `module` (peft's key names), detached on the CPU."""
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items() if "lora_" in k}


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Merges every adapter of `module` into its layer's weight (W + alpha/rank * B A) and puts the plain
    `nn.Linear` back in its place, in place: the module then has the key names and the fused attention
    path it had before `apply_lora`. Returns `module`."""
    from peft.tuners.lora import LoraLayer

    for name, layer in list(module.named_modules()):
        if isinstance(layer, LoraLayer):
            layer.merge()
            parent, _, child = name.rpartition(".")
            setattr(module.get_submodule(parent), child, layer.get_base_layer())
    return module


def trainable_summary(module: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> str:
    """"N trainable of M parameters (P%)", and the optimizer's state bytes when given one."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    total = sum(p.numel() for p in module.parameters())
    text = f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f}%)"
    if optimizer is not None:
        tensors = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        state = sum(t.numel() * t.element_size() for t in tensors)
        text += f"; optimizer state {state:,} bytes"
    return text


# ---- fine-tuning ----------------------------------------------------------------------------------
def finetune_lora(model: CLIP, train: LoadedImages, config: FinetuneConfig, run_dir: Path | None) -> FinetuneResult:
    """`recipe.mode=lora`: the zero-shot-initialised classifier of `model` with adapters on its image
    tower; the adapters and the head train. Returns a FinetuneResult whose classifier has the adapters
    merged, and whose `adapters` holds the trained adapter and head weights."""
    from .classifier import ImageClassifier
    from .finetune import FinetuneResult, _classifier_step, _init_head, _run_key
    from .finetune_loop import run_epochs
    from .optim import build_optimizer

    classifier = ImageClassifier.from_clip(model, train.class_names)
    _init_head(classifier, model, train, config.recipe)
    apply_lora(classifier, config.model.lora)
    # The head is the task's output layer: it trains with the adapters (peft's modules_to_save).
    classifier.head.requires_grad_(True)
    optimizer = build_optimizer(classifier, config.optim)
    key = _run_key(classifier, train, config)
    key["config"]["lora"] = asdict(config.model.lora)
    step = _classifier_step(train, config)
    losses = run_epochs(classifier, optimizer, len(train), config, step, run_key=key, run_dir=run_dir)
    logger.info("LoRA: %s", trainable_summary(classifier, optimizer))
    head = {f"head.{k}": v.detach().cpu() for k, v in classifier.head.state_dict().items()}
    adapters = {**lora_state_dict(classifier), **head}
    return FinetuneResult(merge_lora(classifier).eval(), losses, adapters)


def save_lora_adapter(
    directory: str | os.PathLike,
    adapters: dict[str, Tensor],
    config: LoraConfig,
    base_model: str,
    class_names: Sequence[str] = (),
    image_size: int | None = None,
    pretrained: str | None = None,
) -> Path:
    """Writes the adapter and head weights (safetensors) and what rebuilds the classifier from the base
    model (JSON) to `directory`, atomically; returns the weights' path."""
    from safetensors.torch import save_file

    from vlm.files import atomic_path, atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / ADAPTER_WEIGHTS) as tmp:
        save_file(adapters, str(tmp))
    meta = {
        "type": "vlm-lora-adapter",
        "lora": asdict(config),
        "base_model": base_model,
        "pretrained": pretrained,
        "class_names": list(class_names),
        "image_size": image_size,
    }
    atomic_write_text(directory / ADAPTER_META, json.dumps(meta, indent=2))
    return directory / ADAPTER_WEIGHTS


def save_run_adapters(
    model: nn.Module, config: ModelConfig, run_dir: Path, optimizer: torch.optim.Optimizer | None = None
) -> None:
    """`vlm train` with model.lora.enabled (`config` is its ModelConfig): writes the adapters to
    run_dir/lora, then merges them into `model` in place so that the final model directory holds plain
    full weights. Does nothing without LoRA."""
    if not config.lora.enabled:
        return
    adapters = lora_state_dict(model)
    path = save_lora_adapter(Path(run_dir) / "lora", adapters, config.lora, config.name, pretrained=config.pretrained)
    logger.info("LoRA adapters (%s) saved to %s", trainable_summary(model, optimizer), path)
    merge_lora(model)


def load_lora_classifier(directory: str | os.PathLike, model: CLIP | None = None) -> ImageClassifier:
    """The merged `ImageClassifier` of the adapters `save_lora_adapter` wrote, on `model` (a CLIP), or on
    the base model named in the adapter's JSON when `model` is None."""
    from safetensors.torch import load_file

    from vlm.checkpoint import load

    from .classifier import ImageClassifier

    directory = Path(directory)
    if not (directory / ADAPTER_META).is_file():
        raise FileNotFoundError(f"{directory} holds no {ADAPTER_META}; give a directory of `vlm finetune --mode lora`")
    meta = json.loads((directory / ADAPTER_META).read_text())
    model = model if model is not None else load(meta["base_model"], pretrained=meta.get("pretrained"))
    classifier = ImageClassifier.from_clip(model, meta["class_names"])
    lora = LoraConfig(**{**meta["lora"], "targets": tuple(meta["lora"]["targets"])})
    apply_lora(classifier, replace(lora, dropout=0.0))
    missing = classifier.load_state_dict(load_file(str(directory / ADAPTER_WEIGHTS)), strict=False)
    if missing.unexpected_keys:
        raise ValueError(f"{directory}: adapter weights {missing.unexpected_keys[:3]} fit no layer of the base model")
    classifier.image_size = meta.get("image_size") or classifier.image_size
    return merge_lora(classifier).eval()
