"""Training speed against open_clip, and the memory of the loss at a large batch.

    .venv/bin/python bench/bench_training.py [--model small] [--batch 128] [--steps 5]
                                             [--loss-batch 16384] [--embed-dim 512]
                                             [--only {steps,memory,patch-dropout}]

1. Steps per second of `training.loop.train_step` (accelerate, AdamW, grad clipping, temperature
   clamp, LR schedule) against an open_clip training step on the same architecture and weights
   (`vlm.to_open_clip`), the same batch, AdamW with the same settings, open_clip's `ClipLoss`, the
   same clipping, clamp and schedule: open_clip_train's step, minus its logging. Measured
   alternately in this process; the median step time of each is compared. Target: >= 1.0x.
2. Peak memory of the contrastive loss (forward + backward) on `--loss-batch` pairs of
   `--embed-dim` features: vlm's chunked loss, vlm's loss unchunked, and open_clip's ClipLoss.
   Method: each measurement runs in a fresh process, which allocates the features, notes its
   resident memory, resets the kernel's peak-RSS counter (``echo 5 > /proc/self/clear_refs``), runs
   the loss and its backward pass and reads the peak (VmHWM). The difference is the memory the loss
   itself needed at its peak: the similarity matrix, the softmax and their gradients (glibc returns
   blocks this large to the kernel when they are freed, so they are not hidden by a cache).
   Target: >= 8x less than unchunked. Linux only.
3. Patch dropout (`model.patch_dropout`, FLIP): the time of one `train_step` at patch dropout 0.5
   against 0 on `--dropout-model` (ViT-B-16) at `--dropout-batch` (a CPU's batch), the same run and
   weights switched between the two in interleaved rounds (best of `--steps` each). Target: >= 1.6x.
   Then the quick digits run (training/configs/digits_tiny.yaml) for `--digits-steps` (300: its 100 steps
   leave every variant short of convergence) three ways with the same data, steps and evaluation: without
   patch dropout, with 0.5, and with 0.5 and FLIP's unmasked tuning (the last `--unmasked-steps` steps on
   every patch, `model.patch_dropout_unmasked_steps`), each with the seeds 0 to `--seeds` - 1: held-out
   zero-shot top-1. Target: the means within 1 point.
   `--only patch-dropout-speed` / `patch-dropout-accuracy` run one half.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import interleaved_best_times, open_clip_optimizer, print_table  # noqa: E402

import vlm  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ("a handwritten seven", "the digit {}", "a photo of a cat on a sofa", "a scan of the number {}, by hand")


def _batch(model: vlm.CLIP, n: int):
    g = torch.Generator().manual_seed(0)
    size = model.config.vision.image_size
    images = torch.randn(n, 3, size, size, generator=g)
    texts = vlm.get_tokenizer(model)([CAPTIONS[i % len(CAPTIONS)].format(i) for i in range(n)])
    return images, texts


def _vlm_step(args, model: str | None = None, batch: int | None = None):
    """A prepared run and a callable doing one of its training steps (`args.model`, `args.batch` unless given)."""
    from training.checkpointing import TrainerState
    from training.config import load_config
    from training.data import PairBatch, Position
    from training.loop import prepare, train_step

    out = tempfile.mkdtemp(prefix="bench_training_")
    config = load_config(
        None,
        [
            f"output_dir={out}",
            f"model.name={model or args.model}",
            "logging.progress=false",
            f"schedule.steps={10**6}",
            "schedule.warmup_steps=10",
        ],
    )
    run = prepare(config)
    images, texts = _batch(run.clip, batch or args.batch)
    batch = PairBatch(images, texts, [], Position())
    state = TrainerState()
    return run, lambda: train_step(run, batch, state)


def _open_clip_step(model: vlm.CLIP, args, optim_cfg, schedule):
    """open_clip_train's step (train_one_epoch without logging) on a copy of `model`."""
    from open_clip.loss import ClipLoss

    from training.optim import lr_at

    oc = vlm.to_open_clip(model).train()
    opt = open_clip_optimizer(oc, optim_cfg)
    loss_fn = ClipLoss()
    images, texts = _batch(model, args.batch)
    step = [0]

    def one_step():
        for group in opt.param_groups:
            group["lr"] = optim_cfg.lr * lr_at(step[0], schedule)
        opt.zero_grad()
        image_features, text_features, logit_scale = oc(images, texts)[:3]
        loss = loss_fn(image_features, text_features, logit_scale)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(oc.parameters(), optim_cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            oc.logit_scale.clamp_(0, math.log(100))
        step[0] += 1
        return loss.item()

    return one_step


def bench_steps(args) -> None:
    run, vlm_step = _vlm_step(args)
    oc_step = _open_clip_step(run.clip, args, run.config.optim, run.config.schedule)
    for _ in range(2):  # warm-up: allocator, first-call dispatch
        vlm_step(), oc_step()
    t_vlm, t_oc = [], []
    for _ in range(args.steps):
        for fn, times in ((vlm_step, t_vlm), (oc_step, t_oc)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    m_vlm, m_oc = statistics.median(t_vlm), statistics.median(t_oc)
    print_table(
        f"training step, preset {args.model}, batch {args.batch}, fp32, AdamW + clip + clamp + schedule",
        [
            ("vlm train_step", f"{1 / m_vlm:.3f}", f"{m_vlm * 1000:.0f}", "1.00"),
            ("open_clip", f"{1 / m_oc:.3f}", f"{m_oc * 1000:.0f}", f"{m_oc / m_vlm:.2f}"),
        ],
        ("implementation", "steps/s", "median ms/step", "vlm speed-up"),
    )
    print(f"vlm / open_clip step rate: {m_oc / m_vlm:.2f}x (target >= 1.0x)")


# ---- loss memory ---------------------------------------------------------------------------------
def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure_loss(kind: str, n: int, dim: int, chunk_size: int) -> dict:
    """Runs in a fresh process: peak resident memory of one loss forward + backward."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    img = F.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    scale = torch.tensor(100.0, requires_grad=True)
    if kind == "open_clip":
        from open_clip.loss import ClipLoss

        fn = lambda: ClipLoss()(img, txt, scale)  # noqa: E731
    else:
        from training.losses import clip_loss

        fn = lambda: clip_loss(img, txt, scale, chunk_size=chunk_size)  # noqa: E731
    base = _rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    loss = fn()
    loss.backward()
    seconds = time.perf_counter() - start
    return {"peak_mib": (_rss_kib("VmHWM") - base) / 1024, "seconds": seconds, "loss": loss.item()}


def bench_loss_memory(args) -> None:
    from training.config import LossConfig

    chunk = LossConfig().chunk_size
    cases = [("vlm chunked", "vlm", chunk), ("vlm unchunked", "vlm", 0), ("open_clip ClipLoss", "open_clip", 0)]
    results = {}
    for label, kind, chunk_size in cases:
        code = (
            "import json, sys; sys.path[:0] = %r; import bench_training as b; "
            "print(json.dumps(b._measure_loss(%r, %d, %d, %d)))"
            % (
                [
                    os.path.dirname(os.path.abspath(__file__)),
                    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                ],
                kind,
                args.loss_batch,
                args.embed_dim,
                chunk_size,
            )
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        results[label] = json.loads(out.stdout.strip().splitlines()[-1])
    chunked = results["vlm chunked"]["peak_mib"]
    rows = [
        (label, f"{r['peak_mib']:.0f}", f"{r['seconds']:.2f}", f"{r['peak_mib'] / chunked:.1f}", f"{r['loss']:.5f}")
        for label, r in results.items()
    ]
    print_table(
        f"contrastive loss forward + backward, batch {args.loss_batch}, dim {args.embed_dim}, chunk {chunk}",
        rows,
        ("loss", "peak MiB", "seconds", "x chunked memory", "loss value"),
    )
    ratio = results["vlm unchunked"]["peak_mib"] / chunked
    print(f"unchunked / chunked loss memory: {ratio:.1f}x (target >= 8x)")


# ---- patch dropout -------------------------------------------------------------------------------
def bench_patch_dropout_speed(args) -> float:
    """The step rate at patch dropout 0.5 over the rate without."""
    run, step = _vlm_step(args, args.dropout_model, args.dropout_batch)
    visual = run.clip.visual
    configs = {p: dataclasses.replace(visual.config, patch_dropout=p) for p in (0.0, 0.5)}

    def at(p):
        def one_step():
            visual.config = configs[p]  # the tower reads its dropout at each call: one model, one optimiser
            return step()

        return one_step

    best = interleaved_best_times({p: at(p) for p in configs}, rounds=args.steps)
    ratio = best[0.0] / best[0.5]
    rows = [(f"{p:g}", f"{best[p] * 1000:.0f}", f"{best[0.0] / best[p]:.2f}") for p in configs]
    print_table(
        f"train_step with patch dropout, preset {args.dropout_model}, batch {args.dropout_batch}, fp32",
        rows,
        ("patch dropout", "best ms/step", "speed-up"),
    )
    print(f"patch dropout 0.5 / none step rate: {ratio:.2f}x (target >= 1.6x)")
    return ratio


def _digits_top1(data, folder, steps: int, seed: int, extra: list[str]) -> tuple[float, float]:
    """The quick digits run's held-out zero-shot top-1 and its training seconds, trained for `steps`."""
    from training.config import load_config
    from training.loop import train

    overrides = [f"output_dir={folder}", f"data.train={data.train.table}", f"eval.zeroshot={data.test.table}"]
    overrides += [f"schedule.steps={steps}", f"seed={seed}"]
    torch.manual_seed(seed)
    result = train(load_config(ROOT / "training" / "configs" / "digits_tiny.yaml", overrides + extra))
    return result.metrics["zeroshot_top1"], result.seconds


def bench_patch_dropout_accuracy(args, step_ratio: float | None = None) -> None:
    """The quick digits run without patch dropout, with 0.5, and with 0.5 ending on unmasked steps, for each
    of `--seeds` seeds; with the speed section's `step_ratio`, the whole run's speed-up that the unmasked
    steps leave."""
    from demo.sample_data import write_digits

    n, steps, seeds = args.unmasked_steps, args.digits_steps, range(args.seeds)
    cases = {
        "none": [],
        "0.5": ["model.patch_dropout=0.5"],
        f"0.5, last {n} unmasked": ["model.patch_dropout=0.5", f"model.patch_dropout_unmasked_steps={n}"],
    }
    # One thread, as the tests' digits run: the tiny model gains little from two on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_patch_dropout_") as tmp:
            data = write_digits(os.path.join(tmp, "digits"))
            runs = {
                label: [_digits_top1(data, os.path.join(tmp, f"run_{i}_{seed}"), steps, seed, extra) for seed in seeds]
                for i, (label, extra) in enumerate(cases.items())
            }
    finally:
        torch.set_num_threads(threads)
    mean = {label: 100 * statistics.mean(top1 for top1, _ in results) for label, results in runs.items()}
    rows = [
        (
            label,
            *(f"{100 * top1:.1f}%" for top1, _ in results),
            f"{mean[label]:.1f}%",
            f"{statistics.mean(s for _, s in results):.0f}",
        )
        for label, results in runs.items()
    ]
    title = f"quick digits run (tiny preset: 4x4 = 16 patches, {steps} steps): held-out zero-shot top-1"
    print_table(title, rows, ("patch dropout", *(f"seed {seed}" for seed in seeds), "mean", "train s"))
    for label in list(cases)[1:]:
        gap = mean["none"] - mean[label]
        print(f"mean top-1 without - with patch dropout {label}: {gap:+.1f} points (target within 1 point)")
    if step_ratio:
        whole = steps / ((steps - n) / step_ratio + n)
        print(f"whole-run speed-up at {step_ratio:.2f}x per dropout step, last {n} of {steps} unmasked: {whole:.2f}x")


def _wanted(args, section: str, skipped: bool) -> bool:
    return args.only == section if args.only else not skipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loss-batch", type=int, default=16384)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-patch-dropout", action="store_true")
    sections = ("steps", "memory", "patch-dropout", "patch-dropout-speed", "patch-dropout-accuracy")
    parser.add_argument("--only", choices=sections, help="run this section alone")
    parser.add_argument("--dropout-model", default="ViT-B-16")
    parser.add_argument("--dropout-batch", type=int, default=8)
    parser.add_argument("--digits-steps", type=int, default=300, help="steps of each digits run")
    parser.add_argument("--seeds", type=int, default=3, help="digits runs of each kind, seeds 0, 1, ...")
    parser.add_argument("--unmasked-steps", type=int, default=60, help="FLIP's unmasked tuning in the digits run")
    args = parser.parse_args()
    if _wanted(args, "steps", args.skip_steps):
        bench_steps(args)
    if _wanted(args, "memory", args.skip_memory):
        bench_loss_memory(args)
    ratio = None
    if _wanted(args, "patch-dropout", args.skip_patch_dropout) or args.only == "patch-dropout-speed":
        ratio = bench_patch_dropout_speed(args)
    if _wanted(args, "patch-dropout", args.skip_patch_dropout) or args.only == "patch-dropout-accuracy":
        bench_patch_dropout_accuracy(args, ratio)


if __name__ == "__main__":
    main()
