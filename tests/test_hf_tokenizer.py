"""`vlm.HFTokenizer` against open_clip's `HFTokenizer` and transformers' `AutoTokenizer`: identical ids in the
file layouts of SigLIP, SigLIP 2, MetaCLIP 2 worldwide (XLM-V) and CLIPA (BERT), and its own contracts.

No vocabulary can be downloaded here, so small ones are trained once per session from docstrings
(sentencepiece: T5's unigram, Gemma's byte-fallback BPE, XLM-R's unigram; tokenizers: a BERT WordPiece) and
written as those repositories ship them. The corpus is the distinct docstring lines `test_tokenizer` gathers
(some 10,000), its edge cases and random strings, and the hostile texts below. Each layout runs the whole
corpus through one reference and the hostile texts, in every clean mode, through the other: the references
(transformers' Python around the same Rust pipeline) cost several times what `HFTokenizer` does, and they
dominate this file's run time.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_tokenizer import EDGE_CASES, random_texts
from vocabularies import added_token

from vlm.hf_tokenizer import HFTokenizer
from vlm.text_clean import CLEAN_MODES, get_clean_fn

UNICODE_CASES = [
    # Combining marks, CJK, emoji, right-to-left, zero-width and bidi controls, NUL and other controls.
    "a\u0301\u0302\u0303 o\u0308", "Z\u0324\u0354\u0367\u0311a\u0308\u0356\u032d", "東京タワーの写真",
    "한국어 텍스트 사진", "😀😀 👩‍🔬 🏳️‍🌈 🇯🇵 ✨", "مرحبا بالعالم", "שלום עולם 123", "abc \u202eRTL\u202c def",
    "a\u200bb\u200cc\u200dd\ufeff", "\u2066isolate\u2069", "a\x00b", "\x01\x02\x03 ctrl", "tab\tsep\x0bvt", "\x1b[0m",
    "\U0001d4b3\U0001d4ca math",
    # Punctuation only, SentencePiece's own marker, underscores (canonicalize turns them into spaces).
    "!!!", "...", "?!.,;:", "@#$%^&*()", "_", "snake_case_name", "\u2581", "\u2581\u2581a", "a\u2581b", "\u2581 \u2581",
    # The special tokens of every layout, alone and inside text.
    "</s>", "<s>", "<pad>", "<unk>", "<eos>", "<bos>", "<mask>", "[SEP]", "[CLS]", "[PAD]", "[UNK]", "[MASK]",
    "a photo</s>of a cat", "x <pad> y", "<unk>start", "end<unk>", "end </s>", "</s></s>", "[SEP] [CLS] word [SEP]",
    "<extra_id_0>", "<0x41>", "<start_of_turn>user", "<s>hello</s>", "a<mask>b",
    # Long text: truncation at every context length.
    "東京" * 300, "😀" * 200, "a" * 1000, "word " * 300, "The quick brown fox jumps over the lazy dog. " * 40,
]

# The family's HFTokenizer arguments in open_clip's model config, and the reference that runs over the whole
# corpus: open_clip for the repositories its configs name, transformers for the google/ ones its SigLIP classes
# load. Every layout meets the other reference on the hostile texts.
LAYOUTS = {
    # timm/ViT-B-16-SigLIP: a T5 tokenizer.json, no spiece.model.
    "siglip-timm": (dict(context_length=64, clean="canonicalize"), "open_clip"),
    # timm/ViT-B-16-SigLIP2: a Gemma tokenizer.json.
    "siglip2-timm": (dict(context_length=64, clean="canonicalize"), "open_clip"),
    # facebook/xlm-v-base (MetaCLIP 2 worldwide): sentencepiece.bpe.model, XLMRobertaTokenizer.
    "xlm-v": (dict(context_length=77), "open_clip"),
    # bert-base-uncased (CLIPA): vocab.txt and tokenizer.json, the class named by config.json alone.
    "bert": (dict(context_length=32, strip_sep_token=True), "open_clip"),
    # google/siglip-*: spiece.model, SiglipTokenizer.
    "siglip-google": (dict(context_length=64, clean="canonicalize"), "transformers"),
    # google/siglip2-*: the Gemma files, with config.json's model_type siglip2 (Siglip2Tokenizer).
    "siglip2-google": (dict(context_length=64, clean="canonicalize"), "transformers"),
}
# Hand-read from the files: (pad id, eot id, padding side, vocab_size).
SPECIAL_IDS = {
    "siglip-timm": (1, 1, "right", 1000),  # pad is </s>, as open_clip's SigLipTokenizer set it
    "siglip2-timm": (0, 1, "right", 1200),  # tokenizer_config.json's padding_side overrides GemmaTokenizer's "left"
    "xlm-v": (1, 2, "right", 1002),  # fairseq order: <s> 0, <pad> 1, </s> 2, <unk> 3, ..., <mask> last
    "bert": (0, None, "right", 1600),  # strip_sep_token turns [SEP] (102) into 0: no id ends a text
    "siglip-google": (1, 1, "right", 1000),
    "siglip2-google": (0, 1, "right", 1200),
}


@pytest.fixture(scope="session")
def hostile() -> list[str]:
    return EDGE_CASES + UNICODE_CASES + random_texts(200, seed=1)


@pytest.fixture(scope="session")
def corpus(doc_corpus, hostile) -> list[str]:
    return doc_corpus + hostile


@pytest.fixture(scope="session")
def open_clip_cleaned(corpus) -> dict[str, dict[str, str]]:
    """open_clip's own clean functions, each run once over the corpus: {mode: {text: cleaned text}}."""
    from open_clip.tokenizer import get_clean_fn as open_clip_clean_fn

    return {mode: dict(zip(corpus, map(open_clip_clean_fn(mode), corpus))) for mode in CLEAN_MODES}


@pytest.fixture(scope="session")
def auto_tokenizer():
    """transformers' `AutoTokenizer.from_pretrained(folder)`, loaded once per folder."""
    from transformers import AutoTokenizer

    return functools.cache(lambda folder: AutoTokenizer.from_pretrained(str(folder)))


@pytest.fixture(scope="session")
def references(auto_tokenizer):
    """The ids of open_clip's `HFTokenizer` or of transformers for a folder, each tokenizer loaded once."""
    from open_clip.tokenizer import HFTokenizer as OpenClipHFTokenizer

    open_clip_tokenizer = functools.cache(
        lambda folder, strip_sep_token: OpenClipHFTokenizer(str(folder), 77, strip_sep_token=strip_sep_token)
    )

    def ids(folder, reference, texts, cleaned, context_length, clean="whitespace", strip_sep_token=False):
        if reference == "open_clip":
            tokenizer = open_clip_tokenizer(folder, strip_sep_token)
            # open_clip's clean function, already run over these texts by `open_clip_cleaned`: the same strings.
            tokenizer.clean_fn = cleaned[clean].__getitem__
            return tokenizer(texts, context_length)
        tokenizer = auto_tokenizer(folder)
        texts = [cleaned[clean][text] for text in texts]
        # The call open_clip makes, minus the attention mask and tensor conversion (slow, and no ids).
        out = tokenizer(
            texts, max_length=context_length, padding="max_length", truncation=True, return_attention_mask=False
        )
        ids = torch.from_numpy(np.array(out.input_ids, dtype=np.int64).reshape(len(texts), context_length))
        return ids.masked_fill(ids == tokenizer.sep_token_id, 0) if strip_sep_token else ids

    return ids


@pytest.fixture(scope="session")
def vlm_tokenizer(layouts):
    """One `HFTokenizer` per (layout, clean, strip_sep_token), for the tests that only read ids and attributes."""

    @functools.cache
    def load(layout: str, clean: str = "whitespace", strip_sep_token: bool = False) -> HFTokenizer:
        return HFTokenizer(layouts[layout], 16, clean=clean, strip_sep_token=strip_sep_token)

    return load


def _family_tokenizer(vlm_tokenizer, layout: str) -> HFTokenizer:
    kwargs, _ = LAYOUTS[layout]
    return vlm_tokenizer(layout, kwargs.get("clean", "whitespace"), kwargs.get("strip_sep_token", False))


def assert_same_rows(got: torch.Tensor, expected: torch.Tensor, texts: list[str]) -> None:
    assert got.dtype == torch.long and got.shape == expected.shape
    differ = (got != expected).any(dim=1).nonzero().flatten().tolist()
    if differ:
        first = differ[0]
        pytest.fail(f"{len(differ)} rows differ, first {texts[first]!r}: {got[first]} != {expected[first]}")


@pytest.mark.parametrize("mode", CLEAN_MODES)
def test_clean_is_open_clips(corpus, open_clip_cleaned, mode):
    clean = get_clean_fn(mode)
    assert [clean(text) for text in corpus] == [open_clip_cleaned[mode][text] for text in corpus]


def test_unknown_clean_mode_names_the_choices():
    with pytest.raises(ValueError, match=r"\('whitespace', 'lower', 'canonicalize'\), got 'upper'"):
        get_clean_fn("upper")
    with pytest.raises(ValueError, match="clean must be one of"):
        HFTokenizer("unused", 16, clean="upper")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_ids_on_the_corpus(layouts, vlm_tokenizer, references, corpus, open_clip_cleaned, layout):
    kwargs, reference = LAYOUTS[layout]
    assert len(corpus) >= 10_000
    expected = references(layouts[layout], reference, corpus, open_clip_cleaned, **kwargs)
    assert_same_rows(_family_tokenizer(vlm_tokenizer, layout)(corpus, kwargs["context_length"]), expected, corpus)


# SiglipTokenizer warns when a text already ends with "</s>" (and then adds no second one).
@pytest.mark.filterwarnings("ignore:This sequence already has")
@pytest.mark.parametrize("mode", CLEAN_MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_same_ids_on_hostile_text_in_every_clean_mode(
    layouts, vlm_tokenizer, references, hostile, open_clip_cleaned, layout, mode
):
    """Against the other reference than the corpus test's: short rows (most texts truncate), and clean modes that
    keep "</s>", "[SEP]" and "<pad>" in the text."""
    kwargs, corpus_reference = LAYOUTS[layout]
    reference = "transformers" if corpus_reference == "open_clip" else "open_clip"
    strip = kwargs.get("strip_sep_token", False)
    expected = references(layouts[layout], reference, hostile, open_clip_cleaned, 12, mode, strip)
    assert_same_rows(vlm_tokenizer(layout, mode, strip)(hostile, 12), expected, hostile)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_special_ids_are_the_files(vlm_tokenizer, layout):
    tok = _family_tokenizer(vlm_tokenizer, layout)
    assert (tok.pad_token_id, tok.eot_token_id, tok.padding_side, tok.vocab_size) == SPECIAL_IDS[layout]


def _with_settings(source: Path, folder: Path, drop: tuple[str, ...] = (), **settings) -> Path:
    """A copy of a layout whose tokenizer_config.json has `settings` and lacks the keys in `drop`."""
    shutil.copytree(source, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config = {key: value for key, value in {**config, **settings}.items() if key not in drop}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    "layout, settings, drop, sides",
    [
        ("siglip2-timm", {"padding_side": "left", "truncation_side": "left"}, (), ("left", "left")),
        # Without padding_side in its files, transformers 5's Siglip2Tokenizer pads on the left (GemmaTokenizer's
        # class default), where open_clip's SigLipTokenizer that made the timm files padded on the right.
        ("siglip2-google", {}, ("padding_side",), ("left", "right")),
    ],
)
def test_padding_and_truncation_sides_follow_the_files(
    layouts, references, hostile, open_clip_cleaned, tmp_path, layout, settings, drop, sides
):
    folder = _with_settings(layouts[layout], tmp_path / "sides", drop, **settings)
    tok = HFTokenizer(folder, 12, clean="canonicalize")
    got = tok(hostile)
    assert (tok.padding_side, tok.truncation_side) == sides
    assert got[hostile.index("")].tolist() == [0] * 11 + [1]
    for reference in ("open_clip", "transformers"):
        expected = references(folder, reference, hostile, open_clip_cleaned, 12, "canonicalize")
        assert_same_rows(got, expected, hostile)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_encode_and_lengths_are_transformers_without_truncation(
    layouts, vlm_tokenizer, auto_tokenizer, hostile, open_clip_cleaned, layout
):
    reference = auto_tokenizer(layouts[layout])
    cleaned = [open_clip_cleaned[LAYOUTS[layout][0].get("clean", "whitespace")][text] for text in hostile]
    tok = _family_tokenizer(vlm_tokenizer, layout)
    assert [tok.encode(text) for text in hostile] == reference(cleaned, add_special_tokens=False).input_ids
    assert tok.lengths(hostile) == list(map(len, reference(cleaned).input_ids))
    assert max(tok.lengths(hostile)) > LAYOUTS[layout][0]["context_length"]  # some of them overflow


def test_strip_sep_token_zeroes_bert_sep_and_needs_one(layouts):
    tok, kept = HFTokenizer(layouts["bert"], 8, strip_sep_token=True), HFTokenizer(layouts["bert"], 8)
    rows, kept_rows = tok(["a photo", "x " * 20]), kept(["a photo", "x " * 20])
    assert kept.eot_token_id == 102 and (kept_rows == 102).sum(dim=1).tolist() == [1, 1]
    assert torch.equal(rows, kept_rows.masked_fill(kept_rows == 102, 0)) and rows[:, 0].tolist() == [101, 101]
    with pytest.raises(ValueError, match="has no sep token"):
        HFTokenizer(layouts["siglip2-timm"], 8, strip_sep_token=True)


def test_truncation_is_counted_and_logged_once_per_call(layouts, caplog):
    tok = HFTokenizer(layouts["xlm-v"], 8)
    texts = ["a b", "the " * 10, "photo"]
    assert [n > 8 for n in tok.lengths(texts)] == [False, True, False]
    with caplog.at_level(logging.WARNING, logger="vlm.hf_tokenizer"):
        rows = tok(texts)
        tok(["short"])
        tok(["the " * 10, "the " * 20])
    assert tok.num_truncated == 3
    warnings = [record.getMessage() for record in caplog.records if record.name == "vlm.hf_tokenizer"]
    assert len(warnings) == 2
    assert "1 of 3 texts were longer than 8 tokens" in warnings[0] and "overflow='error'" in warnings[0]
    assert rows[1].tolist() == [0, *tok.encode("the " * 10)[:6], 2]


def test_overflow_error_names_the_text(layouts):
    tok = HFTokenizer(layouts["xlm-v"], 8, overflow="error")
    fits = next(text for text in ("the " * n for n in range(1, 9)) if tok.lengths(text) == [8])
    assert tok(fits)[0, -1].item() == 2  # a text that fills the row exactly is not an overflow
    long_text = "first fits " + "many words " * 20
    length = tok.lengths(long_text)[0]
    named = rf"text 1 \('first fits many words.*\.\.\.'\) is {length} tokens .* context_length=8"
    with pytest.raises(ValueError, match=named):
        tok(["fine", long_text])
    with pytest.raises(ValueError, match="overflow='truncate' to keep its first 6 tokens"):
        tok(long_text)
    assert tok.num_truncated == 0


@pytest.mark.parametrize("bad", ["clip", None, "TRUNCATE"])
def test_unknown_overflow_policy_is_refused(bad):
    with pytest.raises(ValueError, match="overflow must be one of"):
        HFTokenizer("unused", 16, overflow=bad)


@pytest.mark.parametrize("bad", [1, 0, -5, 7.0, True, "64"])
def test_bad_context_length_is_refused(layouts, bad):
    with pytest.raises(ValueError, match="context_length must be an integer >= 2"):
        HFTokenizer(layouts["bert"], bad)
    with pytest.raises(ValueError, match="context_length"):
        HFTokenizer(layouts["bert"], 16)(["a"], context_length=bad)


def test_batch_shapes_and_types(layouts):
    tok = HFTokenizer(layouts["siglip-timm"], 64, clean="canonicalize")
    assert tok([]).shape == (0, 64) and tok([]).dtype == torch.long
    assert tok([], context_length=16).shape == (0, 16)
    assert tok("a cat").shape == (1, 64) and tok(["a", "b"], context_length=16).shape == (2, 16)
    assert torch.equal(tok(("a", "b")), tok(iter(["a", "b"])))


@pytest.mark.parametrize(
    "texts, message",
    [(["ok", b"bytes"], r"texts\[1\] is a bytes"), (["ok", None], r"texts\[1\] is a NoneType"), (3, "got int")],
)
def test_non_string_input_is_refused(layouts, texts, message):
    with pytest.raises(TypeError, match=message):
        HFTokenizer(layouts["bert"], 16)(texts)


def test_a_folder_without_a_vocabulary_names_the_files_and_the_folder(layouts, tmp_path):
    shutil.copy(layouts["bert"] / "tokenizer_config.json", tmp_path)
    message = rf"no tokenizer vocabulary in folder {re.escape(str(tmp_path))}: looked for tokenizer.json, "
    message += r"spiece.model, sentencepiece.bpe.model, tokenizer.model, vocab.txt .*save_pretrained"
    with pytest.raises(FileNotFoundError, match=message):
        HFTokenizer(tmp_path, 16)


def test_a_folder_transformers_cannot_read_says_what_it_needs(layouts, tmp_path):
    shutil.copy(layouts["bert"] / "vocab.txt", tmp_path)
    with pytest.raises(ValueError, match="tokenizer_config.json naming its tokenizer_class, or a config.json"):
        HFTokenizer(tmp_path, 16)


@pytest.mark.parametrize("source", ["/no/such/folder", "not a repo id!", "a/b/c"])
def test_a_source_that_is_neither_folder_nor_repo_id_is_named(source):
    named = rf"{re.escape(repr(source))} is neither a folder .* nor a Hugging Face repo id"
    with pytest.raises(FileNotFoundError, match=named):
        HFTokenizer(source, 16)


def _fake_hub_cache(cache: Path, repo_id: str, files: Path) -> Path:
    """The Hugging Face cache layout: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(files, repo / "snapshots" / commit)
    return repo / "snapshots" / commit


def test_a_repo_id_loads_from_the_hugging_face_cache(layouts, hostile, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    snapshot = _fake_hub_cache(tmp_path, "timm/ViT-Test-SigLIP", layouts["siglip-timm"])
    tok = HFTokenizer("timm/ViT-Test-SigLIP", 64, clean="canonicalize", local_files_only=True)
    local = HFTokenizer(layouts["siglip-timm"], 64, clean="canonicalize")
    assert torch.equal(tok(hostile), local(hostile))
    assert all(path.parent == snapshot for path in tok.files) and tok.fingerprint() == local.fingerprint()
    named = rf"'timm/Not-Cached' in the cache {re.escape(str(tmp_path))} \(looked for tokenizer.json, "
    named += ".*download it once"
    with pytest.raises(FileNotFoundError, match=named):
        HFTokenizer("timm/Not-Cached", 64, local_files_only=True)


def test_fingerprint_follows_the_files_not_the_folder(layouts, tmp_path):
    base = HFTokenizer(layouts["siglip2-timm"], 64, clean="canonicalize")
    moved = tmp_path / "moved"
    shutil.copytree(layouts["siglip2-timm"], moved)
    assert HFTokenizer(moved, 64, clean="canonicalize").fingerprint() == base.fingerprint()
    # config.json describes the model; only the keys that pick the tokenizer class count.
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "num_classes": 1000}))
    assert HFTokenizer(moved, 64, clean="canonicalize").fingerprint() == base.fingerprint()
    (moved / "config.json").write_text(json.dumps({**config, "model_type": "siglip2"}))
    assert HFTokenizer(moved, 64, clean="canonicalize").fingerprint() != base.fingerprint()
    others = [
        HFTokenizer(layouts["siglip2-google"], 64, clean="canonicalize"),  # same vocabulary, another class
        HFTokenizer(layouts["siglip-timm"], 64, clean="canonicalize"),  # another vocabulary
        HFTokenizer(layouts["siglip2-timm"], 64, clean="lower"),
        HFTokenizer(layouts["siglip2-timm"], 32, clean="canonicalize"),
        HFTokenizer(layouts["bert"], 64, clean="canonicalize", strip_sep_token=True),
    ]
    fingerprints = {base.fingerprint(), *(tok.fingerprint() for tok in others)}
    assert len(fingerprints) == 1 + len(others) and all(len(f) == 16 for f in fingerprints)
    bert = HFTokenizer(layouts["bert"], 64, clean="canonicalize")
    assert bert.fingerprint() != others[-1].fingerprint()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_save_then_load_gives_the_same_tokenizer(layouts, hostile, tmp_path, layout):
    kwargs, _ = LAYOUTS[layout]
    tok = HFTokenizer(layouts[layout], **kwargs)
    tok.save(tmp_path / "saved")
    tok.save(tmp_path / "saved")  # the same files again: nothing to do
    again = HFTokenizer(tmp_path / "saved", **kwargs)
    assert [path.name for path in again.files] == [path.name for path in tok.files]
    assert again.fingerprint() == tok.fingerprint() and torch.equal(again(hostile), tok(hostile))


def test_save_refuses_to_overwrite_another_file(layouts, tmp_path):
    (tmp_path / "config.json").write_text('{"model": "a vlm model config"}')
    with pytest.raises(FileExistsError, match=r"config.json exists and differs .* a folder of its own"):
        HFTokenizer(layouts["bert"], 32).save(tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["config.json"]  # nothing half-saved
    assert (tmp_path / "config.json").read_text() == '{"model": "a vlm model config"}'


@pytest.mark.parametrize("layout", LAYOUTS)
def test_decode_gives_plain_text_back(vlm_tokenizer, doc_corpus, layout):
    tok = _family_tokenizer(vlm_tokenizer, layout)
    clean = get_clean_fn(tok.clean)
    # Lower-case words and digits: no character these vocabularies lack or their normalizers rewrite.
    lowered = (clean(text.lower()) for text in doc_corpus)
    plain = [text for text in lowered if re.fullmatch(r"[a-z0-9]+( [a-z0-9]+)*", text)][:300]
    assert len(plain) == 300
    rows = tok(plain, context_length=256)
    assert [tok.decode(row) for row in rows] == plain
    assert tok.decode(tok.encode(plain[0])) == plain[0] and tok.decode([tok.pad_token_id] * 3) == ""


def test_byte_fallback_decodes_any_text_back(vlm_tokenizer, hostile):
    """Gemma's vocabulary spells any character in bytes, so every cleaned text comes back, apart from "▁", the
    space marker its decoder turns into a space."""
    tok = _family_tokenizer(vlm_tokenizer, "siglip2-timm")
    clean = get_clean_fn(tok.clean)
    texts = [text for text in hostile if "\u2581" not in text]
    assert [tok.decode(tok.encode(text)) for text in texts] == list(map(clean, texts))


def test_decode_refuses_batches_and_unknown_ids(layouts):
    tok = HFTokenizer(layouts["bert"], 16)
    with pytest.raises(ValueError, match="one row"):
        tok.decode(tok(["a", "b"]))
    with pytest.raises(ValueError, match=r"\[0, 1600\)"):
        tok.decode([101, 1600])


@pytest.mark.filterwarnings("ignore:This sequence already has")
def test_siglip_tokenizer_adds_no_second_eos(layouts, references, hostile, open_clip_cleaned, tmp_path):
    """SiglipTokenizer appends </s> only to ids that do not end with it; invisible where pad is </s> (google's
    files), so here with <pad> as the pad token."""
    folder = tmp_path / "pad"
    shutil.copytree(layouts["siglip-google"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["0"] = added_token("<pad>")
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "pad_token": "<pad>"}))
    (folder / "special_tokens_map.json").unlink()
    tok = HFTokenizer(folder, 12)
    texts = [text for text in hostile if "</s>" in text]
    got = tok(texts)
    assert tok.pad_token_id == 0 and got[texts.index("</s>")].tolist() == [1] + [0] * 11
    assert_same_rows(got, references(folder, "transformers", texts, open_clip_cleaned, 12), texts)
