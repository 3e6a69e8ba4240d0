"""easy_vqa as a tfds ArrayRecord dataset, built offline from the installed `easy-vqa` package."""

from __future__ import annotations

import dataclasses
import os

import easy_vqa as easy_vqa_pkg
import numpy as np
import tensorflow_datasets as tfds

from meteor_jax.data.tfds.common import LlavaRecords, LocalBuilder, text

_SPLITS = {
    "train": (easy_vqa_pkg.get_train_questions, easy_vqa_pkg.get_train_image_paths),
    "test": (easy_vqa_pkg.get_test_questions, easy_vqa_pkg.get_test_image_paths),
}


@dataclasses.dataclass
class EasyVqaConfig(tfds.core.BuilderConfig):
    """`max_examples`: keep only the first N questions of each split (fast builds for tests); None = all."""

    max_examples: int | None = None


class EasyVqa(LocalBuilder):
    """easy-vqa: 64x64 PNG shapes, one question and a one-word answer per example."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    BUILDER_CONFIGS = [EasyVqaConfig(name="full", description="All questions.")]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="easy-vqa (github.com/vzhou842/easy-VQA): synthetic shapes with questions about them.",
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                # Raw PNG bytes, decoded by the pipeline (tfds' Image feature would decode at read time).
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),
                "question": tfds.features.Text(),
                "answer": tfds.features.Text(),
                "image_id": tfds.features.Scalar(dtype=np.int64),
            }),
            homepage="https://github.com/vzhou842/easy-VQA",
            # Keep the package's order (questions grouped by image), so a slice such as "train[90%:]" holds out
            # whole images: a fair validation split. The pipeline shuffles anyway.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # everything is in the installed package
        return {split: self._generate_examples(split) for split in _SPLITS}

    def _generate_examples(self, split: str):
        get_questions, get_image_paths = _SPLITS[split]
        questions, answers, image_ids = get_questions()
        image_paths = get_image_paths()
        n = len(questions) if self.builder_config.max_examples is None else self.builder_config.max_examples
        png_cache: dict[int, bytes] = {}  # ~10 questions per image: read each file once
        for index in range(min(n, len(questions))):
            image_id = int(image_ids[index])
            if image_id not in png_cache:
                with open(image_paths[image_id], "rb") as f:
                    png_cache[image_id] = f.read()
            example_id = f"{split}_{index:05d}"
            yield index, {
                "id": example_id,
                "image": png_cache[image_id],
                "question": questions[index],
                "answer": answers[index],
                "image_id": image_id,
            }


def to_llava_record(example: dict) -> dict:
    """An easy_vqa example (as read from the data source) → a LLaVA record."""
    return {
        "id": text(example["id"]),
        "conversations": [
            {"from": "human", "value": "<image>\n" + text(example["question"])},
            {"from": "gpt", "value": text(example["answer"])},
        ],
        "image_bytes": bytes(example["image"]),
    }


def easy_vqa_builder(data_dir: str | os.PathLike, *, max_examples: int | None = None) -> EasyVqa:
    """The builder, prepared in `data_dir` on first use (a few seconds; all local)."""
    if max_examples is None:
        builder = EasyVqa(data_dir=os.fspath(data_dir), config="full")
    else:
        config = EasyVqaConfig(name=f"first_{max_examples}", max_examples=max_examples,
                               description=f"The first {max_examples} questions of each split.")
        builder = EasyVqa(data_dir=os.fspath(data_dir), config=config)
    builder.download_and_prepare(file_format="array_record")
    return builder


def easy_vqa_source(split: str, data_dir: str | os.PathLike, *, max_examples: int | None = None) -> LlavaRecords:
    """Random-access source of LLaVA records for `split` ("train", "test", or a tfds slice like "train[:10%]")."""
    builder = easy_vqa_builder(data_dir, max_examples=max_examples)
    return LlavaRecords(builder.as_data_source(split=split), to_llava_record)
