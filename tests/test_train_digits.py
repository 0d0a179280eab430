"""Real data: a short from-scratch run on scikit-learn's digits classifies held-out digits zero-shot,
with prompts that never appeared in its training captions. (The full recipe, training/configs/
digits.yaml, reaches >= 95%; this shortened run, conftest's `digits_run`, checks that learning
happens, well above chance.)"""

import csv

import pytest
from conftest import DIGIT_PROMPTS

from demo.sample_data import DIGIT_NAMES


@pytest.mark.slow
def test_short_digits_run_beats_chance_by_far(digits_run):
    data, result = digits_run
    captions = {row["caption"] for row in csv.DictReader(open(data.train.table))}
    assert not captions & {p.format(n) for p in DIGIT_PROMPTS for n in DIGIT_NAMES}
    assert result.step == 100
    assert result.metrics["zeroshot_top1"] > 0.5, result.metrics  # chance is 0.1
    assert result.skipped_samples == 0
