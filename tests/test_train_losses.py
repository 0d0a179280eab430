"""Contrastive losses and metrics: reference values, chunked / local / accumulated gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_text
from test_train_data import one_thread  # noqa: F401  (fixture)

import vlm
from training.config import LossConfig
from training.losses import clip_loss, contrastive_loss, sigmoid_loss
from training.step import loss_and_gradients
from vlm.metrics import positives_from_ids, recall_at_k, retrieval_recall, topk_accuracy

pytestmark = pytest.mark.usefixtures("one_thread")


def _features(n=40, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_()
    txt = F.normalize(torch.randn(n, dim, generator=g), dim=-1).requires_grad_()
    return img, txt


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


def _plain_clip(img, txt, scale):
    """The textbook symmetric InfoNCE, written out."""
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def test_clip_loss_matches_open_clip():
    from open_clip.loss import ClipLoss

    img, txt = _features()
    scale = torch.tensor(12.0, requires_grad=True)
    ours = clip_loss(img, txt, scale, chunk_size=0)
    ref = ClipLoss()(img, txt, scale)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("local_loss", [True, False])
@pytest.mark.parametrize("chunk_size", [0, 1, 7, 16, 40])
def test_chunked_and_local_clip_equal_the_plain_loss(local_loss, chunk_size):
    img, txt = _features()
    scale = torch.tensor(8.0, requires_grad=True)
    inputs = (img, txt, scale)
    plain = _plain_clip(*inputs)
    ours = clip_loss(*inputs, local_loss=local_loss, chunk_size=chunk_size)
    torch.testing.assert_close(ours, plain, atol=1e-5, rtol=0)
    for a, b in zip(_grads(ours, inputs), _grads(plain, inputs)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_sigmoid_loss_matches_open_clip_and_chunks():
    from open_clip.loss import SigLipLoss

    img, txt = _features()
    scale = torch.tensor(10.0, requires_grad=True)
    bias = torch.tensor(-10.0, requires_grad=True)
    inputs = (img, txt, scale, bias)
    ref = SigLipLoss()(*inputs)
    ref_grads = _grads(ref, inputs)
    for chunk_size in (0, 6):
        ours = sigmoid_loss(*inputs, chunk_size=chunk_size)
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
        for a, b in zip(_grads(ours, inputs), ref_grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_sigmoid_loss_needs_a_bias():
    img, txt = _features(4)
    with pytest.raises(ValueError, match="logit_bias"):
        sigmoid_loss(img, txt, torch.tensor(10.0), None)


def test_chunking_bounds_the_memory_autograd_keeps():
    """Saved tensors of the chunked loss are the inputs, not blocks of the similarity matrix."""
    n = 512
    img, txt = _features(n, 8)
    scale = torch.tensor(10.0, requires_grad=True)

    def saved_numel(chunk_size):
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            clip_loss(img, txt, scale, chunk_size=chunk_size)
        return max(sizes)

    assert saved_numel(0) >= n * n  # the whole matrix is kept for backward
    assert saved_numel(64) <= n * 8  # only features (N, E) are kept


def _model_grads(model, images, texts, config, accelerator):
    model.zero_grad(set_to_none=True)
    value = loss_and_gradients(model, images, texts, config, accelerator)
    return value, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("preset,kind", [("tiny", "clip"), ("tiny-siglip", "siglip")])
def test_accumulation_equals_one_big_batch(preset, kind):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = vlm.create_model(preset)
    images = torch.randn(12, 3, 32, 32)
    texts = make_text(12, 32, [3 + i % 9 for i in range(12)])
    big, g_big = _model_grads(model, images, texts, LossConfig(kind=kind, accum_steps=1), accelerator)
    acc, g_acc = _model_grads(model, images, texts, LossConfig(kind=kind, accum_steps=3, chunk_size=5), accelerator)
    assert math.isclose(big.value, acc.value, abs_tol=1e-5)
    assert set(g_big) == set(g_acc) == {n for n, _ in model.named_parameters()}
    for name in g_big:
        torch.testing.assert_close(g_acc[name], g_big[name], atol=1e-5, rtol=0, msg=name)
    # A plain loop of micro-batches (each with its own negatives) gives different gradients.
    _, g_naive = _model_grads(model, images[:4], texts[:4], LossConfig(kind=kind), accelerator)
    assert not torch.allclose(g_naive["text.proj.weight"], g_big["text.proj.weight"], atol=1e-3)


def test_contrastive_loss_dispatch():
    img, txt = _features(6)
    out = vlm.CLIPOutput(img, txt, torch.tensor(5.0), None)
    torch.testing.assert_close(contrastive_loss(out, "clip"), _plain_clip(img, txt, 5.0))
    with pytest.raises(ValueError, match="unknown loss kind"):
        contrastive_loss(out, "triplet")


# ---- metrics -------------------------------------------------------------------------------------
def test_recall_at_k_on_a_hand_computed_fixture():
    # 4 queries x 8 candidates; the correct candidate of query i is column i.
    scores = torch.tensor(
        [
            [0.9, 0.1, 0.2, 0.3, 0.0, 0.0, 0.0, 0.0],  # rank 0
            [0.9, 0.5, 0.8, 0.7, 0.6, 0.0, 0.0, 0.0],  # four above it: rank 4
            [0.9, 0.9, 0.1, 0.8, 0.8, 0.8, 0.8, 0.8],  # seven above it: rank 7
            [0.0, 0.0, 0.0, 0.5, 0.5, 0.0, 0.0, 0.0],  # a tie counts against it: rank 1
        ]
    )
    positives = torch.eye(4, 8, dtype=torch.bool)
    assert recall_at_k(scores, positives, (1, 5, 10)) == {1: 0.25, 5: 0.75, 10: 1.0}
    assert recall_at_k(scores, positives, (2, 8)) == {2: 0.5, 8: 1.0}


def test_constant_scores_are_not_perfect():
    scores = torch.zeros(10, 10)
    assert topk_accuracy(scores, torch.arange(10), (1,)) == {1: 0.0}


def test_topk_accuracy():
    scores = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]])
    assert topk_accuracy(scores, torch.tensor([1, 1, 0]), (1, 2, 3)) == pytest.approx({1: 1 / 3, 2: 2 / 3, 3: 1.0})
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
        recall_at_k(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))
