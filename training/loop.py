"""The contrastive training loop: `train(config)`, through accelerate, on one CPU or many GPUs."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from vlm.checkpoint import load, save_pretrained
from vlm.data import FailureLog
from vlm.model_card import RETRIEVAL, ZERO_SHOT, ModelCard, card_for_run
from vlm.model import CLIP, create_model
from vlm.presets import PRESETS
from vlm.transforms import image_transform

from .checkpointing import TrainerState, checkpoint_to_resume, clean_partial, latest_checkpoint, load_checkpoint
from .checkpointing import save_checkpoint as _save_checkpoint
from .config import ModelConfig, TrainConfig, check_batch_split, config_to_dict, write_config
from .data import PairBatch, Position, build_loader, caption_tokenizer, report_truncated
from .data_skips import SkipBudget
from .distill import distill_loss_and_gradients, load_teacher, teacher_batches
from .distributed import all_reduce_sums, make_accelerator, resolve_mixed_precision
from .evaluation import EvalSets, load_eval_sets, retrieval_metrics, zeroshot_metrics
from . import fsdp
from .grad_cache import loss_and_gradients
from .lora import apply_lora, save_run_adapters
from .mixing import log_shares, share_metrics
from .optim import build_optimizer, build_scheduler, clamp_logit_scale, lock_tower
from .patch_dropout import apply_patch_dropout, patch_dropout_step
from .remote import pull_checkpoint, push_checkpoint, push_outputs, staging_dir
from .run_log import MetricsLog, read_metrics
from .sources import MapSource, open_pairs

__all__ = [
    "train",
    "train_step",
    "evaluate",
    "save_checkpoint",
    "TrainResult",
    "StepOutput",
    "Run",
    "NonFiniteLossError",
    "resolve_mixed_precision",
    "progress_bar",
]

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss stayed NaN or infinite for `loss.max_nonfinite` consecutive steps."""


@dataclass
class Run:
    """The prepared pieces of a run."""

    config: TrainConfig
    accelerator: object  # accelerate.Accelerator, imported lazily
    model: nn.Module  # as prepared by accelerate (DDP-wrapped with several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    run_dir: Path
    teacher: object = None  # training.distill's OnlineTeacher or OfflineTeacher, with distill.*

    @property
    def clip(self) -> CLIP:
        """The bare `CLIP` inside the accelerate/DDP wrapper (the same parameters, not a copy)."""
        return self.accelerator.unwrap_model(self.model, keep_torch_compile=False)


@dataclass
class StepOutput:
    """What one optimiser step did, for the log."""

    loss: float  # the global-batch loss
    samples: int  # pairs in the global batch after skipping bad ones
    skipped: int  # bad samples dropped from this step's global batch
    updated: bool  # False when the step was skipped (non-finite loss, or no usable sample)
    grad_norm: float = math.nan  # before clipping
    truncated: int = 0  # captions of the global batch cut to the model's context


@dataclass
class TrainResult:
    """What `train` returns: where the run and its final model are, the last step, its loss and
    evaluation metrics, sample counts and the wall-clock `seconds` of the whole call."""

    run_dir: Path
    model_dir: Path
    step: int
    loss: float
    metrics: dict[str, float]  # the last evaluation
    samples_seen: int
    skipped_samples: int
    seconds: float
    truncated_captions: int = 0  # in this call (data.text_overflow=truncate)


# ---- setup ---------------------------------------------------------------------------------------
def build_model(config: ModelConfig) -> CLIP:
    """A preset from scratch (with `overrides`), or any checkpoint `vlm.load` reads."""
    if config.overrides:
        if config.name not in PRESETS:
            raise ValueError(
                f"model.overrides change a preset's config, and {config.name!r} is not a preset "
                f"({', '.join(PRESETS)}); drop model.overrides or name a preset"
            )
        model = create_model(config.name, **config.overrides)
    else:
        model = load(config.name, pretrained=config.pretrained)
    if config.lock_image:
        lock_tower(model, "image", config.unlocked_blocks, freeze_norms=config.lock_image_freeze_norms)
    if config.lock_text:
        lock_tower(model, "text", config.lock_text_unlocked_blocks, freeze_norms=config.lock_text_freeze_norms)
    if config.lora.enabled:
        apply_lora(model, config.lora, ("visual", "text"))
    if config.grad_checkpointing:
        model.set_grad_checkpointing(True)
    apply_patch_dropout(model, config)
    return model


def prepare(config: TrainConfig) -> Run:
    """Accelerator, model, optimiser and schedule, ready to train or to restore into; nothing is written
    (`open_run_dir` writes the run directory once the data is validated too)."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(config.mixed_precision)
    set_seed(config.seed)
    model = build_model(config.model)
    teacher = load_teacher(config, model.config, accelerator.device)
    optimizer = build_optimizer(model, config.optim)
    scheduler = build_scheduler(optimizer, config.schedule)
    if config.model.compile:
        model = torch.compile(model)
    model, optimizer, scheduler = fsdp.prepare(accelerator, model, optimizer, scheduler)
    # A remote output_dir: the run works in a local staging folder, uploaded by `training.remote`.
    return Run(config, accelerator, model, optimizer, scheduler, staging_dir(config.output_dir), teacher)


def open_run_dir(run: Run) -> None:
    """Creates the run directory with the resolved config, without half-written checkpoints."""
    if run.accelerator.is_main_process:
        run.run_dir.mkdir(parents=True, exist_ok=True)
        clean_partial(run.run_dir)
        write_config(run.config, run.run_dir / "config.yaml")
    run.accelerator.wait_for_everyone()


def restore(run: Run) -> TrainerState:
    """The progress to continue from: a checkpoint (per `checkpoint.resume`) or a fresh start."""
    if run.accelerator.is_local_main_process:  # with resume=never too, so that it sees remote checkpoints
        pull_checkpoint(run.config.output_dir, run.run_dir)  # a remote run resumed on another machine
    run.accelerator.wait_for_everyone()
    path = checkpoint_to_resume(run.run_dir, run.config.checkpoint.resume)
    if path is None:
        return TrainerState(positions=[Position()] * run.accelerator.num_processes)
    _warn_config_changes(path, run.config)
    return load_checkpoint(run.accelerator, path)


def _warn_config_changes(path: Path, config: TrainConfig) -> None:
    import yaml

    saved_file = path / "config.yaml"
    if not saved_file.is_file():
        return
    saved, now = _flatten(yaml.safe_load(saved_file.read_text())), _flatten(config_to_dict(config))
    changed = sorted(
        k for k in set(saved) | set(now) if saved.get(k) != now.get(k) and not k.startswith("checkpoint.resume")
    )
    if changed:
        logger.warning("resuming %s with a changed config: %s", path, ", ".join(changed))


def _flatten(data: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "overrides":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _start_position(run: Run, state: TrainerState, indexable: bool) -> Position:
    acc = run.accelerator
    if len(state.positions) == acc.num_processes:
        return state.positions[acc.process_index]
    if indexable and len(set(state.positions)) == 1:
        # An indexable source is cut into the same global batches whatever the number of processes.
        return state.positions[0]
    raise ValueError(
        f"the checkpoint was written by {len(state.positions)} processes and this run has {acc.num_processes}; "
        "a streamed source can only resume with the same number of processes"
    )


def training_batches(run: Run, state: TrainerState) -> Iterator[PairBatch]:
    """This process's batches from where `state` left off, for ever."""
    cfg, acc = run.config, run.accelerator
    data = cfg.data
    shares = f"the number of processes ({acc.num_processes}) times loss.accum_steps ({cfg.loss.accum_steps})"
    check_batch_split(data.batch_size, acc.num_processes * cfg.loss.accum_steps, shares)
    source = open_pairs(data)
    if acc.is_main_process:
        logger.info("training data: %s", source.description)
    model_config = run.clip.config
    loader = build_loader(
        source,
        image_transform(model_config, train=data.augment),
        local_batch=data.batch_size // acc.num_processes,
        image_size=model_config.vision.image_size,
        tokenizer=caption_tokenizer(run.clip, data.text_overflow),
        rank=acc.process_index,
        world_size=acc.num_processes,
        seed=cfg.seed,
        start=_start_position(run, state, isinstance(source, MapSource)),
        num_workers=data.num_workers,
        sample_timeout=data.sample_timeout,
        pin_memory=acc.device.type == "cuda",
    )
    return teacher_batches(run.teacher, source, loader)


# ---- the step ------------------------------------------------------------------------------------
def _nonfinite(run: Run, state: TrainerState, loss: float) -> None:
    state.nonfinite_streak += 1
    limit = run.config.loss.max_nonfinite
    logger.warning("step %d: loss is %s, the update is skipped (%d in a row)", state.step, loss, state.nonfinite_streak)
    if state.nonfinite_streak >= limit:
        ckpt = latest_checkpoint(run.run_dir)
        raise NonFiniteLossError(
            f"the loss was not finite ({loss}) for {state.nonfinite_streak} consecutive steps, up to step "
            f"{state.step}; no update was made on them. Lower optim.lr, keep optim.grad_clip on, or look for "
            f"broken data{f', then resume from {ckpt}' if ckpt else ''}; loss.max_nonfinite={limit} sets how many "
            "such steps are tolerated"
        )


def _update(run: Run) -> float:
    """Clip, step, clamp the temperature; returns the gradient norm before clipping (NaN if not clipped)."""
    acc, cfg = run.accelerator, run.config
    grad_norm = math.nan
    fsdp.average_replicated_grads(acc, run.clip)
    if cfg.optim.grad_clip:
        grad_norm = float(acc.clip_grad_norm_(run.model.parameters(), cfg.optim.grad_clip))
    run.optimizer.step()
    clamp_logit_scale(run.clip, cfg.loss.max_logit_scale)
    return grad_norm


def train_step(run: Run, batch: PairBatch, state: TrainerState) -> StepOutput:
    """One optimiser step on this process's share of the global batch; advances `state`."""
    acc = run.accelerator
    counts = all_reduce_sums([len(batch), len(batch.failures), batch.truncated], acc.device)
    samples, skipped, truncated = (int(v) for v in counts)
    run.optimizer.zero_grad(set_to_none=True)
    out = StepOutput(math.nan, samples, skipped, updated=False, truncated=truncated)
    if samples == 0:
        logger.warning("step %d: every sample of the batch was skipped; no update", state.step)
    else:
        images = batch.images.to(acc.device, non_blocking=True)
        texts = batch.texts.to(acc.device, non_blocking=True)
        if run.teacher is None:
            result = loss_and_gradients(run.model, images, texts, run.config.loss, acc)
        else:
            result = distill_loss_and_gradients(run.model, run.teacher, batch, images, texts, run.config, acc)
        out.loss = result.value
        if result.finite:
            state.nonfinite_streak = 0
            out.grad_norm = _update(run)
            # With fp16, the gradient scaler skips steps whose gradients overflowed.
            out.updated = not acc.optimizer_step_was_skipped
        else:
            run.optimizer.zero_grad(set_to_none=True)
            _nonfinite(run, state, result.value)
    with warnings.catch_warnings():
        # The schedule follows steps, updated or not; torch warns when the first one was skipped.
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
        run.scheduler.step()
    state.step += 1
    state.samples_seen += samples
    state.skipped_samples += skipped
    return out


# ---- evaluation and checkpoints --------------------------------------------------------------------
def evaluate(run: Run, sets: EvalSets, step: int) -> dict[str, float]:
    """Zero-shot and retrieval metrics on the main process (the others wait); {} elsewhere."""
    metrics: dict[str, float] = {}
    acc = run.accelerator
    model = fsdp.full_model(run)  # under FSDP every process takes part
    if acc.is_main_process and sets:
        model.eval()
        opts = dict(batch_size=run.config.eval.batch_size, num_workers=run.config.data.num_workers)
        # Evaluation must not move the training RNG streams, or a resumed run would drift.
        with torch.random.fork_rng(devices=[]), acc.autocast():
            if sets.zeroshot is not None:
                metrics.update(zeroshot_metrics(model, sets.zeroshot, **opts))
            if sets.retrieval is not None:
                metrics.update(retrieval_metrics(model, sets.retrieval, **opts))
        model.train()
        logger.info("step %d evaluation: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    acc.wait_for_everyone()
    return metrics


def save_checkpoint(run: Run, state: TrainerState, batch: PairBatch) -> Path:
    """Records every process's data position in `state`, then writes the checkpoint."""
    from accelerate.utils import gather_object

    state.positions = gather_object([batch.position])
    path = _save_checkpoint(run.accelerator, run.run_dir, state, run.config)
    if run.accelerator.is_main_process:
        push_checkpoint(run.config.output_dir, run.run_dir, path, run.config.checkpoint.keep)
    run.accelerator.wait_for_everyone()
    return path


def _due(step: int, every: int, last: int) -> bool:
    return step == last or (every > 0 and step % every == 0)


# ---- the loop ------------------------------------------------------------------------------------
def train(config: TrainConfig) -> TrainResult:
    """Trains per `config`, resuming from the run directory's latest checkpoint when there is one."""
    start_time = time.perf_counter()
    run = prepare(config)
    state = restore(run)
    acc, last = run.accelerator, config.schedule.steps
    batches = training_batches(run, state)
    # Only the main process evaluates, but every process must take the same branches (collectives).
    evaluating = bool(config.eval.zeroshot or config.data.eval)
    sets = load_eval_sets(config) if acc.is_main_process else EvalSets()
    open_run_dir(run)  # the config and the data are valid: the run may write
    budget = SkipBudget(config.data, state.samples_seen + state.skipped_samples, state.skipped_samples)
    log = MetricsLog(
        run.run_dir, enabled=acc.is_main_process, resume_step=state.step, tensorboard=config.logging.tensorboard
    )
    failures = FailureLog(show=config.data.show_failures)
    bar = _progress(run, state.step)
    metrics: dict[str, float] = {}
    evaluated = False
    out, truncated = StepOutput(math.nan, 0, 0, False), 0
    while state.step < last:
        tick = time.perf_counter()
        batch = next(batches)
        failures.add(batch.failures)
        # The totals live in `state`; the log only needs the failures it has shown (bounded memory).
        del failures.failures[failures.show :]
        patch_dropout_step(run.clip, config, state.step, acc.process_index, acc.device)
        out = train_step(run, batch, state)
        budget.step(state.step, out.samples, out.skipped, batch.failures)
        truncated += out.truncated
        _log_step(run, log, state, out, time.perf_counter() - tick, bar)
        if evaluating and _due(state.step, config.eval.every, last):
            metrics, evaluated = evaluate(run, sets, state.step), True
            log.log(state.step, {f"eval/{k}": v for k, v in metrics.items()})
        if config.checkpoint.every and _due(state.step, config.checkpoint.every, last):
            save_checkpoint(run, state, batch)
    bar.close()
    del batches  # stops the DataLoader workers
    budget.finish(state.step)  # a run shorter than data.skip_window: its share, before the model is saved
    if evaluating and not evaluated:  # resumed at the end: evaluate the final weights anyway
        metrics = evaluate(run, sets, state.step)
    model_dir = _finish(run, state, log, metrics)
    if acc.is_main_process:
        report_truncated(truncated)
        log_shares(config.data, state.step)
    return TrainResult(
        run.run_dir,
        model_dir,
        state.step,
        out.loss,
        metrics,
        state.samples_seen,
        state.skipped_samples,
        time.perf_counter() - start_time,
        truncated,
    )


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """The steps' progress bar of a trainer (a disabled one when `enabled` is false)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=not enabled, dynamic_ncols=True)


def _progress(run: Run, initial: int):
    enabled = run.config.logging.progress and run.accelerator.is_main_process
    return progress_bar(run.config.schedule.steps, initial, "train", enabled)


def _log_step(run: Run, log: MetricsLog, state: TrainerState, out: StepOutput, seconds: float, bar) -> None:
    bar.update(1)
    if state.step % run.config.logging.every and state.step != run.config.schedule.steps:
        return
    lr = run.scheduler.get_last_lr()[0]
    bar.set_postfix(loss=f"{out.loss:.4f}", lr=f"{lr:.2e}")
    log.log(
        state.step,
        {
            "loss": out.loss,
            "lr": lr,
            "logit_scale": run.clip.logit_scale.exp().item(),
            "grad_norm": out.grad_norm,
            "samples_per_s": out.samples / max(seconds, 1e-9),
            "samples": state.samples_seen,
            "skipped": state.skipped_samples,
            **share_metrics(run.config.data, state.step),
        },
    )


def _model_card(config: TrainConfig, state: TrainerState, metrics: dict[str, float]) -> ModelCard:
    """The final model's card: the run's data and settings, and the last evaluation's metrics."""
    pretrained = f"{config.model.name}:{config.model.pretrained}" if config.model.pretrained else config.model.name
    return card_for_run(
        data=config.data.train or ", ".join(f"{s.train} (weight {s.weight:g})" for s in config.data.sources),
        eval_data={ZERO_SHOT: config.eval.zeroshot, RETRIEVAL: config.data.eval},
        metrics=metrics,
        base_model=None if config.model.name in PRESETS and not config.model.pretrained else pretrained,
        name=Path(config.output_dir).name,
        preset=config.model.name if config.model.name in PRESETS else None,
        steps=state.step,
        batch_size=config.data.batch_size,
        lr=config.optim.lr,
        weight_decay=config.optim.weight_decay,
        seed=config.seed,
        samples_seen=state.samples_seen,
    )


def _finish(run: Run, state: TrainerState, log: MetricsLog, metrics: dict[str, float]) -> Path:
    """Final model (with its card), failure summary and plot."""
    acc = run.accelerator
    model_dir = run.run_dir / "model"
    model = fsdp.full_model(run)  # under FSDP every process takes part
    if acc.is_main_process:
        save_run_adapters(model, run.config.model, run.run_dir, run.optimizer)  # LoRA: merges the adapters, in place
        save_pretrained(model, model_dir, card=_model_card(run.config, state, metrics))
        if state.skipped_samples:
            total = state.samples_seen + state.skipped_samples
            logger.warning(
                "%d of %d samples were skipped in all (the first ones are named above)", state.skipped_samples, total
            )
        log.close()
        if run.config.logging.plot:
            from .plots import plot_curves

            plot_curves(read_metrics(log.path), run.run_dir / "curves.png", title=str(run.run_dir))
        logger.info("model saved to %s", model_dir)
        push_outputs(run.config.output_dir, run.run_dir)
    acc.wait_for_everyone()
    return model_dir
