"""The tokenizer's overflow policy where users set it: `data.text_overflow` in a training config (one total
per run, not a warning per batch) and `--text-overflow` on the commands that tokenize user text."""

import csv
import logging

import pytest
from test_train_data import one_thread, write_pairs  # noqa: F401  (one_thread: fixture)

from training.config import DataConfig, config_from_dict
from training.loop import train

LONG = "a red square " + "with many more words " * 10  # far past the tiny preset's 32 tokens


def _long_captions(root, n=16, every=2):
    """write_pairs' table with every `every`-th caption made too long for the tiny model."""
    path = write_pairs(root, n)
    rows = list(csv.reader(open(path)))
    for i, row in enumerate(rows[1:]):
        if i % every == 0:
            row[1] = LONG
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def _config(tmp_path, data, **fields):
    return config_from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "data": {"train": str(data), "batch_size": 8, "num_workers": 0, **fields},
            "schedule": {"steps": 2, "warmup_steps": 1},
            "logging": {"progress": False, "plot": False},
            "checkpoint": {"every": 0},
        }
    )


def test_the_config_key_is_validated():
    assert DataConfig().text_overflow == "truncate"
    with pytest.raises(ValueError, match="data.text_overflow must be one of truncate, error; got 'cut'"):
        DataConfig(text_overflow="cut")


@pytest.mark.usefixtures("one_thread")
def test_training_reports_one_total_of_truncated_captions(tmp_path, caplog):
    data = _long_captions(tmp_path / "data")
    with caplog.at_level(logging.WARNING):
        result = train(_config(tmp_path, data))
    assert result.truncated_captions == 8  # two steps of 8 pairs, every other caption long
    tokenizer_warnings = [r for r in caplog.records if r.name.startswith("vlm.") and "truncated" in r.getMessage()]
    assert tokenizer_warnings == []
    totals = [r.getMessage() for r in caplog.records if r.name == "training.data"]
    assert totals == [
        "8 captions were longer than the model's context and were truncated (data.text_overflow=truncate); "
        "set data.text_overflow=error to refuse them"
    ]


@pytest.mark.usefixtures("one_thread")
def test_training_refuses_long_captions_naming_the_config_key(tmp_path):
    data = _long_captions(tmp_path / "data")
    with pytest.raises(ValueError, match=r"\(data.text_overflow=error\); shorten it, or use data.text_overflow=truncate"):
        train(_config(tmp_path, data, text_overflow="error"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny model (32-token context) and a table of pairs whose every other caption is too long for it."""
    import torch

    import vlm

    root = tmp_path_factory.mktemp("overflow")
    torch.manual_seed(0)
    vlm.create_model("tiny").save_pretrained(root / "model")
    return root / "model", _long_captions(root / "data", 8)


@pytest.mark.parametrize("verb", [["classify"], ["eval", "zeroshot"]])
def test_zeroshot_verbs_take_the_flag(tiny, verb, tmp_path, capsys, caplog):
    from vlm.cli import main

    model, table = tiny
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\n" + "a photo of a {} " + "with more words " * 10 + "\n")
    data = str(table.parent / "images" / "000.png") if verb == ["classify"] else str(table)
    argv = [*verb, data, "--model", str(model), "--labels", "red,green,blue,black", "--templates", str(templates)]
    argv += ["--no-progress"] + (["--no-probe", "--out", str(tmp_path / "eval")] if verb != ["classify"] else [])
    assert main([*argv, "--text-overflow", "error"]) == 1
    assert "(--text-overflow error); shorten it, or use --text-overflow truncate" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="vlm.tokenizer"):
        assert main(argv) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "vlm.tokenizer"]
    assert warnings == [  # one for the whole prompt set
        "4 of 8 texts were longer than 32 tokens and were truncated (--text-overflow truncate); "
        "use --text-overflow error to refuse them"
    ]


def test_index_build_and_search_take_the_flag(tiny, capsys, caplog):
    from vlm.cli import main

    model, table = tiny
    out = table.parent / "captions.index"
    build = ["index", "build", str(table), "--out", str(out), "--model", str(model), "--embed", "text", "--no-progress"]
    assert main([*build, "--kind", "flat", "--text-overflow", "error"]) == 1
    assert "--text-overflow truncate" in capsys.readouterr().err
    assert main([*build, "--kind", "flat"]) == 0
    search = ["search", str(out), "--text", LONG, "-k", "2"]
    assert main([*search, "--text-overflow", "error"]) == 1
    assert "--text-overflow truncate" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING, logger="vlm.tokenizer"):
        assert main(search) == 0
    assert "1 of 1 texts were longer than 32 tokens and were truncated (--text-overflow truncate)" in caplog.text
