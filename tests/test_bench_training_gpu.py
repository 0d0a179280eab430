"""`bench/bench_training_gpu.py --smoke --device cpu` runs and prints what the README quotes: a row per
implementation, the same first loss for both (the same weights and batch), and the vlm / open_clip ratio.

The script runs through its `main(argv)` in this process, as `test_retrieval_index` imports the bench
folder's helpers: a subprocess would pay torch's and open_clip's imports again. Its speed is not tested.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

import vlm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_training_gpu  # noqa: E402


def _rows(out: str) -> dict[str, dict[str, str]]:
    """The table's rows by implementation: {column: cell} (cells are separated by two or more spaces)."""
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("preset"))
    header = re.split(r"\s{2,}", lines[at].strip())
    rows = {}
    for line in lines[at + 1 :]:
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) != len(header):
            break
        rows[cells[1]] = dict(zip(header, cells))
    return rows


def test_smoke_run_prints_both_rows_and_the_ratio(capsys):
    bench_training_gpu.main(["--smoke", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "batch 8 per GPU" in out and "fp32" in out, out
    rows = _rows(out)
    assert set(rows) == {"vlm", "open_clip"}, out
    assert all(row["preset"] == "tiny" and float(row["samples/s/GPU"]) > 0 for row in rows.values()), out
    # The same weights and the same batch: the first step's loss agrees, so both steps do the same job.
    assert float(rows["vlm"]["first loss"]) == pytest.approx(float(rows["open_clip"]["first loss"]), abs=2e-5), out
    ratio = re.search(r"^tiny: vlm / open_clip samples/s: ([0-9.]+)x", out, re.MULTILINE)
    assert ratio, out
    expected = float(rows["vlm"]["samples/s/GPU"]) / float(rows["open_clip"]["samples/s/GPU"])
    assert float(ratio.group(1)) == pytest.approx(expected, rel=0.05, abs=0.02)
    assert rows["open_clip"]["vlm speed-up"] == ratio.group(1)


def test_full_captions_fill_the_text_context():
    # vlm's text tower stops at the batch's last end-of-text token, open_clip's runs the whole context: the
    # default batch must fill it, or the ratio measures the padding vlm skips.
    model = vlm.create_model("tiny")
    full, short = (bench_training_gpu._inputs(model, 8, torch.device("cpu"), full=f)[1] for f in (True, False))
    ends = model.text.pool_positions(full).tolist()  # each caption's end-of-text position
    assert ends[0] == model.config.text.context_length - 1
    assert len(set(ends)) == 8  # lengths spread, not all full
    assert model.text.pool_positions(short).max() < 10


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_names_the_fix():
    with pytest.raises(SystemExit, match="--device cpu"):
        bench_training_gpu.main(["--smoke"])
