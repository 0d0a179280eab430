"""Batches of image-text pairs for training: decoded in DataLoader workers, bad samples skipped.

Three properties the loop relies on:

- Every batch is a pure function of (seed, epoch, step, process): the order comes from a seeded
  permutation (or the seeded stream shuffle), and each sample's random augmentation from a seed
  derived from (seed, epoch, sample). Workers, prefetching and restarts change nothing, so a resumed
  run sees exactly the batches an uninterrupted one would.
- Each batch carries its `Position`, the point in the data a checkpoint records.
- A sample that cannot be used (missing or broken image, empty caption, one that takes longer than
  `sample_timeout` to load) is dropped from its batch and reported in `PairBatch.failures`; the
  batch goes on without it and no replacement is waited for.
- A caption longer than the model's context follows `data.text_overflow`: cut, and counted in
  `PairBatch.truncated` for the run's one total (`report_truncated`), or an error naming it.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vlm.data import Failure
from vlm.images import ImageLoadError, load_image
from vlm.hf_tokenizer import HFTokenizer
from vlm.tokenizer import Tokenizer, get_tokenizer

from .sources import MapSource, Record, StreamSource

__all__ = [
    "Position",
    "SampleKey",
    "Sample",
    "PairBatch",
    "PairDataset",
    "PairBatchSampler",
    "collate_pairs",
    "caption_tokenizer",
    "build_loader",
    "report_truncated",
]

logger = logging.getLogger(__name__)

# How the trainer's overflow policy is set, for the tokenizer's errors and the run's total.
TEXT_OVERFLOW_KEY = "data.text_overflow={}"


@dataclass(frozen=True)
class Position:
    """Where a process stands in its data: `step` batches of `epoch` are consumed."""

    epoch: int = 0
    step: int = 0


@dataclass(frozen=True)
class SampleKey:
    """What the sampler sends to a worker: where the sample sits, and the record itself when streamed."""

    epoch: int
    step: int
    index: int  # position in the source (indexable) or in the epoch's stream
    record: Record | None = None
    # In a mix (`training.mixing`): passes through its source before this draw, so that a repeated
    # row gets a fresh augmentation.
    repeat: int = 0


@dataclass
class PairBatch:
    """This process's share of one step: images (B, 3, H, W), token ids (B, L), what was skipped."""

    images: Tensor
    texts: Tensor
    failures: list[Failure]
    position: Position  # the data position after this batch
    names: list[str] = field(default_factory=list)
    truncated: int = 0  # captions cut to the model's context

    def __len__(self) -> int:
        return len(self.images)

    def pin_memory(self) -> "PairBatch":
        """Pins both tensors in place for faster copies to the GPU (the DataLoader calls it); returns self."""
        self.images, self.texts = self.images.pin_memory(), self.texts.pin_memory()
        return self


class _SampleTimeout(Exception):
    pass


class _deadline:
    """Raises _SampleTimeout after `seconds` (only in a main thread, where signals are delivered)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds if threading.current_thread() is threading.main_thread() else 0

    def __enter__(self) -> None:
        if self.seconds:
            self.previous = signal.signal(signal.SIGALRM, self._raise)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)

    def __exit__(self, *exc: Any) -> None:
        if self.seconds:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self.previous)

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise _SampleTimeout


def sample_seed(seed: int, epoch: int, index: int, repeat: int = 0) -> int:
    """A well-mixed seed for one sample's augmentation (the seeds of single-source runs, `repeat` 0, are
    those of earlier versions, so their runs resume unchanged)."""
    entropy = [seed, epoch, index] + ([repeat] if repeat else [])
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


@dataclass
class Sample:
    """One decoded sample, or the reason it cannot be used."""

    key: SampleKey
    name: str
    image: Tensor | None = None  # (3, H, W)
    text: str | None = None
    reason: str | None = None  # why the sample is skipped; None when it is usable


class PairDataset(Dataset):
    """`SampleKey` -> `Sample`: the transformed image and the caption, or the reason to skip it."""

    def __init__(self, source: MapSource | None, transform: Any, *, seed: int = 0, timeout: float = 0.0) -> None:
        self.source = source
        self.transform = transform
        self.seed = seed
        self.timeout = timeout

    def __getitem__(self, key: SampleKey) -> Sample:
        record = key.record if key.record is not None else self.source[key.index]
        reason = _caption_problem(record.text)
        if reason:
            return Sample(key, record.name, reason=reason)
        try:
            with _deadline(self.timeout), torch.random.fork_rng(devices=[]):
                # The CPU generator only: torch.manual_seed would also queue a (costly) CUDA seeding.
                torch.default_generator.manual_seed(sample_seed(self.seed, key.epoch, key.index, key.repeat))
                image = self.transform(load_image(record.image))
        except _SampleTimeout:
            reason = f"took longer than {self.timeout:g} s to load (data.sample_timeout)"
        except ImageLoadError as err:
            reason = err.reason
        except (OSError, ValueError, TypeError) as err:
            reason = f"{type(err).__name__}: {err}"
        else:
            return Sample(key, record.name, image, record.text)
        return Sample(key, record.name, reason=reason)

    def __len__(self) -> int:
        return len(self.source) if self.source is not None else 0


def _caption_problem(text: Any) -> str | None:
    if text is None:
        return "no caption"
    if not isinstance(text, str):
        return f"caption is a {type(text).__name__}, not text"
    if not text.strip():
        return "empty caption"
    return None


class collate_pairs:
    """Stacks the usable samples and tokenizes their captions with the model's tokenizer; lists the rest as
    failures."""

    def __init__(self, image_size: int, tokenizer: Tokenizer | HFTokenizer) -> None:
        self.image_size = image_size
        self.tokenizer = tokenizer
        self.context_length = tokenizer.context_length

    def __call__(self, samples: list[Sample]) -> PairBatch:
        good = [s for s in samples if s.reason is None]
        failures = [Failure(s.key.index, s.name, s.reason) for s in samples if s.reason is not None]
        last = samples[-1].key
        position = Position(last.epoch, last.step + 1)
        if not good:
            size = self.image_size
            empty = torch.zeros(0, 3, size, size), torch.zeros(0, self.context_length, dtype=torch.long)
            return PairBatch(*empty, failures, position)
        images = torch.stack([s.image for s in good])
        before = self.tokenizer.num_truncated
        texts = self.tokenizer([s.text for s in good])
        truncated = self.tokenizer.num_truncated - before
        return PairBatch(images, texts, failures, position, [s.name for s in good], truncated)


class PairBatchSampler:
    """Endless lists of `SampleKey`s, one list per step: this process's slice of each global batch.

    Indexable sources: each epoch is a permutation seeded by (seed, epoch), cut into
    `len // global_batch` global batches; process r takes rows [r * local, (r + 1) * local) of each.
    Streamed sources: each process reads its own split of the seeded shuffle, `local` records a step.
    Either way it starts at `start` and moves on to the next epoch by itself.
    """

    def __init__(
        self,
        source: MapSource | StreamSource,
        *,
        local_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start: Position = Position(),
    ) -> None:
        self.source = source
        self.local_batch = local_batch
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.start = start
        if isinstance(source, MapSource):
            global_batch = local_batch * world_size
            if len(source) == 0:
                raise ValueError(f"{source.description} is empty: it has no samples; give data with image-text pairs")
            if len(source) < global_batch:
                raise ValueError(
                    f"{source.description} has {len(source)} samples, fewer than one global batch "
                    f"(data.batch_size={global_batch}); set data.batch_size to at most {len(source)}, or give more data"
                )
            self.steps_per_epoch = len(source) // global_batch

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, step = self.start.epoch, self.start.step
        while True:
            epoch_batches = self._map_epoch if isinstance(self.source, MapSource) else self._stream_epoch
            produced = 0
            for keys in epoch_batches(epoch, step):
                produced += 1
                yield keys
            if produced == 0 and step == 0:
                raise ValueError(f"{self.source.description} gave no full batch of {self.local_batch} in epoch {epoch}")
            epoch, step = epoch + 1, 0

    def _map_epoch(self, epoch: int, first_step: int) -> Iterator[list[SampleKey]]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.source), generator=g).tolist()
        global_batch = self.local_batch * self.world_size
        for step in range(first_step, self.steps_per_epoch):
            start = step * global_batch + self.rank * self.local_batch
            yield [SampleKey(epoch, step, i) for i in order[start : start + self.local_batch]]

    def _stream_epoch(self, epoch: int, first_step: int) -> Iterator[list[SampleKey]]:
        records = self.source.iterate(
            epoch=epoch,
            seed=self.seed,
            rank=self.rank,
            world_size=self.world_size,
            skip=first_step * self.local_batch,
        )
        step, index, keys = first_step, first_step * self.local_batch, []
        for record in records:
            keys.append(SampleKey(epoch, step, index, record))
            index += 1
            if len(keys) == self.local_batch:
                yield keys
                step, keys = step + 1, []


def caption_tokenizer(model: Any, text_overflow: str) -> Tokenizer | HFTokenizer:
    """The model's tokenizer for training captions under `data.text_overflow`: silent per batch, since
    the loop reports one total (`report_truncated`); errors name the config key."""
    return get_tokenizer(model, overflow=text_overflow, overflow_setting=TEXT_OVERFLOW_KEY, warn_each_call=False)


def report_truncated(truncated: int) -> None:
    """Logs the run's total of truncated captions (nothing when there were none)."""
    if truncated:
        logger.warning(
            "%d captions were longer than the model's context and were truncated (%s); set %s to refuse them",
            truncated,
            TEXT_OVERFLOW_KEY.format("truncate"),
            TEXT_OVERFLOW_KEY.format("error"),
        )


def build_loader(
    source: MapSource | StreamSource,
    transform: Any,
    *,
    local_batch: int,
    image_size: int,
    tokenizer: Tokenizer | HFTokenizer,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    start: Position = Position(),
    num_workers: int = 0,
    sample_timeout: float = 0.0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader of `PairBatch`es for this process, starting at `start`, running for ever (a
    `training.mixing.MixedSource` is drawn from per its weights); captions are tokenized with
    `tokenizer` (the model's: `caption_tokenizer(model, config.data.text_overflow)`)."""
    from .mixing import MixedBatchSampler, MixedSource  # mixing builds on this module's keys

    kind = MixedBatchSampler if isinstance(source, MixedSource) else PairBatchSampler
    sampler = kind(source, local_batch=local_batch, rank=rank, world_size=world_size, seed=seed, start=start)
    dataset = PairDataset(
        source if isinstance(source, MapSource) else None, transform, seed=seed, timeout=sample_timeout
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_pairs(image_size, tokenizer),
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
    )
