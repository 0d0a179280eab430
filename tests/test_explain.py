"""Attention rollout and text-conditioned relevance: hand-computed fixtures, then the real model end to end."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import vlm
from vlm.explain import attention_rollout, explain_image, model_view, text_relevance


@pytest.fixture
def model16():
    """A 16 px tiny model: a 2 x 2 patch grid, 5 tokens with the class token."""
    return vlm.create_model("tiny", vision={"image_size": 16}).eval()


def _attention(rows: dict[int, list[float]]) -> torch.Tensor:
    """(1, 1, 5, 5) attention: identity rows except those given."""
    a = torch.eye(5)
    for i, row in rows.items():
        a[i] = torch.tensor(row)
    return a[None, None]


def _patch_attention(monkeypatch, model, weights):
    tokens = torch.zeros(1, 5, model.visual.config.width)
    monkeypatch.setattr(model.visual, "forward_with_attention", lambda images: (tokens, weights))


def test_rollout_one_block(monkeypatch, model16):
    # Residual added: (A + I) / 2, so the class token's row over the patches is A[0, 1:] / 2.
    _patch_attention(monkeypatch, model16, [_attention({0: [0.2, 0.4, 0.1, 0.3, 0.0]})])
    heatmap = attention_rollout(model16, torch.zeros(3, 16, 16))
    # Patches 0.2, 0.05, 0.15, 0.0 scaled to [0, 1], on the 2 x 2 grid.
    torch.testing.assert_close(heatmap.values, torch.tensor([[1.0, 0.25], [0.75, 0.0]]))


def test_rollout_follows_attention_through_blocks(monkeypatch, model16):
    """Block 2: the class token reads patch 1 only. Block 1: patch 1 reads patch 3 only. Rollout credits
    patches 1 and 3 equally (0.25 each) and nothing else."""
    first = _attention({1: [0, 0, 0, 1, 0]})
    second = _attention({0: [0, 1, 0, 0, 0]})
    _patch_attention(monkeypatch, model16, [first, second])
    heatmap = attention_rollout(model16, torch.zeros(3, 16, 16))
    torch.testing.assert_close(heatmap.values, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_rollout_without_class_token_averages_the_patch_rows(monkeypatch):
    """SigLIP's tower (no class token, attention pooling): the map is the mean of the 4 patch rows. One block
    where patch 0 reads patch 1: (A + I) / 2 has row 0 = (.5, .5, 0, 0) and identity rows otherwise, mean
    (.125, .375, .25, .25), scaled to (0, 1, .5, .5)."""
    model = vlm.create_model("tiny-siglip", vision={"image_size": 16}).eval()
    attention = torch.eye(4)
    attention[0] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    tokens = torch.zeros(1, 4, model.visual.config.width)
    monkeypatch.setattr(model.visual, "forward_with_attention", lambda images: (tokens, [attention[None, None]]))
    heatmap = attention_rollout(model, torch.zeros(3, 16, 16))
    torch.testing.assert_close(heatmap.values, torch.tensor([[0.0, 1.0], [0.5, 0.5]]))


def test_relevance_on_a_hand_computed_block(monkeypatch, model16):
    """One block, one head, 2-d embeddings: the image embedding is e = sum_j A[0, j] V_j, the text is
    t = (1, 0), the score cos(e, t). With A[0] = (.2, .5, .1, .1, .1) and the values below, e = (.4, .2)
    and d score / d A[0, j] = <V_j, (t - cos * e/|e|) / |e|> = <V_j, (.4472, -.8944)>. Times A[0, j],
    negatives dropped: patches (.2236, 0, 0, .0894), scaled to (1, 0, 0, .4)."""
    values = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]])  # (1, N, 2)
    attention = _attention({0: [0.2, 0.5, 0.1, 0.1, 0.1]}).requires_grad_(True)

    def forward_with_attention(images):
        return attention[:, 0] @ values, [attention]  # (1, N, 2): token i = sum_j A[i, j] V_j

    monkeypatch.setattr(model16.visual, "forward_with_attention", forward_with_attention)
    monkeypatch.setattr(model16.visual, "project", lambda x: x)
    monkeypatch.setattr(model16, "encode_text", lambda tokens, normalize=False: torch.tensor([[1.0, 0.0]]))
    heatmap = text_relevance(model16, torch.zeros(3, 16, 16), "anything")
    assert heatmap.score == pytest.approx(0.4 / 0.2**0.5)
    torch.testing.assert_close(heatmap.values, torch.tensor([[1.0, 0.0], [0.0, 0.4]]), atol=1e-4, rtol=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-siglip"])
def test_explain_real_model_end_to_end(tmp_path, preset):
    from skimage import data

    model = vlm.create_model(preset).eval()
    photo = data.chelsea()
    out = tmp_path / "maps" / "cat.png"
    maps = explain_image(model, photo, ["a photo of a cat", "a red car"], out)
    assert [m.title for m in maps] == ["attention rollout", "'a photo of a cat'", "'a red car'"]
    for heatmap in maps:
        assert heatmap.values.shape == (4, 4)
        assert heatmap.values.min() == 0 and heatmap.values.max() == 1
    assert not torch.allclose(maps[1].values, maps[2].values)  # the map depends on the text
    # The relevance score is the model's own image-text cosine similarity.
    x = vlm.image_transform(model)(vlm.load_image(photo))[None]
    with torch.no_grad():
        cos = F.cosine_similarity(model.encode_image(x), model.encode_text(vlm.get_tokenizer(model)(["a red car"])))
    assert maps[2].score == pytest.approx(float(cos), abs=1e-5)
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 3 * image.size[1]  # image + three panels side by side


def test_model_view_is_what_the_model_sees():
    model = vlm.create_model("tiny").eval()
    wide = np.zeros((40, 80, 3), dtype=np.uint8)
    wide[:, :40] = (255, 0, 0)
    wide[:, 40:] = (0, 0, 255)
    image = Image.fromarray(wide)
    # At the model's own size: exactly the model's input, undone normalisation.
    x = vlm.image_transform(model)(image)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (model.config.vision.image_mean, model.config.vision.image_std))
    expected = (x * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    np.testing.assert_allclose(model_view(model, image, size=32), expected, atol=1e-6)
    # At display size: the centre crop, red on the left half, blue on the right.
    view = model_view(model, image)
    assert view.shape == (224, 224, 3)
    assert view[:, :100, 0].min() > 0.9 and view[:, 124:, 2].min() > 0.9


def test_explain_needs_one_image(model16):
    with pytest.raises(ValueError, match="one image"):
        attention_rollout(model16, torch.zeros(2, 3, 16, 16))
