"""Distillation from a frozen teacher (`distill.*`), as open_clip's `DistillClipLoss`: the student's
contrastive loss plus `distill.weight` times the cross-entropy from the teacher's image-text logit
distributions to the student's, both directions (`training.losses.distill_loss`).

- Online (`distill.model`): the teacher, frozen and in eval mode, embeds the student's own batch without
  gradients. It must read the same inputs: the same image size and tokenizer (images are re-normalised
  when only the mean and std differ). A teacher with other inputs is distilled offline.
- Offline (`distill.embeddings=DIR`): the teacher's embeddings in clip-retrieval's layout,
  DIR/img_emb/img_emb_{k}.npy and DIR/text_emb/text_emb_{k}.npy, the shards' rows in order being the rows
  of the training table (`data.train`, one indexable source), and its temperature in DIR/teacher.json
  or `distill.logit_scale`. Rows are matched by position, not by image name: a table may hold an image
  several times with different captions. `write_teacher_embeddings` writes such a directory with the
  teacher's own preprocessing.

Only whole-batch steps are supported (`loss.accum_steps=1`): GradCache's cached features would need the
distillation term in its feature gradients too.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlm.checkpoint import load
from vlm.config import CLIPConfig
from vlm.data.embedding_shards import numbered_shards
from vlm.files import atomic_directory
from vlm.model import CLIP
from vlm.transforms import image_transform

from .config import DataConfig, TrainConfig, setting_errors
from .data import PairBatch, PairDataset, SampleKey, caption_tokenizer, collate_pairs
from .distill_config import DistillConfig
from .grad_cache import LossValue, _global, _loss
from .losses import distill_loss
from .sources import MapSource, StreamSource

__all__ = [
    "DistillConfig",
    "TeacherEmbeddings",
    "OnlineTeacher",
    "OfflineTeacher",
    "RowBatch",
    "load_teacher",
    "teacher_batches",
    "distill_loss_and_gradients",
    "write_teacher_embeddings",
]

logger = logging.getLogger(__name__)

TEACHER_FILE = "teacher.json"


@dataclass
class TeacherEmbeddings:
    """The teacher's normalised embeddings of a batch, (B, Et) each, and its exponentiated temperature."""

    image_embeds: Tensor
    text_embeds: Tensor
    logit_scale: Tensor  # scalar


@dataclass
class RowBatch(PairBatch):
    """A `PairBatch` with the source row of each of its samples (offline distillation looks them up)."""

    rows: list[int] | None = None


class OnlineTeacher:
    """A frozen model in eval mode that embeds the student's inputs without gradients."""

    def __init__(self, model: CLIP, student: CLIPConfig) -> None:
        _check_same_inputs(model.config, student)
        self.model = model.eval().requires_grad_(False)
        # The student's normalisation undone, the teacher's applied: x_t = x_s * gain + shift.
        s, t = student.vision, model.config.vision
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)  # noqa: E731
        self.gain = as_tensor(s.image_std) / as_tensor(t.image_std)
        self.shift = (as_tensor(s.image_mean) - as_tensor(t.image_mean)) / as_tensor(t.image_std)
        self.renormalise = s.image_mean != t.image_mean or s.image_std != t.image_std

    @torch.no_grad()
    def __call__(self, batch: PairBatch, images: Tensor, texts: Tensor) -> TeacherEmbeddings:
        if self.renormalise:
            images = images * self.gain.to(images.device) + self.shift.to(images.device)
        out = self.model(images, texts)
        return TeacherEmbeddings(out.image_embeds, out.text_embeds, out.logit_scale)


def _check_same_inputs(teacher: CLIPConfig, student: CLIPConfig) -> None:
    pairs = [("vision.image_size", teacher.vision.image_size, student.vision.image_size)]
    for name in ("tokenizer", "tokenizer_clean", "context_length"):
        pairs.append((f"text.{name}", getattr(teacher.text, name), getattr(student.text, name)))
    for name, theirs, ours in pairs:
        if theirs != ours:
            raise ValueError(
                f"distill.model reads other inputs than the student: its {name} is {theirs!r}, the student's "
                f"{ours!r}; an online teacher embeds the student's batch. Write its embeddings with its own "
                "preprocessing (training.distill.write_teacher_embeddings) and set distill.embeddings instead"
            )


class OfflineTeacher:
    """Stored teacher embeddings, looked up by source row; the shards are memory-mapped, not loaded."""

    def __init__(self, directory: str | Path, logit_scale: float | None = None) -> None:
        self.directory = Path(directory)
        self.image = _shards(self.directory, "img_emb")
        self.text = _shards(self.directory, "text_emb")
        self.offsets = np.cumsum([0] + [len(s) for s in self.image])
        if self.rows != sum(len(s) for s in self.text):
            raise ValueError(
                f"distill.embeddings={self.directory}: img_emb holds {self.rows} rows and text_emb "
                f"{sum(len(s) for s in self.text)}; both must hold one row per row of data.train"
            )
        self.text_offsets = np.cumsum([0] + [len(s) for s in self.text])
        self.logit_scale = torch.tensor(_logit_scale(self.directory, logit_scale))

    @property
    def rows(self) -> int:
        """Rows stored (one per row of the training source)."""
        return int(self.offsets[-1])

    def __call__(self, batch: PairBatch, images: Tensor, texts: Tensor) -> TeacherEmbeddings:
        rows = getattr(batch, "rows", None)
        assert rows is not None and len(rows) == len(batch), "offline distillation needs `teacher_batches`"
        image = _take(self.image, self.offsets, rows)
        text = _take(self.text, self.text_offsets, rows)
        embed = lambda a: F.normalize(torch.from_numpy(a).float().to(images.device), dim=-1)  # noqa: E731
        return TeacherEmbeddings(embed(image), embed(text), self.logit_scale.to(images.device))


def _shards(directory: Path, kind: str) -> list[np.ndarray]:
    folder = directory / kind
    found = numbered_shards(folder, kind, "npy") if folder.is_dir() else {}
    if not found or sorted(found) != list(range(len(found))):
        raise ValueError(
            f"distill.embeddings={directory}: expected {kind}/{kind}_0.npy, {kind}_1.npy, ... (clip-retrieval's "
            f"layout), found {[p.name for p in found.values()] or 'none'}; write them with "
            "training.distill.write_teacher_embeddings or point distill.embeddings at such a directory"
        )
    arrays = [np.load(found[k], mmap_mode="r") for k in range(len(found))]
    bad = [found[k].name for k, a in enumerate(arrays) if a.ndim != 2 or a.shape[1] != arrays[0].shape[1]]
    if bad:
        raise ValueError(f"distill.embeddings={directory}: {kind} shards {bad} are not (rows, dim) of one width")
    return arrays


def _logit_scale(directory: Path, given: float | None) -> float:
    if given is not None:
        return float(given)
    meta = directory / TEACHER_FILE
    if not meta.is_file():
        raise ValueError(
            f"distill.embeddings={directory} has no {TEACHER_FILE} with the teacher's logit_scale; set "
            "distill.logit_scale to the teacher's exp(logit_scale) (100 for CLIP models)"
        )
    return float(json.loads(meta.read_text())["logit_scale"])


def _take(shards: list[np.ndarray], offsets: np.ndarray, rows: list[int]) -> np.ndarray:
    index = np.asarray(rows, dtype=np.int64)
    shard = np.searchsorted(offsets, index, side="right") - 1
    out = np.empty((len(index), shards[0].shape[1]), dtype=np.float32)
    for k in np.unique(shard):
        mask = shard == k
        out[mask] = shards[k][index[mask] - offsets[k]]
    return out


# ---- setup and the step ------------------------------------------------------------------------------
def load_teacher(
    config: TrainConfig, student: CLIPConfig, device: torch.device
) -> OnlineTeacher | OfflineTeacher | None:
    """The teacher of `config.distill` on `device`, or None without one; errors name the keys."""
    cfg = config.distill
    if not cfg.enabled:
        return None
    if config.loss.accum_steps != 1:
        raise ValueError(
            f"distillation supports loss.accum_steps=1 only, got loss.accum_steps={config.loss.accum_steps}; "
            "set loss.accum_steps=1 (lower data.batch_size if memory is short) or drop distill.*"
        )
    if cfg.embeddings:
        return OfflineTeacher(cfg.embeddings, cfg.logit_scale)
    # A teacher built from a preset draws random weights: the student's RNG streams must not move.
    with setting_errors("distill.model", cfg.model), torch.random.fork_rng(devices=[]):
        model = load(cfg.model, pretrained=cfg.pretrained)
    logger.info("distilling from %s (weight %g)", cfg.model, cfg.weight)
    return OnlineTeacher(model.to(device), student)


def teacher_batches(teacher: object, source: MapSource | StreamSource, loader: Iterator) -> Iterator[PairBatch]:
    """The loader's batches; for an offline teacher, as `RowBatch`es that name their source rows.

    The rows come from a second pass over the loader's own batch sampler, which yields the same keys
    in the same order (batches are a pure function of seed and position); the failed ones are dropped
    as the collate function drops them."""
    if not isinstance(teacher, OfflineTeacher):
        return iter(loader)
    from .mixing import MixedSource

    if not isinstance(source, MapSource) or isinstance(source, MixedSource):
        raise ValueError(
            f"distill.embeddings are matched to the rows of one table or dataset, and {source.description} is "
            f"{'a mix' if isinstance(source, MapSource) else 'streamed'}; train on one indexable data.train, "
            "or distill online with distill.model"
        )
    if len(source) != teacher.rows:
        raise ValueError(
            f"distill.embeddings={teacher.directory} holds {teacher.rows} rows and {source.description} has "
            f"{len(source)}; write the embeddings of this data.train (training.distill.write_teacher_embeddings)"
        )
    return _with_rows(loader)


def _with_rows(loader) -> Iterator[RowBatch]:
    keys = iter(loader.batch_sampler)
    for batch in loader:
        batch_keys: list[SampleKey] = next(keys)
        failed = {f.index for f in batch.failures}
        rows = [k.index for k in batch_keys if k.index not in failed]
        if len(rows) != len(batch):
            raise RuntimeError(f"batch at {batch.position} has {len(batch)} samples and {len(rows)} rows")
        yield RowBatch(**{f.name: getattr(batch, f.name) for f in fields(PairBatch)}, rows=rows)


def distill_loss_and_gradients(
    model: nn.Module, teacher, batch: PairBatch, images: Tensor, texts: Tensor, config: TrainConfig, accelerator
) -> LossValue:
    """`grad_cache.loss_and_gradients` for accum_steps=1 with the distillation term added."""
    with accelerator.autocast():
        output = model(images, texts)
        target = teacher(batch, images, texts)
    term = distill_loss(
        output.image_embeds,
        output.text_embeds,
        output.logit_scale,
        target.image_embeds,
        target.text_embeds,
        target.logit_scale,
        local_loss=config.loss.local_loss,
        chunk_size=config.loss.chunk_size,
    )
    loss = _loss(output, config.loss) + config.distill.weight * term
    accelerator.backward(loss)  # also for a NaN loss, as loss_and_gradients does (DDP expects it)
    return _global(loss)


# ---- offline embeddings ---------------------------------------------------------------------------------
@torch.no_grad()
def write_teacher_embeddings(
    teacher: CLIP, data: DataConfig, directory: str | Path, *, batch_size: int = 256, num_workers: int = 0
) -> Path:
    """Embeds every row of `data.train` with `teacher` and its own evaluation preprocessing into
    `directory` (img_emb/img_emb_0.npy, text_emb/text_emb_0.npy, teacher.json), written atomically.
    A row that cannot be read gets zeros: training skips it as well."""
    from torch.utils.data import DataLoader

    from .sources import open_pairs

    source = open_pairs(data)
    if not isinstance(source, MapSource):
        raise ValueError(f"{source.description} is streamed; offline teacher embeddings need a table or a dataset")
    teacher = teacher.eval()
    device = next(teacher.parameters()).device
    n = len(source)
    batches = [[SampleKey(0, 0, i) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
    loader = DataLoader(
        PairDataset(source, image_transform(teacher.config, train=False)),
        batch_sampler=batches,
        collate_fn=collate_pairs(teacher.config.vision.image_size, caption_tokenizer(teacher, "truncate")),
        num_workers=num_workers,
    )
    image = np.zeros((len(source), teacher.config.embed_dim), dtype=np.float32)
    text = np.zeros_like(image)
    for keys, batch in zip(batches, loader):
        failed = {f.index for f in batch.failures}
        rows = [k.index for k in keys if k.index not in failed]
        if rows:
            out = teacher(batch.images.to(device), batch.texts.to(device))
            image[rows], text[rows] = out.image_embeds.float().cpu().numpy(), out.text_embeds.float().cpu().numpy()
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        for kind, array in (("img_emb", image), ("text_emb", text)):
            (tmp / kind).mkdir()
            np.save(tmp / kind / f"{kind}_0.npy", array)
        scale = float(teacher.logit_scale.exp())
        (tmp / TEACHER_FILE).write_text(json.dumps({"logit_scale": scale, "rows": len(source)}))
    logger.info("wrote the teacher's embeddings of %d rows to %s", len(source), directory)
    return directory
