r"""Hugging Face tokenizers (SentencePiece, WordPiece) with the ids of open_clip's `HFTokenizer` and transformers.

SigLIP, SigLIP 2, MetaCLIP 2 "worldwide" and CLIPA name a Hugging Face tokenizer instead of CLIP's BPE.
open_clip's `HFTokenizer(source, context_length, clean=..., strip_sep_token=...)` cleans each text
(`vlm.text_clean`), calls transformers,

    AutoTokenizer.from_pretrained(source)(texts, max_length=context_length, padding="max_length", truncation=True)

and, with `strip_sep_token`, turns the sep ids into 0. `HFTokenizer` gives the same ids. It asks transformers
once, at construction, what that call does, then does it itself on every call:

1. Content ids, without special tokens: the Rust pipeline (normalizer, pre-tokenizer, model) of
   `AutoTokenizer.from_pretrained(directory).backend_tokenizer`, run with `encode_batch_fast`. Taking the
   pipeline transformers built, rather than one read from tokenizer.json, is what makes the ids agree:
   transformers 5 rebuilds most tokenizers from their class (T5, Gemma, XLM-R, BERT and Siglip2 set their
   own normalizer and pre-tokenizer; of the file they keep the vocabulary, the sentencepiece character map
   and, unless the class sets its own, the post-processor) and picks the class from config.json's
   model_type as well as from tokenizer_config.json (a google/siglip2-* folder loads `Siglip2Tokenizer`,
   which lower-cases, where the same files without config.json load `GemmaTokenizer`).
2. Framing: the special ids its post-processor puts around every text (SigLIP: `</s>` after; SigLIP 2: what
   tokenizer.json's post-processor says, since transformers 5 ignores tokenizer_config.json's add_bos_token
   and add_eos_token when a tokenizer.json is present; XLM-R: `<s>` before, `</s>` after; BERT: `[CLS]`,
   `[SEP]`). A text keeps its first (or, with truncation_side "left", last) context_length - specials ids,
   and the row is padded with the pad id on the tokenizer's padding side, both read from the files.

`SiglipTokenizer` (google/siglip-*: spiece.model, no tokenizer.json) is a Python tokenizer with no Rust
pipeline. Its own `tokenize` prefixes "▁", lower-cases and strips punctuation again (`canonicalize_text`,
after open_clip's clean), then encodes "<unk>" + text with sentencepiece and drops the pieces of "<unk>";
that is replayed here in one batched call to the same `SentencePieceProcessor`. A text holding one of its
added tokens ("</s>", "<unk>") is split around them by transformers' own `tokenize`: clean="canonicalize",
which those models use, deletes "<", "/" and ">", so such text only reaches it under another clean mode.

Truncation is never silent (see `HFTokenizer`). `encode_batch_fast` uses the tokenizers thread pool unless
TOKENIZERS_PARALLELISM=false (importing open_clip sets it); in a process forked after the pool started,
tokenizers turns parallelism off and warns once.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from . import tokenizer as clip_tokenizer
from .overflow import OVERFLOW_SETTING, check_overflow, count_truncated, overflow_error
from .text_clean import get_clean_fn

if TYPE_CHECKING:
    import torch

__all__ = ["CONFIG_FILES", "HFTokenizer", "VOCABULARY_FILES"]

logger = logging.getLogger(__name__)

# What transformers reads a tokenizer from: one of these holds the vocabulary...
VOCABULARY_FILES = ("tokenizer.json", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "vocab.txt")
# ...and these its settings. config.json belongs here: its model_type picks the tokenizer class where
# tokenizer_config.json names none (bert-base-uncased) or names one transformers overrides (siglip2).
CONFIG_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "config.json")
# The keys of config.json that AutoTokenizer reads; the rest describes the model, not the tokenizer.
_CONFIG_KEYS = ("model_type", "tokenizer_class")
_SPIECE_UNDERLINE = "▁"


class _RustPipeline:
    """Content ids from the Rust pipeline transformers built, its padding and truncation switched off."""

    suffix_only_if_absent = False

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.backend.no_padding()
        self.backend.no_truncation()
        probe = self.backend.encode("a", add_special_tokens=True)
        # sequence_ids is None at the ids the post-processor added, 0 at the text's own.
        content = [i for i, sequence in enumerate(probe.sequence_ids) if sequence is not None]
        assert content, "every vocabulary gives 'a' at least one id"
        self.prefix = probe.ids[: content[0]]
        self.suffix = probe.ids[content[-1] + 1 :]

    def __call__(self, texts: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in self.backend.encode_batch_fast(texts, add_special_tokens=False)]


class _SiglipPipeline:
    """`SiglipTokenizer.tokenize` (google/siglip-*), its sentencepiece calls made once for the whole batch."""

    # Its `_add_eos_if_not_present`: ids already ending in </s> get no second one. Only text holding "</s>"
    # can end so, and only where pad is not </s> does the row change.
    suffix_only_if_absent = True

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.sp = hf_tokenizer.sp_model
        self.unk = str(hf_tokenizer.unk_token)
        self.unk_length = len(self.sp.encode(self.unk))
        self.prefix: list[int] = []
        self.suffix = [hf_tokenizer.eos_token_id]
        # The strings `tokenize` splits the text at before its sentencepiece step; none when it splits nothing.
        added = sorted({*hf_tokenizer.added_tokens_encoder, *hf_tokenizer.all_special_tokens}, key=len, reverse=True)
        split = added and not hf_tokenizer.split_special_tokens
        self.added = re.compile("|".join(map(re.escape, added))) if split else None

    def __call__(self, texts: list[str]) -> list[list[int]]:
        marked = [_SPIECE_UNDERLINE + text.replace(_SPIECE_UNDERLINE, " ") for text in texts]
        split = [self.added is not None and self.added.search(text) is not None for text in marked]
        # `_tokenize` of a whole text: canonicalize (lower case, no punctuation), encode behind "<unk>", then
        # drop the pieces of "<unk>".
        plain = [self.unk + self.hf.canonicalize_text(text) for text, at_added in zip(marked, split) if not at_added]
        encoded = iter(self.sp.encode(plain, out_type=int))
        ids = []
        for text, at_added in zip(texts, split):
            if at_added:
                ids.append(self.hf.convert_tokens_to_ids(self.hf.tokenize(text)))
            else:
                pieces = next(encoded)
                ids.append(pieces[self.unk_length :] if len(pieces) >= self.unk_length else pieces)
        return ids


class HFTokenizer:
    """Texts to (B, context_length) int64 ids, identical to open_clip's `HFTokenizer` and to transformers'.

    `source` is a folder of tokenizer files or a Hugging Face repo id ("timm/ViT-B-16-SigLIP"), whose tokenizer
    files are downloaded into the Hugging Face cache unless `local_files_only` is True or HF_HUB_OFFLINE is set
    (then they must be cached already). Each text is cleaned (`clean`: open_clip's "whitespace", "lower" or
    "canonicalize"), framed with the tokenizer's special ids and padded on its padding side. With
    `strip_sep_token` (CLIPA) the sep ids become 0. A text longer than the row is handled by `overflow`:

    - "truncate" (open_clip's behaviour): the row keeps the text's first ids (its last ones where the
      files say truncation_side "left") and its special ids. Never silent: `num_truncated` keeps the
      running total, and each call that truncates logs one warning with the count (unless
      `warn_each_call` is False).
    - "error": raise ValueError naming the first text that does not fit.

    Warnings and errors name the setting as `overflow_setting` spells it (see `vlm.overflow`).

    Construction reads the files through transformers (a fraction of a second, longer for 900k-token
    vocabularies). Calls do not go through transformers, except `decode` and, with SiglipTokenizer, a text
    holding one of its special tokens. `from_pipeline` rebuilds the tokenizer without transformers from what
    `pipeline_json` and `framing` saved (an ONNX export does so).
    """

    def __init__(
        self,
        source: str | os.PathLike,
        context_length: int,
        *,
        clean: str = "whitespace",
        strip_sep_token: bool = False,
        overflow: str = "truncate",
        overflow_setting: str = OVERFLOW_SETTING,
        warn_each_call: bool = True,
        local_files_only: bool | None = None,
    ) -> None:
        self._set_policy(context_length, clean, strip_sep_token, overflow, overflow_setting, warn_each_call)
        directory, where = _tokenizer_directory(source, local_files_only)
        self.files = _tokenizer_files(directory, where)
        stamp = tuple((path.name, path.stat().st_mtime_ns, path.stat().st_size) for path in self.files)
        self._files_digest, self._hf, self._content_ids = _load(directory, where, stamp)
        hf = self._hf
        framing = dict(prefix=self._content_ids.prefix, suffix=self._content_ids.suffix, vocab_size=len(hf))
        framing.update(pad_token_id=hf.pad_token_id, sep_token_id=hf.sep_token_id)
        self._set_framing(dict(framing, padding_side=hf.padding_side, truncation_side=hf.truncation_side), where)

    @classmethod
    def from_pipeline(
        cls,
        directory: str | os.PathLike,
        framing: dict[str, Any],
        context_length: int,
        *,
        pipeline: str = "pipeline.json",
        clean: str = "whitespace",
        strip_sep_token: bool = False,
        overflow: str = "truncate",
        overflow_setting: str = OVERFLOW_SETTING,
        warn_each_call: bool = True,
    ) -> "HFTokenizer":
        """The tokenizer saved as `directory` (its files, as `save` writes them) plus `pipeline` in it (what
        `pipeline_json` gave) and `framing` (what `framing()` gave), built with `tokenizers` alone: the same ids
        and fingerprint without transformers. `decode` needs transformers and is not available."""
        from tokenizers import Tokenizer as RustTokenizer

        self = cls.__new__(cls)
        self._set_policy(context_length, clean, strip_sep_token, overflow, overflow_setting, warn_each_call)
        directory = Path(directory)
        self.files = _tokenizer_files(directory, f"folder {directory}")
        self._files_digest, self._hf = _files_digest(self.files), None
        self._content_ids = _RustPipeline(RustTokenizer.from_file(str(directory / pipeline)))
        self._set_framing(framing, f"folder {directory}")
        return self

    def framing(self) -> dict[str, Any]:
        """What frames and pads each row (special ids before and after a text, pad and sep ids, padding and
        truncation sides, vocabulary size), as plain values for `from_pipeline`."""
        return dict(
            prefix=list(self._prefix), suffix=list(self._suffix), vocab_size=self.vocab_size,
            pad_token_id=self.pad_token_id, sep_token_id=self._sep_token_id, padding_side=self.padding_side,
            truncation_side=self.truncation_side,
        )

    def pipeline_json(self) -> str | None:
        """The Rust pipeline that gives the content ids, serialised for `from_pipeline`; None for a
        SiglipTokenizer, which has none (transformers is then needed to tokenize)."""
        backend = getattr(self._content_ids, "backend", None)
        return None if backend is None else backend.to_str()

    def _set_policy(
        self, context_length: int, clean: str, strip_sep_token: bool, overflow: str, overflow_setting: str, warn: bool
    ) -> None:
        check_overflow(overflow)
        self._clean_fn = get_clean_fn(clean)
        self.context_length = clip_tokenizer._check_context_length(context_length)
        self.clean = clean
        self.strip_sep_token = strip_sep_token
        self.overflow = overflow
        self.overflow_setting = overflow_setting
        self.warn_each_call = warn
        self.num_truncated = 0

    def _set_framing(self, framing: dict[str, Any], where: str) -> None:
        self._prefix, self._suffix = list(framing["prefix"]), list(framing["suffix"])
        self.vocab_size = framing["vocab_size"]
        self.pad_token_id = framing["pad_token_id"]
        self.padding_side = framing["padding_side"]
        self.truncation_side = framing["truncation_side"]
        self._sep_token_id = framing["sep_token_id"]
        if self.pad_token_id is None:
            raise ValueError(f"the tokenizer of {where} has no pad token to fill rows with; name one in its files")
        if self.strip_sep_token and self._sep_token_id is None:
            raise ValueError(f"strip_sep_token=True, but the tokenizer of {where} has no sep token; drop the flag")
        # The id that ends every text: gone when strip_sep_token turns it into 0.
        ends = self._suffix[-1] if self._suffix else None
        self.eot_token_id = None if self.strip_sep_token and ends == self._sep_token_id else ends

    def __repr__(self) -> str:
        kind = "pipeline" if self._hf is None else type(self._hf).__name__
        return (
            f"HFTokenizer({kind}, context_length={self.context_length}, clean={self.clean!r}, "
            f"strip_sep_token={self.strip_sep_token}, overflow={self.overflow!r})"
        )

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids (B, context_length) int64 for a text or a batch; an empty batch gives (0, context_length).

        `context_length` overrides the tokenizer's own for this call.
        """
        import torch

        return torch.from_numpy(self.ids(texts, context_length))

    def ids(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
        """What a call returns, as a numpy array: the same ids without torch (ONNX runtimes use it)."""
        if context_length is None:
            context_length = self.context_length
        context_length = clip_tokenizer._check_context_length(context_length)
        batch = clip_tokenizer._as_batch(texts)
        room = self._room(context_length)
        contents = self._encode(batch)
        self._handle_overflow(batch, contents, room, context_length)
        rows = self._pack(contents, room, context_length)
        if self.strip_sep_token:
            rows[rows == self._sep_token_id] = 0
        return rows

    def encode(self, text: str) -> list[int]:
        """The ids of one text, cleaned as in a call, without special tokens and without truncation."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes one str, got {type(text).__name__}; tokenize a batch with tokenizer(texts)")
        return self._encode([text])[0]

    def lengths(self, texts: str | Sequence[str]) -> list[int]:
        """Each text's token count with its special tokens, before truncation."""
        specials = len(self._prefix) + len(self._suffix)
        return [len(ids) + specials for ids in self._encode(clip_tokenizer._as_batch(texts))]

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of one row of ids as transformers decodes it, special tokens and padding left out.

        A plain text comes back as its cleaned form where the vocabulary allows: lower case where the
        tokenizer lower-cases (BERT uncased, SiglipTokenizer, Siglip2Tokenizer), without the characters its
        normalizer rewrites, and with "<unk>" dropped for characters the vocabulary lacks.
        """
        if self._hf is None:
            raise ValueError("this HFTokenizer was rebuilt from a saved pipeline without transformers; decoding needs "
                             f"HFTokenizer(folder) with transformers installed (folder: {self.files[0].parent})")
        return self._hf.decode(clip_tokenizer._as_row(ids, self.vocab_size), skip_special_tokens=True)

    def fingerprint(self) -> str:
        """A short hash of what decides the ids: the tokenizer files' bytes (of config.json, the keys that
        pick the tokenizer class), `clean`, `strip_sep_token` and the context length; not where they lie."""
        settings = f"{self._files_digest}:{self.clean}:{self.strip_sep_token}:{self.context_length}"
        return hashlib.sha256(settings.encode()).hexdigest()[:16]

    def save(self, directory: str | os.PathLike) -> None:
        """Copy the tokenizer files into `directory`, from which `HFTokenizer(directory, ...)` loads the same
        tokenizer. A different file of the same name already there (a model's own config.json) is refused."""
        targets = [(path, Path(directory) / path.name) for path in self.files]
        for path, target in targets:
            if target.exists() and target.read_bytes() != path.read_bytes():
                raise FileExistsError(
                    f"{target} exists and differs from the tokenizer's {path.name}; save the tokenizer to a folder "
                    "of its own (a 'tokenizer' subfolder) or remove the file"
                )
        Path(directory).mkdir(parents=True, exist_ok=True)
        for path, target in targets:
            if not target.exists():
                shutil.copyfile(path, target)

    def _encode(self, texts: list[str]) -> list[list[int]]:
        return self._content_ids([self._clean_fn(text) for text in texts])

    def _room(self, context_length: int) -> int:
        """How many of a text's own ids fit in a row beside its special ids."""
        room = context_length - len(self._prefix) - len(self._suffix)
        if room < 0:
            raise ValueError(
                f"context_length={context_length} leaves no room for the {len(self._prefix) + len(self._suffix)} "
                "special tokens this tokenizer puts in every row; pass a larger one"
            )
        return room

    def _pack(self, contents: list[list[int]], room: int, context_length: int) -> np.ndarray:
        """(B, context_length) rows: each text's ids cut to `room`, framed, padded on the padding side."""
        keep_first = self.truncation_side == "right"
        kept = (ids if len(ids) <= room else ids[:room] if keep_first else ids[len(ids) - room :] for ids in contents)
        rows = list(map(self._frame, kept))
        lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
        out = np.full((len(rows), context_length), self.pad_token_id, dtype=np.int64)
        column = np.arange(context_length)
        if self.padding_side == "right":
            filled = column < lengths[:, None]
        else:
            filled = column >= context_length - lengths[:, None]
        # A boolean mask assigns in row-major order, the order of the chained rows.
        out[filled] = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
        return out

    def _frame(self, ids: list[int]) -> list[int]:
        if self._content_ids.suffix_only_if_absent and ids[len(ids) - len(self._suffix) :] == self._suffix:
            return self._prefix + ids
        return self._prefix + ids + self._suffix

    def _handle_overflow(self, texts: list[str], contents: list[list[int]], room: int, context_length: int) -> None:
        over = [i for i, ids in enumerate(contents) if len(ids) > room]
        if not over:
            return
        if self.overflow == "error":
            first = over[0]
            length = len(contents[first]) + context_length - room
            kept = "first" if self.truncation_side == "right" else "last"
            raise overflow_error(
                self, first, texts[first], f"{length} tokens long with its special tokens", context_length, f"{kept} {room}"
            )
        count_truncated(self, len(over), len(texts), context_length, logger)


def _tokenizer_directory(source: str | os.PathLike, local_files_only: bool | None) -> tuple[Path, str]:
    """The local folder holding the tokenizer files, and a description of it for messages."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path, f"folder {path}"
    if path.exists() or not _is_repo_id(str(source)):
        raise FileNotFoundError(
            f"{str(source)!r} is neither a folder of tokenizer files nor a Hugging Face repo id ('org/name'); "
            "pass the folder the tokenizer was saved in, or a repo id such as 'timm/ViT-B-16-SigLIP'"
        )
    return _hub_snapshot(str(source), local_files_only)


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _hub_snapshot(repo_id: str, local_files_only: bool | None) -> tuple[Path, str]:
    """The cached snapshot folder of `repo_id` holding its tokenizer files (fetched first when allowed)."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        # Tokenizer files only: a repo's weights are gigabytes.
        folder = snapshot_download(
            repo_id, allow_patterns=[*VOCABULARY_FILES, *CONFIG_FILES], local_files_only=bool(local_files_only)
        )
    except (LocalEntryNotFoundError, HfHubHTTPError) as error:
        if local_files_only or constants.HF_HUB_OFFLINE:
            fix = "download it once online (local_files_only=False, HF_HUB_OFFLINE unset)"
        else:
            fix = "check the repo id and your access to it"
        raise FileNotFoundError(
            f"no tokenizer files of Hugging Face repo {repo_id!r} in the cache {constants.HF_HUB_CACHE} "
            f"(looked for {', '.join(VOCABULARY_FILES)}): {error}; {fix}, or pass a folder holding the files"
        ) from error
    return Path(folder), f"Hugging Face repo {repo_id!r} (cached in {folder})"


def _tokenizer_files(directory: Path, where: str) -> list[Path]:
    files = [directory / name for name in (*VOCABULARY_FILES, *CONFIG_FILES) if (directory / name).is_file()]
    if not any(path.name in VOCABULARY_FILES for path in files):
        raise FileNotFoundError(
            f"no tokenizer vocabulary in {where}: looked for {', '.join(VOCABULARY_FILES)} (with "
            f"{', '.join(CONFIG_FILES)}); pass the folder a Hugging Face tokenizer was saved in "
            "(tokenizer.save_pretrained(folder)) or the repo id of a model that ships one"
        )
    return files


@functools.lru_cache(maxsize=8)
def _load(directory: Path, where: str, stamp: tuple) -> tuple[str, Any, _RustPipeline | _SiglipPipeline]:
    """The files' digest, transformers' tokenizer and the pipeline over it, built once per folder and kept
    while the files are unchanged (`stamp`: their names, sizes and modification times): a model's tokenizer is
    asked for often, and a 900k-token vocabulary takes seconds to read."""
    files = [directory / name for name, _, _ in stamp]
    hf = _load_transformers_tokenizer(directory, where)
    return _files_digest(files), hf, _pipeline(hf, where)


def _files_digest(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in sorted(files, key=lambda p: p.name):
        data = path.read_bytes()
        if path.name == "config.json":
            config = json.loads(data)
            data = json.dumps({key: config.get(key) for key in _CONFIG_KEYS}).encode()
        digest.update(f"{path.name}:{len(data)}:".encode() + data)
    return digest.hexdigest()


def _load_transformers_tokenizer(directory: Path, where: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as error:  # transformers, tokenizers (Rust) and sentencepiece each raise their own kinds
        raise ValueError(
            f"transformers could not build a tokenizer from {where}: {error}. The folder needs a vocabulary "
            f"({', '.join(VOCABULARY_FILES)}) and a tokenizer_config.json naming its tokenizer_class, or a "
            "config.json with the model_type; copy them from the model's repository"
        ) from error


def _pipeline(hf_tokenizer: Any, where: str) -> _RustPipeline | _SiglipPipeline:
    from transformers import SiglipTokenizer, TokenizersBackend

    # A class with its own `__call__` or `_encode_plus` runs Python code around the Rust pipeline on every call.
    cls = type(hf_tokenizer)
    if isinstance(hf_tokenizer, TokenizersBackend) and (cls.__call__, cls._encode_plus) == (
        TokenizersBackend.__call__,
        TokenizersBackend._encode_plus,
    ):
        return _RustPipeline(hf_tokenizer.backend_tokenizer)
    if isinstance(hf_tokenizer, SiglipTokenizer):
        return _SiglipPipeline(hf_tokenizer)
    raise ValueError(
        f"transformers loads the tokenizer of {where} as {cls.__name__}, which tokenizes in Python; HFTokenizer runs "
        "the Rust pipeline of tokenizers that have one (tokenizer.json, or a sentencepiece or WordPiece vocabulary "
        "that transformers converts), and SiglipTokenizer; use transformers' tokenizer directly"
    )
