"""The run's metrics: one JSON object per line in ``metrics.jsonl``, optionally TensorBoard too.

Only the main process writes. When a run resumes at step s, rows after s (written by the run that
was killed, and about to be recomputed) are dropped, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from vlm.files import atomic_write_text

__all__ = ["MetricsLog", "read_metrics"]

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl file (a torn last line, from a kill mid-write, is ignored)."""
    rows = []
    path = Path(path)
    if not path.is_file():
        return rows
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class MetricsLog:
    """Appends rows to ``run_dir/metrics.jsonl`` (and TensorBoard when asked) on the main process."""

    def __init__(self, run_dir: Path, *, enabled: bool, resume_step: int = 0, tensorboard: bool = False) -> None:
        self.path = Path(run_dir) / METRICS_NAME
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if tensorboard:
            self.writer = _tensorboard_writer(Path(run_dir) / "tensorboard")

    def log(self, step: int, values: dict[str, float]) -> None:
        """Appends the row ``{"step": step, **values}`` to metrics.jsonl (numeric values to TensorBoard too);
        a no-op when disabled."""
        if not self.enabled:
            return
        row = {"step": step, **values}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer, if any."""
        if self.writer is not None:
            self.writer.close()


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise ValueError(
            "logging.tensorboard=true needs the tensorboard package (pip install tensorboard); "
            "or set logging.tensorboard=false: metrics.jsonl has the same numbers"
        ) from err
    return SummaryWriter(str(directory))
