"""Contrastive losses: reference values, chunked / local / accumulated gradients (metrics: test_metrics.py)."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import make_text
from test_train_data import one_thread  # noqa: F401  (fixture)

import vlm
from training.config import LossConfig
from training.losses import clip_loss, contrastive_loss, sigmoid_loss
from training.grad_cache import loss_and_gradients

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
