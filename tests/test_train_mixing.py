"""Weighted mixing of several sources (`data.sources`): exact shares, resampling, step-exact resume,
processes splitting each global batch, config errors and the shares logged by a run."""

import json
import shutil
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_data import _loader, one_thread, write_pairs  # noqa: F401  (one_thread: fixture)

import vlm
from training.checkpointing import list_checkpoints
from training.config import load_config
from training.data import Position
from training.loop import train
from training.mixing import MixedBatchSampler, MixedSource, MixSchedule, share_metrics
from training.sources import open_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the allocation ------------------------------------------------------------------------------
def test_weights_three_to_one_give_three_and_one_of_every_four():
    schedule = MixSchedule([3, 1], global_batch=4)
    sources = [schedule.slot(k)[0] for k in range(8)]
    assert sorted(sources[:4]) == sorted(sources[4:]) == [0, 0, 0, 1]
    assert schedule.counts(5) == [15, 5]


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize(
    "weights", [[3, 1], [1, 1, 1], [0.7, 0.2, 0.1], [5, 1, 1, 0.001], [2.5, 1, 1, 1, 3, 0.25, 9]]
)
def test_shares_follow_the_weights_exactly_over_a_run(weights, batch):
    """Walking slot by slot: every slot is the next draw of one source, the counts at each step are the
    closed form's, and each source stays within one sample of its share (half a sample per tree level
    for more than four sources)."""
    schedule = MixSchedule(weights, batch)
    shares = np.array(weights) / sum(weights)
    bound = 1 if len(weights) <= 4 else np.ceil(np.log2(len(weights))) / 2
    counts = np.zeros(len(weights), dtype=int)
    worst = 0.0
    for k in range(600):
        source, draw = schedule.slot(k)
        assert draw == counts[source]
        counts[source] += 1
        worst = max(worst, np.abs(counts - shares * (k + 1)).max())
        if (k + 1) % batch == 0:
            assert schedule.counts((k + 1) // batch) == counts.tolist()
    assert worst < bound
    # Exact for millions of steps: integer arithmetic, no float drift.
    far = np.array(schedule.counts(10**7))
    assert np.abs(far - shares * 10**7 * batch).max() < bound


# ---- the loader ----------------------------------------------------------------------------------
def _two_tables(tmp_path, small=4, large=12, bad=False):
    return str(write_pairs(tmp_path / "small", small, bad=bad)), str(write_pairs(tmp_path / "large", large))


def _mix(tmp_path, weights=(3, 1), **kw):
    small, large = _two_tables(tmp_path, **kw)
    sources = [{"train": small, "weight": weights[0]}, {"train": large, "weight": weights[1]}]
    return open_pairs(load_config(None, [f"data.sources={sources}"]).data)


def _source_of(name):
    return "small" if "/small/" in name else "large"


def test_a_small_heavy_source_is_resampled_pass_after_pass(tmp_path):
    mix = _mix(tmp_path)
    assert isinstance(mix, MixedSource) and len(mix) == 16
    sampler = MixedBatchSampler(mix, local_batch=8, seed=1)
    keys = [k for step in islice(sampler, 6) for k in step]  # 48 draws: 36 small, 12 large
    by_source = Counter(_source_of(mix[k.index].name) for k in keys)
    assert by_source == {"small": 36, "large": 12}
    small = [k for k in keys if _source_of(mix[k.index].name) == "small"]
    # Nine passes through the 4 small rows, each pass a permutation of them, each repeat augmented afresh.
    for p in range(9):
        assert sorted(k.index for k in small[4 * p : 4 * p + 4]) == [0, 1, 2, 3]
        assert {k.repeat for k in small[4 * p : 4 * p + 4]} == {p}
    # Each pass is shuffled afresh.
    assert len({tuple(k.index for k in small[4 * p : 4 * p + 4]) for p in range(9)}) > 1


def test_mixed_batches_resume_exactly(tmp_path):
    mix = _mix(tmp_path)
    full = list(islice(_loader(mix), 6))
    assert [b.position for b in full] == [Position(0, s) for s in range(1, 7)]
    resumed = list(islice(_loader(mix, start=Position(0, 3), num_workers=2), 3))
    for a, b in zip(full[3:], resumed):
        assert a.names == b.names
        assert torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts)
    # The same small image drawn in two passes is augmented differently.
    draws = [(n, x) for b in full for n, x in zip(b.names, b.images)]
    first = next(n for n, _ in draws if _source_of(n) == "small")
    images = [x for n, x in draws if n == first]
    assert len(images) > 1 and not torch.equal(images[0], images[1])


def test_processes_split_each_mixed_global_batch(tmp_path):
    mix = _mix(tmp_path, weights=(1, 2))
    one = list(islice(MixedBatchSampler(mix, local_batch=6, seed=3), 4))
    two = [list(islice(MixedBatchSampler(mix, local_batch=3, rank=r, world_size=2, seed=3), 4)) for r in range(2)]
    for step in range(4):
        assert [(k.index, k.repeat) for k in one[step]] == [(k.index, k.repeat) for k in two[0][step] + two[1][step]]
    with pytest.raises(ValueError, match="epoch 0"):
        MixedBatchSampler(mix, local_batch=2, start=Position(1, 0))


def test_unreadable_samples_of_a_mix_are_skipped_and_counted(tmp_path):
    mix = _mix(tmp_path, bad=True)  # the small source: 4 good rows and 3 bad ones
    batches = list(islice(_loader(mix), 4))
    failures = [f for b in batches for f in b.failures]
    assert failures and sum(len(b) for b in batches) + len(failures) == 16
    assert {Path(f.source).name for f in failures} <= {"missing.png", "broken.png", "000.png"}


# ---- config --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.sources=[{train: a.csv}, {train: b.csv, weight: 0}]"], r"data\.sources\[1\]\.weight must be .* > 0"),
        (["data.sources=[{train: a.csv, wieght: 2}]"], r"data\.sources\[0\]\.wieght \(did you mean 'weight'\?\)"),
        (["data.sources=[{weight: 2}]"], r"data\.sources\[0\]\.train is empty"),
        (["data.train=a.csv", "data.sources=[{train: b.csv}]"], "both set"),
    ],
)
def test_bad_sources_name_their_entry(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_tar_shards_cannot_be_mixed(tmp_path):
    small, _ = _two_tables(tmp_path)
    shard = tmp_path / "shard-{0..1}.tar"  # refused by its name, before anything is read
    data = load_config(None, [f"data.sources=[{{train: {small}}}, {{train: '{shard}', weight: 2}}]"]).data
    with pytest.raises(ValueError, match=r"data\.sources\[1\]\.train=.*cannot be mixed"):
        open_pairs(data)


# ---- a run ---------------------------------------------------------------------------------------
def _mixed_run(tmp_path, out, **extra):
    small, large = _two_tables(tmp_path / "data")
    overrides = {
        "output_dir": str(tmp_path / out),
        "data.sources": f"[{{train: {small}, weight: 3}}, {{train: {large}, weight: 1}}]",
        "data.batch_size": 4,
        "data.num_workers": 0,
        "data.max_skipped_fraction": 1,
        "model.name": "tiny",
        "schedule.steps": 4,
        "schedule.warmup_steps": 1,
        "logging.progress": False,
        "logging.plot": False,
        "checkpoint.every": 2,
        "checkpoint.keep": 2,
    }
    overrides.update(extra)
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def test_a_mixed_run_logs_shares_and_resumes_step_exactly(tmp_path, caplog):
    config = _mixed_run(tmp_path, "a")
    with caplog.at_level("INFO", logger="training.mixing"):
        straight = train(config)
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["share/0"], r["share/1"]) for r in rows] == [(0.75, 0.25)] * 4
    assert "share/0" in caplog.text and "75.00% (weight 3: 75.00%)" in caplog.text
    # Stopped after step 2: its step-2 checkpoint is all that is left, then resumed to the end.
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "model")
    shutil.rmtree(list_checkpoints(tmp_path / "b")[-1])
    with caplog.at_level("INFO"):
        resumed = train(_mixed_run(tmp_path, "b"))
    assert "step_00000002" in caplog.text.split("resumed from")[-1].splitlines()[0]
    assert resumed.step == straight.step == 4
    a, b = vlm.load(straight.model_dir).state_dict(), vlm.load(resumed.model_dir).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    assert share_metrics(config.data, 4) == {"share/0": 0.75, "share/1": 0.25}


@pytest.mark.slow
def test_a_mixed_run_on_two_processes_matches_one(tmp_path):
    """torchrun with two gloo processes: each takes its half of every mixed global batch, so the weights
    equal a one-process run's; both record the same step as their data position."""
    from test_train_distributed import _torchrun

    common = _mixed_run(tmp_path, "unused", **{"data.batch_size": 8, "schedule.steps": 2, "checkpoint.every": 2})
    args = [f"data.sources={[dict(train=s.train, weight=s.weight) for s in common.data.sources]}"]
    args += ["data.batch_size=8", "data.num_workers=0", "schedule.steps=2", "schedule.warmup_steps=1"]
    args += ["checkpoint.every=2", "logging.progress=false", "logging.plot=false"]
    _torchrun(["-m", "vlm", "train", *args, f"output_dir={tmp_path / 'two'}"])
    one = train(load_config(None, [*args, f"output_dir={tmp_path / 'one'}"]))
    state = json.loads((tmp_path / "two" / "checkpoints" / "step_00000002" / "trainer_state.json").read_text())
    assert state["positions"] == [{"epoch": 0, "step": 2}] * 2 and state["samples_seen"] == 16
    two, ref = vlm.load(tmp_path / "two" / "model").state_dict(), vlm.load(one.model_dir).state_dict()
    for key in ref:
        torch.testing.assert_close(two[key], ref[key], atol=2e-5, rtol=1e-4, msg=key)
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["share/0"]) for r in rows] == [(1, 0.75), (2, 0.75)]
