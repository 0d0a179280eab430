"""Checks shared by the training configs (`training.config`, `training.finetune_config`): every error
names the full dotted key, the bad value, the valid names or range and a fix (with the nearest valid
name, when one is close)."""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import typing
from dataclasses import fields
from typing import Any, Iterable, Iterator, Mapping, Sequence

__all__ = ["close_match", "check_batch_split", "check_model_overrides", "check_sources", "setting_errors"]


def close_match(name: Any, choices: Iterable[str]) -> str:
    """The suffix ``(did you mean 'x'?)`` for the choice nearest to `name` (difflib); "" when none is close."""
    match = difflib.get_close_matches(str(name), [str(c) for c in choices], n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


def _key(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def _default(section: Any, name: str) -> Any:
    """The default of field `name` of a config dataclass, None when it has none (or a factory)."""
    found = [f.default for f in fields(section) if f.name == name]
    return found[0] if found and found[0] is not dataclasses.MISSING else None


def _positive(owner: str, name: str, value: Any, *, zero_ok: bool = False, default: Any = None) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (value >= 0 if zero_ok else value > 0) or not math.isfinite(value):
        bound = ">= 0" if zero_ok else "> 0"
        usual = f" (the default is {default!r})" if default is not None else ""
        raise ValueError(
            f"{_key(owner, name)} must be a number {bound}, got {value!r}; set {_key(owner, name)} to a number "
            f"{bound}{usual}"
        )


def _positives(section: Any, owner: str, names: Sequence[str], *, zero_ok: bool = False) -> None:
    """`_positive` for several fields of `section`, each error suggesting the field's default."""
    for name in names:
        _positive(owner, name, getattr(section, name), zero_ok=zero_ok, default=_default(section, name))


def _in_range(section: Any, owner: str, name: str, low: float, high: float, *, high_open: bool = False) -> None:
    """Field `name` of `section` in [low, high] (or [low, high)); the error names the range and the default."""
    value = getattr(section, name)
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (low <= value < high if high_open else low <= value <= high):
        bounds = f"[{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(
            f"{_key(owner, name)} must be in {bounds}, got {value!r}; set {_key(owner, name)} to a number in "
            f"{bounds} (the default is {_default(section, name)!r})"
        )


def _choice(owner: str, name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        key = _key(owner, name)
        raise ValueError(
            f"{key} must be one of {', '.join(choices)}; got {value!r}{close_match(value, choices)}; "
            f"set {key} to one of them"
        )


def check_batch_split(batch_size: int, parts: int, what: str) -> None:
    """ValueError unless data.batch_size splits into `parts` equal shares (`what` names the divisor)."""
    if batch_size % parts:
        lower = batch_size // parts * parts
        choices = f"{lower} or {lower + parts}" if lower else str(parts)
        raise ValueError(
            f"data.batch_size ({batch_size}) must be a multiple of {what} ({parts}), each share getting an equal "
            f"part of the batch; set data.batch_size={choices}"
        )


# ---- model.overrides ------------------------------------------------------------------------------
def check_model_overrides(name: str, overrides: Mapping[str, Any]) -> None:
    """Every key of `model.overrides` is a field of the model config (`vlm.config.CLIPConfig`, its
    `vision` and `text` sections), and, for a preset, the changed config is valid; errors name the
    dotted key (model.overrides.vision.patch_size), the bad name or value and the valid names."""
    from vlm.config import CLIPConfig
    from vlm.presets import PRESETS

    _check_override_keys(overrides, CLIPConfig, "model.overrides")
    if name not in PRESETS:
        return  # `training.loop.build_model` says that overrides need a preset
    try:
        PRESETS[name].replace(**json.loads(json.dumps(dict(overrides))))
    except (ValueError, TypeError) as err:
        # The model config names its own classes; the user wrote dotted keys.
        message = str(err)
        for owner, key in (("VisionConfig", "vision"), ("TextConfig", "text"), ("CLIPConfig", "")):
            message = message.replace(f"{owner}.", f"model.overrides.{key + '.' if key else ''}")
        kind = TypeError if isinstance(err, TypeError) else ValueError
        raise kind(f"model.overrides of preset {name!r}: {message}") from None


def _check_override_keys(values: Any, cls: type, prefix: str) -> None:
    if not isinstance(values, Mapping):
        raise TypeError(
            f"config key {prefix} is a section of {cls.__name__} fields, got {values!r}; write "
            f"{prefix}.FIELD=VALUE, e.g. model.overrides.vision.patch_size=8"
        )
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        if key not in hints:
            raise ValueError(
                f"unknown config key {prefix}.{key}: {prefix} ({cls.__name__}) has no {key!r}"
                f"{close_match(key, hints)}; known: {', '.join(sorted(hints))}"
            )
        if dataclasses.is_dataclass(hints[key]):
            _check_override_keys(value, hints[key], f"{prefix}.{key}")


@contextlib.contextmanager
def setting_errors(key: str, value: Any) -> Iterator[None]:
    """Prefixes the message of a user's error (ValueError, TypeError, FileNotFoundError) raised inside with
    ``key=value: ``, so that an error about a file says which setting named it; the error keeps its type
    where that type is built from a message alone."""
    try:
        yield
    except (ValueError, TypeError, FileNotFoundError) as err:
        prefix = f"{key}={value}"
        if str(err).startswith(prefix):
            raise
        message = f"{prefix}: {err}"
        try:
            renamed = type(err)(message)
        except Exception:  # a type with other constructor arguments (UnicodeDecodeError...)
            renamed = None
        if renamed is None or str(renamed) != message:
            renamed = next(k for k in (FileNotFoundError, TypeError, ValueError) if isinstance(err, k))(message)
        raise renamed from err


def check_sources(sources: Sequence[Any], train: str, source_type: type) -> None:
    """data.sources: each entry a `source_type` (SourceConfig) with a positive weight, and not together with
    data.train (`train`)."""
    if sources and train:
        raise ValueError(f"data.train ({train}) and data.sources are both set; give one of them, not both")
    for i, entry in enumerate(sources):
        key = f"data.sources[{i}]"
        if not isinstance(entry, source_type):
            raise TypeError(f"{key} is {entry!r}; write it as {{train: SPEC, weight: NUMBER}}")
        if not entry.train:
            raise ValueError(f"{key}.train is empty; give a table, hf:NAME_OR_DIR or a dataset directory")
        _positives(entry, key, ("weight",))
