"""Training data and run outputs on remote or object storage, through fsspec URLs.

`data.train` (and each `data.sources` entry) may be a table at a URL (``s3://bucket/pairs.parquet``,
``gs://...``, ``memory://...``): the table file is copied to a local temporary folder and read as a
local table; its image cells are read through fsspec when the sample is loaded, relative paths taken
from the table's URL folder (or `data.image_root`, itself a URL or a local folder). `output_dir` may be
a URL: the run works in a local staging folder (`staging_dir`) and every checkpoint, once written
atomically there as usual, is uploaded to ``output_dir/checkpoints/step_N/`` with a ``COMPLETE`` marker
written last; the final model, config and metrics are uploaded when the run ends. A run whose staging
folder is gone (another machine) downloads the newest remote checkpoint that has its marker and
resumes from it, step-exactly.

What is guaranteed on a remote store: a checkpoint with ``COMPLETE`` was fully uploaded (the marker is
written after every other file, and removed first when a checkpoint is deleted), so resume never reads
a partial upload; older checkpoints are deleted only after the new one is complete. Object stores have
no atomic directory rename, so a killed upload leaves a folder without the marker, which is ignored
(and replaced when that step is saved again). ``file://`` URLs are plain local paths, with the local
atomic-rename guarantee. Not supported: tar shards, Hugging Face datasets and image folders at URLs
(use the `hf:`/webdataset loaders' own URL support), and several machines sharing one run's staging.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import posixpath
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .checkpointing import PREFIX, STATE_NAME, checkpoint_root, list_checkpoints
from .sources import Record, TableSource

__all__ = ["is_remote", "local_path", "filesystem", "staging_dir", "RemoteTableSource", "pull_checkpoint",
           "push_checkpoint", "push_outputs", "COMPLETE"]  # fmt: skip

logger = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
# Install hints for the fsspec protocols whose implementation is a separate package.
PACKAGES = {"s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
# Files of the run folder (beside checkpoints/) uploaded with every checkpoint, so a resume elsewhere
# continues the metrics log rather than restarting it.
RUN_FILES = ("config.yaml", "metrics.jsonl")


def is_remote(path: str | os.PathLike) -> bool:
    """True for an fsspec URL other than ``file://`` (which is a local path)."""
    text = str(path)
    return "://" in text and not text.startswith("file://")


def local_path(path: str | os.PathLike) -> str:
    """`path` with a ``file://`` prefix removed; other paths unchanged."""
    text = str(path)
    return text[len("file://") :] if text.startswith("file://") else text


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec filesystem of `url` and the path inside it; an ImportError names the package to install."""
    import fsspec

    protocol = url.split("://", 1)[0]
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        package = PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise ImportError(f"{url}: reading {protocol}:// URLs needs {package}; pip install {package}") from err
    except ValueError as err:
        raise ValueError(f"{url}: {err}; use a protocol fsspec knows (s3://, gs://, memory://, file://...)") from err


def staging_dir(output_dir: str) -> Path:
    """The local folder a run works in: `output_dir` itself when local, else a folder named after the URL
    under ``$VLM_STAGING`` (default: the system's temporary folder)."""
    if not is_remote(output_dir):
        return Path(local_path(output_dir))
    filesystem(output_dir)  # the missing-package error before any work
    root = Path(os.environ.get("VLM_STAGING") or Path(tempfile.gettempdir()) / "vlm-staging")
    digest = hashlib.sha256(output_dir.encode()).hexdigest()[:12]
    return root / f"{posixpath.basename(output_dir.rstrip('/')) or 'run'}-{digest}"


# ---- data ------------------------------------------------------------------------------------------
class RemoteImage:
    """An image file at a URL, fetched on first read, as the binary file object `vlm.load_image` takes
    (so a missing remote image is a skipped sample, like a missing local one)."""

    def __init__(self, url: str) -> None:
        self.name = url
        self._buffer: io.BytesIO | None = None

    def _file(self) -> io.BytesIO:
        if self._buffer is None:
            fs, path = filesystem(self.name)
            self._buffer = io.BytesIO(fs.cat_file(path))
        return self._buffer

    def read(self, size: int = -1) -> bytes:
        """Up to `size` bytes (all when -1), as `io.BytesIO.read`."""
        return self._file().read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        """Moves the position, as `io.BytesIO.seek`."""
        return self._file().seek(offset, whence)

    def tell(self) -> int:
        """The position, as `io.BytesIO.tell`."""
        return self._file().tell()


class RemoteTableSource(TableSource):
    """A table at a URL: the table copied to a local temporary file, its images read through fsspec."""

    def __init__(self, url: str, *, image_root: str | None = None, **kwargs: Any) -> None:
        fs, path = filesystem(url)
        if not fs.isfile(path):
            raise FileNotFoundError(f"the table {url} does not exist; give the URL of an existing table file")
        # The table is read into memory, so its local copy goes at once (nothing to pickle to workers).
        with tempfile.TemporaryDirectory(prefix="vlm-table-") as tmp:
            local = Path(tmp) / posixpath.basename(path)
            fs.get_file(path, str(local))
            super().__init__(local, image_root=image_root, **kwargs)
        self.url = url
        self.root = local_path(image_root) if image_root else url.rsplit("/", 1)[0]
        self.description = f"{url} ({len(self)} rows)"

    def __getitem__(self, index: int) -> Record:
        record = super().__getitem__(index) if not is_remote(self.root) else None
        if record is not None:  # a local image_root: local paths
            return record
        cell = self._images[index]
        if isinstance(cell, dict):
            cell = cell.get("bytes") or cell.get("path")
        image = cell
        if isinstance(cell, str):
            image = RemoteImage(cell if "://" in cell else posixpath.join(self.root, cell))
        text = self._texts[index] if self._texts is not None else None
        label = self._labels[index] if self._labels is not None else None
        name = image.name if isinstance(image, RemoteImage) else f"{self.url} row {index}"
        return Record(image, text, name, label)


# ---- run outputs -----------------------------------------------------------------------------------
def _complete_steps(output_dir: str) -> list[str]:
    """Names of the remote checkpoints that have their COMPLETE marker, oldest first."""
    fs, root = filesystem(output_dir.rstrip("/") + "/checkpoints")
    if not fs.isdir(root):
        return []
    names = [posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)]
    done = [n for n in names if n.startswith(PREFIX) and fs.isfile(f"{root}/{n}/{COMPLETE}")]
    return sorted(done, key=lambda n: int(n[len(PREFIX) :]))


def pull_checkpoint(output_dir: str, run_dir: Path) -> Path | None:
    """Downloads the newest complete remote checkpoint (and the run's log) into `run_dir` when `run_dir`
    lacks it; returns its local path, or None when `output_dir` is local or has no checkpoint."""
    if not is_remote(output_dir):
        return None
    steps = _complete_steps(output_dir)
    if not steps:
        return None
    local = checkpoint_root(run_dir) / steps[-1]
    if local in list_checkpoints(run_dir):
        return local
    fs, root = filesystem(output_dir)
    tmp = checkpoint_root(run_dir) / f".tmp-{steps[-1]}"  # clean_partial removes it if killed here
    shutil.rmtree(tmp, ignore_errors=True)
    fs.get(f"{root}/checkpoints/{steps[-1]}/", str(tmp), recursive=True)
    (tmp / COMPLETE).unlink()  # a marker of the store, not of the checkpoint (uploaded first, it would lie)
    for name in RUN_FILES:
        if fs.isfile(f"{root}/{name}") and not (run_dir / name).exists():
            fs.get_file(f"{root}/{name}", str(run_dir / name))
    os.rename(tmp, local)
    logger.info("downloaded %s/checkpoints/%s to %s", output_dir, steps[-1], local)
    return local


def push_checkpoint(output_dir: str, run_dir: Path, checkpoint: Path, keep: int) -> None:
    """Uploads the local `checkpoint` (marker last), the run's log, then deletes all but the newest
    `keep` complete remote checkpoints (each one's marker first)."""
    if not is_remote(output_dir):
        return
    fs, root = filesystem(output_dir)
    target = f"{root}/checkpoints/{checkpoint.name}"
    if fs.exists(target):  # the same step saved again, or a killed upload
        fs.rm(target, recursive=True)
    files = [p for p in sorted(checkpoint.rglob("*")) if p.is_file()]
    assert (checkpoint / STATE_NAME) in files, "only complete local checkpoints are uploaded"
    for file in files:
        fs.put_file(str(file), f"{target}/{file.relative_to(checkpoint).as_posix()}")
    fs.pipe_file(f"{target}/{COMPLETE}", b"")
    _push_run_files(fs, root, run_dir)
    for old in _complete_steps(output_dir)[:-keep]:
        fs.rm_file(f"{root}/checkpoints/{old}/{COMPLETE}")
        fs.rm(f"{root}/checkpoints/{old}", recursive=True)
    logger.info("checkpoint uploaded: %s/checkpoints/%s", output_dir, checkpoint.name)


def _push_run_files(fs: Any, root: str, run_dir: Path) -> None:
    for name in RUN_FILES:
        if (run_dir / name).is_file():
            fs.put_file(str(run_dir / name), f"{root}/{name}")


def push_outputs(output_dir: str, run_dir: Path) -> None:
    """Uploads the run's final outputs (everything but the checkpoints, which `push_checkpoint` uploads)."""
    if not is_remote(output_dir):
        return
    fs, root = filesystem(output_dir)
    for file in sorted(p for p in run_dir.rglob("*") if p.is_file()):
        relative = file.relative_to(run_dir).as_posix()
        if not relative.startswith("checkpoints/"):
            fs.put_file(str(file), f"{root}/{relative}")
    logger.info("run outputs uploaded to %s", output_dir)
