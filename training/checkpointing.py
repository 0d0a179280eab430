"""Checkpoints that survive a kill at any moment and resume to the step.

A checkpoint is a directory ``checkpoints/step_00001000`` holding what `accelerator.save_state`
writes (model, optimiser, scheduler, gradient scaler, every process's RNG states) plus
``trainer_state.json`` (step, data position of every process, counters) and the resolved config,
and, when the trainer has more (fine-tuning's weight EMA, shuffling generator and losses), the tensors
of ``extra.safetensors``: plain data, never a pickle. It is written under a hidden temporary name and renamed into place once complete; older
checkpoints are deleted only after that rename, so there is always one complete checkpoint on disk.
A directory without ``trainer_state.json`` or with the temporary prefix is never resumed from.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vlm.files import fsync_dir, fsync_tree

import torch

from .config import write_config
from .data import Position

__all__ = [
    "TrainerState",
    "save_checkpoint",
    "load_checkpoint",
    "load_extra",
    "checkpoint_to_resume",
    "list_checkpoints",
    "latest_checkpoint",
    "clean_partial",
]

logger = logging.getLogger(__name__)

STATE_NAME = "trainer_state.json"
EXTRA_NAME = "extra.safetensors"
PREFIX = "step_"
TMP_PREFIX = ".tmp-"


@dataclass
class TrainerState:
    """Everything about the run's progress that is not a tensor."""

    step: int = 0
    # One data position per process, in process order.
    positions: list[Position] = field(default_factory=lambda: [Position()])
    samples_seen: int = 0
    skipped_samples: int = 0
    nonfinite_streak: int = 0
    # What a checkpoint must agree on to be resumed (fine-tuning: its settings, model kind and data);
    # empty when the trainer checks nothing.
    run: dict = field(default_factory=dict)

    def to_json(self) -> str:
        """The state as the indented JSON of ``trainer_state.json``."""
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "TrainerState":
        """The state `to_json` wrote."""
        data = json.loads(text)
        data["positions"] = [Position(**p) for p in data["positions"]]
        return cls(**data)


def checkpoint_root(run_dir: Path) -> Path:
    """The folder holding a run's checkpoints: ``run_dir/checkpoints``."""
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / STATE_NAME).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of the run, or None when there is none."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def clean_partial(run_dir: Path) -> None:
    """Removes checkpoints a killed run left half-written (main process only)."""
    root = checkpoint_root(run_dir)
    for path in root.glob(f"{TMP_PREFIX}*") if root.is_dir() else []:
        logger.info("removing the incomplete checkpoint %s", path)
        shutil.rmtree(path, ignore_errors=True)


def checkpoint_to_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint a run continues from per `resume` ("auto": the latest of `run_dir`, if any; "never":
    none, and an error when `run_dir` has one; else that directory), or None for a fresh start."""
    found = latest_checkpoint(run_dir)
    if resume == "never":
        if found is not None:
            raise ValueError(
                f"{run_dir} already has checkpoints (latest {found.name}) and checkpoint.resume=never; "
                "choose a new output_dir, or set checkpoint.resume=auto to continue"
            )
        return None
    return found if resume == "auto" else Path(resume)


def save_checkpoint(
    accelerator, run_dir: Path, state: TrainerState, config, extra: dict[str, torch.Tensor] | None = None
) -> Path:
    """Writes the checkpoint of `state.step` atomically and keeps the newest `config.checkpoint.keep`.

    `config` is the run's dataclass config (written resolved beside the weights); `extra` holds tensors
    the trainer keeps outside accelerate's state, the same on every process (the main one writes them)."""
    root = checkpoint_root(run_dir)
    final = root / f"{PREFIX}{state.step:08d}"
    tmp = root / f"{TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process has written its RNG states
    if accelerator.is_main_process:
        write_config(config, tmp / "config.yaml")
        (tmp / STATE_NAME).write_text(state.to_json())
        if extra:
            from safetensors.torch import save_file

            save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(tmp / EXTRA_NAME))
        fsync_tree(tmp)  # the rename must not outrun the data
        if final.exists():  # the same step saved again (a run resumed at its last step)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        for old in list_checkpoints(run_dir)[: -config.checkpoint.keep]:
            shutil.rmtree(old)
        logger.info("checkpoint saved: %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> TrainerState:
    """Restores model, optimiser, scheduler, scaler and RNG states from `path`; returns the progress."""
    path = Path(path)
    if not (path / STATE_NAME).is_file():
        raise ValueError(
            f"{path} is not a complete checkpoint (no {STATE_NAME}); point checkpoint.resume at a step_* directory"
        )
    accelerator.load_state(str(path))
    state = TrainerState.from_json((path / STATE_NAME).read_text())
    logger.info("resumed from %s at step %d", path, state.step)
    return state


def load_extra(path: Path) -> dict[str, torch.Tensor]:
    """The tensors `save_checkpoint` wrote as `extra` into the checkpoint `path` ({} when none)."""
    from safetensors.torch import load_file

    file = Path(path) / EXTRA_NAME
    return load_file(str(file)) if file.is_file() else {}
