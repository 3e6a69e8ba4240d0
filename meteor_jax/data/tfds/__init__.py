"""tfds builders (ArrayRecord, no TensorFlow needed) and their LLaVA-record adapters.

Importing this package registers `easy_vqa`, `llava_pretrain` and `llava_instruct` with tfds, so
`tfds.data_source(name, data_dir=...)` finds them once built.
"""

from meteor_jax.data.tfds import easy_vqa, llava
from meteor_jax.data.tfds.common import LlavaRecords
from meteor_jax.data.tfds.easy_vqa import EasyVqa, EasyVqaConfig, easy_vqa_builder, easy_vqa_source
from meteor_jax.data.tfds.llava import LlavaInstruct, LlavaPretrain, llava_builder, llava_source


def to_llava_record(example: dict) -> dict:
    """Any of our builders' examples → a LLaVA record {id, conversations, image_bytes or None[, image]}."""
    if "question" in example:
        return easy_vqa.to_llava_record(example)
    return llava.to_llava_record(example)


__all__ = [
    "EasyVqa", "EasyVqaConfig", "LlavaInstruct", "LlavaPretrain", "LlavaRecords", "easy_vqa_builder",
    "easy_vqa_source", "llava_builder", "llava_source", "to_llava_record",
]
