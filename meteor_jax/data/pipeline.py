"""The grain input pipeline: LLaVA records → fixed-shape feature batches, deterministic and resumable.

MapDataset.source → record→features (lazy) → feature cache (optional) → seeded shuffle (new order each epoch)
→ repeat → this process's rows of each global batch → to_iter_dataset → mp_prefetch (worker_count > 0) → drop &
count skips, count truncations → batch.

The shuffled order is global (the same on every process) and process i reads rows [i·b, (i+1)·b) of every global
batch of P·b records, so P processes with per-process batch b see exactly the global batches of one process with
batch P·b (as long as no sample is skipped: a skipped sample is replaced by the next record of the same process).

Skips travel as markers up to the main process and are dropped there, so the counts are real (not per worker)
and the order of kept samples does not depend on the number of workers. The counts are part of the iterator
state: a restored iterator continues both the batches and the counts.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np
from absl import flags, logging

from meteor_jax.data import balance as balance_lib
from meteor_jax.data import features as features_lib
from meteor_jax.data import images

SKIP_REASON = "skip_reason"  # key of the marker a skipped sample becomes
# More skips in a row than this means a broken configuration (e.g. max_len too short for every sample), not bad
# samples: raise instead of spinning forever over an infinitely repeated dataset.
MAX_CONSECUTIVE_SKIPS = 1000


class SkipCounter:
    """Samples kept, skipped (by reason) and truncated, as seen by the main process.

    Thread-safe (the training loop may read it while a prefetch thread advances the iterator). Each reason and
    the first truncation are logged once, with the sample id.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._kept = 0
            self._truncated = 0
            self._skipped: dict[str, int] = {}

    def observe(self, element: dict) -> bool:
        """Counts `element`; returns whether to keep it. Removes the `truncated` flag from kept elements."""
        if SKIP_REASON in element:
            reason = str(element[SKIP_REASON])
            with self._lock:
                first = reason not in self._skipped
                self._skipped[reason] = self._skipped.get(reason, 0) + 1
            if first:
                logging.warning("Skipping samples: %s (first: id %s, %s); further ones are counted, not logged",
                                reason, element.get("id"), element.get("detail"))
            return False
        truncated = bool(element.pop("truncated", False))
        with self._lock:
            self._kept += 1
            self._truncated += truncated
            first = truncated and self._truncated == 1
        if first:
            logging.warning("Truncating over-long samples to max_len (first one in this run); counted from now on")
        return True

    @property
    def kept(self) -> int:
        return self._kept

    @property
    def truncated(self) -> int:
        return self._truncated

    @property
    def skipped(self) -> dict[str, int]:
        with self._lock:
            return dict(self._skipped)

    def metrics(self, prefix: str = "data/") -> dict[str, int]:
        """Flat counters for the training metrics: kept, truncated, skipped (total) and skipped/<reason>."""
        with self._lock:
            out = {f"{prefix}kept": self._kept, f"{prefix}truncated": self._truncated,
                   f"{prefix}skipped": sum(self._skipped.values())}
            out.update({f"{prefix}skipped/{reason}": n for reason, n in sorted(self._skipped.items())})
        return out

    def get_state(self) -> dict[str, Any]:
        with self._lock:
            return {"kept": self._kept, "truncated": self._truncated, "skipped": dict(self._skipped)}

    def set_state(self, state: Mapping[str, Any]) -> None:
        with self._lock:
            self._kept = int(state["kept"])
            self._truncated = int(state["truncated"])
            self._skipped = {str(k): int(v) for k, v in state["skipped"].items()}

    def __repr__(self) -> str:
        return f"SkipCounter({self.get_state()})"


class _ProcessRows(grain.MapDataset):
    """Rows [index·rows, (index+1)·rows) of every block of count·rows consecutive elements of the parent; with
    `whole_blocks`, of complete blocks only (so every process gets the same number of rows)."""

    def __init__(self, parent: grain.MapDataset, index: int, count: int, rows: int, whole_blocks: bool):
        super().__init__(parent)
        self._index, self._count, self._rows = index, count, rows
        full, rest = divmod(len(parent), count * rows)
        self._length = full * rows + (0 if whole_blocks else min(max(rest - index * rows, 0), rows))

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, i: int) -> int:
        block, row = divmod(i, self._rows)
        return (block * self._count + self._index) * self._rows + row

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"ProcessRows(index={self._index}, count={self._count}, rows={self._rows})"


class RecordToFeatures:
    """LLaVA record → model features (`features.make_features`); a `SkipSample` becomes a skip marker.

    A module-level class so that grain can pickle it into worker processes (with the tokenizer).
    image_cache > 0 keeps that many decoded, resized, normalised images (S×S×3 float32, read-only, keyed by the
    encoded bytes; least recently used dropped first; per process): datasets whose conversations share images
    (easy-vqa: ten questions per image, LLaVA-Instruct: COCO images) then decode and normalise each image once
    rather than once per sample and epoch, and the samples of one image share one pixel array (which keeps the
    feature cache of `make_dataset` small). The features are the same with and without the cache.
    """

    def __init__(self, tokenizer, spec: features_lib.FeatureSpec, image_cache: int = 0):
        if image_cache < 0:
            raise ValueError(f"image_cache={image_cache} must be >= 0")
        self.tokenizer = tokenizer
        self.spec = spec
        self.image_cache = image_cache
        self._cached_pixels = (functools.lru_cache(maxsize=image_cache)(self._pixels) if image_cache
                               else self._pixels)

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_cached_pixels"]  # an lru_cache does not pickle; each worker process builds its own
        return state

    def __setstate__(self, state):
        self.__init__(state["tokenizer"], state["spec"], state["image_cache"])

    def _pixels(self, data: bytes) -> np.ndarray:
        pixels = images.load_image(data, self.spec.image_size, self.spec.image_mean, self.spec.image_std)
        pixels.flags.writeable = False  # shared by every sample of the image (and by cached features)
        return pixels

    def __call__(self, record: dict) -> dict:
        try:
            image = None
            if record.get("image_bytes") is not None:
                image = self._cached_pixels(bytes(record["image_bytes"]))
            return features_lib.make_features(record, self.tokenizer, self.spec, image=image)
        except features_lib.SkipSample as skip:
            return {SKIP_REASON: skip.reason, "id": str(record.get("id")), "detail": getattr(skip, "detail", "")}


class _FeatureCache(grain.MapDataset):
    """The parent's elements by index, the first `capacity` distinct indices read kept in memory (per process).

    It sits on the source's own indices, before the shuffle, so from the second epoch on a cached record skips
    the image decode, the template and the tokenizer. The first indices are kept rather than the most recent ones:
    a shuffled epoch visits every index once, so least-recently-used eviction would never hit with a cache smaller
    than the dataset. Elements go out as shallow copies (the skip counter pops keys); their arrays are shared, so
    nothing downstream may write into them (the pixel arrays are read-only). Worker processes start empty.
    """

    def __init__(self, parent: grain.MapDataset, capacity: int):
        super().__init__(parent)
        self._capacity = capacity
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        key = index % len(self._parent)  # grain's repeat and shuffle pass indices past the end for later epochs
        element = self._cache.get(key)
        if element is None:
            element = self._parent[index]
            if len(self._cache) < self._capacity:  # dict writes are atomic: grain's reader threads may race here
                self._cache[key] = element
        return dict(element)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"] = {}  # pickled into grain's worker processes: each fills its own
        return state

    def __str__(self) -> str:
        return f"FeatureCache(capacity={self._capacity})"


class _CountSkipsIterDataset(grain.IterDataset):
    """Drops skip markers, counting them (and truncations) into a SkipCounter; runs in the main process."""

    def __init__(self, parent: grain.IterDataset, counter: SkipCounter):
        super().__init__(parent)
        self._counter = counter

    def __iter__(self) -> grain.DatasetIterator:
        return _CountSkipsIterator(self._parent.__iter__(), self._counter)

    def __str__(self) -> str:
        return "CountSkipsIterDataset"


class _CountSkipsIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, counter: SkipCounter):
        super().__init__(parent)
        self._counter = counter
        counter.reset()  # the counter follows the latest iterator (a fresh one starts from zero)

    def __next__(self) -> dict:
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            element = next(self._parent)
            if self._counter.observe(element):
                return element
        raise RuntimeError(f"{MAX_CONSECUTIVE_SKIPS} samples in a row were skipped; counts so far: "
                           f"{self._counter.skipped}. Check the data and the FeatureSpec (max_len, template).")

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "counts": self._counter.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._counter.set_state(state["counts"])


def _mark_flags_parsed(worker_index: int, worker_count: int) -> None:
    # grain reads absl flags in its worker processes; unparsed flags (a library caller, pytest) would raise there.
    del worker_index, worker_count
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def make_dataset(source, tokenizer, spec: features_lib.FeatureSpec, *, batch_size: int, seed: int,
                 shuffle: bool = True, num_epochs: int | None = None, worker_count: int = 0, prefetch: int = 2,
                 process_index: int | None = None, process_count: int | None = None, drop_remainder: bool = True,
                 skip_counter: SkipCounter | None = None,
                 balance: Mapping[str, float] | None = None, image_cache: int = 0, feature_cache: int = 0,
                 read_threads: int = 16) -> grain.IterDataset:
    """A grain IterDataset of feature batches (dicts of stacked np arrays, no `truncated`) for this process.

    source: a random-access source of LLaVA records (`len`, `[i]`), e.g. `tfds.easy_vqa_source(...)`,
      `llava.LlavaJsonSource` or a list. batch_size is per process. num_epochs None repeats forever.
    balance: {question type: weight} (see `data/balance.py`): draw the types in these proportions instead of
      the source's (infinite stream; needs shuffle and num_epochs None). None or empty: plain shuffled epochs.
    process_index / process_count default to JAX's: this process reads rows [index·batch_size, (index+1)·batch_size)
      of each global batch of count·batch_size records in the (shared) shuffled order, so the processes together
      read what one process with batch count·batch_size would, batch by batch. (A multi-process trainer passes the
      index of its rows in the global batch, which may differ from the process index: see the trainer.)
    worker_count > 0 runs the record→features map in that many processes (`mp_prefetch`; close the iterator
      when done); 0 runs it in `read_threads` of grain's reader threads. Either way about `prefetch` batches are
      prepared ahead. image_cache: decoded images kept per process (see RecordToFeatures). feature_cache: the
      features of that many records kept per process (the first ones read; see _FeatureCache): a run of several
      epochs then prepares each record once. Memory: about 12 bytes per max_len token plus the pixels, which the
      samples of one image share when image_cache holds all images.
    The batches do not depend on worker_count. The returned dataset's `skip_counter` (the one passed in, or a new
    one) counts kept, skipped (by reason) and truncated samples of its latest iterator; the counts are part of
    the iterator state. Iterator `get_state()` is JSON-serialisable and `set_state()` resumes exactly.
    """
    if process_index is None or process_count is None:
        import jax  # only for the defaults: the pipeline itself is JAX-free

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    if batch_size < 1 or worker_count < 0 or prefetch < 1:
        raise ValueError(f"need batch_size >= 1, worker_count >= 0, prefetch >= 1; got {batch_size}, "
                         f"{worker_count}, {prefetch}")
    if feature_cache < 0:
        raise ValueError(f"feature_cache={feature_cache} must be >= 0")
    counter = skip_counter if skip_counter is not None else SkipCounter()

    ds = grain.MapDataset.source(source)
    if len(ds) == 0:
        raise ValueError("the source has no records")
    # Features are a function of the record alone, so mapping before the shuffle gives the batches of mapping after
    # it, and lets the cache key on the source's indices.
    ds = ds.map(RecordToFeatures(tokenizer, spec, image_cache))
    if feature_cache:
        ds = _FeatureCache(ds, feature_cache)
    if balance:
        # Question-type proportions (data/balance.py): each type shuffled and repeated on its own, then interleaved.
        if not shuffle or num_epochs is not None:
            raise ValueError("balance needs shuffle=True and num_epochs=None (a balanced stream has no epochs)")
        ds = balance_lib.balanced(ds, balance_lib.record_types(source), balance, seed=seed)
    else:
        if shuffle:
            ds = ds.shuffle(seed=seed)  # reseeded per epoch by repeat()
        ds = ds.repeat(num_epochs)
    if process_count > 1:
        # drop_remainder: a last global batch that is not complete is dropped on every process alike.
        ds = _ProcessRows(ds, process_index, process_count, batch_size, whole_blocks=drop_remainder)
        if len(ds) == 0:
            raise ValueError(f"process {process_index} of {process_count} got no records (source has "
                             f"{len(source)}, global batch {process_count * batch_size})")
    ahead = prefetch * batch_size  # elements; per worker when there are workers (bounds host memory)
    if worker_count > 0:
        ahead = -(-ahead // worker_count)
    if read_threads < 1:
        raise ValueError(f"read_threads={read_threads} must be >= 1")
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=read_threads,
                                              prefetch_buffer_size=max(ahead, read_threads)))
    if worker_count > 0:
        _mark_flags_parsed(0, 0)  # the main process reads grain's flags too
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=ahead),
                            worker_init_fn=_mark_flags_parsed)
    it = _CountSkipsIterDataset(it, counter)
    batched = it.batch(batch_size, drop_remainder=drop_remainder)
    batched.skip_counter = counter
    return batched


__all__ = ["RecordToFeatures", "SKIP_REASON", "SkipCounter", "make_dataset"]
