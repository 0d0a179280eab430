"""The names a data column goes by: one table of roles (image, text, label), one picker, one error.

Every source with columns (a table, a Hugging Face dataset, tar shards) finds its image, text and label
columns here: the one the user named (`--image-column`, `--text-column`, `--label-column`; in a training
config `data.image_column`, `data.text_column`, `eval.label_column`), else the first of the role's usual
names that the source has (compared without case). A missing column is the same error everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["ColumnRole", "COLUMN_ROLES", "pick_column"]


@dataclass(frozen=True)
class ColumnRole:
    """A kind of column: the flag and the training setting that name it, and the names looked for."""

    role: str
    flag: str
    setting: str
    names: tuple[str, ...]  # in order of preference


# One row per role, like `vlm.convert`'s key tables. The image names include the webdataset
# extensions (a tar sample's ``key.jpg`` is its ``jpg`` column); ``cls`` is webdataset's label.
COLUMN_ROLES: dict[str, ColumnRole] = {
    row.role: row
    for row in (
        ColumnRole(
            "image",
            "--image-column",
            "data.image_column",
            ("image", "img", "image_path", "img_path", "filepath", "file_path", "path", "file", "filename",
             "jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff"),
        ),  # fmt: skip
        ColumnRole(
            "text",
            "--text-column",
            "data.text_column",
            ("caption", "captions", "text", "txt", "title", "description", "alt", "sentence"),
        ),
        ColumnRole("label", "--label-column", "eval.label_column", ("label", "labels", "class", "cls", "target")),
    )
}


def pick_column(
    columns: Sequence[str],
    role: str,
    given: str | None = None,
    *,
    where: str,
    prefer: Sequence[str] = (),
    required: bool = True,
) -> str | None:
    """The `role` column of `where` (a description such as "table a.csv"): `given` when named, else the
    first of `prefer` (e.g. a dataset's image features) and the role's usual names that `columns` has.

    Raises ValueError naming the columns and the flag to set when `given` is missing, or when nothing
    is found and the column is `required`; returns None when it is not required and not found.
    """
    row = COLUMN_ROLES[role]
    available = [str(c) for c in columns]
    fix = f"name it with {row.flag} ({row.setting} in a training config)"
    if given is not None:
        if given in available:
            return given
        raise ValueError(f"{where} has no column {given!r} (the {role} column); its columns are {available}; {fix}")
    lower = {c.lower(): c for c in reversed(available)}
    for name in (*prefer, *row.names):
        if name.lower() in lower:
            return lower[name.lower()]
    if not required:
        return None
    raise ValueError(
        f"{where} has none of the usual {role} columns ({', '.join(row.names)}); its columns are {available}; {fix}"
    )
