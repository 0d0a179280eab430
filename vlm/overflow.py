"""What both tokenizers do with a text longer than their rows: the policy, how the caller sets it, and the
messages that say so.

"truncate" (open_clip's behaviour) keeps the text's first tokens and counts it; "error" refuses it naming
the text. Each caller spells the setting its own way, and warnings and errors name that spelling, `{}`
standing for the policy: "overflow='{}'" in Python, "--text-overflow {}" on a command line,
"data.text_overflow={}" in a training config. A command sets the policy once for its whole job with
`overflow_policy`; the tokenizers it creates deep down (classifier building, embedding, search) follow it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from typing import Protocol

__all__ = ["OVERFLOW_POLICIES", "OVERFLOW_SETTING", "overflow_policy", "resolve_overflow"]

OVERFLOW_POLICIES = ("truncate", "error")
OVERFLOW_SETTING = "overflow='{}'"
_MAX_SHOWN_CHARS = 60
# (policy, setting) for tokenizers whose creator names no policy.
_default: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar(
    "vlm_overflow", default=("truncate", OVERFLOW_SETTING)
)


class _Counting(Protocol):
    num_truncated: int
    overflow_setting: str
    warn_each_call: bool


def check_overflow(overflow: str) -> None:
    """ValueError unless `overflow` is a policy."""
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")


@contextlib.contextmanager
def overflow_policy(overflow: str, setting: str = OVERFLOW_SETTING) -> Iterator[None]:
    """Within the block (in this thread), `vlm.get_tokenizer` calls that name no `overflow` use `overflow`,
    and their tokenizers' warnings and errors name `setting`."""
    check_overflow(overflow)
    token = _default.set((overflow, setting))
    try:
        yield
    finally:
        _default.reset(token)


def resolve_overflow(overflow: str | None, setting: str | None) -> tuple[str, str]:
    """(policy, setting) for a new tokenizer: the ones given, else those of the enclosing `overflow_policy`
    block, else truncate, spelled as a Python argument."""
    default, default_setting = _default.get() if overflow is None else (overflow, OVERFLOW_SETTING)
    return overflow or default, setting or default_setting


def _shorten(text: str) -> str:
    return repr(text if len(text) <= _MAX_SHOWN_CHARS else text[: _MAX_SHOWN_CHARS - 3] + "...")


def overflow_error(
    tokenizer: _Counting, index: int, text: str, length: str, context_length: int, kept: str
) -> ValueError:
    """The error for text `index` of a call that does not fit under "error": `length` says how long it is,
    `kept` which of its tokens truncation would keep."""
    setting = tokenizer.overflow_setting
    return ValueError(
        f"text {index} ({_shorten(text)}) is {length}, more than context_length={context_length} "
        f"({setting.format('error')}); shorten it, or use {setting.format('truncate')} to keep its {kept} tokens"
    )


def count_truncated(tokenizer: _Counting, count: int, total: int, context_length: int, log: logging.Logger) -> None:
    """Adds `count` truncated texts (of `total` in the call) to `tokenizer.num_truncated`, with a warning on
    `log` (the tokenizer module's) unless the caller reports a total itself (`warn_each_call` False)."""
    tokenizer.num_truncated += count
    if tokenizer.warn_each_call:
        setting = tokenizer.overflow_setting
        log.warning(
            "%d of %d texts were longer than %d tokens and were truncated (%s); use %s to refuse them",
            count,
            total,
            context_length,
            setting.format("truncate"),
            setting.format("error"),
        )
