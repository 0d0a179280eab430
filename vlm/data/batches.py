"""Image collections for batched work: find the files, decode them in DataLoader workers, and skip
(report and count) the ones that cannot be read instead of stopping the run."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..images import ImageLoadError, load_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "find_images",
    "Failure",
    "FailureLog",
    "ImageDataset",
    "ImageBatch",
    "collate_images",
    "iter_image_batches",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".jfif"}
)


def find_images(root: str | os.PathLike, *, recursive: bool = True) -> list[Path]:
    """Image files under `root` (by extension, case-insensitive), sorted; `root` itself if it is a file."""
    root = Path(root)
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist; give an image file or a folder of images")
    pattern = "**/*" if recursive else "*"
    return sorted(p for p in root.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


@dataclass(frozen=True)
class Failure:
    """One item that could not be used: where it came from and why."""

    index: int
    source: str
    reason: str


@dataclass
class FailureLog:
    """Counts failures and logs the first `show` of them with their reasons."""

    show: int = 10
    failures: list[Failure] = field(default_factory=list)

    def add(self, failures: Sequence[Failure]) -> None:
        """Records `failures`, logging a warning for each while fewer than `show` have been seen."""
        for failure in failures:
            if len(self.failures) < self.show:
                logger.warning("skipped %s: %s", failure.source, failure.reason)
            self.failures.append(failure)

    @property
    def count(self) -> int:
        """Failures recorded so far (all of them, not only those logged)."""
        return len(self.failures)

    def summary(self, total: int) -> str:
        """One line for the user: how many of `total` items were skipped, or that all were read."""
        return f"{self.count} of {total} items skipped (unreadable)" if self.count else f"all {total} items read"


def _describe(source: Any) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"<{type(source).__name__}>"


class ImageDataset(Dataset):
    """`sources[i]` (anything `vlm.load_image` reads) -> (i, transformed image or None, error or None).

    Unreadable items come back as None with the reason, so one broken file never stops a DataLoader.
    """

    def __init__(
        self,
        sources: Sequence[Any],
        transform: Callable[[Any], Tensor],
        *,
        draft_size: tuple[int, int] | None = None,
    ) -> None:
        self.sources = sources
        self.transform = transform
        self.draft_size = draft_size

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> tuple[int, Tensor | None, str | None]:
        source = self.sources[index]
        try:
            image = load_image(source, draft_size=self.draft_size)
            return index, self.transform(image), None
        except (ImageLoadError, OSError, ValueError) as err:
            return index, None, getattr(err, "reason", None) or str(err)


@dataclass
class ImageBatch:
    """The readable images of a batch (B, 3, H, W), their indices into the sources, and the failures."""

    indices: Tensor
    images: Tensor
    failures: list[Failure]


class collate_images:
    """DataLoader collate function: stacks the readable images, lists the rest as failures."""

    def __init__(self, sources: Sequence[Any]) -> None:
        self.sources = sources

    def __call__(self, items: list[tuple[int, Tensor | None, str | None]]) -> ImageBatch:
        good = [(i, x) for i, x, _ in items if x is not None]
        failures = [Failure(i, _describe(self.sources[i]), err) for i, x, err in items if x is None]
        if good:
            indices = torch.tensor([i for i, _ in good], dtype=torch.long)
            images = torch.stack([x for _, x in good])
        else:
            indices, images = torch.zeros(0, dtype=torch.long), torch.zeros(0)
        return ImageBatch(indices, images, failures)


def iter_image_batches(
    sources: Sequence[Any],
    transform: Callable[[Any], Tensor],
    *,
    batch_size: int = 64,
    num_workers: int = 0,
    draft_size: tuple[int, int] | None = None,
    failure_log: FailureLog | None = None,
    progress: bool = True,
    desc: str = "images",
) -> Iterator[ImageBatch]:
    """Batches of decoded, transformed images in source order; failures go to `failure_log`."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dataset = ImageDataset(sources, transform, draft_size=draft_size)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_images(sources),
        persistent_workers=False,
    )
    log = failure_log if failure_log is not None else FailureLog()
    for batch in _progress(loader, progress, desc, len(sources)):
        log.add(batch.failures)
        yield batch


def _progress(loader: DataLoader, enabled: bool, desc: str, total: int) -> Iterator[ImageBatch]:
    if not enabled:
        yield from loader
        return
    from tqdm.auto import tqdm

    with tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True) as bar:
        for batch in loader:
            yield batch
            bar.update(len(batch.indices) + len(batch.failures))
