"""Answer questions by batched greedy generation and score them by exact match (easy-vqa)."""
from __future__ import annotations

import re
import time
from typing import Callable, Iterable, Sequence

import numpy as np
from absl import logging

from meteor_jax.data import features as features_lib
from meteor_jax.data.images import load_image
from meteor_jax.data.templates import instruction_text

Generator = Callable[[dict], tuple[np.ndarray, np.ndarray]]  # batch → (tokens (B, L), lengths (B,))


def normalize_answer(text: str) -> str:
    """Lowercase, collapse whitespace, drop trailing punctuation: "Red." and " red" both match "red"."""
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(".!?,;: ")


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


def answer_records(
    generate: Generator,
    records: Iterable[dict],
    tokenizer,
    spec: features_lib.FeatureSpec,
    *,
    batch_size: int,
    progress_every: int = 20,
) -> list[dict]:
    """[{id, question, prediction, answer}] for every record. Prompts are left-padded to spec.max_len; the last
    batch is filled with copies of its first row (static shapes) whose answers are dropped. A record whose image
    cannot be read is answered with "" and flagged `skipped`, so the score still counts it."""
    results, rows, pending = [], [], []
    start, batches = time.perf_counter(), 0

    def flush():
        nonlocal batches
        real = len(rows)
        batch = {k: np.stack([r[k] for r in rows] + [rows[0][k]] * (batch_size - real)) for k in rows[0]}
        tokens, lengths = generate(batch)
        for meta, toks, n in zip(pending, np.asarray(tokens)[:real], np.asarray(lengths)[:real]):
            ids = [int(t) for t in toks[:int(n)] if int(t) != tokenizer.eos_id]
            results.append(dict(meta, prediction=tokenizer.decode(ids, skip_special_tokens=True).strip()))
        rows.clear()
        pending.clear()
        batches += 1
        if progress_every and batches % progress_every == 0:
            logging.info("answered %d questions (%.0f/s)", len(results), len(results) / (time.perf_counter() - start))

    for record in records:
        meta = dict(id=record.get("id"), question=instruction_text(record["conversations"]),
                    answer=gold_answer(record))
        try:
            image = None
            if record.get("image_bytes") is not None:
                image = load_image(record["image_bytes"], spec.image_size, spec.image_mean, spec.image_std)
            rows.append(features_lib.make_prompt_features(prompt_record(record), tokenizer, spec, image=image))
        except features_lib.SkipSample as e:
            logging.warning("evaluation: %s (%s): answered as empty", e.reason, meta["id"])
            results.append(dict(meta, prediction="", skipped=e.reason))
            continue
        pending.append(meta)
        if len(rows) == batch_size:
            flush()
    if rows:
        flush()
    return results


def exact_match(results: Sequence[dict]) -> float:
    if not results:
        raise ValueError("no results to score")
    return float(np.mean([normalize_answer(r["prediction"]) == normalize_answer(r["answer"]) for r in results]))
