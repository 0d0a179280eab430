"""Prompt templates: format strings with one ``{}`` (or ``{c}``) where the class name goes.

The two built-in sets are OpenAI's prompt-engineering templates for ImageNet, as open_clip ships them in
`open_clip.zero_shot_metadata` (there as lambdas): all 80 (``"imagenet80"``) and the 7-template subset
(``"simple"``). They are copied here as data rather than imported: vlm must classify without importing
open_clip at run time (importing it loads its model zoo and sets TOKENIZERS_PARALLELISM for the whole
process), and strings, unlike lambdas, can be written into a saved classifier and read back.
`tests/test_zeroshot.py` checks the copies against open_clip's.
"""

from __future__ import annotations

import os
import string
from pathlib import Path
from typing import Sequence

__all__ = [
    "OPENAI_IMAGENET_TEMPLATES",
    "SIMPLE_IMAGENET_TEMPLATES",
    "TEMPLATE_SETS",
    "check_template",
    "fill_template",
    "resolve_templates",
]

OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

# From OpenAI's Prompt_Engineering_for_ImageNet notebook: nearly the accuracy of all 80 at a tenth of the cost.
SIMPLE_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of the {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet80": OPENAI_IMAGENET_TEMPLATES,
    "simple": SIMPLE_IMAGENET_TEMPLATES,
}

# The placeholders a template may use: `{}` (what open_clip's templates and str.format use) or `{c}`.
_FIELDS = frozenset({"", "c"})


def fill_template(template: str, class_name: str) -> str:
    """`template` with every placeholder replaced by `class_name` (what open_clip's `template.format(c)` gives)."""
    count = sum(field is not None for _, field, _, _ in string.Formatter().parse(template))
    return template.format(*[class_name] * count, c=class_name)


def check_template(template: str, where: str = "template") -> str:
    """`template` itself if it is a format string with only `{}`/`{c}` placeholders, at least one."""
    if not isinstance(template, str):
        raise TypeError(
            f"{where} must be a format string such as 'a photo of a {{}}.', got {type(template).__name__}; "
            "for prompts that are not templates, give per-class prompts instead"
        )
    try:
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field is not None]
    except ValueError as err:
        raise ValueError(
            f"{where} {template!r} is not a valid format string ({err}); write braces as {{{{ }}}}"
        ) from None
    bad = [f for f in fields if f not in _FIELDS]
    if not fields or bad:
        found = f"it has {{{bad[0]}}}" if bad else "it has none"
        raise ValueError(
            f"{where} {template!r} needs the class name placeholder {{}} (or {{c}}) and no other; {found}. "
            "Example: 'a photo of a {}.'"
        )
    return template


def resolve_templates(templates: str | os.PathLike | Sequence[str]) -> tuple[str, ...]:
    """A template set by name (``"imagenet80"``, ``"simple"``), a file with one template a line (blank
    lines and lines starting with ``#`` are skipped), or a sequence of templates; each is checked."""
    if isinstance(templates, str) and templates in TEMPLATE_SETS:
        return TEMPLATE_SETS[templates]
    if isinstance(templates, (str, os.PathLike)):
        return _read_templates_file(Path(templates))
    if not isinstance(templates, Sequence) or not templates:
        raise ValueError(
            f"templates must be {' or '.join(map(repr, TEMPLATE_SETS))}, a file, or a non-empty list of "
            f"format strings; got {templates!r}"
        )
    return tuple(check_template(t, f"templates[{i}]") for i, t in enumerate(templates))


def _read_templates_file(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        raise FileNotFoundError(
            f"templates {str(path)!r} is neither a built-in set ({', '.join(TEMPLATE_SETS)}) nor a file; "
            "give a file with one format string a line, such as 'a photo of a {}.'"
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    templates = tuple(
        check_template(line.strip(), f"{path}:{n}")
        for n, line in enumerate(lines, 1)
        if line.strip() and not line.lstrip().startswith("#")
    )
    if not templates:
        raise ValueError(f"{path} holds no templates; write one format string a line, such as 'a photo of a {{}}.'")
    return templates
