"""Texts per second: open_clip's `SimpleTokenizer` against `vlm.Tokenizer`, same process, same batches.

    .venv/bin/python bench/bench_tokenizer.py [--size 10000] [--repeats 3]

Four batches of real text: docstrings of installed packages (long, most get truncated), their single
lines (caption-like), zero-shot prompts ("a photo of a {class}."), and a shuffled mix of the three.
Both tokenizers cache per word (vlm also per space-separated chunk), so each batch is timed three ways:

- cold: both caches empty, as in a fresh process;
- held-out: caches warmed on other texts of the same kind, then the batch is new to them, as in a
  training run's next batch;
- warm: the same batch again, every piece cached (the steady state of a fixed prompt set).

Each number is the best of `--repeats` runs after a garbage collection; outputs are checked identical.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch

# bench/ for the shared table printer; the repository root for the corpus helpers, which live with the
# parity tests that run on the same texts.
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from common import print_table  # noqa: E402
from open_clip.tokenizer import SimpleTokenizer  # noqa: E402
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES  # noqa: E402

import vlm.tokenizer as vlm_tokenizer  # noqa: E402
from tests.test_tokenizer import doc_lines, docstrings  # noqa: E402

BATCHES = ["docstrings", "doc lines", "prompts", "mix"]


class Timing(NamedTuple):
    cpu: float
    wall: float


def pools(size: int) -> dict[str, list[str]]:
    """Per kind, 2 * size distinct texts (fewer for docstrings if the packages hold fewer), shuffled."""
    rng = random.Random(0)
    docs = docstrings(every=2)
    prompts = [t(c) for c in IMAGENET_CLASSNAMES for t in OPENAI_IMAGENET_TEMPLATES]
    kinds = {"docstrings": docs, "doc lines": doc_lines(docs, 10 * size), "prompts": prompts}
    kinds = {name: rng.sample(sorted(set(texts)), min(2 * size, len(set(texts)))) for name, texts in kinds.items()}
    kinds["mix"] = rng.sample([t for texts in kinds.values() for t in texts], 2 * size)
    return kinds


def best_of(
    run: Callable[[], torch.Tensor],
    prepare: Callable[[], None],
    repeats: int,
) -> tuple[Timing, torch.Tensor]:
    """Best CPU and wall seconds of `repeats` runs, each after `prepare` and a garbage collection
    (`common.best_time` has no per-run preparation, which the cold runs need)."""
    cpu, wall, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        prepare()
        gc.collect()
        start_cpu, start_wall = time.process_time(), time.perf_counter()
        out = run()
        cpu = min(cpu, time.process_time() - start_cpu)
        wall = min(wall, time.perf_counter() - start_wall)
    return Timing(cpu, wall), out


def fresh_open_clip() -> Callable[[list[str]], torch.Tensor]:
    return SimpleTokenizer()


def fresh_vlm() -> Callable[[list[str]], torch.Tensor]:
    vlm_tokenizer._chunk_ids = None  # drop the process-wide cache, as in a new process
    return vlm_tokenizer.Tokenizer()


def measure(
    make: Callable[[], Callable], batch: list[str], other: list[str], repeats: int
) -> dict[str, tuple[Timing, torch.Tensor]]:
    """Timing and output of one tokenizer in each regime; `make` gives one with an empty cache."""
    tok = make()

    def cold() -> None:
        nonlocal tok
        tok = make()

    def held_out() -> None:
        cold()
        tok(other)

    # "warm" comes last: by then the tokenizer has seen the batch in the runs before.
    regimes = {"cold": cold, "held-out": held_out, "warm": lambda: None}
    return {regime: best_of(lambda: tok(batch), prepare, repeats) for regime, prepare in regimes.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=10_000, help="texts per batch")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best counts")
    parser.add_argument("--batches", nargs="+", default=BATCHES, choices=BATCHES, help="which batches to time")
    args = parser.parse_args(argv)
    import logging

    logging.getLogger("vlm.tokenizer").setLevel(logging.ERROR)  # truncation warnings are expected here
    print(f"{os.cpu_count()} CPUs. Both tokenizers run in one thread; texts/s from CPU time, which a busy machine")
    print("inflates less than wall time (the wall-time ratio is in the last column).")
    header = ("regime", "open_clip texts/s", "vlm texts/s", "ratio", "wall-time ratio")
    for name, pool in pools(args.size).items():
        if name not in args.batches:
            continue
        batch, other = pool[: args.size], pool[args.size :]
        ref = measure(fresh_open_clip, batch, other, args.repeats)
        ours = measure(fresh_vlm, batch, other, args.repeats)
        rows = []
        for regime, (t_ref, expected), (t_ours, got) in zip(ref, ref.values(), ours.values()):
            if not torch.equal(expected, got):
                raise AssertionError(f"vlm and open_clip ids differ on the {regime} {name} batch")
            n = len(batch)
            ratios = f"{t_ref.cpu / t_ours.cpu:.1f}x", f"{t_ref.wall / t_ours.wall:.1f}x"
            rows.append((regime, f"{n / t_ref.cpu:,.0f}", f"{n / t_ours.cpu:,.0f}", *ratios))
        print_table(f"{name}: {len(batch)} texts, {sum(map(len, batch)) / len(batch):.0f} characters each", rows, header)
    print("\nids identical to open_clip in every run")


if __name__ == "__main__":
    main()
