"""LLaVA training data as tfds ArrayRecord datasets, built from a manual dir (LLaVA JSON + image folders).

Samples without an image are kept (text-only). A sample whose image file is missing is skipped, logged and
counted; the counts per split are saved in the dataset's metadata (`builder.info.metadata["missing_images"]`).
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from meteor_jax.data.tfds.common import LlavaRecords, LocalBuilder, text

# Missing images are logged one by one up to this many, then every `_LOG_EVERY`-th.
_LOG_FIRST = 20
_LOG_EVERY = 1000


class _LlavaJsonBuilder(LocalBuilder, skip_registration=True):
    """A LLaVA-format JSON (`[{id, image?, conversations: [{from, value}]}]`) with images under a folder."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Initial release."}
    JSON_NAME: str
    IMAGE_ROOT: str  # relative to the manual dir; the JSON's image paths are relative to it

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.__doc__,
            features=tfds.features.FeaturesDict({
                "id": tfds.features.Text(),
                "image": tfds.features.Text(),  # path relative to the image root; "" for text-only samples
                "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),  # b"" for text-only samples
                "conversations": tfds.features.Text(),  # the JSON list [{from, value}, ...], verbatim
            }),
            homepage="https://github.com/haotian-liu/LLaVA",
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        json_path = dl_manager.manual_dir / self.JSON_NAME
        if not json_path.exists():
            raise FileNotFoundError(f"{self.name}: {json_path} not found.\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}")
        return {"train": self._generate_examples(json_path, dl_manager.manual_dir / self.IMAGE_ROOT, "train")}

    def _generate_examples(self, json_path, image_root, split: str):
        with open(json_path, encoding="utf-8") as f:
            samples = json.load(f)
        missing = 0
        for index, sample in enumerate(samples):
            image = sample.get("image") or ""
            image_bytes = b""
            if image:
                path = os.path.join(image_root, image)
                try:
                    with open(path, "rb") as f:
                        image_bytes = f.read()
                except FileNotFoundError:
                    missing += 1
                    if missing <= _LOG_FIRST or missing % _LOG_EVERY == 0:
                        logging.warning("%s: skipping sample %d (id %s): image file %s is missing (%d so far)",
                                        self.name, index, sample.get("id"), path, missing)
                    continue
            # The JSON index is the key: LLaVA's ids are not unique across its source datasets.
            yield index, {
                "id": str(sample.get("id", index)),
                "image": image,
                "image_bytes": image_bytes,
                "conversations": json.dumps(sample["conversations"], ensure_ascii=False),
            }
        if missing:
            logging.warning("%s/%s: %d of %d samples skipped for a missing image file",
                            self.name, split, missing, len(samples))
        self.info.metadata.setdefault("missing_images", {})[split] = missing


class LlavaPretrain(_LlavaJsonBuilder):
    """LLaVA stage-1 alignment data: LCS-558K captions (BLIP-captioned LAION/CC/SBU)."""

    JSON_NAME = "blip_laion_cc_sbu_558k.json"
    IMAGE_ROOT = "images"
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    From https://huggingface.co/datasets/liuhaotian/LLaVA-Pretrain put in the manual dir:
      blip_laion_cc_sbu_558k.json
      images/   (images.zip extracted: images/00000/000000012.jpg, ...)
    """


class LlavaInstruct(_LlavaJsonBuilder):
    """LLaVA-1.5 stage-2 instruction data: llava_v1_5_mix665k (with its text-only ShareGPT samples)."""

    JSON_NAME = "llava_v1_5_mix665k.json"
    IMAGE_ROOT = "."
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    From https://huggingface.co/datasets/liuhaotian/LLaVA-Instruct-150K put llava_v1_5_mix665k.json in the
    manual dir, and next to it the image folders LLaVA's README lists: coco/train2017, gqa/images,
    ocr_vqa/images, textvqa/train_images, vg/VG_100K, vg/VG_100K_2 (image paths in the JSON are relative
    to the manual dir).
    """


BUILDERS = {"llava_pretrain": LlavaPretrain, "llava_instruct": LlavaInstruct}


def to_llava_record(example: dict) -> dict:
    """A llava_pretrain / llava_instruct example (as read from the data source) → a LLaVA record."""
    image_bytes = bytes(example["image_bytes"])
    record = {
        "id": text(example["id"]),
        "conversations": json.loads(text(example["conversations"])),
        "image_bytes": image_bytes or None,
    }
    if image_bytes:
        record["image"] = text(example["image"])
    return record


def llava_builder(name: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None):
    """The `name` ("llava_pretrain" | "llava_instruct") builder, prepared from `manual_dir` if not built yet."""
    builder = BUILDERS[name](data_dir=os.fspath(data_dir))
    download_config = tfds.download.DownloadConfig(manual_dir=os.fspath(manual_dir) if manual_dir else None)
    builder.download_and_prepare(file_format="array_record", download_config=download_config)
    return builder


def llava_source(name: str, data_dir: str | os.PathLike, manual_dir: str | os.PathLike | None = None,
                 split: str = "train") -> LlavaRecords:
    """Random-access source of LLaVA records of a llava builder (built on first use from `manual_dir`)."""
    return LlavaRecords(llava_builder(name, data_dir, manual_dir).as_data_source(split=split), to_llava_record)
