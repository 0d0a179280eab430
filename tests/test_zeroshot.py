"""Zero-shot classifiers: templates, class specs, parity with open_clip's builder, scoring, artifacts."""

import json

import pytest
import torch

import vlm
from vlm import embed
from vlm.templates import (
    OPENAI_IMAGENET_TEMPLATES,
    SIMPLE_IMAGENET_TEMPLATES,
    check_template,
    fill_template,
    resolve_templates,
)
from vlm.zeroshot import (
    ClassPrompts,
    ZeroShotClassifier,
    as_class_prompts,
    build_classifier,
    parse_labels,
    read_labels_file,
)

ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return vlm.create_model("tiny").eval()


def _open_clip_classifier(model, names, templates):
    import open_clip

    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.config.text.context_length)
    return open_clip.build_zero_shot_classifier(vlm.to_open_clip(model), tokenizer, names, templates, 10, "cpu")


# ---- templates -----------------------------------------------------------------------------------
def test_builtin_templates_are_open_clips():
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES as OC80
    from open_clip.zero_shot_metadata import SIMPLE_IMAGENET_TEMPLATES as OC7

    assert len(OPENAI_IMAGENET_TEMPLATES) == 80 and len(SIMPLE_IMAGENET_TEMPLATES) == 7
    for ours, theirs in ((OPENAI_IMAGENET_TEMPLATES, OC80), (SIMPLE_IMAGENET_TEMPLATES, OC7)):
        assert [fill_template(t, "golden retriever") for t in ours] == [f("golden retriever") for f in theirs]
    assert resolve_templates("imagenet80") == OPENAI_IMAGENET_TEMPLATES
    assert resolve_templates("simple") == SIMPLE_IMAGENET_TEMPLATES


def test_custom_templates_and_files(tmp_path):
    assert fill_template("a {c} next to a {}", "cat") == "a cat next to a cat"
    assert fill_template("{{literal}} {}", "cat") == "{literal} cat"
    path = tmp_path / "t.txt"
    path.write_text("# my prompts\na photo of a {}.\n\n  a sketch of a {c}.  \n")
    assert resolve_templates(path) == ("a photo of a {}.", "a sketch of a {c}.")
    assert resolve_templates(["x {}"]) == ("x {}",)


@pytest.mark.parametrize(
    "bad, message",
    [("a photo", "needs the class name placeholder"), ("a {name}", "it has {name}"), ("a {", "not a valid format")],
)
def test_bad_templates_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        check_template(bad)


def test_template_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a built-in set"):
        resolve_templates(tmp_path / "missing.txt")
    (tmp_path / "bad.txt").write_text("a photo of a {}\nno placeholder\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        resolve_templates(tmp_path / "bad.txt")


# ---- classes ------------------------------------------------------------------------------------
def test_class_forms():
    templates = ("a {}", "the {}")
    assert ClassPrompts("cat").texts(templates) == ("a cat", "the cat")
    assert ClassPrompts("n1", aliases=("dog", "puppy")).texts(templates) == ("a dog", "the dog", "a puppy", "the puppy")
    assert ClassPrompts("x", prompts=("exactly this",)).texts(templates) == ("exactly this",)
    mapped = as_class_prompts({"cat": None, "dog": ["dog", "puppy"], "car": {"prompts": ["a red car"]}, "ox": "bull"})
    assert mapped == (
        ClassPrompts("cat"),
        ClassPrompts("dog", aliases=("dog", "puppy")),
        ClassPrompts("car", prompts=("a red car",)),
        ClassPrompts("ox", aliases=("bull",)),
    )
    assert parse_labels(" cat, dog ,car") == (ClassPrompts("cat"), ClassPrompts("dog"), ClassPrompts("car"))


def test_class_errors():
    with pytest.raises(ValueError, match="'cat' is given twice"):
        as_class_prompts(["cat", "dog", "cat"])
    with pytest.raises(ValueError, match="both aliases and prompts"):
        ClassPrompts("cat", aliases=("a",), prompts=("b",))
    with pytest.raises(ValueError, match="empty name"):
        parse_labels("cat,,dog")
    with pytest.raises(ValueError, match="unknown key"):
        as_class_prompts({"cat": {"alias": ["x"]}})
    with pytest.raises(ValueError, match="at least one class"):
        as_class_prompts([])


def test_labels_files(tmp_path):
    text = tmp_path / "labels.txt"
    text.write_text("# animals\ncat\n\ndog: dog | puppy\n")
    assert read_labels_file(text) == (ClassPrompts("cat"), ClassPrompts("dog", aliases=("dog", "puppy")))
    data = tmp_path / "labels.json"
    data.write_text(json.dumps({"cat": [], "car": {"prompts": ["a photo of a car"]}}))
    assert read_labels_file(data) == (ClassPrompts("cat"), ClassPrompts("car", prompts=("a photo of a car",)))
    (tmp_path / "bad.txt").write_text("cat\ndog: | puppy\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        read_labels_file(tmp_path / "bad.txt")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        read_labels_file(tmp_path / "bad.json")


# ---- parity and building ------------------------------------------------------------------------
def test_parity_with_open_clip_tiny_80_templates(tiny):
    names = ["cat", "dog", "golden retriever", "a very long class name that makes a longer prompt", "car"]
    ours = build_classifier(tiny, names, "imagenet80")
    ref = _open_clip_classifier(tiny, names, OPENAI_IMAGENET_TEMPLATES)
    assert ref.shape == (tiny.config.embed_dim, len(names))  # open_clip: (E, C); ours: (C, E)
    torch.testing.assert_close(ours.weights, ref.T, atol=ATOL, rtol=0)
    assert torch.allclose(ours.weights.norm(dim=-1), torch.ones(len(names)))


def test_parity_with_open_clip_full_context_tokenizer():
    """open_clip's own default tokenizer (77 positions) against a model with CLIP's context length."""
    import open_clip

    model = vlm.create_model("tiny", text={"context_length": 77}).eval()
    names = ["tench", "goldfish", "tiger shark"]
    ours = build_classifier(model, names, "simple")
    ref = open_clip.build_zero_shot_classifier(
        vlm.to_open_clip(model), open_clip.get_tokenizer("ViT-B-32"), names, SIMPLE_IMAGENET_TEMPLATES, 2, "cpu"
    )
    torch.testing.assert_close(ours.weights, ref.T, atol=ATOL, rtol=0)


def test_aliases_average_over_all_alias_prompts(tiny):
    """A class with aliases equals open_clip's builder run on the flattened (alias x template) prompts."""
    templates = ("a photo of a {}.", "a {} in a video game.")
    ours = build_classifier(tiny, {"dog": ["dog", "puppy"], "cat": ["kitten"]}, templates)
    dog = _open_clip_classifier(tiny, ["dog"], templates + tuple(t.replace("{}", "puppy") for t in templates))
    cat = _open_clip_classifier(tiny, ["kitten"], templates)
    torch.testing.assert_close(ours.weights[0], dog[:, 0], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.weights[1], cat[:, 0], atol=ATOL, rtol=0)


def test_prompts_are_embedded_once(tiny, monkeypatch):
    seen = []
    real = embed.embed_texts

    def counting(model, texts, **kwargs):
        seen.extend(texts)
        return real(model, texts, **kwargs)

    monkeypatch.setattr("vlm.zeroshot.embed_texts", counting)
    # "a" and "b" share the prompt "same", and a template repeated gives the same prompt twice.
    classes = [ClassPrompts("a", prompts=("same", "only a")), ClassPrompts("b", prompts=("same",)), "c"]
    classifier = build_classifier(tiny, classes, ["x {}", "x {}", "y {}"], batch_size=2)
    assert sorted(seen) == sorted(["same", "only a", "x c", "y c"])
    # Repeats still count in the mean, as in open_clip: c = normalise(2 * e("x c") + e("y c")).
    e = embed.embed_texts(tiny, ["x c", "y c", "same", "only a"])
    torch.testing.assert_close(
        classifier.weights[2], torch.nn.functional.normalize(2 * e[0] + e[1], dim=0), atol=ATOL, rtol=0
    )
    torch.testing.assert_close(classifier.weights[1], e[2], atol=ATOL, rtol=0)
    torch.testing.assert_close(
        classifier.weights[0], torch.nn.functional.normalize(e[2] + e[3], dim=0), atol=ATOL, rtol=0
    )
    assert classifier.prompts == (("same", "only a"), ("same",), ("x c", "x c", "y c"))


# ---- scoring ------------------------------------------------------------------------------------
def _one_prompt_per_class(model, prompts):
    classes = [ClassPrompts(f"class {i}", prompts=(p,)) for i, p in enumerate(prompts)]
    return build_classifier(model, classes)


@pytest.mark.parametrize("preset", ["tiny", "tiny-siglip"])
def test_scores_match_the_models_own_logits(preset):
    """One prompt per class: the classifier's logits are the model's `logits_per_image`; probabilities are
    a softmax over classes for the contrastive model and an independent sigmoid for the sigmoid one."""
    model = vlm.create_model(preset).eval()
    prompts = ["a photo of a cat", "a dog", "a red car on a road"]
    classifier = _one_prompt_per_class(model, prompts)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        out = model(images, vlm.get_tokenizer(model)(prompts))
        probs = classifier.probabilities(out.image_embeds)
    torch.testing.assert_close(classifier.logits(out.image_embeds), out.logits_per_image, atol=1e-4, rtol=1e-5)
    if preset == "tiny-siglip":
        assert classifier.sigmoid
        torch.testing.assert_close(probs, torch.sigmoid(out.logits_per_image), atol=1e-5, rtol=1e-5)
        assert not torch.allclose(probs.sum(dim=1), torch.ones(4))  # with bias -10 each is near 0
    else:
        assert not classifier.sigmoid
        torch.testing.assert_close(probs, out.logits_per_image.softmax(dim=1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(probs.sum(dim=1), torch.ones(4))


# ---- artifacts ----------------------------------------------------------------------------------
def test_artifact_round_trip(tiny, tmp_path):
    classes = [
        ClassPrompts("dog", aliases=("dog", "puppy")),
        ClassPrompts("x", prompts=("a thing",)),
        ClassPrompts("cat"),
    ]
    classifier = build_classifier(tiny, classes, "simple")
    classifier.save(tmp_path / "clf")
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    assert meta["class_names"] == ["dog", "x", "cat"]
    assert meta["prompts"][1] == ["a thing"] and len(meta["prompts"][0]) == 14
    assert meta["model_fingerprint"] == tiny.fingerprint()
    assert meta["tokenizer_fingerprint"] == vlm.get_tokenizer(tiny).fingerprint()
    loaded = ZeroShotClassifier.load(tmp_path / "clf", tiny)
    assert torch.equal(loaded.weights, classifier.weights)
    assert loaded.classes == classifier.classes and loaded.templates == classifier.templates
    assert loaded.prompts == classifier.prompts
    assert (loaded.logit_scale, loaded.logit_bias) == (classifier.logit_scale, classifier.logit_bias)


def test_artifact_refuses_another_model(tiny, tmp_path):
    build_classifier(tiny, ["cat", "dog"], "simple").save(tmp_path / "clf")
    torch.manual_seed(1)
    other = vlm.create_model("tiny")  # same config, other weights
    with pytest.raises(ValueError, match="built with another model.*model fingerprint"):
        ZeroShotClassifier.load(tmp_path / "clf", other)
    ZeroShotClassifier.load(tmp_path / "clf")  # without a model: no check


def test_artifact_refuses_another_tokenizer(tiny, tmp_path):
    build_classifier(tiny, ["cat"], "simple").save(tmp_path / "clf")
    meta_path = tmp_path / "clf" / "classifier.json"
    meta = json.loads(meta_path.read_text())
    meta["tokenizer_fingerprint"] = vlm.get_tokenizer(77).fingerprint()
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tokenizer fingerprint") as err:
        ZeroShotClassifier.load(tmp_path / "clf", tiny)
    assert "model fingerprint" not in str(err.value)


def test_tokenizer_fingerprint_tracks_context_length():
    assert vlm.get_tokenizer(32).fingerprint() == vlm.get_tokenizer(32).fingerprint()
    assert vlm.get_tokenizer(32).fingerprint() != vlm.get_tokenizer(77).fingerprint()


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved classifier"):
        ZeroShotClassifier.load(tmp_path)
