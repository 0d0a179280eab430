"""open_clip's text cleaning, `clean='whitespace'`, `'lower'` or `'canonicalize'`, before a tokenizer sees the text.

Each mode computes what `open_clip.tokenizer.get_clean_fn(mode)` computes:

- "whitespace": `ftfy.fix_text`, `html.unescape` twice, whitespace runs collapsed to one space, ends stripped;
- "lower": the same, then `lower()`;
- "canonicalize" (SigLIP's, from big_vision): the first two steps, then "_" becomes a space, ASCII
  punctuation (`string.punctuation`) is deleted, `lower()`, whitespace collapsed.

Most texts skip ftfy and HTML unescaping: printable ASCII (plus tab, line feed, form feed, carriage return)
without `&` is left unchanged by both, apart from ftfy turning "\\r" and "\\r\\n" into "\\n", which the
whitespace collapse that every mode ends with makes invisible. ftfy costs more than tokenizing a caption.
"""

from __future__ import annotations

import html
import re
import string
from collections.abc import Callable

import ftfy

__all__ = ["CLEAN_MODES", "NEEDS_FULL_CLEAN", "get_clean_fn"]

# Characters that ftfy.fix_text or html.unescape may change: non-ASCII, '&', and the control characters
# ftfy deletes (below 0x20 except \t \n \f \r, which it keeps or turns into \n; and 0x7f).
NEEDS_FULL_CLEAN = re.compile(r"[^\t\n\x0c\r\x20-\x25\x27-\x7e]")
_NO_PUNCTUATION = str.maketrans("", "", string.punctuation)


def _basic_clean(text: str) -> str:
    """open_clip's `basic_clean` without its final `strip()`, which the whitespace collapse of every mode does."""
    if NEEDS_FULL_CLEAN.search(text):
        text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return text


def _clean_whitespace(text: str) -> str:
    return " ".join(_basic_clean(text).split())


def _clean_lower(text: str) -> str:
    return _clean_whitespace(text).lower()


def _clean_canonicalize(text: str) -> str:
    return " ".join(_basic_clean(text).replace("_", " ").translate(_NO_PUNCTUATION).lower().split())


_CLEAN_FNS: dict[str, Callable[[str], str]] = {
    "whitespace": _clean_whitespace,
    "lower": _clean_lower,
    "canonicalize": _clean_canonicalize,
}
CLEAN_MODES = tuple(_CLEAN_FNS)


def get_clean_fn(mode: str) -> Callable[[str], str]:
    """The function that cleans a text as open_clip's `get_clean_fn(mode)` does; `mode` is one of `CLEAN_MODES`."""
    if mode not in _CLEAN_FNS:
        raise ValueError(f"clean must be one of {CLEAN_MODES}, got {mode!r}")
    return _CLEAN_FNS[mode]
