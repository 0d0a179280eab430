"""Saving and loading models: vlm directories, open_clip names, files and directories, transformers directories.

Loading never executes code from a checkpoint: safetensors by default, and `.pt`/`.bin` files only
through ``torch.load(weights_only=True)``, with no fallback to unrestricted unpickling.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from .config import CLIPConfig
from .files import atomic_directory, atomic_path, atomic_write_text
from .model import CLIP, create_model
from .model_card import ModelCard, read_model_card, write_model_card
from .presets import PRESETS, get_preset

__all__ = ["save_pretrained", "load_pretrained", "load", "load_state_dict_file"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# A model with a Hugging Face tokenizer keeps a copy of its files here, so the directory works offline.
TOKENIZER_DIR = "tokenizer"
MODEL_TYPE = "vlm-clip"
FORMAT_VERSION = 1


def save_pretrained(model: CLIP, directory: str | Path, *, card: ModelCard | None = None) -> Path:
    """Writes `config.json` and `model.safetensors` into `directory` (created if needed), a copy of a
    Hugging Face tokenizer's files into `directory/tokenizer/`, and the model card `README.md` (`card`, else
    ``model.card``; see `vlm.model_card`), which replaces any README already there.

    Each file is written aside and renamed into place, so a crash never leaves a half-written file
    under the final name. Shared tensors (``share_transformer=True``) are stored once. When the tokenizer
    files cannot be found (offline, never downloaded), the model is saved without them and a warning says so.
    """
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"model_type": MODEL_TYPE, "format_version": FORMAT_VERSION, **model.config.to_dict()}
    with atomic_path(directory / WEIGHTS_NAME) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt", "model_type": MODEL_TYPE})
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2) + "\n")
    _save_tokenizer(model, directory / TOKENIZER_DIR)
    write_model_card(directory, model, fmt="vlm", card=card)
    return directory


def _save_tokenizer(model: CLIP, target: Path) -> None:
    """Replaces `target` with a copy of the model's tokenizer files (removes it for CLIP's vocabulary, which
    ships with the library); the old folder stays until the new one is complete."""
    from .config import CLIP_TOKENIZER
    from .tokenizer import get_tokenizer

    if model.tokenizer_path is not None and Path(model.tokenizer_path).resolve() == target.resolve():
        return
    if model.config.text.tokenizer == CLIP_TOKENIZER:
        shutil.rmtree(target, ignore_errors=True)
        return
    try:
        tokenizer = get_tokenizer(model)
    except (OSError, ValueError) as err:
        logger.warning("saved the model without its tokenizer files (%s); copy them into %s", err, target)
        return
    with atomic_directory(target) as staging:
        tokenizer.save(staging)


def tokenizer_dir(directory: str | Path) -> Path | None:
    """Where a model directory keeps its Hugging Face tokenizer files: `directory/tokenizer/` (vlm's layout)
    or `directory` itself (transformers' and open_clip's), or None when it holds none."""
    from .hf_tokenizer import VOCABULARY_FILES

    directory = Path(directory)
    for candidate in (directory / TOKENIZER_DIR, directory):
        if any((candidate / name).is_file() for name in VOCABULARY_FILES):
            return candidate
    return None


def read_config(directory: str | Path) -> CLIPConfig:
    """The `CLIPConfig` in `directory/config.json`, without loading weights.

    Raises FileNotFoundError without the file, ValueError when it is not a vlm config or a newer vlm
    wrote it.
    """
    path = Path(directory) / CONFIG_NAME
    data = json.loads(path.read_text())
    if data.get("model_type") != MODEL_TYPE:
        raise ValueError(f"{path} is not a vlm config (model_type={data.get('model_type')!r})")
    if data.get("format_version", 1) > FORMAT_VERSION:
        raise ValueError(f"{path} was written by a newer vlm (format {data['format_version']}); upgrade vlm")
    data.pop("model_type")
    return CLIPConfig.from_dict(data)


def load_pretrained(
    directory: str | Path, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> CLIP:
    """Reads a directory written by `save_pretrained`, bit-exactly."""
    from safetensors.torch import load_model

    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ValueError(f"{directory} has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    model = CLIP(config, device="meta").to_empty(device="cpu")
    try:
        load_model(model, str(weights), strict=True)
    except Exception as err:  # safetensors raises several types for damaged files
        raise ValueError(f"could not read weights from {weights}: {err}") from err
    model.tokenizer_path = tokenizer_dir(directory)
    model.card = read_model_card(directory)  # None for directories saved before cards, or without one
    return model.to(device=device, dtype=dtype)


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors from a `.safetensors` file, or from a `.pt`/`.bin`/`.pth` file with `weights_only=True`.

    Checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped, and a
    ``module.`` prefix left by DistributedDataParallel is removed.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise ValueError(f"{path} is not a readable safetensors file: {err}") from err
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(
            f"{path} could not be loaded with torch.load(weights_only=True) ({err}); vlm never unpickles "
            "arbitrary objects: re-save the weights as a plain state dict or as safetensors"
        ) from err
    for key in ("state_dict", "model", "module"):
        if isinstance(state, Mapping) and key in state and isinstance(state[key], Mapping):
            state = state[key]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _from_state_dict(state: Mapping[str, Tensor], config: CLIPConfig, source: str) -> CLIP:
    from .convert import detect_state_dict_format, hf_state_dict_to_vlm, load_into, model_from_state
    from .convert import open_clip_state_dict_to_vlm

    kind = detect_state_dict_format(state)
    try:
        if kind == "open_clip":
            return model_from_state(config, open_clip_state_dict_to_vlm(state, config))
        converted = hf_state_dict_to_vlm(state, config) if kind == "hf" else dict(state)
        return load_into(CLIP(config, device="meta").to_empty(device="cpu"), converted)
    except (ValueError, RuntimeError) as err:
        raise ValueError(f"{source}: {err}") from err


def load(
    name_or_path: str | Path,
    pretrained: str | Path | None = None,
    *,
    config: CLIPConfig | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> CLIP:
    """Any model vlm can read, as a vlm `CLIP`.

    - a directory from `save_pretrained` (``config.json`` + ``model.safetensors``);
    - a transformers directory (``config.json`` with ``model_type`` clip, siglip, siglip2 or metaclip_2), or a
      repo id such as ``"openai/clip-vit-base-patch32"`` or ``"google/siglip-base-patch16-224"`` (downloaded by
      transformers when online);
    - an open_clip directory (``open_clip_config.json`` with the weights and tokenizer files, as open_clip's
      hub repos hold them);
    - an open_clip model name with a pretrained tag, ``load("ViT-B-32", pretrained="laion2b_s34b_b79k")``
      (downloaded through open_clip's own machinery when online, its cache offline), or with a local
      weights file, ``load("ViT-B-32", pretrained="/path/open_clip_pytorch_model.bin")``;
    - a preset name alone: random weights;
    - a weights file with `config=` given.
    """
    model = _load(str(name_or_path), pretrained, config)
    return model.to(device=device, dtype=dtype)


def _load(name: str, pretrained: str | Path | None, config: CLIPConfig | None) -> CLIP:
    path = Path(name)
    if path.is_dir():
        model = _load_dir(path)
        # Whatever the format, the directory's card travels with the model into the next save.
        model.card = read_model_card(path)
        return model
    if path.is_file():
        if config is None and (path.parent / CONFIG_NAME).is_file():
            return _load_dir(path.parent)
        if config is None:
            raise ValueError(f"{path} is a bare weights file: pass config= (e.g. vlm.get_preset('ViT-B-32'))")
        return _from_state_dict(load_state_dict_file(path), config, str(path))
    if pretrained is not None and Path(pretrained).is_file():
        base = config or _config_for_name(name)
        model = _from_state_dict(load_state_dict_file(pretrained), base, str(pretrained))
        # Hugging Face repos of open_clip models keep the tokenizer next to the weights.
        model.tokenizer_path = tokenizer_dir(Path(pretrained).parent)
        return model
    if name in PRESETS and pretrained is None:
        return create_model(config or get_preset(name))
    if pretrained is not None or name.startswith("hf-hub:"):
        return _load_open_clip(name, pretrained)
    if "/" in name and not name.startswith(("/", ".")):
        from .convert import from_hf

        return from_hf(name)
    raise ValueError(
        f"cannot load {name!r}: it is not a directory, a file, a preset ({', '.join(PRESETS)}), an open_clip "
        "name with pretrained=..., nor a Hugging Face repo id"
    )


def _load_dir(path: Path) -> CLIP:
    config_path = path / CONFIG_NAME
    if (path / "open_clip_config.json").is_file():
        return _load_open_clip(f"local-dir:{path}", None)
    if not config_path.is_file():
        raise ValueError(f"{path} holds no {CONFIG_NAME}; expected a directory written by save_pretrained")
    from .convert import HF_FAMILIES, from_hf

    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type == MODEL_TYPE:
        return load_pretrained(path)
    if model_type in HF_FAMILIES:
        model = from_hf(path)
        model.tokenizer_path = tokenizer_dir(path)
        return model
    raise ValueError(
        f"{config_path} has model_type {model_type!r}; vlm reads {MODEL_TYPE!r} and transformers' "
        f"{', '.join(repr(t) for t in HF_FAMILIES)}"
    )


def _config_for_name(name: str) -> CLIPConfig:
    if name in PRESETS:
        return get_preset(name)
    from .convert import config_from_open_clip, open_clip_model_config

    import open_clip

    if name not in open_clip.list_models():
        raise ValueError(f"unknown model name {name!r}: not a vlm preset nor an open_clip model")
    return config_from_open_clip(open_clip.create_model(name, device="meta"), open_clip_model_config(name))


def _load_open_clip(name: str, pretrained: str | Path | None) -> CLIP:
    import open_clip

    from .convert import from_open_clip

    try:
        oc_model = open_clip.create_model(name, pretrained=None if pretrained is None else str(pretrained))
    except RuntimeError as err:
        raise ValueError(
            f"open_clip could not provide {name!r} with pretrained={pretrained!r} ({err}); offline, the "
            "weights must already be in open_clip's cache or given as a local file"
        ) from err
    model = from_open_clip(oc_model, model_name=name)
    if name.startswith("local-dir:"):
        model.tokenizer_path = tokenizer_dir(name[len("local-dir:") :])
    return model
