"""Training speed against open_clip, and the memory of the loss at a large batch.

    .venv/bin/python bench/bench_training.py [--model small] [--batch 128] [--steps 5]
                                             [--loss-batch 16384] [--embed-dim 512]

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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import print_table  # noqa: E402

import vlm  # noqa: E402

CAPTIONS = ("a handwritten seven", "the digit {}", "a photo of a cat on a sofa", "a scan of the number {}, by hand")


def _batch(model: vlm.CLIP, n: int):
    g = torch.Generator().manual_seed(0)
    size = model.config.vision.image_size
    images = torch.randn(n, 3, size, size, generator=g)
    texts = vlm.get_tokenizer(model)([CAPTIONS[i % len(CAPTIONS)].format(i) for i in range(n)])
    return images, texts


def _vlm_step(args):
    """A prepared run and a callable doing one of its training steps."""
    from training.checkpointing import TrainerState
    from training.config import load_config
    from training.data import PairBatch, Position
    from training.loop import prepare, train_step

    out = tempfile.mkdtemp(prefix="bench_training_")
    config = load_config(
        None,
        [
            f"output_dir={out}",
            f"model.name={args.model}",
            "logging.progress=false",
            f"schedule.steps={10**6}",
            "schedule.warmup_steps=10",
        ],
    )
    run = prepare(config)
    images, texts = _batch(run.clip, args.batch)
    batch = PairBatch(images, texts, [], Position())
    state = TrainerState()
    return run, lambda: train_step(run, batch, state)


def _open_clip_step(model: vlm.CLIP, args, optim_cfg, schedule):
    """open_clip_train's step (train_one_epoch without logging) on a copy of `model`."""
    from open_clip.loss import ClipLoss

    from training.optim import lr_at

    oc = vlm.to_open_clip(model).train()
    # open_clip_train's rule: no weight decay on ndim < 2, norms ("ln"), biases and logit_scale.
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(oc.named_parameters())
    groups = [
        {"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
        {
            "params": [p for n, p in named if not exclude(n, p) and p.requires_grad],
            "weight_decay": optim_cfg.weight_decay,
        },
    ]
    opt = torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.beta1, optim_cfg.beta2), eps=optim_cfg.eps)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--loss-batch", type=int, default=16384)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--skip-steps", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    args = parser.parse_args()
    if not args.skip_steps:
        bench_steps(args)
    if not args.skip_memory:
        bench_loss_memory(args)


if __name__ == "__main__":
    main()
