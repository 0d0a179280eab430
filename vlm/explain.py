"""Where the image tower looks: attention rollout and text-conditioned relevance maps, drawn over the image.

- `attention_rollout` (Abnar & Zuidema, 2020): each block's head-averaged attention, with the residual
  connection added as an identity and rows renormalised, multiplied from the first block to the last;
  the class token's row over the patches says how much each patch flows into the image embedding (for a
  tower pooled otherwise, SigLIP's or CLIPA's, the mean of the patch tokens' rows).
- `text_relevance` (Chefer, Gur & Wolf, 2021, "Generic Attention-model Explainability"): the gradient
  of the image-text score with respect to each block's attention probabilities, times those
  probabilities, negative parts dropped, averaged over heads, accumulated as R <- R + A_bar R from an
  identity. The pooled row (as above) shows which patches raise the score of that prompt.

Both return a (rows, columns) map over the patch grid, scaled to [0, 1]; `render_explanation` draws
maps as heatmaps over the image the model saw (the same resize and crop, at a visible size) into a PNG.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .images import load_image
from .model import CLIP
from .tokenizer import get_tokenizer
from .transforms import image_transform

__all__ = ["Heatmap", "attention_rollout", "text_relevance", "model_view", "render_explanation", "explain_image"]

# Side of the image drawn under the maps: model inputs (32 px for the small presets) are too small to see.
DISPLAY_SIZE = 224


@dataclass(frozen=True)
class Heatmap:
    """A map over the patch grid, scaled to [0, 1], with a title; `score` is the image-text cosine
    similarity for text-conditioned maps."""

    values: Tensor  # (rows, columns)
    title: str
    score: float | None = None


def _as_batch(model: CLIP, image: Tensor) -> Tensor:
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(
            f"explanations take one image (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}; "
            "preprocess it with vlm.image_transform(model)"
        )
    return image.to(model.logit_scale.device, model.logit_scale.dtype)


def _to_grid(model: CLIP, images: Tensor, flow: Tensor) -> Tensor:
    """A (P + N, P + N) flow matrix -> the pooled token's row over the patches as (rows, columns) in [0, 1]:
    the class token's row, or the mean of the patch tokens' rows when the tower pools them."""
    vision = model.config.vision
    prefix = vision.num_prefix_tokens
    row = flow[0] if vision.pool == "token" else flow[prefix:].mean(dim=0)
    rows, cols = model.visual.patch_embed.grid(images)
    grid = row[prefix:].reshape(rows, cols).float()  # (rows, columns)
    low, high = grid.min(), grid.max()
    return (grid - low) / (high - low) if high > low else torch.zeros_like(grid)


@torch.no_grad()
def attention_rollout(model: CLIP, image: Tensor) -> Heatmap:
    """Attention rollout of one preprocessed image (3, H, W): how much each patch flows into the class token."""
    images = _as_batch(model, image)
    _, weights = model.visual.forward_with_attention(images)
    n = weights[0].shape[-1]
    eye = torch.eye(n, device=images.device)
    rollout = eye
    for attn in weights:
        a = attn[0].float().mean(dim=0) + eye  # (N, N): heads averaged, residual added
        rollout = (a / a.sum(dim=-1, keepdim=True)) @ rollout
    return Heatmap(_to_grid(model, images, rollout), "attention rollout")


def text_relevance(model: CLIP, image: Tensor, text: str) -> Heatmap:
    """Which patches of one preprocessed image (3, H, W) raise its similarity to `text` (Chefer et al.)."""
    images = _as_batch(model, image)
    tokens = get_tokenizer(model)([text]).to(images.device)
    with torch.no_grad():
        text_embed = model.encode_text(tokens, normalize=True)  # (1, E)
    with torch.enable_grad():
        # The input requires grad so that the attention maps do even when the weights are frozen.
        tokens_out, weights = model.visual.forward_with_attention(images.detach().requires_grad_(True))
        image_embed = F.normalize(model.visual.project(model.visual.pool(tokens_out)), dim=-1)  # (1, E)
        score = (image_embed * text_embed).sum()
        grads = torch.autograd.grad(score, weights)
    n = weights[0].shape[-1]
    relevance = torch.eye(n, device=images.device)
    for attn, grad in zip(weights, grads):
        a_bar = (grad[0] * attn[0]).detach().float().clamp(min=0).mean(dim=0)  # (N, N)
        relevance = relevance + a_bar @ relevance
    return Heatmap(_to_grid(model, images, relevance), repr(text), float(score.detach()))


def model_view(model: CLIP, image: Image.Image, size: int = DISPLAY_SIZE) -> np.ndarray:
    """The part of `image` the model sees (its resize and crop), at `size` pixels: (size, size, 3) in [0, 1]."""
    transform = dataclasses.replace(image_transform(model), image_size=size)
    mean = torch.tensor(transform.mean).view(3, 1, 1)
    std = torch.tensor(transform.std).view(3, 1, 1)
    return (transform(image) * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def render_explanation(
    view: np.ndarray, maps: Sequence[Heatmap], path: str | os.PathLike, *, alpha: float = 0.5
) -> Path:
    """A PNG: the image, then each map upsampled over it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = view.shape[0]
    fig = Figure(figsize=(3.2 * (1 + len(maps)), 3.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(maps), squeeze=False)[0]
    axes[0].imshow(view)
    axes[0].set_title("image")
    for ax, heatmap in zip(axes[1:], maps):
        up = F.interpolate(heatmap.values[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        ax.imshow(view)
        ax.imshow(up.clamp(0, 1).numpy(), cmap="jet", alpha=alpha, vmin=0, vmax=1)
        title = heatmap.title if heatmap.score is None else f"{heatmap.title}\ncosine {heatmap.score:.3f}"
        ax.set_title(title[:60], fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def explain_image(model: CLIP, source: Any, texts: Sequence[str], path: str | os.PathLike) -> list[Heatmap]:
    """Loads `source`, computes the attention rollout and one relevance map per text, writes them to `path`."""
    image = load_image(source)
    x = image_transform(model)(image)
    maps = [attention_rollout(model, x)]
    maps += [text_relevance(model, x, text) for text in texts]
    render_explanation(model_view(model, image), maps, path)
    return maps
