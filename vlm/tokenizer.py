r"""CLIP's byte-pair tokenizer: open_clip's `SimpleTokenizer` ids, an order of magnitude faster.

`Tokenizer` gives the same (B, context_length) ids as `open_clip.tokenizer.SimpleTokenizer()` (the
default `clean='lower'`, vocabulary `bpe_simple_vocab_16e6.txt.gz` read from the installed open_clip
package) for every input; `bench/bench_tokenizer.py` measures the speed-up on real batches.

How a text becomes ids, each step computing what open_clip computes:

1. Cleaning: `ftfy.fix_text`, `html.unescape` twice, whitespace runs collapsed to one space, `lower()`.
   Most texts skip the first two: printable ASCII (plus tab, line feed, form feed, carriage return)
   without `&` is provably left unchanged by them (ftfy rewrites only non-ASCII characters, control
   characters and HTML entities; `html.unescape` only touches `&`).
2. Words: open_clip's regex (`<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|
   [^\s\p{L}\p{N}]+`, case insensitive), run by the same `regex` module (by the stdlib `re` on ASCII,
   where the two provably agree). No word contains whitespace, so the words of a text are the words
   of its space-separated chunks, taken one chunk at a time.
3. Byte-pair merges of each word: the Rust BPE model of `tokenizers`, built from the same vocabulary
   and merges with the "</w>" end-of-word suffix, fed the word's bytes through the same
   byte-to-unicode table. A word that is exactly "<start_of_text>" or "<end_of_text>" becomes that
   special id, as in open_clip.
4. Framing: `[sot] + ids + [eot]`, padded with 0; a longer row keeps its first context_length ids
   and ends in eot. Truncation is never silent (see `Tokenizer`).

Speed comes from two process-wide caches, the ids of each space-separated chunk ("dog,") and of each
word ("dog"), and from treating a batch as one string: it is lower-cased and split once, and its
chunks are looked up in one pass that stays in C, so a chunk seen before costs a dict lookup. A long
text is only split as far as its row reaches. open_clip caches words too, but
runs ftfy and its regex over every text, all of it, and its BPE in Python. Each cache keeps at most
`_MAX_CACHED` entries: one found fuller at the start of a call is dropped and refills (dropping the
word cache drops the chunk cache too). Forked DataLoader workers inherit the caches.

Not used, on purpose, although they are the obvious route: `tokenizers`' pipeline (`Split` regex
pre-tokenizer, `ByteLevel`, `encode_batch`). Its regex engine (Oniguruma) disagrees with the `regex`
module on about 17,000 code points (letters of recent Unicode versions, and case folding: "'ſ",
U+0345), and on whole texts it measured about 4x open_clip's speed on two threads (some 0.5 us a
token), against 10x and more for the chunk cache on one. Everything here runs in the calling thread:
the tokenizers thread pool is never started, TOKENIZERS_PARALLELISM has no effect, and forking
(DataLoader workers) is always safe.
"""

from __future__ import annotations

import bisect
import functools
import gzip
import hashlib
import importlib.util
import itertools
import logging
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import regex
from tokenizers import models

from .config import CLIP_TOKENIZER, CLIPConfig, TextConfig
from .overflow import OVERFLOW_POLICIES, OVERFLOW_SETTING, check_overflow, count_truncated, overflow_error
from .overflow import resolve_overflow
from .text_clean import NEEDS_FULL_CLEAN, get_clean_fn

if TYPE_CHECKING:
    import torch

    from .hf_tokenizer import HFTokenizer

__all__ = ["DEFAULT_CONTEXT_LENGTH", "OVERFLOW_POLICIES", "Tokenizer", "get_tokenizer"]

logger = logging.getLogger(__name__)

DEFAULT_CONTEXT_LENGTH = 77
PAD_TOKEN_ID = 0
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"

_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# open_clip reads merges from lines [1, 48895) of the file: 49152 ids minus 256 bytes minus 2 specials.
_NUM_MERGES = 49152 - 256 - 2
_WORDS = regex.compile(
    rf"{SOT_TOKEN}|{EOT_TOKEN}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+", regex.IGNORECASE
)
# The same pattern for a lowercase ASCII chunk without whitespace, where \p{L} is [a-z], \p{N} is [0-9]
# and case folding finds nothing to fold; the stdlib engine runs it three times faster.
_ASCII_WORDS = re.compile(rf"{SOT_TOKEN}|{EOT_TOKEN}|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")
# Entries per cache (chunks, words). About 150 bytes an entry: both full hold some 40 MB.
_MAX_CACHED = 1 << 17
# Stands between texts when a batch is joined into one string: a chunk of its own, never in a cleaned
# text (the fast path does not take text with control characters, and ftfy deletes NUL).
_TEXT_BREAK = "\x00"
_clean_lower = get_clean_fn("lower")


@dataclass(frozen=True)
class _Backend:
    """The Rust BPE model (one word of byte-level symbols in, its tokens out) and the tables around it."""

    bpe: models.BPE
    # str.translate table from each byte (as a latin-1 character) to its byte-level symbol.
    byte_symbols: dict[int, str]
    id_to_token: tuple[str, ...]
    byte_decoder: dict[str, int]
    special_ids: dict[str, int]


def _vocab_path() -> Path:
    # find_spec locates the package without importing it: `import open_clip` loads its model zoo and
    # sets TOKENIZERS_PARALLELISM=false for the whole process.
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the CLIP vocabulary ships with open_clip; install it: pip install open_clip_torch")
    return Path(next(iter(spec.submodule_search_locations))) / _VOCAB_FILE


@functools.lru_cache(maxsize=4)
def _vocab_digest(vocabulary: Path | None = None) -> str:
    return hashlib.sha256((vocabulary or _vocab_path()).read_bytes()).hexdigest()


def _bytes_to_unicode() -> dict[int, str]:
    """open_clip's (and GPT-2's) reversible map from the 256 byte values to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    codes = printable + [256 + n for n in range(len(others))]
    return dict(zip(printable + others, map(chr, codes)))


def _read_merges(path: Path) -> list[tuple[str, str]]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]


@functools.lru_cache(maxsize=4)
def _backend(vocabulary: Path | None = None) -> _Backend:
    """Built once per process and vocabulary file (a fraction of a second) and shared by every `Tokenizer`;
    None: open_clip's file. An ONNX export carries its own copy, so a runtime without open_clip finds it."""
    byte_encoder = _bytes_to_unicode()
    merges = _read_merges(vocabulary or _vocab_path())
    symbols = list(byte_encoder.values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    return _Backend(
        bpe=models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>"),
        byte_symbols=byte_encoder,
        id_to_token=tuple(tokens),
        byte_decoder={c: b for b, c in byte_encoder.items()},
        special_ids={SOT_TOKEN: vocab[SOT_TOKEN], EOT_TOKEN: vocab[EOT_TOKEN]},
    )


class _WordIds(dict):
    """word -> its ids; an unseen word goes through the Rust BPE model and is kept."""

    def __init__(self, backend: _Backend) -> None:
        # open_clip seeds its BPE cache with the two special strings: a word equal to one is its id.
        super().__init__({token: (i,) for token, i in backend.special_ids.items()})
        self._bpe = backend.bpe.tokenize
        self._symbols = backend.byte_symbols

    def __missing__(self, word: str) -> tuple[int, ...]:
        # The model itself, not a Tokenizer pipeline around it: less than half the time per word.
        tokens = self._bpe(word.encode("utf-8").decode("latin-1").translate(self._symbols))
        ids = self[word] = tuple([t.id for t in tokens])
        return ids


class _ChunkIds(dict):
    """Space-separated chunk of cleaned text -> its ids; an unseen chunk is split into words and kept."""

    def __init__(self, words: _WordIds) -> None:
        super().__init__({_TEXT_BREAK: (-1,)})
        self.words = words

    def __missing__(self, chunk: str) -> tuple[int, ...]:
        if chunk.isascii() and chunk.isalpha():  # most chunks: one word, no regex needed
            ids = self[chunk] = self.words[chunk]
            return ids
        words = _ASCII_WORDS.findall(chunk) if chunk.isascii() else _WORDS.findall(chunk)
        ids = self[chunk] = tuple(itertools.chain.from_iterable(map(self.words.__getitem__, words)))
        return ids


_chunk_ids: _ChunkIds | None = None  # of open_clip's vocabulary file
_chunk_ids_of_file: dict[Path, _ChunkIds] = {}  # of other copies of it (an ONNX export's)


def _current_chunk_ids(vocabulary: Path | None = None) -> _ChunkIds:
    """The id cache for one batch. A full table is replaced, never cleared, so that a batch running in
    another thread keeps a consistent one; a full chunk table alone keeps its word table."""
    global _chunk_ids
    table = _chunk_ids if vocabulary is None else _chunk_ids_of_file.get(vocabulary)
    if table is None or len(table.words) > _MAX_CACHED:
        table = _ChunkIds(_WordIds(_backend(vocabulary)))
    elif len(table) > _MAX_CACHED:
        table = _ChunkIds(table.words)
    else:
        return table
    if vocabulary is None:
        _chunk_ids = table
    else:
        _chunk_ids_of_file[vocabulary] = table
    return table


def _clean(text: str) -> str:
    """open_clip's `clean='lower'`: ftfy, HTML unescaping twice, whitespace collapsed, lower case."""
    text = _clean_lower(text)
    assert _TEXT_BREAK not in text, "ftfy deletes NUL and html.unescape never makes one"
    return text


def _needing_full_clean(texts: list[str]) -> list[int]:
    """Indices of the texts that ftfy or html.unescape might change, found in one scan of the batch."""
    joined = "".join(texts)
    match = NEEDS_FULL_CLEAN.search(joined)
    ends = list(itertools.accumulate(map(len, texts))) if match else []
    dirty = []
    while match:
        dirty.append(bisect.bisect_right(ends, match.start()))  # the text holding the match
        match = NEEDS_FULL_CLEAN.search(joined, ends[dirty[-1]])
    return dirty


class _Ids(NamedTuple):
    """A batch's ids without start and end tokens, one flat array: text i owns `lengths[i]` of them."""

    ids: np.ndarray  # (sum(lengths),) int64
    lengths: np.ndarray  # (B,) int64


def _encode(texts: list[str], limit: int | None = None, vocabulary: Path | None = None) -> _Ids:
    """open_clip's `encode` of every text. With `limit`, a text's ids may stop anywhere after its first
    `limit`: filling a row of n needs limit = n - 1, the n - 2 ids it holds and one to see an overflow.

    The batch is joined into one string (texts apart by a chunk of its own, `_TEXT_BREAK`), so that
    lower-casing, splitting and the cache lookups each run once over the batch, not once per text.
    """
    texts = list(texts)
    for i in _needing_full_clean(texts):
        texts[i] = _clean(texts[i])
    if limit is not None:
        # Every chunk gives at least one id, so the first `limit` chunks hold the first `limit` ids; a
        # text shorter than 2 * limit characters cannot have more chunks than that.
        texts = [t if len(t) < 2 * limit else " ".join(t.split(None, limit)[:limit]) for t in texts]
    if not texts:
        return _Ids(np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    chunks = f" {_TEXT_BREAK} ".join(texts).lower().split()
    table = _current_chunk_ids(vocabulary)
    flat = np.fromiter(itertools.chain.from_iterable(map(table.__getitem__, chunks)), dtype=np.int64)
    is_id = flat >= 0
    ends = np.append(np.flatnonzero(~is_id), flat.size)  # (B,) where each text's ids stop in `flat`
    return _Ids(flat[is_id], np.diff(ends, prepend=-1) - 1)


def _check_context_length(context_length: Any) -> int:
    if isinstance(context_length, bool) or not isinstance(context_length, int) or context_length < 2:
        raise ValueError(
            f"context_length must be an integer >= 2 (room for the start and end tokens), got {context_length!r}; "
            f"CLIP models use {DEFAULT_CONTEXT_LENGTH}"
        )
    return context_length


def _as_batch(texts: str | Iterable[str]) -> list[str]:
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    batch = list(texts)
    for i, text in enumerate(batch):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, not a str; convert it (bytes: .decode('utf-8'))")
    return batch


def _pack(encoded: _Ids, context_length: int, sot: int, eot: int) -> np.ndarray:
    """(B, context_length) int64 rows [sot, ids..., eot, 0, ...]; a row keeps its first context_length - 2
    ids, so a truncated row ends in eot, as in open_clip."""
    ids, lengths = encoded
    kept = np.minimum(lengths, context_length - 2)
    position = np.arange(ids.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)  # of each id in its text
    out = np.zeros((len(lengths), context_length), dtype=np.int64)
    out[:, 0] = sot
    # A boolean mask assigns in row-major order, the order of `ids`.
    out[:, 1:][np.arange(context_length - 1) < kept[:, None]] = ids[position < context_length - 2]
    out[np.arange(len(lengths)), kept + 1] = eot
    return out


class Tokenizer:
    """Texts to (B, context_length) int64 token ids, identical to open_clip's `SimpleTokenizer`.

    Each row is [sot, ids..., eot, 0, 0, ...]. A text whose ids do not fit (more than
    context_length - 2 of them) is handled by `overflow`:

    - "truncate" (open_clip's behaviour): the row keeps the text's first context_length - 2 ids and
      ends in eot. Never silent: `num_truncated` keeps the running total, and each call that truncates
      logs one warning with the count (unless `warn_each_call` is False: the caller reports a total).
    - "error": raise ValueError naming the first text that does not fit.

    Warnings and errors tell how to change the policy as `overflow_setting` spells it (see `vlm.overflow`).

    Reading the vocabulary and building the Rust BPE model takes a fraction of a second, once per
    process; constructing a `Tokenizer` after that is free. `vocabulary` is a copy of open_clip's
    `bpe_simple_vocab_16e6.txt.gz` to read instead of the installed package's (an ONNX export ships one).
    """

    pad_token_id: int = PAD_TOKEN_ID

    def __init__(
        self,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        overflow: str = "truncate",
        *,
        overflow_setting: str = OVERFLOW_SETTING,
        warn_each_call: bool = True,
        vocabulary: str | os.PathLike | None = None,
    ) -> None:
        check_overflow(overflow)
        self.context_length = _check_context_length(context_length)
        self.vocabulary = None if vocabulary is None else Path(vocabulary).resolve()
        self.overflow = overflow
        self.overflow_setting = overflow_setting
        self.warn_each_call = warn_each_call
        backend = _backend(self.vocabulary)
        self.vocab_size = len(backend.id_to_token)
        self.sot_token_id = backend.special_ids[SOT_TOKEN]
        self.eot_token_id = backend.special_ids[EOT_TOKEN]
        self.num_truncated = 0

    def __repr__(self) -> str:
        return f"Tokenizer(context_length={self.context_length}, overflow={self.overflow!r})"

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids (B, context_length) int64 for a text or a batch; an empty batch gives (0, context_length).

        `context_length` overrides the tokenizer's own for this call.
        """
        import torch

        return torch.from_numpy(self.ids(texts, context_length))

    def ids(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """What a call returns, as a numpy array: the same ids without torch (ONNX runtimes use it)."""
        context_length = self.context_length if context_length is None else _check_context_length(context_length)
        batch = _as_batch(texts)
        # One id past the row's room is enough to see that a text overflows.
        encoded = _encode(batch, limit=context_length - 1, vocabulary=self.vocabulary)
        self._handle_overflow(batch, encoded.lengths, context_length)
        return _pack(encoded, context_length, self.sot_token_id, self.eot_token_id)

    def encode(self, text: str) -> list[int]:
        """The ids of one text without start and end tokens and without truncation (open_clip's `encode`)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes one str, got {type(text).__name__}; tokenize a batch with tokenizer(texts)")
        return _encode([text], vocabulary=self.vocabulary).ids.tolist()

    def lengths(self, texts: str | Sequence[str]) -> list[int]:
        """Each text's token count with start and end tokens, before truncation."""
        return (_encode(_as_batch(texts), vocabulary=self.vocabulary).lengths + 2).tolist()

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of one row of ids, as open_clip's `decode` writes it, minus the framing.

        A leading start token is dropped and the row ends at its first end token: what follows is
        padding (id 0 is also the token "!", so padding is only recognisable after the end token).
        The rest decodes as in open_clip: bytes from the byte-level symbols, invalid UTF-8 as U+FFFD,
        each end of word as a space; the final trailing space is stripped. Decoding gives back the
        cleaned text (lower case, single spaces) with a space after every word, punctuation included:
        "a dog, sitting!" comes back as "a dog , sitting !".
        """
        row = _as_row(ids, self.vocab_size)
        if row[:1] == [self.sot_token_id]:
            row = row[1:]
        if self.eot_token_id in row:
            row = row[: row.index(self.eot_token_id)]
        backend = _backend(self.vocabulary)
        symbols = "".join(backend.id_to_token[i] for i in row)
        # Special tokens are plain ASCII, and every printable ASCII character is its own byte symbol.
        data = bytes(backend.byte_decoder[c] for c in symbols)
        return data.decode("utf-8", errors="replace").replace("</w>", " ").rstrip(" ")

    def fingerprint(self) -> str:
        """A short hash of the vocabulary file and the context length: what artifacts built from token
        ids (zero-shot classifiers) record, so that they are not used with another tokenizer."""
        return hashlib.sha256(f"{_vocab_digest(self.vocabulary)}:{self.context_length}".encode()).hexdigest()[:16]

    def _handle_overflow(self, texts: list[str], lengths: np.ndarray, context_length: int) -> None:
        over = np.flatnonzero(lengths > context_length - 2)
        if not over.size:
            return
        if self.overflow == "error":
            first = int(over[0])
            # `lengths` may stop short past the row.
            length = int(_encode([texts[first]], vocabulary=self.vocabulary).lengths[0]) + 2
            long = f"{length} tokens long with its start and end tokens"
            raise overflow_error(self, first, texts[first], long, context_length, f"first {context_length}")
        count_truncated(self, int(over.size), len(texts), context_length, logger)


def _is_array(ids: Any) -> bool:
    """A numpy array or a torch tensor; torch is not imported for the check (if it is not, ids are no tensor)."""
    torch = sys.modules.get("torch")
    return isinstance(ids, np.ndarray) or (torch is not None and isinstance(ids, torch.Tensor))


def _as_row(ids: Sequence[int] | torch.Tensor, vocab_size: int) -> list[int]:
    if _is_array(ids) and ids.ndim != 1:
        raise ValueError(
            f"decode takes one row of ids, got shape {tuple(ids.shape)}; decode rows one at a time: "
            "[tokenizer.decode(row) for row in ids]"
        )
    row = ids.tolist() if _is_array(ids) else list(ids)
    bad = [i for i in row if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"decode takes token ids in [0, {vocab_size}), got {bad[0]!r}")
    return row


def _text_config_of(source: Any) -> TextConfig:
    if source is None:
        return TextConfig(context_length=DEFAULT_CONTEXT_LENGTH)
    if isinstance(source, int) and not isinstance(source, bool):
        return TextConfig(context_length=_check_context_length(source))
    if isinstance(source, TextConfig):
        return source
    if isinstance(source, CLIPConfig):
        return source.text
    if isinstance(getattr(source, "config", None), CLIPConfig):
        return source.config.text
    raise TypeError(
        "get_tokenizer takes None, a context length (int), a CLIPConfig, a TextConfig or a model whose "
        f".config is a CLIPConfig; got {type(source).__name__}"
    )


def get_tokenizer(
    model_or_config: Any = None,
    *,
    overflow: str | None = None,
    overflow_setting: str | None = None,
    warn_each_call: bool = True,
) -> "Tokenizer | HFTokenizer":
    """The tokenizer a model was trained with, from a model, a config or a context length (None: CLIP's 77).

    CLIP's byte-pair `Tokenizer` for `TextConfig.tokenizer == "clip"`; otherwise an `HFTokenizer` over the
    model's Hugging Face tokenizer files with the config's cleaning, padding to `context_length`. Both take
    the `overflow` policy, how the caller spells it (`overflow_setting`) and `warn_each_call` (see `Tokenizer`);
    without `overflow`, the policy of the enclosing `vlm.overflow.overflow_policy` block, else "truncate". The
    files are looked for where the model was loaded from (`model.tokenizer_path`, set by `vlm.load` when that
    directory holds them), then at `TextConfig.tokenizer` (a directory, or a repo id in the Hugging Face
    cache; downloaded when online). ValueError when the tokenizer disagrees with the
    text tower about the end-of-text id it pools at.
    """
    text = _text_config_of(model_or_config)
    overflow, overflow_setting = resolve_overflow(overflow, overflow_setting)
    policy = dict(overflow=overflow, overflow_setting=overflow_setting, warn_each_call=warn_each_call)
    if text.tokenizer == CLIP_TOKENIZER:
        return Tokenizer(text.context_length, **policy)
    from .hf_tokenizer import HFTokenizer

    source = getattr(model_or_config, "tokenizer_path", None) or text.tokenizer
    tokenizer = HFTokenizer(
        source, text.context_length, clean=text.tokenizer_clean, strip_sep_token=text.strip_sep_token, **policy
    )
    if text.pool == "eot" and text.eot_id != tokenizer.eot_token_id:
        raise ValueError(
            f"the text tower pools at end-of-text id {text.eot_id} (TextConfig.eot_id) but the tokenizer in {source} "
            f"ends texts with id {tokenizer.eot_token_id}; set eot_id={tokenizer.eot_token_id} or use the model's own tokenizer"
        )
    return tokenizer
