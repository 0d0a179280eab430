"""Real data: a short from-scratch run on scikit-learn's digits classifies held-out digits zero-shot,
with prompts that never appeared in its training captions. (The full recipe, training/configs/
digits.yaml, reaches >= 95%; this shortened run checks that learning happens, well above chance.)"""

import csv

import pytest
from test_train_data import one_thread  # noqa: F401  (fixture)

from demo.sample_data import DIGIT_NAMES, write_digits
from training.config import load_config
from training.loop import train

PROMPTS = ("a photo of the number {}.", "an image of a handwritten {}.", "a drawing of the digit {}.")


@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_short_digits_run_beats_chance_by_far(tmp_path):
    data = write_digits(tmp_path / "digits")
    captions = {row["caption"] for row in csv.DictReader(open(data.train.table))}
    assert not captions & {p.format(n) for p in PROMPTS for n in DIGIT_NAMES}
    config = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={data.train.table}",
            f"eval.zeroshot={data.test.table}",
            f"eval.templates={list(PROMPTS)}",
            f"eval.classnames={list(DIGIT_NAMES)}",
            "data.batch_size=128",
            "data.num_workers=0",
            "model.name=tiny",
            "optim.lr=2e-3",
            "optim.weight_decay=0.1",
            "schedule.steps=100",
            "schedule.warmup_steps=10",
            "checkpoint.every=0",
            "logging.progress=false",
            "logging.plot=false",
        ],
    )
    result = train(config)
    assert result.metrics["zeroshot_top1"] > 0.5, result.metrics  # chance is 0.1
    assert result.skipped_samples == 0
