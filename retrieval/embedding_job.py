"""Resumable, shardable embedding of a collection.

The collection is cut into chunks of `chunk_size` consecutive items. Each finished chunk is written as
one shard file, ``chunk-000012.npz`` (positions, L2-normalised vectors, failures), aside and then renamed
into place: a shard exists completely or not at all, so the shard files are the record of what is done.
A job killed at any moment (SIGKILL included) and started again embeds only the chunks without a shard,
and every item ends up embedded exactly once. ``job.json`` binds the directory to the model fingerprint,
the preprocessing and the exact item list; a restart with anything else is refused.

Under `accelerate launch`, rank r of w takes the chunks c with c % w == r and writes their shards into
the same directory; once every rank is done, the shards of all ranks form the whole collection.
Unreadable images are counted and reported by name in their shard's failure list and get no vector.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from vlm.data import Failure, FailureLog, iter_image_batches
from vlm.distributed import dist_info, launched_without_device  # dist_info re-exported: build.py takes it from here
from vlm.embed import embed_texts
from vlm.files import atomic_path, atomic_write_text
from vlm.model import CLIP
from vlm.transforms import image_transform

from .sources import Collection, Subset

__all__ = ["EmbedOptions", "Shard", "JobStatus", "EmbeddingJob", "dist_info", "barrier", "preprocessing"]

logger = logging.getLogger(__name__)

JOB_FILE = "job.json"


@dataclass(frozen=True)
class EmbedOptions:
    """How an `EmbeddingJob` embeds: batching, workers, JPEG draft decoding, shard size, progress bar."""

    batch_size: int = 64
    num_workers: int = 0
    # JPEGs decode at a reduced scale that stays at least the model's input size: several times faster
    # for camera photos, and the embedding moves by less than the resize itself does (see bench/).
    draft: bool = True
    # Items per shard: the most work a kill can lose. Large enough that shard files stay few.
    chunk_size: int = 4096
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("batch_size", "chunk_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"EmbedOptions.{name} must be positive, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"EmbedOptions.num_workers must be >= 0, got {self.num_workers}")


@dataclass
class Shard:
    """One chunk's result: positions into the collection (ascending), their vectors, and failures."""

    chunk: int
    positions: np.ndarray  # (m,) int64
    xb: np.ndarray  # (m, d) float32
    failures: list[Failure]


@dataclass
class JobStatus:
    """Progress of an embedding job after one `run`: shards done out of all chunks, and what this call did."""

    chunks: int  # in the whole job
    done: int  # chunks with a shard, all ranks
    embedded_now: int  # items embedded by this call
    failed_now: int  # unreadable items met by this call

    @property
    def complete(self) -> bool:
        """True when every chunk has its shard (on any rank)."""
        return self.done == self.chunks


class EmbeddingJob:
    """Embeds `collection` with `model` into shard files under `directory` (see the module docstring)."""

    def __init__(
        self,
        directory: str | Path,
        model: CLIP,
        collection: Collection,
        options: EmbedOptions = EmbedOptions(),
        *,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
        self.directory = Path(directory)
        self.model = model
        self.collection = collection
        self.options = options
        self.rank, self.world_size = rank, world_size
        self.fingerprint = model.fingerprint()
        recorded = self._recorded_chunk_size()
        if recorded is not None and recorded != options.chunk_size:
            # Shards are cut by chunk: a restart keeps the chunking it started with.
            logger.info("resuming %s with its chunk size %d (not %d)", self.directory, recorded, options.chunk_size)
            self.options = replace(options, chunk_size=recorded)
        self.num_chunks = -(-len(collection) // self.options.chunk_size)

    # ---- the record -----------------------------------------------------------------------------
    def describe(self) -> dict:
        """What the shards depend on: a restart must match it exactly."""
        return {
            "model_fingerprint": self.fingerprint,
            "modality": self.collection.modality,
            "items": len(self.collection),
            "items_digest": self.collection.digest(),
            "chunk_size": self.options.chunk_size,
            "embed_dim": self.model.config.embed_dim,
            "preprocessing": preprocessing(self.model, self.options.draft),
        }

    def _recorded_chunk_size(self) -> int | None:
        try:
            return int(json.loads((self.directory / JOB_FILE).read_text())["chunk_size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / JOB_FILE
        wanted = json.loads(json.dumps(self.describe()))  # tuples become lists, as in the file
        if path.is_file():
            found = json.loads(path.read_text())
            if found != wanted:
                changed = sorted(k for k in wanted if found.get(k) != wanted[k])
                raise ValueError(
                    f"{self.directory} holds an embedding job for a different {', '.join(changed)}; "
                    "delete that directory to start over, or run with the same model and items"
                )
            return
        # Every rank may write it: the content is identical, and the rename is atomic.
        atomic_write_text(path, json.dumps(wanted, indent=2, sort_keys=True))

    def shard_path(self, chunk: int) -> Path:
        """The .npz file holding (or to hold) chunk `chunk`'s vectors."""
        return self.directory / f"chunk-{chunk:06d}.npz"

    def done_chunks(self) -> list[int]:
        """Chunks whose shard file exists, ascending."""
        return [c for c in range(self.num_chunks) if self.shard_path(c).is_file()]

    def missing_chunks(self) -> list[int]:
        """Chunks still to embed (no shard file yet), ascending."""
        return [c for c in range(self.num_chunks) if not self.shard_path(c).is_file()]

    # ---- running --------------------------------------------------------------------------------
    def run(self) -> JobStatus:
        """Embeds this rank's chunks that have no shard yet; returns the job's state afterwards."""
        self._open()
        mine = [c for c in self.missing_chunks() if c % self.world_size == self.rank]
        positions = [p for c in mine for p in range(*self._bounds(c))]
        if mine:
            logger.info(
                "embedding %d items in %d chunks (rank %d of %d; %d chunks already done)",
                len(positions),
                len(mine),
                self.rank,
                self.world_size,
                len(self.done_chunks()),
            )
        embedded, failed = 0, 0
        for shard in self._embed(positions):
            self._write(shard)
            embedded, failed = embedded + len(shard.positions), failed + len(shard.failures)
        return JobStatus(self.num_chunks, len(self.done_chunks()), embedded, failed)

    def _bounds(self, chunk: int) -> tuple[int, int]:
        size = self.options.chunk_size
        return chunk * size, min(len(self.collection), (chunk + 1) * size)

    def _embed(self, positions: list[int]) -> Iterator[Shard]:
        """Shards, in order, for the chunks that `positions` covers (whole chunks only)."""
        if not positions:
            return
        batches = (
            self._image_batches(positions) if self.collection.modality == "image" else self._text_batches(positions)
        )
        size = self.options.chunk_size
        pending: dict[int, list] = {}
        for pos, xb, failures in batches:
            for chunk in sorted({int(p) // size for p in pos} | {f.index // size for f in failures}):
                in_chunk = (pos // size) == chunk
                part = pending.setdefault(chunk, [[], [], []])
                part[0].append(pos[in_chunk])
                part[1].append(xb[in_chunk])
                part[2].extend(f for f in failures if f.index // size == chunk)
            for chunk in sorted(pending):
                start, end = self._bounds(chunk)
                if sum(len(p) for p in pending[chunk][0]) + len(pending[chunk][2]) == end - start:
                    yield _shard(chunk, *pending.pop(chunk), self.model.config.embed_dim)

    def _image_batches(self, positions: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray, list[Failure]]]:
        model, collection = self.model, self.collection
        size = model.config.vision.image_size
        sources = Subset(collection.images, positions)
        device, dtype = model.logit_scale.device, model.logit_scale.dtype
        log = FailureLog()
        batches = iter_image_batches(
            sources,
            image_transform(model),
            batch_size=self.options.batch_size,
            num_workers=self.options.num_workers,
            draft_size=(size, size) if self.options.draft else None,
            failure_log=log,
            progress=self.options.progress,
            desc=f"embedding images (rank {self.rank})" if self.world_size > 1 else "embedding images",
        )
        with torch.inference_mode():
            for batch in batches:
                pos = np.asarray(positions, dtype=np.int64)[batch.indices.numpy()]
                xb = (
                    model.encode_image(batch.images.to(device, dtype), normalize=True).float().cpu().numpy()
                    if len(pos)
                    else np.zeros((0, model.config.embed_dim), np.float32)
                )
                failures = [
                    Failure(positions[f.index], collection.keys[positions[f.index]], f.reason) for f in batch.failures
                ]
                yield pos, xb, failures

    def _text_batches(self, positions: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray, list[Failure]]]:
        texts = self.collection.texts()
        step = self.options.chunk_size
        for start in range(0, len(positions), step):
            pos = np.asarray(positions[start : start + step], dtype=np.int64)
            yield pos, embed_texts(self.model, [texts[p] for p in pos]).numpy(), []

    def _write(self, shard: Shard) -> None:
        with atomic_path(self.shard_path(shard.chunk)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    positions=shard.positions,
                    xb=shard.xb,
                    failed_positions=np.asarray([x.index for x in shard.failures], dtype=np.int64),
                    failed_names=np.asarray([x.source for x in shard.failures], dtype=str),
                    failed_reasons=np.asarray([x.reason for x in shard.failures], dtype=str),
                )

    # ---- results --------------------------------------------------------------------------------
    def shards(self) -> Iterator[Shard]:
        """Every chunk's shard in order; ValueError naming the missing chunks if the job is unfinished."""
        missing = self.missing_chunks()
        if missing:
            raise ValueError(
                f"the embedding job in {self.directory} is unfinished: chunks {missing[:10]} "
                f"({len(missing)} of {self.num_chunks}) have no shard; run the same command again to finish it"
            )
        for chunk in range(self.num_chunks):
            yield self.read_shard(chunk)

    def read_shard(self, chunk: int) -> Shard:
        """Chunk `chunk`'s positions, vectors xb (m, d) float32 and failures; ValueError naming the file (and
        telling to delete it and rerun) when it is damaged."""
        path = self.shard_path(chunk)
        try:
            with np.load(path) as data:
                failures = [
                    Failure(int(i), str(n), str(r))
                    for i, n, r in zip(data["failed_positions"], data["failed_names"], data["failed_reasons"])
                ]
                return Shard(chunk, data["positions"].astype(np.int64), data["xb"].astype(np.float32), failures)
        except (OSError, ValueError, KeyError, EOFError) as err:
            raise ValueError(
                f"shard {path} is unreadable ({err}); delete it and run the same command again to redo it"
            ) from err

    def counts(self) -> tuple[int, int]:
        """(embedded, failed) over all shards, reading only their position arrays."""
        embedded = failed = 0
        for chunk in range(self.num_chunks):
            try:
                with np.load(self.shard_path(chunk)) as data:
                    embedded, failed = embedded + len(data["positions"]), failed + len(data["failed_positions"])
            except (OSError, ValueError, KeyError, EOFError) as err:
                raise ValueError(
                    f"shard {self.shard_path(chunk)} is unreadable ({err}); delete it and run again"
                ) from err
        return embedded, failed


def barrier() -> None:
    """Waits for every process of an `accelerate launch` / torchrun group (no-op in a single process)."""
    if dist_info()[1] > 1:
        from accelerate import PartialState

        PartialState(cpu=launched_without_device()).wait_for_everyone()


def _shard(chunk: int, pos: list[np.ndarray], xb: list[np.ndarray], failures: list[Failure], dim: int) -> Shard:
    positions = np.concatenate(pos) if pos else np.zeros(0, np.int64)
    vectors = np.concatenate(xb) if xb else np.zeros((0, dim), np.float32)
    order = np.argsort(positions, kind="stable")
    return Shard(chunk, positions[order], np.ascontiguousarray(vectors[order]), sorted(failures, key=lambda f: f.index))


def preprocessing(model: CLIP, draft: bool) -> dict:
    """The image preprocessing an index's vectors went through (recorded in manifests and jobs)."""
    return {**asdict(image_transform(model)), "draft_jpeg": bool(draft)}
