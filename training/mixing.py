"""Weighted mixing of several training sources (`data.sources`): which source each sample of a step
comes from, and which of its rows.

Two properties the loop relies on, as for a single source (`training.data`):

- The allocation is exact over a run: after any number of samples each source has given its weight's
  share of them to within one sample (up to four sources; half a sample per level of a balanced tree
  in general), and the sources alternate within every batch (`MixSchedule`). It is a closed form of
  the weights and the slot number, so every process computes its own slots alone.
- Every batch is a pure function of (seed, step, process): source `i`'s draws are consumed in order
  from an endless sequence of seeded permutations of its rows (one per pass through it), so a small
  source with a large weight is repeated (resampled) and a large one is sampled with a small weight,
  and a resumed run only needs its step to continue exactly.

Only indexable sources (tables, Hugging Face datasets on disk) are mixed: a streamed source (tar
shards) has no length to pass through and cannot resume from a step alone.
"""

from __future__ import annotations

import bisect
import logging
import math
from fractions import Fraction
from typing import Iterator, Sequence

import torch

from .config import DataConfig
from .data import Position, SampleKey, sample_seed
from .sources import MapSource, Record

__all__ = ["MixedSource", "MixSchedule", "MixedBatchSampler", "share_metrics", "log_shares"]

logger = logging.getLogger(__name__)


class MixedSource(MapSource):
    """Several indexable sources as one: index `offsets[i] + j` is row `j` of source `i`."""

    def __init__(self, sources: Sequence[MapSource], weights: Sequence[float], names: Sequence[str]) -> None:
        if not (len(sources) == len(weights) == len(names)) or not sources:
            counts = f"{len(sources)} sources, {len(weights)} weights, {len(names)} names"
            raise ValueError(f"a mix needs one weight and one name per source, and a source; got {counts}")
        self.sources = list(sources)
        self.weights = [float(w) for w in weights]
        self.names = list(names)
        self.offsets = [0]
        for source in self.sources[:-1]:
            self.offsets.append(self.offsets[-1] + len(source))
        self.description = "a mix of " + ", ".join(
            f"{s.description} (weight {w:g})" for s, w in zip(self.sources, self.weights)
        )

    def __len__(self) -> int:
        return self.offsets[-1] + len(self.sources[-1])

    def __getitem__(self, index: int) -> Record:
        i = bisect.bisect_right(self.offsets, index) - 1
        return self.sources[i][index - self.offsets[i]]


class MixSchedule:
    """Which source each sample slot of a run draws from, in closed form.

    Slots are numbered over the run (step `t`'s global batch is slots [t * batch, (t + 1) * batch)).
    The sources are split in two halves, recursively (a balanced tree); of the first `k` slots, each
    half takes its weight's share rounded to the nearest whole, and so on down the tree. Rounded shares
    of a count never fall as the count grows, so every slot adds one to exactly one source, and
    `counts(k)` is within 1/2 of each weight's share per tree level (within one sample for up to four
    sources, depth / 2 in general): a pure function of `k`, so resuming at any step costs nothing.
    """

    def __init__(self, weights: Sequence[float], global_batch: int) -> None:
        # Weights as exact fractions over one denominator: integer arithmetic stays exact for any run length.
        fractions = [Fraction(w).limit_denominator(10**6) for w in weights]
        if not fractions or any(f <= 0 for f in fractions):
            raise ValueError(f"mixing weights must all be > 0, got {list(weights)}; give each source a positive weight")
        denominator = math.lcm(*(f.denominator for f in fractions))
        self.units = [int(f * denominator) for f in fractions]
        self.global_batch = global_batch

    def _split(self, lo: int, hi: int, count: int) -> tuple[int, int]:
        """The middle of sources [lo, hi) and the left half's rounded share of `count` slots."""
        mid = (lo + hi) // 2
        left, whole = sum(self.units[lo:mid]), sum(self.units[lo:hi])
        return mid, (2 * left * count + whole) // (2 * whole)

    def counts(self, step: int) -> list[int]:
        """Samples each source has given in steps [0, `step`)."""
        out = [0] * len(self.units)
        pending = [(0, len(self.units), step * self.global_batch)]
        while pending:
            lo, hi, count = pending.pop()
            if hi - lo == 1:
                out[lo] = count
                continue
            mid, left = self._split(lo, hi, count)
            pending += [(lo, mid, left), (mid, hi, count - left)]
        return out

    def slot(self, k: int) -> tuple[int, int]:
        """The source of slot `k` and which of its draws that is (0 for its first)."""
        lo, hi, before = 0, len(self.units), k  # `before`: the slots of [lo, hi) among the first k
        while hi - lo > 1:
            mid, left_before = self._split(lo, hi, before)
            if self._split(lo, hi, before + 1)[1] > left_before:
                hi, before = mid, left_before
            else:
                lo, before = mid, before - left_before
        return lo, before


def share_metrics(data: DataConfig, step: int) -> dict[str, float]:
    """The metrics-log entries ``share/I``: source I's share of the samples drawn in steps [0, `step`)
    (skipped ones included: they are counted apart, as `skipped`); {} without `data.sources`."""
    if not data.sources:
        return {}
    counts = MixSchedule([s.weight for s in data.sources], data.batch_size).counts(step)
    drawn = sum(counts)
    return {f"share/{i}": c / drawn if drawn else 0.0 for i, c in enumerate(counts)}


def log_shares(data: DataConfig, step: int) -> None:
    """Logs each source's samples and share after `step` steps, beside its weight's share."""
    if not data.sources or not step:
        return
    counts = MixSchedule([s.weight for s in data.sources], data.batch_size).counts(step)
    total = sum(s.weight for s in data.sources)
    parts = [
        f"share/{i} {s.train}: {c} samples, {c / sum(counts):.2%} (weight {s.weight:g}: {s.weight / total:.2%})"
        for i, (s, c) in enumerate(zip(data.sources, counts))
    ]
    logger.info("data mix after %d steps: %s", step, "; ".join(parts))


class MixedBatchSampler:
    """Endless lists of `SampleKey`s of a `MixedSource`, one list per step: this process's slice of each
    global batch, whose samples come from the sources per `MixSchedule`.

    Step `t`'s global batch is slots [t * global, (t + 1) * global) of the schedule, and process r takes
    its slots [r * local, (r + 1) * local) (the same interface as `training.data.PairBatchSampler`). A
    key's `repeat` is its source's pass (so a repeated row is augmented afresh); its epoch is 0, so the
    batch's `Position` is (0, step + 1) and a checkpoint needs nothing else.
    """

    def __init__(
        self,
        source: MixedSource,
        *,
        local_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        start: Position = Position(),
    ) -> None:
        if start.epoch:
            raise ValueError(
                f"a mixed run's data position is its step, with epoch 0; got {start}: the checkpoint was written "
                "by a run on a single source (data.train), which resumes only with data.train"
            )
        self.source = source
        self.local_batch = local_batch
        self.rank = rank
        self.seed = seed
        self.start = start
        self.schedule = MixSchedule(source.weights, local_batch * world_size)
        self._orders: dict[tuple[int, int], list[int]] = {}

    def __iter__(self) -> Iterator[list[SampleKey]]:
        step = self.start.step
        while True:
            first = step * self.schedule.global_batch + self.rank * self.local_batch
            yield [self._key(step, *self.schedule.slot(k)) for k in range(first, first + self.local_batch)]
            step += 1

    def _key(self, step: int, i: int, draw: int) -> SampleKey:
        size = len(self.source.sources[i])
        epoch, row = divmod(draw, size)
        return SampleKey(0, step, self.source.offsets[i] + self._order(i, epoch)[row], repeat=epoch)

    def _order(self, i: int, epoch: int) -> list[int]:
        if (i, epoch) not in self._orders:
            # Only the current pass of each source is kept: memory stays at one permutation per source.
            self._orders = {k: v for k, v in self._orders.items() if k[0] != i}
            g = torch.Generator().manual_seed(sample_seed(self.seed, i, epoch))
            self._orders[(i, epoch)] = torch.randperm(len(self.source.sources[i]), generator=g).tolist()
        return self._orders[(i, epoch)]
