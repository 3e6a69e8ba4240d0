"""Write a dataset's questions as a LLaVA benchmark: questions.jsonl + images/ + ground_truth.jsonl.

  python -m meteor_jax.eval.export --source easy_vqa:test --out /tmp/easy_vqa_bench [--limit 1000]

The result is what `python -m meteor_jax.evaluate --benchmark easy_vqa` reads, so the demo's test split can be
scored by the same benchmark path as VQAv2 or GQA.
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterable

from absl import app, flags, logging
from PIL import Image

from meteor_jax import cli
from meteor_jax.data.templates import instruction_text
from meteor_jax.eval.answering import gold_answer


def export_benchmark(records: Iterable[dict], out_dir: str) -> dict[str, str]:
    """LLaVA records with an image and an answer → the three benchmark files; returns their paths."""
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    paths = dict(questions=os.path.join(out_dir, "questions.jsonl"), images=image_dir,
                 ground_truth=os.path.join(out_dir, "ground_truth.jsonl"))
    count = 0
    with open(paths["questions"], "w") as questions, open(paths["ground_truth"], "w") as truth:
        for record in records:
            data = record.get("image_bytes")
            if data is None:
                raise ValueError(f"record {record.get('id')!r} has no image")
            name = f"{record['id']}.{(Image.open(io.BytesIO(data)).format or 'png').lower()}"
            with open(os.path.join(image_dir, name), "wb") as f:
                f.write(data)
            questions.write(json.dumps(dict(question_id=record["id"], image=name,
                                            text=instruction_text(record["conversations"]))) + "\n")
            truth.write(json.dumps(dict(question_id=record["id"], answer=gold_answer(record))) + "\n")
            count += 1
    logging.info("exported %d questions to %s", count, out_dir)
    return paths


def main(argv):
    cli.setup_logging()
    del argv
    from meteor_jax.data import tfds as tfds_lib

    flags_ = flags.FLAGS
    kind, _, split = flags_.source.partition(":")
    if kind != "easy_vqa":
        raise app.UsageError(f"--source {flags_.source!r}: only easy_vqa:SPLIT can be exported")
    source = tfds_lib.easy_vqa_source(split or "test", flags_.data_dir or os.path.join(flags_.out, "tfds"))
    n = len(source) if flags_.limit < 0 else min(flags_.limit, len(source))
    export_benchmark((source[i] for i in range(n)), flags_.out)


if __name__ == "__main__":
    flags.DEFINE_string("source", "easy_vqa:test", "The dataset split to export (easy_vqa:SPLIT).")
    flags.DEFINE_string("out", None, "Output directory.", required=True)
    flags.DEFINE_string("data_dir", "", "tfds data dir (default: OUT/tfds).")
    flags.DEFINE_integer("limit", -1, "Export at most this many questions (-1: all).")
    app.run(main)
