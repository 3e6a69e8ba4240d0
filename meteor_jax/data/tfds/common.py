"""Shared helpers of the tfds builders: the LLaVA-record view over a tfds data source."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils


class LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base of our builders: data comes from local files only (never a download)."""

    # tfds 4.9.10 resolves `code_path` of a builder inside a package through `importlib_resources`, a backport it
    # only installs on Python < 3.9, so it fails on 3.11; the file of the class is all tfds needs (checksums.tsv).
    @tfds_utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(inspect.getfile(cls))


def text(value: Any) -> str:
    """tfds returns Text features as bytes when reading without TensorFlow."""
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class LlavaRecords:
    """A grain RandomAccessDataSource: `len`, `[i]` → LLaVA record ({id, conversations, image_bytes or None}).

    Wraps a tfds ArrayRecord data source and an adapter; picklable (grain worker processes get a copy).
    """

    def __init__(self, source: Sequence[dict], to_record: Callable[[dict], dict]):
        self._source = source
        self._to_record = to_record

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        return self._to_record(self._source[index])

    def __repr__(self) -> str:
        return f"LlavaRecords({self._source!r})"
