"""clip-retrieval's numbered embedding shards (``img_emb/img_emb_{i}.npy``, ``text_emb/text_emb_{i}.npy``,
``metadata/metadata_{i}.parquet``), the one naming rule for everything that reads them: an index import
(`retrieval.clip_retrieval`) and offline distillation (`training.distill`). Recent clip-retrieval versions
zero-pad the numbers to the width of the shard count (``img_emb_007.npy``), older ones do not: both are read.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

__all__ = ["numbered_shards", "npy_shape"]


def numbered_shards(folder: Path, prefix: str, suffix: str) -> dict[int, Path]:
    """Shard number -> file in `folder` (``{prefix}_{i}.{suffix}``, padded or not); ValueError for a file
    that is not a shard, or a number twice. Hidden files are ignored."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+)\.{re.escape(suffix)}$")
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        match = pattern.match(path.name)
        if match is None:
            raise ValueError(
                f"{path} is not a shard: {folder.name}/ holds {prefix}_{{i}}.{suffix} files; move it elsewhere"
            )
        number = int(match.group(1))
        if number in found:
            raise ValueError(f"{found[number]} and {path} are both shard {number}; remove one")
        found[number] = path
    return found


def npy_shape(path: Path) -> tuple[int, int]:
    """(rows, dim) from the header of a 2-D float npy file, without reading it; ValueError naming it otherwise."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read(f)
    except (ValueError, OSError, EOFError) as err:
        raise ValueError(f"{path} is not a readable .npy file ({err}); write it again with numpy.save") from err
    if len(shape) != 2 or dtype.kind != "f":
        raise ValueError(
            f"{path} holds a {dtype} array of shape {shape}; embeddings are 2-D float16 or float32 (rows, dim)"
        )
    return int(shape[0]), int(shape[1])
