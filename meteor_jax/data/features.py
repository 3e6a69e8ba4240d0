"""One LLaVA record → the fixed-shape arrays the model reads (see the batch layout in models/meteor.py).

The single "<image>" placeholder becomes exactly K image slots (static shapes); text-only samples get a
blank image and no slots. Training rows are right-padded, generation prompts left-padded.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from meteor_jax.data.templates import (IGNORE_INDEX, IMAGE_PLACEMENTS, TEMPLATES, InvalidConversation,
                                       TokenizationMismatch, instruction_text, tokenize_conversation)
from meteor_jax.data.tokenizer import Tokenizer


class SkipSample(Exception):
    """A sample that cannot be used; `reason` is a short stable string (a counter key), `detail` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    max_len: int            # T
    instruction_len: int    # M
    num_image_tokens: int   # K (= model selection.keep)
    image_size: int
    template: str
    image_placement: str = "front"  # where the "<image>" slots go in the user turn (templates.IMAGE_PLACEMENTS)
    image_mean: tuple = (0.48145466, 0.4578275, 0.40821073)   # CLIP
    image_std: tuple = (0.26862954, 0.26130258, 0.27577711)

    def __post_init__(self):
        if self.template not in TEMPLATES:
            raise ValueError(f"FeatureSpec.template={self.template!r} is unknown; known: {sorted(TEMPLATES)}")
        if self.image_placement not in IMAGE_PLACEMENTS:
            raise ValueError(f"FeatureSpec.image_placement={self.image_placement!r}; expected one of "
                             f"{IMAGE_PLACEMENTS}")
        for name in ("max_len", "instruction_len", "num_image_tokens", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FeatureSpec.{name}={getattr(self, name)} must be >= 1")
        if self.num_image_tokens >= self.max_len:
            raise ValueError(f"FeatureSpec.num_image_tokens={self.num_image_tokens} leaves no room for text "
                             f"in max_len={self.max_len}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3:
            raise ValueError("FeatureSpec.image_mean and image_std need one value per RGB channel")


def make_features(record: Mapping, tokenizer: Tokenizer, spec: FeatureSpec, *,
                  image: np.ndarray | None) -> dict[str, np.ndarray]:
    """Training features of one record, right-padded to max_len; `truncated` says whether text was cut."""
    ids, labels, image_mask = _tokens(record, tokenizer, spec, image, add_generation_prompt=False)
    t = spec.max_len
    truncated = len(ids) > t
    if truncated:
        if image_mask[t:].any():
            raise SkipSample("image slots beyond max_len", f"sample {record.get('id')!r}: {len(ids)} > {t} tokens")
        ids, labels, image_mask = ids[:t], labels[:t], image_mask[:t]
    if np.all(labels == IGNORE_INDEX):
        raise SkipSample("no trained tokens", f"sample {record.get('id')!r}")
    pad = t - len(ids)
    return dict(
        _common(record, tokenizer, spec, image),
        tokens=np.pad(ids, (0, pad), constant_values=tokenizer.pad_id),
        mask=np.arange(t) < len(ids),
        image_mask=np.pad(image_mask, (0, pad)),
        labels=np.pad(labels, (0, pad), constant_values=IGNORE_INDEX),
        truncated=np.bool_(truncated),
    )


def make_prompt_features(record: Mapping, tokenizer: Tokenizer, spec: FeatureSpec, *,
                         image: np.ndarray | None) -> dict[str, np.ndarray]:
    """Generation features: the conversation up to its last answer plus the generation prompt, LEFT-padded to
    max_len so every row's prompt ends in the last column. No labels; never truncated (SkipSample instead)."""
    ids, _, image_mask = _tokens(record, tokenizer, spec, image, add_generation_prompt=True)
    t = spec.max_len
    if len(ids) > t:
        raise SkipSample("prompt beyond max_len", f"sample {record.get('id')!r}: {len(ids)} > {t} tokens")
    pad = t - len(ids)
    return dict(
        _common(record, tokenizer, spec, image),
        tokens=np.pad(ids, (pad, 0), constant_values=tokenizer.pad_id),
        mask=np.arange(t) >= pad,
        image_mask=np.pad(image_mask, (pad, 0)),
    )


def _tokens(record, tokenizer, spec, image, add_generation_prompt):
    """(ids, labels, image_mask) with the placeholder expanded to K slots; unpadded int32/bool arrays."""
    try:
        if not isinstance(record.get("conversations"), (list, tuple)):
            raise InvalidConversation("no 'conversations' list")
        tokenized = tokenize_conversation(record["conversations"], spec.template, tokenizer,
                                          add_generation_prompt=add_generation_prompt, sample_id=record.get("id"),
                                          image_placement=spec.image_placement)
    except InvalidConversation as e:
        raise SkipSample("malformed conversation", f"sample {record.get('id')!r}: {e}") from e
    except TokenizationMismatch as e:  # no exact label mask for this sample: skipped under the mismatch's reason
        raise SkipSample(e.reason, str(e)) from e
    placeholders = len(tokenized.image_positions)
    if image is None and placeholders:
        # The record names an image the caller could not provide, or the text refers to an image it lacks.
        has_file = record.get("image") is not None or record.get("image_bytes") is not None
        raise SkipSample("missing image" if has_file else "placeholder without image", f"sample {record.get('id')!r}")
    if image is not None and placeholders != 1:
        raise SkipSample("image without placeholder" if placeholders == 0 else "multiple image placeholders",
                         f"sample {record.get('id')!r}: {placeholders} '<image>' in the conversation")
    ids = np.asarray(tokenized.ids, np.int32)
    labels = np.asarray(tokenized.labels, np.int32)
    slot_mask = np.zeros(len(ids), bool)
    slot_mask[tokenized.image_positions] = True
    repeats = np.where(slot_mask, spec.num_image_tokens, 1)  # the placeholder → K slots holding image_id
    return np.repeat(ids, repeats), np.repeat(labels, repeats), np.repeat(slot_mask, repeats)


def _common(record, tokenizer, spec, image) -> dict[str, np.ndarray]:
    """pixels and the instruction (first user turn without the placeholder, tokenized alone, right-padded)."""
    s = spec.image_size
    if image is None:
        pixels = np.zeros((s, s, 3), np.float32)
    else:
        pixels = np.asarray(image, np.float32)
        if pixels.shape != (s, s, 3):
            raise ValueError(f"image of shape {pixels.shape}, expected ({s}, {s}, 3): decode it with load_image")
    instruction = np.asarray(tokenizer.encode(instruction_text(record["conversations"]))[:spec.instruction_len],
                             np.int32)
    pad = spec.instruction_len - len(instruction)
    return dict(
        pixels=pixels,
        instruction=np.pad(instruction, (0, pad), constant_values=tokenizer.pad_id),
        instruction_mask=np.arange(spec.instruction_len) < len(instruction),
    )
