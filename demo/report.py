"""A self-contained HTML report: one folder holding `index.html` and every image it shows.

The page has no scripts and no external resources, so the folder can be zipped, mailed or opened from
disk. Sections hold figures (PNG files copied into the folder), tables and image grids (thumbnails
copied in, drawn pixelated so that small images such as 32-pixel digits stay legible).
"""

from __future__ import annotations

import html
import os
import re
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Sequence

__all__ = ["Figure", "Table", "Tile", "Grid", "Section", "write_report"]


@dataclass(frozen=True)
class Figure:
    """An image file shown with a caption; copied into the report folder."""

    path: Path
    caption: str = ""


@dataclass(frozen=True)
class Table:
    """Rows of cells under a header; cells are shown as text (numbers as given)."""

    header: Sequence[str]
    rows: Sequence[Sequence[object]]


@dataclass(frozen=True)
class Tile:
    """One thumbnail of a grid: an image file and up to two lines of text under it."""

    path: Path
    label: str = ""
    detail: str = ""
    good: bool | None = None  # True/False draws a green/red frame (e.g. right or wrong class)


@dataclass(frozen=True)
class Grid:
    """A titled row of thumbnails (for one search query, say)."""

    title: str
    tiles: Sequence[Tile]


@dataclass(frozen=True)
class Section:
    """A heading, a paragraph, and any of tables, figures and grids, in that order."""

    title: str
    text: str = ""
    figures: Sequence[Figure] = ()
    tables: Sequence[Table] = ()
    grids: Sequence[Grid] = ()
    code: str = ""  # shown as a command block at the end


# Marks the folders this module wrote. It keeps the name the module had before it moved out of the core
# (vlm.report): with a new name, reports written earlier (a previous `make demo`) could not be rewritten.
GENERATOR = '<meta name="generator" content="vlm.report">'
STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } .sub { color: #666; margin-top: 0; }
section { border-top: 1px solid #ddd; padding: 0.6em 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 3px 9px; }
td.n { text-align: right; font-variant-numeric: tabular-nums; } th { background: #f4f4f4; }
figure { display: inline-block; margin: 0.4em 1em 0.4em 0; vertical-align: top; }
figure img { max-width: 520px; border: 1px solid #ddd; } figcaption { color: #555; font-size: 13px; }
.grid { display: flex; flex-wrap: wrap; gap: 8px; margin: 0.3em 0 0.9em; }
.tile { width: 84px; font-size: 12px; text-align: center; }
.tile img { width: 80px; height: 80px; image-rendering: pixelated; border: 2px solid #ccc; }
.tile.good img { border-color: #2a2; } .tile.bad img { border-color: #d22; }
pre { background: #f6f6f6; padding: 0.7em; overflow-x: auto; }
"""


def write_report(
    directory: str | os.PathLike, title: str, sections: Sequence[Section], *, subtitle: str = ""
) -> Path:
    """Writes `directory/index.html` and copies every figure and thumbnail into `directory/files/`;
    returns the path of index.html. Files are copied, not linked: the folder stands alone.

    A missing image raises FileNotFoundError before anything is written. A previous report's `files/`
    is replaced, so a rewritten report holds only what it shows; a `files/` folder that no report
    wrote is left alone (FileExistsError)."""
    directory = Path(directory)
    missing = [p for p in _images(sections) if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"the report shows {missing[0]}, which does not exist")
    files = directory / "files"
    if files.exists():
        index = directory / "index.html"
        if not (index.is_file() and GENERATOR in index.read_text(encoding="utf-8", errors="replace")):
            raise FileExistsError(f"{files} exists and was not written by a report; write the report to another folder")
        shutil.rmtree(files)
    files.mkdir(parents=True)
    assets = _Assets(files)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>{_e(title)}</h1>", f'<p class="sub">{_e(subtitle)}{" · " if subtitle else ""}{stamp}</p>']
    body += [_section(s, assets) for s in sections]
    page = (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">{GENERATOR}'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n"
    )
    path = directory / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


@dataclass
class _Assets:
    """Copies files into the report under unique names and hands back their relative links."""

    folder: Path
    copied: dict[Path, str] = field(default_factory=dict)

    def link(self, source: Path) -> str:
        source = Path(source).resolve()
        if source not in self.copied:
            # Only characters that need no quoting in a URL or an HTML attribute.
            name = f"{len(self.copied):04d}-{re.sub(r'[^A-Za-z0-9._-]', '_', source.name)}"
            shutil.copyfile(source, self.folder / name)
            self.copied[source] = f"{self.folder.name}/{name}"
        return self.copied[source]


def _images(sections: Sequence[Section]) -> list[Path]:
    return [f.path for s in sections for f in s.figures] + [t.path for s in sections for g in s.grids for t in g.tiles]


def _e(text: object) -> str:
    return html.escape(str(text))


def _section(section: Section, assets: _Assets) -> str:
    parts = [f"<section><h2>{_e(section.title)}</h2>"]
    if section.text:
        parts.append(f"<p>{_e(section.text)}</p>")
    for table in section.tables:
        parts.append(_table(table))
    for figure in section.figures:
        caption = f"<figcaption>{_e(figure.caption)}</figcaption>" if figure.caption else ""
        parts.append(f'<figure><img src="{assets.link(figure.path)}" alt="{_e(figure.caption)}">{caption}</figure>')
    for grid in section.grids:
        parts.append(f"<h3>{_e(grid.title)}</h3>" + _grid(grid, assets))
    if section.code:
        parts.append(f"<pre>{_e(section.code)}</pre>")
    parts.append("</section>")
    return "\n".join(parts)


def _table(table: Table) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in table.header)
    rows = []
    for row in table.rows:
        cells = "".join(
            f'<td class="n">{_e(c)}</td>' if isinstance(c, (int, float)) else f"<td>{_e(c)}</td>" for c in row
        )
        rows.append(f"<tr>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _grid(grid: Grid, assets: _Assets) -> str:
    tiles = []
    for tile in grid.tiles:
        cls = "tile" + {True: " good", False: " bad", None: ""}[tile.good]
        tiles.append(
            f'<div class="{cls}"><img src="{assets.link(tile.path)}" alt="{_e(tile.label)}">'
            f"<div>{_e(tile.label)}</div><div>{_e(tile.detail)}</div></div>"
        )
    return f'<div class="grid">{"".join(tiles)}</div>'
