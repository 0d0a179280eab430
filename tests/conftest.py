import logging
import os

import pytest
import torch

# Tests must never reach a model hub; loading code is exercised on local files.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
logging.getLogger("root").setLevel(logging.ERROR)


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
def doc_corpus() -> list[str]:
    """The distinct docstring lines `test_tokenizer` gathers: some 10,000."""
    from test_tokenizer import doc_lines, docstrings

    return list(dict.fromkeys(doc_lines(docstrings(), 20_000)))


@pytest.fixture(scope="session")
def layouts(tmp_path_factory, doc_corpus):
    """One folder of tokenizer files per family layout (`vocabularies.build_layouts`), built once per session."""
    from vocabularies import build_layouts

    return build_layouts(tmp_path_factory.mktemp("hf_layouts"), doc_corpus)
