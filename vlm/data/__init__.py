"""The data layer: every verb opens its images, texts and labels here, so all of them take the same
sources with the same flags and the same errors.

- `tables`: one reader for CSV, TSV, JSON Lines, JSON and Parquet (and list files), one image-path rule.
- `hf`: one Hugging Face dataset spec (``hf:NAME_OR_DIR``, a split), images read undecoded.
- `columns`: one vocabulary of column names (image, text, label) with one picker and one error.
- `collection`: one image-collection type (files, folders, list files, tables, datasets, optional texts).
- `labels`: labelled images (class folders, tables, datasets) and the one label rule.
- `batches`: decoding collections in DataLoader workers, skipping and counting unreadable images.
"""

from .batches import (
    IMAGE_EXTENSIONS,
    Failure,
    FailureLog,
    ImageBatch,
    ImageDataset,
    collate_images,
    find_images,
    iter_image_batches,
)
from .collection import (
    ImageCollection,
    Subset,
    image_files,
    is_inside_folder,
    is_tar_spec,
    only_for_training,
    open_images,
    source_kind,
)
from .columns import COLUMN_ROLES, ColumnRole, pick_column
from .hf import HF_PREFIX, HFImageColumn, is_hf_dataset, is_hf_spec, is_saved_hf_dataset, load_hf_dataset
from .labels import LabelledImages, label_ids, labelled_folder, labelled_hf_dataset, labelled_table, open_labelled
from .tables import LIST_SUFFIXES, TABLE_SUFFIXES, Table, is_table, read_table

__all__ = [
    "collate_images",
    "COLUMN_ROLES",
    "ColumnRole",
    "Failure",
    "FailureLog",
    "find_images",
    "HF_PREFIX",
    "HFImageColumn",
    "IMAGE_EXTENSIONS",
    "image_files",
    "ImageBatch",
    "ImageCollection",
    "ImageDataset",
    "is_hf_dataset",
    "is_hf_spec",
    "is_inside_folder",
    "is_saved_hf_dataset",
    "is_table",
    "is_tar_spec",
    "iter_image_batches",
    "label_ids",
    "labelled_folder",
    "labelled_hf_dataset",
    "labelled_table",
    "LabelledImages",
    "LIST_SUFFIXES",
    "load_hf_dataset",
    "only_for_training",
    "open_images",
    "open_labelled",
    "pick_column",
    "read_table",
    "source_kind",
    "Subset",
    "Table",
    "TABLE_SUFFIXES",
]
