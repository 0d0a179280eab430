"""Contrastive losses over the global batch: symmetric InfoNCE (CLIP) and the sigmoid loss (SigLIP).

Features of all processes are gathered with gradients. In local-loss mode each process computes the
rows of its own samples against every column; the per-process losses are scaled so that, once
DistributedDataParallel averages the gradients, they equal the gradients of the full-matrix loss on
one process, at 1/world_size of the memory and compute.

With `chunk_size`, the similarity matrix is built a block of rows at a time and each block is
recomputed in the backward pass (activation checkpointing), so the loss holds O(chunk_size * N)
numbers instead of O(N^2): a batch of 16,384 needs tens of MB instead of several GB. The gradients
are those of the unchunked loss up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from vlm.model import CLIPOutput

from .distributed import gather_with_grad

__all__ = ["clip_loss", "sigmoid_loss", "contrastive_loss", "distill_loss", "GlobalBatch", "gather_batch"]


@dataclass
class GlobalBatch:
    """Normalised features of every process and the rows this process is responsible for."""

    image_embeds: Tensor  # (N, E), all processes
    text_embeds: Tensor  # (N, E)
    offset: int  # first row of this process
    count: int  # rows of this process
    world_size: int

    @property
    def total(self) -> int:
        """Rows gathered from all processes (N)."""
        return len(self.image_embeds)

    def local(self, x: Tensor) -> Tensor:
        """This process's rows of `x` (N, ...) -> (count, ...)."""
        return x[self.offset : self.offset + self.count]


def gather_batch(image_embeds: Tensor, text_embeds: Tensor) -> GlobalBatch:
    """One collective for both towers: the features side by side, gathered with gradients."""
    dim = image_embeds.shape[1]
    g = gather_with_grad(torch.cat([image_embeds, text_embeds], dim=1))
    return GlobalBatch(g.features[:, :dim], g.features[:, dim:], g.offset, g.count, g.world_size)


def _chunks(n: int, chunk_size: int) -> list[tuple[int, int]]:
    step = chunk_size if chunk_size > 0 else max(n, 1)
    return [(s, min(s + step, n)) for s in range(0, n, step)]


def _ce_rows(q: Tensor, k: Tensor, scale: Tensor, offset: int) -> Tensor:
    """Sum over rows of q of cross-entropy(scale * q @ k.T), row i's target being column offset + i."""
    logits = scale * q @ k.T  # (n, N)
    targets = torch.arange(offset, offset + len(q), device=q.device)
    return F.cross_entropy(logits, targets, reduction="sum")


def _sigmoid_rows(q: Tensor, k: Tensor, scale: Tensor, bias: Tensor, offset: int) -> Tensor:
    """Sum over rows of q of -log sigmoid(+-(scale * q.k + bias)): + on the pair, - elsewhere."""
    logits = scale * q @ k.T + bias  # (n, N)
    signs = -torch.ones_like(logits)
    rows = torch.arange(len(q), device=q.device)
    signs[rows, rows + offset] = 1.0
    return -F.logsigmoid(signs * logits).sum()


def _chunked_sum(fn, q: Tensor, k: Tensor, *args, offset: int, chunk_size: int) -> Tensor:
    """Sum of fn over row blocks of q; each block is recomputed in backward instead of stored."""
    if chunk_size <= 0 or chunk_size >= len(q):
        return fn(q, k, *args, offset)
    total = q.new_zeros(())
    for start, end in _chunks(len(q), chunk_size):
        total = total + checkpoint(fn, q[start:end], k, *args, offset + start, use_reentrant=False)
    return total


def clip_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    *,
    local_loss: bool = True,
    chunk_size: int = 0,
) -> Tensor:
    """Symmetric InfoNCE of this process's normalised features (B, E) against the global batch.

    `logit_scale` is the exponentiated temperature. With one process the value is the mean of the
    image-to-text and text-to-image cross-entropies; with several, the loss of each process is the
    share whose gradients, averaged over processes, are those of the global loss.
    """
    g = gather_batch(image_embeds.float(), text_embeds.float())
    scale = logit_scale.float()
    if local_loss:
        rows = (g.local(g.image_embeds), g.local(g.text_embeds), g.offset)
    else:
        rows = (g.image_embeds, g.text_embeds, 0)
    q_img, q_txt, offset = rows
    i2t = _chunked_sum(_ce_rows, q_img, g.text_embeds, scale, offset=offset, chunk_size=chunk_size)
    t2i = _chunked_sum(_ce_rows, q_txt, g.image_embeds, scale, offset=offset, chunk_size=chunk_size)
    return (i2t + t2i) / (2 * g.total) * _share(g, local_loss)


def sigmoid_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    local_loss: bool = True,
    chunk_size: int = 0,
) -> Tensor:
    """SigLIP's pairwise sigmoid loss over the global batch, summed over pairs and divided by the
    number of images, as in the paper; process shares as in `clip_loss`."""
    if logit_bias is None:
        raise ValueError(
            "the sigmoid loss needs a model with a logit_bias; create it with init_logit_bias (e.g. the "
            "'tiny-siglip' preset, or model.overrides={init_logit_bias: -10}) or use loss.kind=clip"
        )
    g = gather_batch(image_embeds.float(), text_embeds.float())
    q, offset = (g.local(g.image_embeds), g.offset) if local_loss else (g.image_embeds, 0)
    args = (logit_scale.float(), logit_bias.float())
    total = _chunked_sum(_sigmoid_rows, q, g.text_embeds, *args, offset=offset, chunk_size=chunk_size)
    return total / g.total * _share(g, local_loss)


def _share(g: GlobalBatch, local_loss: bool) -> float:
    # DDP averages gradients over processes. Each local loss covers 1/world of the rows, so it is
    # scaled by world; a full-matrix loss is the same on every process and is left as it is.
    return float(g.world_size) if local_loss else 1.0


def contrastive_loss(output: CLIPOutput, kind: str = "clip", *, local_loss: bool = True, chunk_size: int = 0) -> Tensor:
    """The loss `kind` ("clip" or "siglip") of a model output."""
    if kind == "clip":
        return clip_loss(
            output.image_embeds, output.text_embeds, output.logit_scale, local_loss=local_loss, chunk_size=chunk_size
        )
    if kind == "siglip":
        return sigmoid_loss(
            output.image_embeds,
            output.text_embeds,
            output.logit_scale,
            output.logit_bias,
            local_loss=local_loss,
            chunk_size=chunk_size,
        )
    raise ValueError(f"unknown loss kind {kind!r}; use 'clip' or 'siglip'")


def _soft_ce_rows(
    q: Tensor, k: Tensor, scale: Tensor, teacher_k: Tensor, teacher_scale: Tensor, dim: int, offset: int
) -> Tensor:
    """Sum over rows of the cross-entropy from the teacher's row distribution to the student's.

    `q` holds the student's rows (n, dim) and the teacher's (n, Et) side by side, so that one row block of
    `_chunked_sum` slices both; `offset` is unused (no targets: the teacher's distribution is the target).
    """
    student = (scale * q[:, :dim] @ k.T).log_softmax(dim=1)  # (n, N)
    teacher = (teacher_scale * q[:, dim:] @ teacher_k.T).softmax(dim=1)  # (n, N)
    return -(teacher * student).sum()


def distill_loss(
    image_embeds: Tensor,
    text_embeds: Tensor,
    logit_scale: Tensor,
    teacher_image_embeds: Tensor,
    teacher_text_embeds: Tensor,
    teacher_logit_scale: Tensor,
    *,
    local_loss: bool = True,
    chunk_size: int = 0,
) -> Tensor:
    """open_clip's `DistillClipLoss` term over the global batch: the mean of the image-to-text and
    text-to-image cross-entropies between the teacher's and the student's softmaxed logit rows.

    Logits are compared, not embeddings, so the teacher's embedding width may differ from the student's;
    the teacher's features carry no gradient. Process shares and chunking as in `clip_loss`.
    """
    g = gather_batch(image_embeds.float(), text_embeds.float())
    t = gather_batch(teacher_image_embeds.detach().float(), teacher_text_embeds.detach().float())
    pick = g.local if local_loss else (lambda x: x)
    scales = (logit_scale.float(), teacher_logit_scale.float())
    total = g.image_embeds.new_zeros(())
    directions = (
        (g.image_embeds, t.image_embeds, g.text_embeds, t.text_embeds),  # image -> text
        (g.text_embeds, t.text_embeds, g.image_embeds, t.image_embeds),  # text -> image
    )
    for q, tq, k, tk in directions:
        rows = torch.cat([pick(q), pick(tq)], dim=1)  # (n, E + Et)
        total = total + _chunked_sum(
            _soft_ce_rows, rows, k, scales[0], tk, scales[1], q.shape[1], offset=0, chunk_size=chunk_size
        )
    return total / (2 * g.total) * _share(g, local_loss)
