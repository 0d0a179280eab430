"""Key tables and the machinery that applies them in both directions.

A conversion is a table of rows (vlm keys, foreign key, how). One table serves both directions, so a
round trip is exact by construction. The ways a row converts (`how`):

- ``same``: copied;
- ``T``: transposed (open_clip keeps projections as ``x @ W`` matrices);
- ``cat``: the foreign tensor is our tensors concatenated along dim 0 (open_clip's fused ``in_proj``,
  timm's ``qkv`` and ``kv``), split back into them;
- ``squeeze1`` / ``squeeze2``: the foreign tensor has one / two leading singleton dimensions (timm's
  ``pos_embed`` (1, N, C), ``cls_token`` (1, 1, C); transformers' ``logit_scale`` (1,));
- ``patch_linear``: transformers' SigLIP 2 patch embedding, a Linear over patches flattened as
  (row, column, channel), which is our patch convolution's weight (C, 3, p, p) reordered.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from ..config import CLIPConfig
from ..model import CLIP

__all__ = [
    "Row",
    "block_rows",
    "check_shared",
    "detect_state_dict_format",
    "from_vlm",
    "linear_rows",
    "load_into",
    "model_from_state",
    "norm_rows",
    "stack_rows",
    "to_vlm",
    "unread_keys",
]

Row = tuple[tuple[str, ...], str, str]
# One block of a foreign Transformer: (our sub-keys, their sub-key template with {} for weight/bias, how).
BlockNames = Sequence[tuple[tuple[str, ...], str, str]]


def norm_rows(ours: str, theirs: str) -> list[Row]:
    """A LayerNorm's weight and bias."""
    return [((f"{ours}.{s}",), f"{theirs}.{s}", "same") for s in ("weight", "bias")]


def linear_rows(ours: str, theirs: str, bias: bool) -> list[Row]:
    """An nn.Linear's weight, and its bias when it has one."""
    return [((f"{ours}.{s}",), f"{theirs}.{s}", "same") for s in ("weight", "bias")[: 1 + bias]]


def block_rows(ours: str, theirs: str, names: BlockNames, layer_scale: tuple[str, str] | None) -> list[Row]:
    """Every parameter of one block: `names` maps our sub-keys to the foreign template; `layer_scale` names
    the foreign keys of the two LayerScale gammas when the block has them."""
    rows: list[Row] = []
    for suffix in ("weight", "bias"):
        for mine, template, how in names:
            rows.append((tuple(f"{ours}{m}.{suffix}" for m in mine), theirs + template.format(suffix), how))
    if layer_scale is not None:
        rows += [((f"{ours}{m}.gamma",), theirs + t, "same") for m, t in zip(("ls1", "ls2"), layer_scale)]
    return rows


def stack_rows(ours: str, theirs: str, depth: int, names: BlockNames, layer_scale: tuple[str, str] | None) -> list[Row]:
    """`block_rows` of blocks 0..depth-1: ours at ``{ours}{i}.``, theirs at ``{theirs}{i}.``."""
    return [row for i in range(depth) for row in block_rows(f"{ours}{i}.", f"{theirs}{i}.", names, layer_scale)]


def _patch_size(linear_weight: Tensor) -> int:
    return math.isqrt(linear_weight.shape[1] // 3)


def _to_ours(how: str, value: Tensor, n: int) -> list[Tensor]:
    if how == "cat":
        return list(value.chunk(n, dim=0))
    if how == "T":
        return [value.T]
    if how in ("squeeze1", "squeeze2"):
        return [value.reshape(value.shape[int(how[-1]) :])]
    if how == "patch_linear":
        p = _patch_size(value)
        return [value.reshape(value.shape[0], p, p, 3).permute(0, 3, 1, 2)]  # (C, 3, p, p)
    assert how == "same", how
    return [value]


def _to_theirs(how: str, values: list[Tensor]) -> Tensor:
    if how == "cat":
        return torch.cat(values, dim=0)
    value = values[0]
    if how == "T":
        return value.T
    if how in ("squeeze1", "squeeze2"):
        return value.reshape((1,) * int(how[-1]) + tuple(value.shape))
    if how == "patch_linear":
        return value.permute(0, 2, 3, 1).reshape(value.shape[0], -1)  # (C, p * p * 3)
    assert how == "same", how
    return value


def to_vlm(table: list[Row], theirs: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Their state dict -> ours, by `table`; ValueError naming missing keys (`source` names the format)."""
    missing = [key for _, key, _ in table if key not in theirs]
    if missing:
        raise ValueError(
            f"the {source} state dict lacks {len(missing)} expected key(s), e.g. {missing[:3]}; "
            "is the config right for these weights (depth, architecture)?"
        )
    out: dict[str, Tensor] = {}
    for ours, key, how in table:
        out.update(zip(ours, _to_ours(how, theirs[key], len(ours))))
    return {k: v.contiguous() for k, v in out.items()}


def from_vlm(table: list[Row], ours: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> theirs, by the same `table` read the other way."""
    return {key: _to_theirs(how, [ours[k] for k in keys]).contiguous() for keys, key, how in table}


def unread_keys(table: list[Row], theirs: Mapping[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Their keys the table does not read: parameters of a feature vlm's model lacks. Keys ending in one
    of `ignore` (buffers such as ``position_ids``) are left out."""
    read = {key for _, key, _ in table}
    return sorted(k for k in theirs if k not in read and not k.endswith(ignore))


def check_shared(config: CLIPConfig, state: Mapping[str, Tensor]) -> None:
    """With `share_transformer`, both towers' Transformer weights must be equal; ValueError otherwise."""
    if not config.share_transformer:
        return
    for key, value in state.items():
        if key.startswith("visual.transformer."):
            other = state["text." + key[len("visual.") :]]
            if not torch.equal(value, other):
                raise ValueError(
                    f"config.share_transformer=True but the towers' Transformer weights differ (first at {key}); "
                    "load these weights with share_transformer=False"
                )


def load_into(model: CLIP, state: Mapping[str, Tensor]) -> CLIP:
    """Loads our-key `state` into `model` (strict, allowing the shared text Transformer to be absent)."""
    if model.config.share_transformer:
        state = {k: v for k, v in state.items() if not k.startswith("text.transformer.")}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (model.config.share_transformer and k.startswith("text.transformer."))]
    if missing or result.unexpected_keys:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model


def model_from_state(config: CLIPConfig, converted: Mapping[str, Tensor]) -> CLIP:
    """A `CLIP` of `config` holding `converted` (our keys), on their device and in their dtype."""
    check_shared(config, converted)
    like = converted["logit_scale"]
    model = CLIP(config, device="meta").to_empty(device=like.device).to(like.dtype)
    return load_into(model, converted)


def detect_state_dict_format(state: Mapping[str, Any]) -> str:
    """'vlm', 'open_clip' or 'hf' from the key names; ValueError for anything else."""
    keys = set(state)
    if "visual.pos_embed" in keys or "text.token_embed.weight" in keys:
        return "vlm"
    open_clip_vision = "visual.class_embedding" in keys or "visual.trunk.pos_embed" in keys
    if open_clip_vision and ("token_embedding.weight" in keys or "text.token_embedding.weight" in keys):
        return "open_clip"
    if "vision_model.embeddings.position_embedding.weight" in keys:
        return "hf"
    sample = sorted(keys)[:5]
    raise ValueError(
        f"unrecognised checkpoint: keys such as {sample} are neither vlm's, open_clip's ViT CLIP nor "
        "transformers' CLIPModel / SiglipModel / Siglip2Model / MetaClip2Model"
    )
