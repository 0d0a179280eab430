"""The skip budget: a run whose data is mostly unreadable stops with an error instead of "training".

A wrong `data.image_root` or a table of missing files makes every sample fail to load; skipping them
one by one, a run would take no step, report a NaN loss and save an untrained model as if it had
succeeded. `SkipBudget` counts the skipped samples of every step (over all processes: the counts are
the global batch's, reduced by the step, so every process takes the same decision at the same step)
against `data.max_skipped_steps` and `data.max_skipped_fraction`, and raises `UnreadableDataError`
naming the first unreadable samples and the settings to check. The fine-tuning job, which decodes its
images up front, applies the same share with `check_skipped_share`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from vlm.data import Failure

from .config import DataConfig

__all__ = ["UnreadableDataError", "SkipBudget", "check_skipped_share", "describe_failures"]

# How many unreadable samples an error names: enough to see the pattern of a wrong folder.
NAMED = 5


class UnreadableDataError(ValueError):
    """Too many samples could not be read: the data's paths or columns are wrong, not a few files."""


def describe_failures(failures: Sequence[Failure], total: int | None = None, limit: int = NAMED) -> str:
    """The first `limit` failures as "path (reason), ..." for an error message, and how many more there
    are of `total` (default: of `failures`)."""
    total = len(failures) if total is None else total
    shown = ", ".join(f"{f.source} ({f.reason})" for f in failures[:limit])
    return shown + (f" and {total - limit} more" if total > limit else "")


def _gather_failures(local: list[Failure]) -> list[Failure]:
    """Every process's first failures, in process order (a collective: all processes call it together)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return local
    parts: list[list[Failure] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return [f for part in parts for f in part or []]


def _train_setting(data: DataConfig) -> str:
    """The setting that names the training data: data.train, or the sources of a mixed run."""
    if data.sources:
        return "data.sources (" + ", ".join(str(source.train) for source in data.sources) + ")"
    return f"data.train ({data.train})"


def _image_root_hint(data: DataConfig) -> str:
    if data.image_root:
        return f"data.image_root (now {data.image_root}: relative image paths of a table resolve against it)"
    return "data.image_root (unset: relative image paths of a table resolve against the table's own folder)"


@dataclass
class SkipBudget:
    """Counts the skipped samples of a run's steps and stops the run when they exceed the budget.

    `seen` and `skipped` start from a resumed run's totals, so the first `skip_window` samples are those
    of the whole run, not of this call.
    """

    data: DataConfig
    seen: int = 0  # samples of the steps so far (usable and skipped), all processes
    skipped: int = 0
    streak: int = 0  # consecutive steps whose whole global batch was skipped
    window_seen: int = 0  # the part of `seen` and `skipped` that falls in the first `skip_window`
    window_skipped: int = 0
    first: list[Failure] = field(default_factory=list)  # this process's first failures

    def __post_init__(self) -> None:
        # A resumed run inside the window continues its counts; one past it has passed the share rule.
        if self.seen < self.data.skip_window:
            self.window_seen, self.window_skipped = self.seen, self.skipped

    def step(self, step: int, usable: int, skipped: int, failures: Sequence[Failure]) -> None:
        """Records one step (`usable` and `skipped` over all processes; `failures` this process's) and raises
        `UnreadableDataError` when the budget is spent. Every process must call it at every step."""
        self.first.extend(failures[: NAMED - len(self.first)])
        self.streak = self.streak + 1 if usable == 0 else 0
        if self.seen < self.data.skip_window:
            self.window_seen += usable + skipped
            self.window_skipped += skipped
        self.seen, self.skipped = self.seen + usable + skipped, self.skipped + skipped
        limit = self.data.max_skipped_steps
        if limit and self.streak >= limit:
            reason = f"every sample of the last {self.streak} steps was skipped (data.max_skipped_steps={limit})"
            self._stop(step, reason)
        share = self.data.max_skipped_fraction
        # Certain before the window is full: the skips alone are more than the share of the whole window.
        if self.window_skipped > share * max(self.window_seen, self.data.skip_window):
            self._stop(step, self._share_reason())

    def finish(self, step: int) -> None:
        """The share rule for a run shorter than the window, at its end (before the final model is saved)."""
        if self.window_seen and self.window_skipped > self.data.max_skipped_fraction * self.window_seen:
            self._stop(step, self._share_reason())

    def _share_reason(self) -> str:
        return (
            f"{self.window_skipped} of the first {self.window_seen} samples were skipped, more than "
            f"data.max_skipped_fraction={self.data.max_skipped_fraction:g} of them"
        )

    def _stop(self, step: int, reason: str) -> None:
        named = describe_failures(_gather_failures(self.first), self.skipped)
        raise UnreadableDataError(
            f"the training data is mostly unreadable at step {step}: {reason}. The first unreadable samples: "
            f"{named}. Check {_image_root_hint(self.data)}, data.image_column and the files of "
            f"{_train_setting(self.data)}. The run stopped without saving a final model; data.max_skipped_steps "
            "(0: off) and data.max_skipped_fraction (1: off) set how much skipping is tolerated"
        )


def check_skipped_share(failures: Sequence[Failure], total: int, max_fraction: float, setting: str) -> None:
    """UnreadableDataError when more than `max_fraction` of `total` images (read from the data `setting`
    names, e.g. "data.train=DIR") could not be read: the fine-tuning job's form of the skip budget."""
    if total and len(failures) > max_fraction * total:
        raise UnreadableDataError(
            f"{setting}: {len(failures)} of {total} images could not be read, more than "
            f"data.max_skipped_fraction={max_fraction:g} of them; the first: {describe_failures(failures)}. "
            "Check the paths of the data (a table's relative paths resolve against its own folder) and "
            "data.image_column; nothing was trained or written (data.max_skipped_fraction=1 turns this off)"
        )
