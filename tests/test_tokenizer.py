"""`vlm.Tokenizer` against open_clip's `SimpleTokenizer`: identical ids on real and hostile text, and the
overflow, decode and `get_tokenizer` contracts.

The corpus helpers at the top are shared with `bench/bench_tokenizer.py`.
"""

from __future__ import annotations

import ast
import html
import importlib.util
import logging
import multiprocessing
import random
import string
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ftfy
import pytest
import torch

import vlm.tokenizer as tokenizer_module
from vlm.config import TextConfig
from vlm.presets import get_preset
from vlm.model import create_model
from vlm.tokenizer import Tokenizer, get_tokenizer

DOC_PACKAGES = ("torch", "numpy", "transformers")


def docstrings(packages: tuple[str, ...] = DOC_PACKAGES, every: int = 20) -> list[str]:
    """The module, class and function docstrings of every `every`-th .py file (sorted) of each package."""
    texts: list[str] = []
    for package in packages:
        root = Path(next(iter(importlib.util.find_spec(package).submodule_search_locations)))
        for path in sorted(root.rglob("*.py"))[::every]:
            texts.extend(_file_docstrings(path))
    return texts


def _file_docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    docs = (ast.get_docstring(node, clean=False) for node in ast.walk(tree) if isinstance(node, kinds))
    return [doc for doc in docs if doc]


def doc_lines(texts: list[str], limit: int) -> list[str]:
    """Non-blank lines of `texts`: short, caption-like strings."""
    return [line for text in texts for line in text.split("\n") if line.strip()][:limit]


EDGE_CASES = [
    # Empty, whitespace, control characters (ftfy deletes some, str.split treats others as spaces).
    "", " ", "\t\n \r\n", "\x00", "a\x00b", "a\x0bb", "a\x0cb", "a\x1cb\x1fc", "\x7fdel", "\x1b[31mred\x1b[0m text",
    "  leading", "trailing  ", "a\t\tb\n\nc\r\nd\re",
    # Plain English, case, contractions.
    "a photo of a cat.", "A PHOTO OF A CAT!", "it's they're we've i'm you'll he'd can't", "IT'S THEY'RE",
    "''s", "'sam", "rock'n'roll", "don''t", "3.14159 1,000,000 2024-01-01 0x1F", "def f(x): return x**2  # square",
    # HTML entities, decoded up to twice by open_clip.
    "AT&T", "fish &amp; chips", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp;", "&nbsp;x", "&#39;quoted&#39;", "&#x1F600;",
    "&#0; &#1; &#128; &#x7f;", "&notin; &notit", "5 &lt 6", "<b>bold &amp; tags</b>", "caf&eacute;", "P&EACUTE;REZ",
    "https://example.com/a?q=1&r=2", "&amp;lt;end_of_text&amp;gt;",
    # Mojibake and C1 controls.
    "cafÃ©", "Ã¼ber", "donâ€™t", "â€œquotedâ€\x9d", "ÃƒÂ©", "\x80\x81\x9f", "voilÃ le travail",
    # Non-ASCII text.
    "naïve café", "Straße STRASSE", "İstanbul ıi", "ΣΟΦΙΑ σοφία ς", "ǅ ǈ ǋ", "ﬁnance ﬂow ﬆ", "ＬＯＵＤ　ＮＯＩＳＥＳ ｶﾀｶﾅ",
    "“curly” ‘quotes’", "e\u0301 n\u0303", "\u212a kelvin \u212b", "\u017f 'ſ 'ſt", "x\u0345y '\u0345", "½ ² ١٢٣ Ⅻ ⑦ ߀",
    "日本語のテキスト", "中文字符。", "한국어 텍스트", "ภาษาไทย", "हिन्दी", "العربية", "עברית", "ქართული",
    "😀 👍🏽 👨‍👩‍👧 🇫🇷 ❤️", "\u200b\u200c\u200d\u2060", "\ufeffbom", "\xa0nbsp\xa0", "\u2028line\u2029para\x85next",
    "\u3000ideographic\u3000", "\ufffd", "\ud800 lone surrogate", "\ud83d\ude00 pair", "\U000e0067\U000e007f tag",
    "\U0003ffff \U0010fffd", "\u180e \u2066x\u2069",
    # Letters only recent Unicode versions know, where Oniguruma and the regex module disagree.
    "\u0558\u0c5c\ua7ce\u088f", "'\u0558 '\ua7ce",
    # The special tokens inside text: open_clip recognises them only where its regex starts a match.
    "<start_of_text>", "<end_of_text>", "a<end_of_text>b", "x.<end_of_text>", "1<end_of_text>",
    "<end_of_text><end_of_text>", "<END_OF_TEXT>", "<ſtart_of_text>", "<start_of_text x", "it's<end_of_text>",
    "<<end_of_text>>", "_of_text>", "< end_of_text >", "<start_of_text>hello<end_of_text>",
    # Long texts: truncation, and one very long word.
    "word " * 100, "a" * 400, "The quick brown fox jumps over the lazy dog. " * 30,
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Strings glued from pieces chosen to hit every branch: ASCII, controls, entities, non-ASCII, specials."""
    pieces = [
        *string.ascii_letters, *string.digits, *string.punctuation, " ", " ", " ", "\t", "\n", "\r", "\x0b", "\x0c",
        "\x00", "\x1b", "\x1c", "\x7f", "\x85", "&amp;", "&lt;", "&#39;", "&eacute;", "&", "'s", "'ll", "'",
        "<end_of_text>", "<start_of_text>", "é", "Ã©", "â€™", "©", "’", "ſ", "\u0345", "日本", "😀", "\xa0", "\u2028",
        "ﬁ", "Ｌ", "İ", "ß", "the ", "photo ", "tensor", "Σ", "\u0301", "\u200b", "\ufeff", "½", "٣",
    ]
    rng = random.Random(seed)
    return ["".join(rng.choices(pieces, k=rng.randrange(0, 40))) for _ in range(n)]


def code_point_texts(stop: int = 0x20000, per_text: int = 256) -> list[str]:
    """Every code point below `stop` (surrogates excluded), `per_text` to a text, separated by spaces."""
    points = [chr(c) for c in range(stop) if not 0xD800 <= c < 0xE000]
    return [" ".join(points[i : i + per_text]) for i in range(0, len(points), per_text)]


@pytest.fixture(scope="module")
def reference():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@pytest.fixture(scope="module")
def docs() -> list[str]:
    return docstrings()


def assert_same_ids(reference, texts: list[str], context_length: int = 77) -> None:
    expected = reference(texts, context_length=context_length)
    got = Tokenizer(context_length)(texts)
    assert got.dtype == torch.long and got.shape == expected.shape
    bad = [i for i in range(len(texts)) if not torch.equal(got[i], expected[i])]
    first = bad[0] if bad else None
    assert not bad, f"{len(bad)} of {len(texts)} texts differ: {texts[first][:200]!r} {got[first]} vs {expected[first]}"


@pytest.mark.parametrize("context_length", [77, 16])
def test_same_ids_as_open_clip_on_docstrings(reference, docs, context_length):
    assert len(docs) > 1000
    assert_same_ids(reference, docs, context_length)


def test_same_ids_as_open_clip_on_short_lines(reference, docs):
    assert_same_ids(reference, doc_lines(docs, 6000))


@pytest.mark.parametrize("context_length", [77, 16])
def test_same_ids_as_open_clip_on_edge_cases(reference, context_length):
    assert_same_ids(reference, EDGE_CASES, context_length)


def test_same_ids_as_open_clip_on_random_strings(reference):
    assert_same_ids(reference, random_texts(3000))


def test_same_ids_as_open_clip_on_every_code_point_of_planes_0_and_1(reference):
    ours = Tokenizer()
    for text in code_point_texts():  # untruncated: every code point's ids are compared
        assert ours.encode(text) == reference.encode(text), text[:10]


def test_encode_is_open_clips_encode_untruncated(reference, docs):
    ours = Tokenizer()
    for text in docs[:200] + EDGE_CASES:
        assert ours.encode(text) == reference.encode(text), text[:200]


def test_lengths_count_start_and_end_tokens(reference):
    texts = ["a photo of a cat", "", "word " * 100]
    assert Tokenizer().lengths(texts) == [len(reference.encode(t)) + 2 for t in texts] == [7, 2, 102]


def test_skipping_ftfy_and_html_on_plain_ascii_changes_nothing():
    rng = random.Random(1)
    alphabet = [c for c in string.printable if c not in "&\x0b"] + ["\r\n"]
    for _ in range(3000):
        text = "".join(rng.choices(alphabet, k=rng.randrange(0, 60)))
        assert tokenizer_module.NEEDS_FULL_CLEAN.search(text) is None
        full = html.unescape(html.unescape(ftfy.fix_text(text)))
        assert full.split() == text.split(), repr(text)


def test_ascii_pattern_splits_like_open_clips_regex(docs):
    chunks = {c for text in docs[:300] + random_texts(1000) for c in text.lower().split() if c.isascii()}
    assert len(chunks) > 3000
    for chunk in chunks:
        assert tokenizer_module._ASCII_WORDS.findall(chunk) == tokenizer_module._WORDS.findall(chunk), chunk


def test_one_scan_finds_the_texts_that_need_ftfy():
    texts = ["", "plain", "", "café", "AT&T", "", "tab\tand\nnewline", "nul\x00", "plain", "ｘ", ""] + random_texts(500)
    expected = [i for i, text in enumerate(texts) if tokenizer_module.NEEDS_FULL_CLEAN.search(text)]
    assert tokenizer_module._needing_full_clean(texts) == expected
    assert expected[:4] == [3, 4, 7, 9]


@pytest.mark.parametrize("full", ["chunks", "words"])
def test_a_full_cache_is_replaced_without_changing_ids(monkeypatch, reference, docs, full):
    monkeypatch.setattr(tokenizer_module, "_chunk_ids", None)
    texts = doc_lines(docs, 400)
    first = Tokenizer()(texts)
    table = tokenizer_module._chunk_ids
    assert len(table) > len(table.words) + 1  # lines of code hold more distinct chunks than words
    monkeypatch.setattr(tokenizer_module, "_MAX_CACHED", len(table.words) + (-1 if full == "words" else 1))
    assert torch.equal(first, Tokenizer()(texts)) and torch.equal(first, reference(texts))
    replaced = tokenizer_module._chunk_ids
    assert replaced is not table and (replaced.words is table.words) == (full == "chunks")


def test_special_token_strings_in_text_act_as_in_open_clip(reference):
    tok = Tokenizer()
    ids = tok.encode("a<end_of_text>b")
    assert ids == reference.encode("a<end_of_text>b") and ids[1] == tok.eot_token_id and len(ids) == 3
    ids = tok.encode("x.<end_of_text>")
    assert ids == reference.encode("x.<end_of_text>") and tok.eot_token_id not in ids  # ".<" is one punctuation run
    assert tok.sot_token_id not in tok.encode("<ſtart_of_text>")  # matched case-insensitively, not an id


def test_threads_sharing_the_cache_get_the_same_ids(monkeypatch):
    batches = [random_texts(300, seed=seed) for seed in range(4)]
    expected = [Tokenizer()(batch) for batch in batches]
    monkeypatch.setattr(tokenizer_module, "_chunk_ids", None)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(Tokenizer(), batches))
    assert all(torch.equal(a, b) for a, b in zip(expected, got))


def test_truncation_is_counted_and_logged_once_per_call(reference, caplog):
    tok = Tokenizer(context_length=8)
    with caplog.at_level(logging.WARNING, logger="vlm.tokenizer"):
        ids = tok(["a b c d e f", "one two", "a b c d e f g h i"])
        tok(["short"])
        tok(["x y z " * 5])
    assert tok.num_truncated == 2
    warnings = [r for r in caplog.records if r.name == "vlm.tokenizer"]
    assert len(warnings) == 2
    assert "1 of 3 texts were longer than 8 tokens" in warnings[0].getMessage()
    assert "overflow='error'" in warnings[0].getMessage()
    # A truncated row keeps the first context_length - 2 ids and still ends in eot.
    assert ids[2].tolist() == [tok.sot_token_id, *reference.encode("a b c d e f g h i")[:6], tok.eot_token_id]


def test_overflow_error_names_the_text(reference):
    tok = Tokenizer(context_length=8, overflow="error")
    assert tok(["a b c d e f"]).shape == (1, 8)  # 6 words + sot + eot fit exactly
    long_text = "first fits " + "many words " * 20
    length = len(reference.encode(long_text)) + 2
    named = rf"text 1 \('first fits many words.*\.\.\.'\) is {length} tokens .* context_length=8"
    with pytest.raises(ValueError, match=named):
        tok(["fine", long_text])
    with pytest.raises(ValueError, match="overflow='truncate'"):
        tok("a b c d e f g", context_length=8)
    assert tok.num_truncated == 0


def test_overflow_messages_name_the_callers_setting(caplog):
    tok = Tokenizer(context_length=4, overflow_setting="--text-overflow {}")
    with caplog.at_level(logging.WARNING, logger="vlm.tokenizer"):
        tok(["a b c d e", "a"])
    assert "(--text-overflow truncate); use --text-overflow error to refuse them" in caplog.records[0].getMessage()
    quiet = Tokenizer(context_length=4, warn_each_call=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vlm.tokenizer"):
        quiet(["a b c d e", "a b c d e f"])
    assert quiet.num_truncated == 2 and not caplog.records  # the caller reports the total
    strict = Tokenizer(context_length=4, overflow="error", overflow_setting="data.text_overflow={}")
    with pytest.raises(ValueError, match=r"\(data.text_overflow=error\); shorten it, or use data.text_overflow=truncate"):
        strict(["a b c d e"])


@pytest.mark.parametrize("bad", ["clip", None, "TRUNCATE"])
def test_unknown_overflow_policy_is_refused(bad):
    with pytest.raises(ValueError, match="overflow must be one of"):
        Tokenizer(overflow=bad)


@pytest.mark.parametrize("bad", [1, 0, -5, 7.0, True, "77"])
def test_bad_context_length_is_refused(bad):
    with pytest.raises(ValueError, match="context_length must be an integer >= 2"):
        Tokenizer(context_length=bad)
    with pytest.raises(ValueError, match="context_length"):
        Tokenizer()(["a"], context_length=bad)


def test_batch_shapes_and_types(reference):
    tok = Tokenizer()
    assert tok([]).shape == (0, 77) and tok([]).dtype == torch.long
    assert tok([], context_length=16).shape == (0, 16)
    assert tok("a cat").shape == (1, 77)
    assert torch.equal(tok(("a", "b")), tok(iter(["a", "b"])))
    expected = (reference.vocab_size, reference.sot_token_id, reference.eot_token_id, 0)  # open_clip pads with 0
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id, tok.pad_token_id) == expected


@pytest.mark.parametrize(
    "texts, message",
    [(["ok", b"bytes"], r"texts\[1\] is a bytes"), (["ok", None], r"texts\[1\] is a NoneType"), (3, "got int")],
)
def test_non_string_input_is_refused(texts, message):
    with pytest.raises(TypeError, match=message):
        Tokenizer()(texts)


def test_decode_round_trips_plain_text(reference):
    tok = Tokenizer()
    text = "a photo of a dog sitting on 2 chairs"
    row = tok(text)[0]
    assert tok.decode(row) == text
    # Every word ends in "</w>", punctuation included, so decoding spaces it out, as open_clip does.
    assert tok.decode(tok("a dog, sitting!")[0]) == "a dog , sitting !"
    assert tok.decode(tok.encode(text)) == text == reference.decode(reference.encode(text)).strip()
    assert tok.decode(tok("Ünïcode  TEXT")[0]) == "ünïcode text"
    assert tok.decode([tok.sot_token_id, tok.eot_token_id, 0, 0]) == ""


def test_decode_refuses_batches_and_unknown_ids(reference):
    tok = Tokenizer()
    with pytest.raises(ValueError, match="one row"):
        tok.decode(tok(["a", "b"]))
    with pytest.raises(ValueError, match=rf"\[0, {reference.vocab_size}\)"):
        tok.decode([*reference.encode("a"), reference.vocab_size])


def test_get_tokenizer_accepts_configs_models_and_lengths():
    model = create_model("tiny")
    assert get_tokenizer().context_length == 77
    assert get_tokenizer(16).context_length == 16
    assert get_tokenizer(TextConfig(context_length=24)).context_length == 24
    assert get_tokenizer(get_preset("ViT-B-32")).context_length == 77
    assert get_tokenizer(model).context_length == model.config.text.context_length == 32
    assert get_tokenizer(model)(["a cat"]).shape == (1, 32)
    assert get_tokenizer(overflow="error").overflow == "error"


@pytest.mark.parametrize("bad", ["ViT-B-32", 7.5, True, object()])
def test_get_tokenizer_names_an_unknown_type(bad):
    with pytest.raises(TypeError, match=type(bad).__name__):
        get_tokenizer(bad)


def _tokenize_in_child(queue) -> None:
    queue.put(Tokenizer()(["a forked worker tokenizes zebras and quokkas"]).tolist())


def test_tokenizes_in_a_forked_worker(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "_chunk_ids", None)
    Tokenizer()(random_texts(200, seed=2))
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_tokenize_in_child, args=(queue,))
    child.start()
    child.join(timeout=60)
    assert child.exitcode == 0, "the forked worker hung or failed"
    assert queue.get(timeout=5) == Tokenizer()(["a forked worker tokenizes zebras and quokkas"]).tolist()
