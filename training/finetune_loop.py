"""The fine-tuning loop: epochs over images held in memory, on the machinery of `vlm train`.

The same `make_accelerator`, optimiser groups and schedule (`training.optim`), checkpoint directories
with atomic saves and step-exact resume (`training.checkpointing`), metrics log (`training.run_log`),
progress bar and curves (`training.plots`). What differs from the contrastive loop (`training.loop`),
and why it is a loop of its own: the data is a tensor shuffled per epoch by one generator instead of a
streamed loader with per-process positions; the step is a function the mode supplies (cross-entropy of
a classifier, or FLYP's contrastive loss); checkpoints fall on epoch ends; a weight EMA may be kept.

Under `accelerate launch` (or torchrun) every process computes its share of each global batch of
`recipe.batch_size` images and the gradients are those of the whole batch.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .checkpointing import TrainerState, checkpoint_to_resume, clean_partial, load_checkpoint, load_extra, save_checkpoint
from .config import ScheduleConfig
from .data import Position
from .distributed import make_accelerator
from .finetune_config import FinetuneConfig
from .loop import NonFiniteLossError, progress_bar
from .optim import build_scheduler
from .run_log import MetricsLog, read_metrics

__all__ = ["Batch", "StepFn", "run_epochs", "steps_per_epoch", "OLD_CHECKPOINT"]

logger = logging.getLogger(__name__)

# What `vlm finetune` wrote before it shared the trainer's checkpoints; refused, not read.
OLD_CHECKPOINT = Path("checkpoint") / "finetune_state.pt"


@dataclass(frozen=True)
class Batch:
    """One global batch: which training images it holds and which of them this process computes."""

    step: int  # optimiser steps before this one
    rows: Tensor  # indices into the training images of the whole global batch
    local: Tensor  # positions in `rows` that this process computes


# Runs forward and backward on this process's rows of one global batch and returns the global batch's
# loss: step(model as prepared by accelerate, accelerator, batch) -> float.
StepFn = Callable[[nn.Module, object, Batch], float]


@dataclass
class _Loop:
    """The prepared pieces and the progress of one fine-tuning run."""

    accelerator: object  # accelerate.Accelerator, imported lazily
    module: nn.Module  # the bare module: its parameters are the prepared model's
    home: torch.device  # where the module was before accelerate moved it
    model: nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator  # the per-epoch shuffles, drawn one after the other
    losses: list[float]
    ema: dict[str, Tensor] | None
    state: TrainerState


def steps_per_epoch(images: int, batch_size: int, world: int) -> int:
    """Optimiser steps in one epoch. An epoch's last global batch is dropped when it has fewer images than
    there are processes (one would get none): with one process, never."""
    if batch_size < world or images < world:
        raise ValueError(
            f"{world} processes need at least {world} images a batch: recipe.batch_size={batch_size}, "
            f"{images} training images; use a larger batch or fewer processes"
        )
    return images // batch_size + (images % batch_size >= world)


def run_epochs(
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: int,
    config: FinetuneConfig,
    step_fn: StepFn,
    *,
    run_key: dict,
    run_dir: Path | None = None,
    after_update: Callable[[nn.Module], None] | None = None,
) -> list[float]:
    """Trains `module` in place on `images` training images for `config.recipe.epochs` epochs and returns
    the loss per step; the module ends on the device it came on, with the EMA weights when kept.

    With `run_dir`, every epoch ends with a checkpoint, the steps go to metrics.jsonl and curves.png,
    and a rerun resumes to the weights an uninterrupted run reaches; `run_key` is what a checkpoint must
    agree on to be resumed (settings, model kind, data)."""
    recipe = config.recipe
    loop = _prepare(module, optimizer, images, config, run_key, run_dir)
    acc, per_epoch = loop.accelerator, steps_per_epoch(images, recipe.batch_size, loop.accelerator.num_processes)
    log = MetricsLog(run_dir or Path("."), enabled=run_dir is not None and acc.is_main_process, resume_step=loop.state.step)
    bar = progress_bar(recipe.epochs * per_epoch, loop.state.step, "fine-tune", config.logging.progress and acc.is_main_process)
    loop.model.train()
    for epoch in range(loop.state.step // per_epoch, recipe.epochs):
        order = torch.randperm(images, generator=loop.generator)
        for start in range(0, per_epoch * recipe.batch_size, recipe.batch_size):
            rows = order[start : start + recipe.batch_size]
            batch = Batch(loop.state.step, rows, torch.arange(acc.process_index, len(rows), acc.num_processes))
            loss = _train_step(loop, config, step_fn, batch, after_update)
            _log_step(loop, config, log, bar, loss)
        if run_dir is not None:
            loop.state.positions = [Position(epoch + 1, 0)] * acc.num_processes
            save_checkpoint(acc, run_dir, loop.state, config, _extra(loop))
    bar.close()
    _finish(loop, config, log, run_dir)
    return loop.losses


def _prepare(
    module: nn.Module, optimizer, images: int, config: FinetuneConfig, run_key: dict, run_dir: Path | None
) -> _Loop:
    """Accelerator, schedule, the prepared model, and the progress restored from a checkpoint if any."""
    recipe = config.recipe
    acc = make_accelerator(config.mixed_precision)
    steps = recipe.epochs * steps_per_epoch(images, recipe.batch_size, acc.num_processes)
    scheduler = build_scheduler(optimizer, ScheduleConfig(steps=steps, warmup_steps=min(recipe.warmup_steps, steps - 1)))
    # The EMA stays where it was made (the CPU) while the module trains on the accelerator's device.
    ema = {k: v.detach().clone() for k, v in module.state_dict().items()} if recipe.ema_decay else None
    key = json.loads(json.dumps(run_key, sort_keys=True))  # as it reads back from trainer_state.json
    home = next(module.parameters()).device
    model, optimizer, scheduler = acc.prepare(module, optimizer, scheduler)
    generator = torch.Generator().manual_seed(config.seed)
    loop = _Loop(acc, module, home, model, optimizer, scheduler, generator, [], ema, TrainerState(run=key))
    if run_dir is not None:
        if acc.is_main_process:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            clean_partial(run_dir)
        acc.wait_for_everyone()
        _restore(loop, Path(run_dir), config.checkpoint.resume)
    return loop


def _restore(loop: _Loop, run_dir: Path, resume: str) -> None:
    """Continues from the checkpoint `resume` names, if any; a checkpoint of another run is refused."""
    old = run_dir / OLD_CHECKPOINT
    if old.is_file():
        raise ValueError(
            f"{old} is a checkpoint of an older `vlm finetune`, whose format is no longer read; "
            f"delete {old.parent} to start afresh (or write to another output directory)"
        )
    path = checkpoint_to_resume(run_dir, resume)
    if path is None:
        return
    state_file = path / "trainer_state.json"
    saved = TrainerState.from_json(state_file.read_text()) if state_file.is_file() else loop.state
    if saved.run != loop.state.run:
        changed = sorted(k for k in set(saved.run) | set(loop.state.run) if saved.run.get(k) != loop.state.run.get(k))
        raise ValueError(
            f"{path} is the checkpoint of a different fine-tuning run (it differs in: {', '.join(changed)}); "
            f"delete {path.parent} to start afresh, or write to another output directory"
        )
    loop.state = load_checkpoint(loop.accelerator, path)
    extra = load_extra(path)
    loop.generator.set_state(extra["generator"])
    loop.losses.extend(extra["losses"].tolist())
    if loop.ema is not None:
        loop.ema.update({k[len("ema.") :]: v for k, v in extra.items() if k.startswith("ema.")})


def _extra(loop: _Loop) -> dict[str, Tensor]:
    """What a checkpoint holds beyond accelerate's state: the shuffling generator, the losses, the EMA."""
    extra = {"generator": loop.generator.get_state(), "losses": torch.tensor(loop.losses, dtype=torch.float64)}
    extra.update({f"ema.{k}": v for k, v in (loop.ema or {}).items()})
    return extra


def _train_step(loop: _Loop, config: FinetuneConfig, step_fn: StepFn, batch: Batch, after_update) -> float:
    """One optimiser step on the global `batch`; a non-finite loss stops the run before any update."""
    loop.optimizer.zero_grad(set_to_none=True)
    loss = step_fn(loop.model, loop.accelerator, batch)
    if not math.isfinite(loss):  # the global batch's loss: every process stops here alike
        raise NonFiniteLossError(
            f"the fine-tuning loss is {loss} at step {batch.step}; no update was made. Lower the "
            f"learning rate (optim.lr={config.optim.lr}) or look for broken images"
        )
    if config.optim.grad_clip:
        loop.accelerator.clip_grad_norm_(loop.model.parameters(), config.optim.grad_clip)
    loop.optimizer.step()
    with warnings.catch_warnings():
        # With fp16 the scaler may skip the first step; the schedule follows steps all the same.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
        loop.scheduler.step()
    if after_update is not None:
        after_update(loop.module)
    loop.losses.append(loss)
    loop.state.step += 1
    if loop.ema is not None:
        _update_ema(loop.ema, loop.module, config.recipe.ema_decay)
    return loss


@torch.no_grad()
def _update_ema(ema: dict[str, Tensor], module: nn.Module, decay: float) -> None:
    for k, v in module.state_dict().items():
        if v.is_floating_point():
            ema[k].lerp_(v.detach().to(ema[k].device, ema[k].dtype), 1 - decay)
        else:
            ema[k].copy_(v)


def _log_step(loop: _Loop, config: FinetuneConfig, log: MetricsLog, bar, loss: float) -> None:
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.3f}")
    if loop.state.step % config.logging.every == 0:
        log.log(loop.state.step, {"loss": loss, "lr": loop.scheduler.get_last_lr()[0]})


def _finish(loop: _Loop, config: FinetuneConfig, log: MetricsLog, run_dir: Path | None) -> None:
    """The module back where it came from, with the EMA weights when kept; the curves when logged."""
    # prepare() moved the module to the accelerator's device and, with mixed precision, wrapped its
    # forward in autocast: undo both, so the result evaluates and mixes (WiSE-FT) like any model.
    loop.accelerator.unwrap_model(loop.model, keep_fp32_wrapper=False).to(loop.home)
    if loop.ema is not None:
        loop.module.load_state_dict(loop.ema)
    log.close()
    if run_dir is not None and loop.accelerator.is_main_process and config.logging.plot and log.path.is_file():
        from .plots import plot_curves

        plot_curves(read_metrics(log.path), Path(run_dir) / "curves.png", title="fine-tuning")
    loop.accelerator.wait_for_everyone()
