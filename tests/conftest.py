import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

# Tests must never reach a model hub; loading code is exercised on local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def _torch_threads() -> int:
    """Two threads in a serial run; under pytest-xdist the cores split between the workers, so that
    `make test`'s workers together never run more threads than there are cores (oversubscribed OpenMP
    threads wait on each other and make the tiny models' steps several times slower)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    return max(1, min(2, (os.cpu_count() or 1) // workers))


torch.set_num_threads(_torch_threads())
logging.getLogger("root").setLevel(logging.ERROR)

# The quick digits run `digits_run` trains, and its zero-shot prompts, which no training caption uses
# (`test_train_digits` checks it).
DIGITS_TINY = Path(__file__).resolve().parents[1] / "training" / "configs" / "digits_tiny.yaml"
DIGIT_PROMPTS = tuple(yaml.safe_load(DIGITS_TINY.read_text())["eval"]["templates"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make_text(batch: int, context_length: int, lengths: list[int] | None = None, vocab: int = 49408) -> torch.Tensor:
    """Token ids shaped like the tokenizer's: start token, random body, end token (highest id), zeros."""
    g = torch.Generator().manual_seed(1)
    lengths = lengths or [min(context_length, 3 + 4 * i) for i in range(batch)]
    text = torch.zeros(batch, context_length, dtype=torch.long)
    for i, n in enumerate(lengths):
        text[i, :n] = torch.randint(1, vocab - 2, (n,), generator=g)
        text[i, 0], text[i, n - 1] = vocab - 2, vocab - 1
    return text


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """scikit-learn's digits written once and the tiny model trained on their captions by `vlm train`'s
    loop, 100 steps: one trained model for every digits test (and every xdist worker), as
    (DigitsData, TrainResult). The run evaluates zero-shot on the held-out split with `DIGIT_PROMPTS`."""
    from demo.sample_data import DigitsData, DigitsSplit
    from training.loop import TrainResult

    made = _once_per_run(tmp_path_factory, "digits_run", _train_digits)
    splits = {
        name: DigitsSplit([Path(p) for p in split["paths"]], split["labels"], split["captions"], Path(split["table"]))
        for name, split in made["splits"].items()
    }
    result = made["result"]
    result.update(run_dir=Path(result["run_dir"]), model_dir=Path(result["model_dir"]))
    return DigitsData(Path(made["root"]), splits["train"], splits["test"]), TrainResult(**result)


def _train_digits(folder: Path) -> dict:
    """`digits_run`'s data and training run in `folder`, as JSON."""
    import dataclasses

    from demo.sample_data import write_digits
    from training.config import load_config
    from training.loop import train

    data = write_digits(folder / "digits")
    overrides = {"output_dir": folder / "run", "data.train": data.train.table, "eval.zeroshot": data.test.table}
    config = load_config(DIGITS_TINY, [f"{key}={value}" for key, value in overrides.items()])
    # One thread: the tiny model gains little from two, and two OpenMP threads on a busy 2-core
    # machine made each step 5-10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        result = train(config)
    finally:
        torch.set_num_threads(threads)
    splits = {
        name: {"paths": [str(p) for p in split.paths], "labels": split.labels, "captions": split.captions, "table": str(split.table)}
        for name, split in (("train", data.train), ("test", data.test))
    }
    return {"root": str(data.root), "splits": splits, "result": json.loads(json.dumps(dataclasses.asdict(result), default=str))}


def _once_per_run(tmp_path_factory, name: str, make: Callable[[Path], Any]) -> Any:
    """`make(folder)`'s JSON value, made once per pytest run: under pytest-xdist the first worker makes
    it in a folder every worker sees and the others read it (the pattern xdist documents for session
    fixtures), instead of each worker spending the same seconds again."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return make(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # the run's folder, above each worker's own
    done = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.is_file():
            folder = shared / name
            folder.mkdir()
            done.write_text(json.dumps(make(folder)))
        return json.loads(done.read_text())


@pytest.fixture(scope="session")
def doc_corpus(tmp_path_factory) -> list[str]:
    """The distinct docstring lines `test_tokenizer` gathers: some 10,000."""
    from test_tokenizer import doc_lines, docstrings

    return _once_per_run(tmp_path_factory, "doc_corpus", lambda _: list(dict.fromkeys(doc_lines(docstrings(), 20_000))))


@pytest.fixture(scope="session")
def layouts(tmp_path_factory, doc_corpus) -> dict[str, Path]:
    """One folder of tokenizer files per family layout (`vocabularies.build_layouts`), built once per run."""
    from vocabularies import build_layouts

    def build(folder: Path) -> dict[str, str]:
        return {name: str(path) for name, path in build_layouts(folder, doc_corpus).items()}

    return {name: Path(path) for name, path in _once_per_run(tmp_path_factory, "hf_layouts", build).items()}
