"""Shared helpers for the benchmark scripts: timing and a plain table printer."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def timings(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> list[float]:
    """`repeats` wall-clock timings of `fn()` in seconds, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def best_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """The best of `repeats` timings of `fn()` in seconds (see `timings`)."""
    return min(timings(fn, repeats, warmup))


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """The median of `repeats` timings of `fn()` in seconds (see `timings`)."""
    return statistics.median(timings(fn, repeats, warmup))


def interleaved_best_times(fns: dict[str, Callable[[], object]], rounds: int = 3, warmup: int = 1) -> dict[str, float]:
    """The best wall-clock time in seconds of each function over `rounds` rounds, each round calling every
    function once (the order rotating), so that a change in the machine's load hits all of them alike."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    best = {name: float("inf") for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def print_table(title: str, rows: list[tuple], header: tuple) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}  (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))


def open_clip_optimizer(oc, optim):
    """open_clip_train's AdamW for the open_clip model `oc` with the settings of `optim`
    (`training.config.OptimConfig`): no weight decay on ndim < 2, norms ("ln", "bn"), biases and logit_scale."""
    import torch

    def exclude(name: str, p) -> bool:
        return p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name

    named = [(n, p) for n, p in oc.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": optim.weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps)
