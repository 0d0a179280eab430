"""Training throughput on one GPU against open_clip: samples/s/GPU of a CLIP contrastive step.

    .venv/bin/python bench/bench_training_gpu.py [--model ViT-B-32 ViT-B-16] [--batch 256]
                                                 [--precision {bf16,fp32}] [--steps 10] [--rounds 5]
                                                 [--warmup 5] [--compile] [--grad-checkpointing]
                                                 [--captions {full,short}] [--device cuda] [--smoke]

For each preset: a vlm model with seeded random weights (`vlm.create_model`) and open_clip's module
holding the same weights (`vlm.to_open_clip`, the converter `vlm.export.save_open_clip` writes with),
both on the device, each with its own AdamW at the trainer's settings (`training.config.OptimConfig`):
vlm's groups from the trainer's `build_optimizer`, open_clip's from open_clip_train's weight-decay rule.
One step, the same for both: forward both towers under bf16 autocast (`--precision fp32`: none; on CPU
fp32 is the default), the contrastive loss (vlm: `training.losses.contrastive_loss` with the trainer's
chunk size; open_clip: `ClipLoss`), backward, AdamW step. No clipping, schedule or logging: the step is
the models' and the losses' own cost. Attention: vlm's fused path (`scaled_dot_product_attention`);
open_clip's `nn.MultiheadAttention`, which calls the same kernel when it returns no weights. TF32
matmuls are on, as in open_clip_train. `--compile` wraps both models in `torch.compile` (the loss runs
eagerly; vlm's text tower reads its batch's last end-of-text position on the host, one graph break and
one host sync a step, eager too); `--grad-checkpointing` turns it on in both.
Inputs: seeded random images; captions whose lengths spread over the text context, the first filling
it, as a web-scale batch of this size does (`--captions short`: 1 to 8 words, where vlm's text tower,
which stops at the batch's last end-of-text token, skips most of the padding that open_clip's computes).

Method: `--warmup` untimed steps of each (compilation, kernel autotuning, the caching allocator; the
first step's loss is printed for both: equal on the same weights and inputs, up to bf16 rounding), then
`--rounds` rounds alternating vlm and open_clip (order rotating, `common.interleaved_best_times`), each
timing `--steps` steps between two `torch.cuda.synchronize()`. The best round of each gives
samples/s/GPU = batch * steps / seconds. "step GiB": the peak CUDA memory of the last warm-up step above the memory
held before it (activations, gradients, the optimiser's update). Target: >= 1.0x (vlm / open_clip).
`--smoke`: the tiny preset, batch 8, one warm-up and one timed step: a check that the script runs
(`--device cpu`: seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import sys
from dataclasses import dataclass
from typing import Callable

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import interleaved_best_times, open_clip_optimizer, print_table  # noqa: E402

import vlm  # noqa: E402

WORDS = "a photo of the cat sitting on a sofa near the window in the morning light".split()  # one token each
IMPLEMENTATIONS = ("vlm", "open_clip")


@dataclass(frozen=True)
class Measured:
    """One implementation's figures on one preset."""

    samples_per_s: float
    ms_per_step: float
    step_gib: float | None  # None off CUDA
    first_loss: float


def _caption_words(i: int, context_length: int, full: bool) -> int:
    """Words of caption `i` (one token each, plus start and end): spread over the context, the first filling
    it (`full`), or 1 to 8 words."""
    if not full:
        return 1 + i % 8
    return context_length - 2 if i == 0 else 1 + (i * 37) % (context_length - 2)


def _inputs(model: vlm.CLIP, batch: int, device: torch.device, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    size, context = model.config.vision.image_size, model.config.text.context_length
    images = torch.randn(batch, 3, size, size, generator=g)
    words = [_caption_words(i, context, full) for i in range(batch)]
    texts = vlm.get_tokenizer(model)([" ".join(WORDS[j % len(WORDS)] for j in range(n)) for n in words])
    return images.to(device), texts.to(device)


def build_steps(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Callable[[], torch.Tensor]]:
    """One training step of each implementation (forward, loss, backward, AdamW) on preset `name`, with the
    same seeded weights and the same batch (`args`: batch, precision, compile, grad_checkpointing, captions);
    each call returns that step's loss."""
    from open_clip.loss import ClipLoss

    from training.config import LossConfig, OptimConfig
    from training.losses import contrastive_loss
    from training.optim import build_optimizer

    torch.manual_seed(0)
    model = vlm.create_model(name, device=device).train()
    oc = vlm.to_open_clip(model).train()
    model.set_grad_checkpointing(args.grad_checkpointing)
    oc.set_grad_checkpointing(args.grad_checkpointing)
    optim, chunk_size, clip_loss = OptimConfig(), LossConfig().chunk_size, ClipLoss()
    opts = {"vlm": build_optimizer(model, optim), "open_clip": open_clip_optimizer(oc, optim)}
    images, texts = _inputs(model, args.batch, device, full=args.captions == "full")
    run_vlm, run_oc = (torch.compile(model), torch.compile(oc)) if args.compile else (model, oc)

    def autocast():
        bf16 = args.precision == "bf16"
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def vlm_loss() -> torch.Tensor:
        return contrastive_loss(run_vlm(images, texts), "clip", chunk_size=chunk_size)

    def open_clip_loss() -> torch.Tensor:
        image_features, text_features, logit_scale = run_oc(images, texts)[:3]
        return clip_loss(image_features, text_features, logit_scale)

    def step(opt: torch.optim.Optimizer, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def one_step() -> torch.Tensor:
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn()
            loss.backward()
            opt.step()
            return loss.detach()

        return one_step

    return {"vlm": step(opts["vlm"], vlm_loss), "open_clip": step(opts["open_clip"], open_clip_loss)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(step: Callable[[], torch.Tensor], warmup: int, device: torch.device) -> tuple[float, float | None]:
    """`warmup` untimed steps: the first one's loss and the last one's CUDA memory (GiB) above the start."""
    cuda = device.type == "cuda"
    first_loss, held = 0.0, 0
    for i in range(warmup):
        if cuda and i == warmup - 1:
            _sync(device)
            held = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        loss = step()
        if i == 0:
            first_loss = float(loss)
    _sync(device)
    return first_loss, (torch.cuda.max_memory_allocated(device) - held) / 2**30 if cuda else None


def measure(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, Measured]:
    """samples/s/GPU, ms/step, step memory and first loss of each implementation on preset `name`."""
    steps = build_steps(name, args, device)
    warm = {impl: _warm_up(steps[impl], args.warmup, device) for impl in IMPLEMENTATIONS}

    def timed(step: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(args.steps):
                step()
            _sync(device)  # the previous call ended with one too: the round times these steps alone

        return run

    best = interleaved_best_times({impl: timed(steps[impl]) for impl in IMPLEMENTATIONS}, rounds=args.rounds, warmup=0)
    del steps
    gc.collect()  # the next preset's models start on a free device
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        impl: Measured(
            samples_per_s=args.batch * args.steps / best[impl],
            ms_per_step=1000 * best[impl] / args.steps,
            step_gib=warm[impl][1],
            first_loss=warm[impl][0],
        )
        for impl in IMPLEMENTATIONS
    }


def device_name(device: torch.device) -> str:
    """The accelerator's name (`torch.cuda.get_device_name`), or the CPU's."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "CPU"


def _resolve(args: argparse.Namespace) -> torch.device:
    if args.smoke:
        args.model, args.batch, args.steps, args.rounds, args.warmup = ["tiny"], 8, 1, 1, 1
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device is visible here; run with --device cpu (fp32)")
    args.precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        raise SystemExit(
            f"--warmup {args.warmup}, --steps {args.steps}, --rounds {args.rounds}: each must be at least 1"
        )
    if device.type == "cuda":
        # open_clip_train's setting; under bf16 autocast it only touches the fp32 leftovers.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return device


def _report(results: dict[str, dict[str, Measured]], args: argparse.Namespace, device: torch.device) -> None:
    rows = []
    for name, by_impl in results.items():
        ours = by_impl["vlm"].samples_per_s
        for impl, m in by_impl.items():
            gib = "-" if m.step_gib is None else f"{m.step_gib:.2f}"
            row = (name, impl, f"{m.samples_per_s:.1f}", f"{m.ms_per_step:.1f}", gib, f"{m.first_loss:.5f}")
            rows.append(row + (f"{ours / m.samples_per_s:.2f}",))
    options = [args.precision + (" autocast" if args.precision == "bf16" else ""), "SDPA attention"]
    options += ["torch.compile"] * args.compile + ["grad checkpointing"] * args.grad_checkpointing
    title = (
        f"CLIP training step on {device_name(device)} ({device}), batch {args.batch} per GPU, {', '.join(options)}, "
        f"{args.captions} captions, best of {args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up"
    )
    header = ("preset", "implementation", "samples/s/GPU", "ms/step", "step GiB", "first loss", "vlm speed-up")
    print_table(title, rows, header)
    for name, by_impl in results.items():
        ratio = by_impl["vlm"].samples_per_s / by_impl["open_clip"].samples_per_s
        print(f"{name}: vlm / open_clip samples/s: {ratio:.2f}x (target >= 1.0x)")


def main(argv: list[str] | None = None) -> None:
    """Parses `argv` (the command line when None), measures every preset, prints the table and the ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["ViT-B-32", "ViT-B-16"], help="presets, one table row pair each")
    parser.add_argument("--batch", type=int, default=256, help="samples per step (per GPU)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), help="default: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each implementation per preset")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--grad-checkpointing", action="store_true")
    parser.add_argument(
        "--captions", choices=("full", "short"), default="full",
        help="full: lengths spread over the context, the longest filling it (as a web batch's); short: 1-8 words",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true", help="tiny preset, batch 8, 2 steps: checks the script runs")
    args = parser.parse_args(argv)
    device = _resolve(args)
    _report({name: measure(name, args, device) for name in args.model}, args, device)


if __name__ == "__main__":
    main()
