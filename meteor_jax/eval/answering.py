"""Questions in, answers out: LLaVA question files or records → batched generation → LLaVA answer-file records.

A question file is LLaVA's JSON lines format, one `{"question_id", "image", "text", ...}` per line, the image
named relative to an image folder. An answer record is LLaVA's answer-file format:
`{"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}`.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from typing import Callable, Iterable, Sequence

import numpy as np
from absl import logging

from meteor_jax import paths
from meteor_jax.data import features as features_lib
from meteor_jax.data.images import load_image
from meteor_jax.data.templates import instruction_text

Generator = Callable[[dict], tuple[np.ndarray, np.ndarray]]  # batch → (tokens (B, N), lengths (B,))
IMAGE_TOKEN = "<image>"


def with_suffix(text: str, suffix: str) -> str:
    """LLaVA's benchmark prompt: the question, a newline, the suffix. Many of LLaVA's question files already carry
    the suffix; it is never added twice."""
    text = text.rstrip()
    if not suffix or text.endswith(suffix.strip()):
        return text
    return f"{text}\n{suffix}"


def prompt_conversation(text: str, has_image: bool) -> list[dict]:
    """One user turn (the image placeholder first, as LLaVA puts it) and an empty assistant turn to fill."""
    value = f"{IMAGE_TOKEN}\n{text}" if has_image and IMAGE_TOKEN not in text else text
    return [{"from": "human", "value": value}, {"from": "gpt", "value": ""}]


def read_questions(path: str, image_folder: str | None,
                   prompt_suffix: str | Callable[[dict], str] = "") -> list[dict]:
    """Records ({id, image, conversations}) from a LLaVA question file; `image` is the full path or None.
    `prompt_suffix` is a string or a function of the question line (MMMU's depends on the question type)."""
    suffix = prompt_suffix if callable(prompt_suffix) else lambda _: prompt_suffix
    records, seen = [], set()
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not JSON ({e})") from None
            missing = [k for k in ("question_id", "text") if k not in q]
            if missing:
                raise ValueError(f"{path}:{line_no}: question without {missing}")
            if str(q["question_id"]) in seen:
                raise ValueError(f"{path}:{line_no}: duplicate question_id {q['question_id']!r}")
            seen.add(str(q["question_id"]))
            image = q.get("image")
            if image is not None:
                if image_folder is None:
                    raise ValueError(f"{path}:{line_no}: the question names image {image!r}: pass an image folder")
                image = os.path.join(image_folder, image)
            records.append(dict(id=q["question_id"], image=image,
                                conversations=prompt_conversation(with_suffix(q["text"], suffix(q)),
                                                                  image is not None)))
    if not records:
        raise ValueError(f"{path}: no questions")
    logging.info("read %d questions from %s", len(records), path)
    return records


def gold_answer(record: dict) -> str:
    """The first assistant turn of a LLaVA record (the reference answer)."""
    for turn in record["conversations"]:
        if turn["from"] in ("gpt", "assistant"):
            return turn["value"]
    raise ValueError(f"record {record.get('id')!r} has no assistant turn")


def prompt_record(record: dict) -> dict:
    """The record up to (without) its first answer: what the model is asked."""
    turns = []
    for turn in record["conversations"]:
        if turn["from"] in ("gpt", "assistant"):
            break
        turns.append(turn)
    return dict(record, conversations=turns + [{"from": "gpt", "value": ""}])


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the first stop string."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=len(text))
    return text[:cut]


def prompt_features(record: dict, tokenizer, spec: features_lib.FeatureSpec) -> dict[str, np.ndarray]:
    """The generation features of a record, its image read from `image_bytes` or the `image` path (SkipSample when
    the image is missing or corrupt, or the prompt too long)."""
    source = record.get("image_bytes")
    if source is None:
        source = record.get("image")
    image = None if source is None else load_image(source, spec.image_size, spec.image_mean, spec.image_std)
    return features_lib.make_prompt_features(record, tokenizer, spec, image=image)


def prompt_batch(source, tokenizer, spec: features_lib.FeatureSpec, rows: int) -> dict[str, np.ndarray]:
    """The prompts of `source`'s first `rows` records (cycled when it has fewer) as one generation batch: a real
    batch for speed measurements."""
    features = [prompt_features(prompt_record(source[i % len(source)]), tokenizer, spec) for i in range(rows)]
    return {k: np.stack([f[k] for f in features]) for k in features[0]}


def answer_records(
    generate: Generator,
    records: Iterable[dict],
    tokenizer,
    spec: features_lib.FeatureSpec,
    *,
    batch_size: int,
    stop: Sequence[str] = (),
    model_id: str = "meteor-jax",
    progress_every: int = 20,
) -> list[dict]:
    """LLaVA answer records for every record, in order. Prompts are left-padded to spec.max_len; the last batch is
    filled with copies of its first row (static shapes) whose answers are dropped. A record that cannot be
    prompted (image missing or corrupt, prompt too long) is answered with "" and `metadata.skipped` says why, so a
    score still counts it as a question."""
    results: list[dict | None] = []
    rows, pending = [], []
    start, batches, answered = time.perf_counter(), 0, 0

    def answer(meta, text, **metadata):
        return dict(question_id=meta["id"], prompt=meta["prompt"], text=text, answer_id=uuid.uuid4().hex,
                    model_id=model_id, metadata=metadata)

    def flush():
        nonlocal batches, answered
        real = len(rows)
        batch = {k: np.stack([r[k] for r in rows] + [rows[0][k]] * (batch_size - real)) for k in rows[0]}
        tokens, lengths = generate(batch)
        for (index, meta), toks, n in zip(pending, tokens[:real], lengths[:real]):
            ids = [int(t) for t in toks[:int(n)] if int(t) != tokenizer.eos_id]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            results[index] = answer(meta, cut_at_stop(text, stop).strip())
            answered += 1
        rows.clear()
        pending.clear()
        batches += 1
        if progress_every and batches % progress_every == 0:
            logging.info("answered %d questions (%.0f/s)", answered, answered / (time.perf_counter() - start))

    for record in records:
        meta = dict(id=record.get("id"), prompt=instruction_text(record["conversations"]))
        try:
            rows.append(prompt_features(record, tokenizer, spec))
        except features_lib.SkipSample as e:
            logging.warning("question %r: %s: answered as empty", meta["id"], e)
            results.append(answer(meta, "", skipped=e.reason))
            continue
        pending.append((len(results), meta))
        results.append(None)  # filled when its batch is generated
        if len(rows) == batch_size:
            flush()
    if rows:
        flush()
    return results


def write_answers(answers: Sequence[dict], path: paths.PathLike) -> None:
    """One JSON line per answer, at a local path or a URL (gs://bucket/run/answers.jsonl)."""
    path = paths.workdir_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(a) + "\n" for a in answers))
