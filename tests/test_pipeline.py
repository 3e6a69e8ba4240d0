"""The tfds builders (easy_vqa from the installed package, llava_* from a manual dir) and the grain pipeline:
exact counts and round trips, determinism, per-epoch/per-process coverage, resumable iterator state
(in-process and with worker processes), counted skips and truncations."""
import collections
import hashlib
import io
import json
import logging
import pathlib
import sys
import threading

import easy_vqa as easy_vqa_pkg
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from meteor_jax.data import images, pipeline
from meteor_jax.data import tfds as our_tfds
from meteor_jax.data.features import FeatureSpec
from meteor_jax.data.templates import VICUNA_SYSTEM
from meteor_jax.data.tokenizer import train_word_tokenizer

SPEC = FeatureSpec(max_len=64, instruction_len=16, num_image_tokens=4, image_size=16, template="vicuna_v1")


@pytest.fixture(scope="module")
def easy_vqa_dir(easy_vqa_data_dir):
    return pathlib.Path(easy_vqa_data_dir)  # the full build, once for the suite (conftest)


@pytest.fixture(scope="module")
def tokenizer():
    questions, answers, _ = easy_vqa_pkg.get_train_questions()
    return train_word_tokenizer(questions + answers + [VICUNA_SYSTEM, "USER: ASSISTANT:"])


@pytest.fixture(scope="module")
def records(easy_vqa_dir):
    """40 real easy_vqa test records as a plain list (a valid grain source), with unique features."""
    source = our_tfds.easy_vqa_source("test[:40]", easy_vqa_dir)
    return [source[i] for i in range(len(source))]


@pytest.fixture(scope="module")
def mixed_records(records):
    """The records with a corrupt image (3), two placeholders (7), an over-long answer (11), a text-only one (15)."""
    mixed = [dict(r) for r in records]
    mixed[3]["image_bytes"] = b"\x89PNG\r\n\x1a\n but not an image"
    mixed[7]["conversations"] = [{"from": "human", "value": "<image>\n<image>\nwhat shape is it?"},
                                 {"from": "gpt", "value": "circle"}]
    mixed[11]["conversations"] = [mixed[11]["conversations"][0], {"from": "gpt", "value": " ".join(["yes"] * 60)}]
    mixed[15] = {"id": "text_only", "image_bytes": None,
                 "conversations": [{"from": "human", "value": "is there a circle?"}, {"from": "gpt", "value": "no"}]}
    return mixed


def _fingerprint(tokens, pixels) -> str:
    return hashlib.sha1(np.ascontiguousarray(tokens).tobytes() + np.ascontiguousarray(pixels).tobytes()).hexdigest()


def _record_fingerprints(records, tokenizer):
    to_features = pipeline.RecordToFeatures(tokenizer, SPEC)
    return [_fingerprint(f["tokens"], f["pixels"]) for f in map(to_features, records)]


def _rows(batches):
    return [_fingerprint(b["tokens"][i], b["pixels"][i]) for b in batches for i in range(len(b["tokens"]))]


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_easy_vqa_builder_counts_and_round_trip(easy_vqa_dir):
    builder = our_tfds.easy_vqa_builder(easy_vqa_dir)  # already built: reused
    assert builder.info.splits["train"].num_examples == 38575
    assert builder.info.splits["test"].num_examples == 9673
    for split, (get_questions, get_paths) in {
            "train": (easy_vqa_pkg.get_train_questions, easy_vqa_pkg.get_train_image_paths),
            "test": (easy_vqa_pkg.get_test_questions, easy_vqa_pkg.get_test_image_paths)}.items():
        questions, answers, image_ids = get_questions()
        paths = get_paths()
        source = builder.as_data_source(split=split)
        assert len(source) == len(questions)
        for index in np.random.default_rng(0).choice(len(questions), 25, replace=False).tolist() + [0, -1]:
            index %= len(questions)
            example = source[index]  # stored in the package's order
            assert example["id"].decode() == f"{split}_{index:05d}"
            assert example["question"].decode() == questions[index]
            assert example["answer"].decode() == answers[index]
            assert example["image_id"] == image_ids[index]
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(example["image"]))),
                                          np.asarray(Image.open(paths[image_ids[index]])))
            record = our_tfds.to_llava_record(example)
            assert record["conversations"] == [{"from": "human", "value": "<image>\n" + questions[index]},
                                               {"from": "gpt", "value": answers[index]}]
            assert record["image_bytes"] == example["image"]
    # Registered by name with tfds; readable without TensorFlow (which must never have been imported).
    assert len(tfds.data_source("easy_vqa", data_dir=str(easy_vqa_dir), split="test")) == 9673
    assert "tensorflow" not in sys.modules


def test_easy_vqa_subset_build(tmp_path):
    source = our_tfds.easy_vqa_source("train", tmp_path, max_examples=30)
    questions, _, _ = easy_vqa_pkg.get_train_questions()
    assert [source[i]["id"] for i in range(len(source))] == [f"train_{i:05d}" for i in range(30)]
    assert [source[i]["conversations"][0]["value"] for i in range(30)] == ["<image>\n" + q for q in questions[:30]]
    assert len(our_tfds.easy_vqa_source("test", tmp_path, max_examples=30)) == 30


def test_pipeline_deterministic_and_each_record_once_per_epoch(records, tokenizer):
    expected = _record_fingerprints(records, tokenizer)
    assert len(set(expected)) == len(records)  # precondition: rows identify records

    def epochs(seed):
        ds = pipeline.make_dataset(records, tokenizer, SPEC, batch_size=4, seed=seed, num_epochs=2,
                                   process_index=0, process_count=1)
        rows = _rows(list(ds))
        return rows[:40], rows[40:]

    first, second = epochs(seed=0)
    assert sorted(first) == sorted(expected) and sorted(second) == sorted(expected)
    assert first != second  # a new order each epoch
    assert epochs(seed=0) == (first, second)
    assert epochs(seed=1)[0] != first
    unshuffled = pipeline.make_dataset(records, tokenizer, SPEC, batch_size=4, seed=0, shuffle=False, num_epochs=1)
    assert _rows(unshuffled) == expected


def test_process_shards_split_the_global_batches(records, tokenizer):
    """2 processes × batch 2 read exactly the batches of 1 process × batch 4, each process its half, in order."""
    expected = _record_fingerprints(records, tokenizer)
    single = [_rows([b]) for b in pipeline.make_dataset(records, tokenizer, SPEC, batch_size=4, seed=3, num_epochs=1,
                                                         process_index=0, process_count=1)]
    shards = [[_rows([b]) for b in pipeline.make_dataset(records, tokenizer, SPEC, batch_size=2, seed=3, num_epochs=1,
                                                          process_index=i, process_count=2)]
              for i in range(2)]
    assert len(single) == len(shards[0]) == len(shards[1]) == 10
    assert [a + b for a, b in zip(*shards)] == single
    assert sorted(r for shard in shards for batch in shard for r in batch) == sorted(expected)
    with pytest.raises(ValueError, match="process_index"):
        pipeline.make_dataset(records, tokenizer, SPEC, batch_size=2, seed=3, process_index=2, process_count=2)


def test_skips_and_truncations_are_counted(mixed_records, tokenizer, caplog):
    counter = pipeline.SkipCounter()
    ds = pipeline.make_dataset(mixed_records, tokenizer, SPEC, batch_size=4, seed=0, shuffle=False, num_epochs=1,
                               drop_remainder=False, skip_counter=counter)
    assert ds.skip_counter is counter
    with caplog.at_level(logging.WARNING):
        batches = list(ds)
    kept = [r for i, r in enumerate(mixed_records) if i not in (3, 7)]
    assert _rows(batches) == _record_fingerprints(kept, tokenizer)  # the rest, in order
    assert "truncated" not in batches[0]
    assert counter.skipped == {"corrupt image": 1, "multiple image placeholders": 1}
    assert (counter.kept, counter.truncated) == (38, 1)
    assert counter.metrics() == {"data/kept": 38, "data/truncated": 1, "data/skipped": 2,
                                 "data/skipped/corrupt image": 1, "data/skipped/multiple image placeholders": 1}
    logged = caplog.text
    assert "corrupt image" in logged and "multiple image placeholders" in logged and "Truncating" in logged
    text_row = 15 - 2  # after the two skipped records
    rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
    assert not rows["image_mask"][text_row].any() and not rows["pixels"][text_row].any()
    assert rows["image_mask"].sum(axis=1).tolist().count(SPEC.num_image_tokens) == 37


def test_all_samples_skipped_raises(mixed_records, tokenizer, monkeypatch):
    monkeypatch.setattr(pipeline, "MAX_CONSECUTIVE_SKIPS", 50)  # the real limit (1000) only takes longer
    broken = [dict(mixed_records[3], id=f"broken{i}") for i in range(5)]
    ds = pipeline.make_dataset(broken, tokenizer, SPEC, batch_size=2, seed=0)  # repeats forever
    with pytest.raises(RuntimeError, match="in a row were skipped.*corrupt image"):
        next(iter(ds))


def test_iterator_state_round_trip(mixed_records, tokenizer):
    def make():
        return pipeline.make_dataset(mixed_records, tokenizer, SPEC, batch_size=4, seed=5)  # 9 batches per epoch

    ds = make()
    iterator = iter(ds)
    _take(iterator, 7)
    state = json.loads(json.dumps(iterator.get_state()))  # as a checkpoint stores it
    counts = ds.skip_counter.get_state()
    expected = _take(iterator, 6)  # across the epoch boundary
    resumed_ds = make()
    resumed = iter(resumed_ds)
    resumed.set_state(state)
    assert resumed_ds.skip_counter.get_state() == counts
    _assert_same_batches(_take(resumed, 6), expected)
    assert resumed_ds.skip_counter.get_state() == ds.skip_counter.get_state()


def test_image_cache_decodes_each_image_once_and_changes_nothing(mixed_records, tokenizer, monkeypatch):
    # Ten samples over three distinct images, plus the corrupt one (a skip every time: failures are not cached).
    distinct = list({r["image_bytes"]: r for r in mixed_records[:3] + mixed_records[4:] if r["image_bytes"]}.values())
    records = [dict(distinct[i % 3], id=f"s{i}") for i in range(10)] + [mixed_records[3]]
    assert len({r["image_bytes"] for r in records}) == 4
    decoded = []
    real_decode = images.decode_image
    # Only this thread's decodes: earlier tests' iterators leave grain prefetch threads that may still be decoding.
    here = threading.get_ident()

    def counting_decode(source):
        if threading.get_ident() == here:
            decoded.append(source)
        return real_decode(source)

    monkeypatch.setattr(images, "decode_image", counting_decode)
    plain = [pipeline.RecordToFeatures(tokenizer, SPEC)(r) for r in records]
    assert len(decoded) == len(records)
    decoded.clear()
    to_features = pipeline.RecordToFeatures(tokenizer, SPEC, image_cache=2)
    cached = [to_features(r) for r in records + records[:3]]
    # Three images in a cache of two, visited 0,1,2,0,1,2,0,1,2,0: least-recently-used eviction misses all ten;
    # the corrupt one decodes (and fails); then 0 hits (held with 2) and 1, 2 miss again.
    assert len(decoded) == 10 + 1 + 2
    to_features = pipeline.RecordToFeatures(tokenizer, SPEC, image_cache=8)
    decoded.clear()
    cached = [to_features(r) for r in records + records[:3]]
    assert len(decoded) == 3 + 1  # three images once, the corrupt one (not cached) once
    for want, got in zip(plain + plain[:3], cached):
        assert want.keys() == got.keys()
        for key in set(want) - {"detail"}:  # a skip's detail names a BytesIO object's address
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    assert cached[-4][pipeline.SKIP_REASON] == "corrupt image"
    with pytest.raises(ValueError, match="image_cache"):
        pipeline.RecordToFeatures(tokenizer, SPEC, image_cache=-1)


def test_feature_cache_prepares_each_record_once_and_changes_nothing(mixed_records, tokenizer, monkeypatch):
    """Three epochs with the cache: the batches and the skip/truncation counts of the uncached pipeline; each
    cached record is prepared once (the capacity bounds how many); a resumed iterator still gives the same."""
    from meteor_jax.data import features

    def make(feature_cache, **kwargs):
        return pipeline.make_dataset(mixed_records, tokenizer, SPEC, batch_size=4, seed=4, num_epochs=3,
                                     read_threads=1, feature_cache=feature_cache, **kwargs)

    prepared = []
    real_make_features = features.make_features

    def counting_make_features(record, *args, **kwargs):
        prepared.append(record["id"])
        return real_make_features(record, *args, **kwargs)

    monkeypatch.setattr(features, "make_features", counting_make_features)
    plain = make(0)
    expected = list(plain)
    assert len(expected) == 28  # 3 × 38 kept samples, batches of 4, the remainder dropped
    assert len(prepared) == 3 * 39  # every record but the corrupt image (skipped before make_features), 3 epochs
    for capacity in (1000, 10):
        prepared.clear()
        cached = make(capacity)
        _assert_same_batches(list(cached), expected)
        assert cached.skip_counter.get_state() == plain.skip_counter.get_state()  # truncations counted every epoch
        # Cached records are prepared once, the others once per epoch. The cache holds the first `capacity` records
        # read, skips included: the corrupt image, if among them, takes a place without reaching make_features.
        times = collections.Counter(prepared)
        assert len(times) == 39 and set(times.values()) <= {1, 3}
        once = sum(n == 1 for n in times.values())
        assert once == 39 if capacity > 40 else once in (capacity - 1, capacity)
    prepared.clear()
    cached = make(1000)
    iterator = iter(cached)
    _take(iterator, 12)  # into the second epoch, served from the cache
    state = json.loads(json.dumps(iterator.get_state()))
    resumed = iter(make(1000))
    resumed.set_state(state)
    _assert_same_batches(list(resumed), expected[12:])
    with pytest.raises(ValueError, match="feature_cache"):
        make(-1)


def test_worker_processes_same_batches_and_resume(mixed_records, tokenizer):
    def make(worker_count, image_cache=0):
        return pipeline.make_dataset(mixed_records, tokenizer, SPEC, batch_size=4, seed=2, num_epochs=1,
                                     worker_count=worker_count, image_cache=image_cache)

    reference = make(0)
    expected = list(reference)
    assert len(expected) == 9  # 38 kept, remainder dropped
    first = iter(make(2, image_cache=8))  # the decoded-image cache pickles into the workers
    try:
        _assert_same_batches(_take(first, 4), expected[:4])  # same order as in-process: skips drop in the main
        state = json.loads(json.dumps(first.get_state()))
    finally:
        first.close()
    resumed_ds = make(2)
    resumed = iter(resumed_ds)
    try:
        resumed.set_state(state)
        _assert_same_batches(list(resumed), expected[4:])
    finally:
        resumed.close()
    assert resumed_ds.skip_counter.get_state() == reference.skip_counter.get_state()
    assert resumed_ds.skip_counter.skipped == {"corrupt image": 1, "multiple image placeholders": 1}


@pytest.mark.parametrize("name,image_root", [("llava_instruct", "."), ("llava_pretrain", "images")])
def test_llava_builder_from_manual_dir(tmp_path, tokenizer, caplog, name, image_root):
    manual = tmp_path / "manual"
    rng = np.random.default_rng(0)
    (manual / image_root / "coco").mkdir(parents=True)
    image_files = {}
    for i in range(3):
        path = manual / image_root / "coco" / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (12, 9 + i, 3), dtype=np.uint8)).save(path)
        image_files[f"s{i}"] = path.read_bytes()
    samples = [{"id": f"s{i}", "image": f"coco/{i}.png",
                "conversations": [{"from": "human", "value": f"<image>\nwhat is in image {i}?"},
                                  {"from": "gpt", "value": "a blue circle"}]} for i in range(3)]
    samples.insert(1, {"id": "gone", "image": "coco/missing.png",
                       "conversations": [{"from": "human", "value": "<image>\nwhat?"}, {"from": "gpt", "value": "x"}]})
    samples.append({"id": "chat", "conversations": [{"from": "human", "value": "hello there"},
                                                    {"from": "gpt", "value": "is there a circle?"},
                                                    {"from": "human", "value": "yes"},
                                                    {"from": "gpt", "value": "no"}]})
    json_name = our_tfds.llava.BUILDERS[name].JSON_NAME
    (manual / json_name).write_text(json.dumps(samples))

    with caplog.at_level(logging.WARNING):
        source = our_tfds.llava_source(name, tmp_path / "data", manual)
    assert "coco/missing.png is missing" in caplog.text
    assert our_tfds.llava_builder(name, tmp_path / "data").info.metadata["missing_images"] == {"train": 1}
    by_id = {source[i]["id"]: source[i] for i in range(len(source))}
    assert sorted(by_id) == ["chat", "s0", "s1", "s2"]
    for sample in samples:
        if sample["id"] == "gone":
            continue
        record = by_id[sample["id"]]
        assert record["conversations"] == sample["conversations"]
        assert record["image_bytes"] == image_files.get(sample["id"])  # None for the text-only sample
        assert record.get("image") == sample.get("image")

    ds = pipeline.make_dataset(source, tokenizer, SPEC, batch_size=1, seed=0, num_epochs=1)
    rows = list(ds)
    assert len(rows) == 4 and ds.skip_counter.skipped == {}
    assert sorted(int(r["image_mask"].sum()) for r in rows) == [0, 4, 4, 4]

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("not the json")
    with pytest.raises(FileNotFoundError, match=json_name):
        our_tfds.llava_builder(name, tmp_path / "data2", tmp_path / "empty")


def test_skip_counter_state_and_logging_once(caplog):
    counter = pipeline.SkipCounter()
    with caplog.at_level(logging.WARNING):
        for i in range(3):
            assert not counter.observe({pipeline.SKIP_REASON: "corrupt image", "id": f"x{i}"})
    assert caplog.text.count("corrupt image") == 1 and "x0" in caplog.text
    assert counter.observe({"tokens": np.zeros(2), "truncated": np.bool_(True)})
    restored = pipeline.SkipCounter()
    restored.set_state(json.loads(json.dumps(counter.get_state())))
    assert restored.metrics() == counter.metrics() == {
        "data/kept": 1, "data/truncated": 1, "data/skipped": 3, "data/skipped/corrupt image": 3}
