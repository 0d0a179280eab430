"""vlm.metrics: recall@k by scores and by ids on hand-computed fixtures, the one tie rule (ties count
against the query) in both, against a brute-force oracle, and through retrieval's paired recall."""

import numpy as np
import pytest
import torch

from retrieval.evaluate import paired_recall
from vlm import evaluation
from vlm.metrics import (
    confusion_matrix,
    per_class_recall,
    positives_from_ids,
    recall_at_k_from_ids,
    recall_at_k_from_scores,
    retrieval_recall,
    topk_accuracy,
)

# 4 queries x 8 candidates; the correct candidate of query i is column i.
SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.2, 0.3, 0.0, 0.0, 0.0, 0.0],  # rank 0
        [0.9, 0.5, 0.8, 0.7, 0.6, 0.0, 0.0, 0.0],  # four above it: rank 4
        [0.9, 0.9, 0.1, 0.8, 0.8, 0.8, 0.8, 0.8],  # seven above it: rank 7
        [0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0],  # a tie counts against it: rank 1
    ]
)
POSITIVES = torch.eye(4, 8, dtype=torch.bool)


def _ranked(scores: torch.Tensor, positives: torch.Tensor, ties_favour_query: bool):
    """FAISS-style (D, I) of every candidate, best first; among equal scores the true candidates come
    first (`ties_favour_query`) or last: the two orders a search engine may return."""
    order = [
        sorted(range(len(row)), key=lambda j: (-float(row[j]), bool(pos[j]) != ties_favour_query))
        for row, pos in zip(scores, positives)
    ]
    I = np.array(order)
    D = np.take_along_axis(scores.numpy(), I, axis=1)
    return D, I


def _true_ids(positives: torch.Tensor) -> list[list[int]]:
    return [row.nonzero().flatten().tolist() for row in positives]


# ---- by scores ------------------------------------------------------------------------------------
def test_recall_from_scores_on_a_hand_computed_fixture():
    assert recall_at_k_from_scores(SCORES, POSITIVES, (1, 5, 10)) == {1: 0.25, 5: 0.75, 10: 1.0}
    assert recall_at_k_from_scores(SCORES, POSITIVES, (2, 8)) == {2: 0.5, 8: 1.0}


def test_constant_scores_are_not_perfect():
    scores = torch.zeros(10, 10)
    assert recall_at_k_from_scores(scores, torch.eye(10, dtype=torch.bool), (1, 10)) == {1: 0.0, 10: 1.0}
    assert topk_accuracy(scores, torch.arange(10), (1,)) == {1: 0.0}


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    assert topk_accuracy(scores, torch.tensor([1, 1, 0]), (1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}
    with pytest.raises(ValueError, match="class indices"):
        topk_accuracy(scores, torch.tensor([0, 1, 3]))


def test_retrieval_recall_with_several_captions_per_image():
    img = torch.eye(3)
    # Captions 0 and 1 describe image 0, caption 2 image 1, caption 3 image 2.
    txt = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 1.0, 0.0], [0.0, 0.8, 0.6]])
    positives = positives_from_ids([0, 1, 2], [0, 0, 1, 2])
    result = retrieval_recall(img, txt, positives, ks=(1, 2))
    # Every image's best caption is its own. Captions 1 and 3 score higher with image 1 than with
    # their own image: second place.
    assert result.image_to_text == {1: 1.0, 2: 1.0}
    assert result.text_to_image == {1: 0.5, 2: 1.0}
    assert set(result.as_dict()) == {"image_to_text_R@1", "image_to_text_R@2", "text_to_image_R@1", "text_to_image_R@2"}
    with pytest.raises(ValueError, match="no positive"):
        recall_at_k_from_scores(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))


# ---- by ids ---------------------------------------------------------------------------------------
def test_recall_from_ids_needs_enough_results_and_matching_scores():
    # The hand-computed fixture without scores is tests/test_retrieval_search.py's (through the old name).
    D, I = _ranked(SCORES, POSITIVES, ties_favour_query=False)
    with pytest.raises(ValueError, match="recall@10"):
        recall_at_k_from_ids(I, _true_ids(POSITIVES), ks=(10,))
    with pytest.raises(ValueError, match="shape of I"):
        recall_at_k_from_ids(I, _true_ids(POSITIVES), ks=(1,), D=D[:, :3])
    assert recall_at_k_from_ids(I[:0], [], ks=(1,)) == {1: 0.0}  # no queries


@pytest.mark.parametrize("ties_favour_query", [True, False])
def test_ids_with_scores_follow_the_tie_rule_whatever_the_result_order(ties_favour_query):
    D, I = _ranked(SCORES, POSITIVES, ties_favour_query)
    by_ids = recall_at_k_from_ids(I, _true_ids(POSITIVES), (1, 2, 5, 8), D=D)
    assert by_ids == recall_at_k_from_scores(SCORES, POSITIVES, (1, 2, 5, 8)) == {1: 0.25, 2: 0.5, 5: 0.75, 8: 1.0}


def test_ids_without_scores_take_the_order_as_the_ranking():
    # Query 3's tie, returned with its true candidate first, is then a hit at k=1: the scores are what
    # let the tie rule see it.
    D, I = _ranked(SCORES, POSITIVES, ties_favour_query=True)
    assert recall_at_k_from_ids(I, _true_ids(POSITIVES), (1,)) == {1: 0.5}
    assert recall_at_k_from_ids(I, _true_ids(POSITIVES), (1,), D=D) == {1: 0.25}


def test_both_recalls_match_a_brute_force_oracle_on_tied_scores():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (50, 12), generator=g).float()  # 4 levels: many ties
    positives = torch.rand(50, 12, generator=g) < 0.2
    positives[torch.arange(50), torch.randint(0, 12, (50,), generator=g)] = True
    ks = (1, 2, 3, 5, 12)
    oracle = {}
    for k in ks:
        hits = 0
        for row, pos in zip(scores.tolist(), positives.tolist()):
            best = max(s for s, p in zip(row, pos) if p)
            hits += sum(s >= best and not p for s, p in zip(row, pos)) < k
        oracle[k] = hits / len(scores)
    assert recall_at_k_from_scores(scores, positives, ks) == pytest.approx(oracle, abs=1e-12)
    for favour in (True, False):
        D, I = _ranked(scores, positives, favour)
        assert recall_at_k_from_ids(I, _true_ids(positives), ks, D=D) == pytest.approx(oracle, abs=1e-12)


# ---- retrieval's paired recall --------------------------------------------------------------------
def test_paired_recall_counts_ties_against_the_query():
    # Images 0-3 are the same picture, image 4 another; caption j is image j's own vector. Each of the
    # four equal images ties with three others for its caption (rank 3); image 4 is found first.
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((2, 8)).astype(np.float32)
    images = np.stack([a, a, a, a, b])
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    result = paired_recall(images, images.copy(), [0, 1, 2, 3, 4], ks=(1, 3))
    # With only max(ks) = 3 results from FAISS, three tied images would show two negatives: a hit at 3.
    assert result.text_to_image == {1: 0.2, 3: 0.2}
    assert result.image_to_text == {1: 0.2, 3: 0.2}
    assert paired_recall(images, images.copy(), [0, 1, 2, 3, 4], ks=(4,)).text_to_image == {4: 1.0}


def test_paired_recall_sees_ties_past_several_captions():
    # Image 0 has captions 0-2, image 1 caption 3; all four captions are the same vector. Image 0's
    # captions tie with caption 3 (rank 1); image 1's caption ties with the other three (rank 3).
    # With max(ks) + 1 = 3 results, image 0 could see only its own captions and count a hit at 1.
    rng = np.random.default_rng(1)
    images = rng.standard_normal((2, 4)).astype(np.float32)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    texts = np.stack([images[1]] * 4)
    result = paired_recall(images, texts, [0, 0, 0, 1], ks=(1, 2))
    assert result.image_to_text == {1: 0.0, 2: 0.5}


# ---- classification ---------------------------------------------------------------------------------
def test_confusion_matrix_and_per_class_recall_live_in_metrics():
    confusion = confusion_matrix(torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2]), 4)
    assert confusion.tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]]
    recall = per_class_recall(confusion)
    assert recall[:3].tolist() == [1.0, 1.0, 0.5] and recall[3].isnan()
    assert evaluation.confusion_matrix is confusion_matrix and evaluation.per_class_recall is per_class_recall
