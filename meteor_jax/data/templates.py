"""Conversation templates: a LLaVA conversation → token ids with an exact label mask.

The text is built segment by segment (prompt parts untrained, answers trained) and each segment is
encoded on its own, so the label mask cannot drift. The ids are then checked against the encoding of
the whole rendered text: where a tokenizer merges or respells tokens across a segment boundary, LLaVA
prints "tokenization mismatch" and silently trains that sample on nothing; we raise `TokenizationMismatch`.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

from meteor_jax.data.tokenizer import IMAGE_TOKEN, Tokenizer

IGNORE_INDEX = -100  # must equal meteor_jax.models.meteor.IGNORE_INDEX (a test checks)

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its chat template's default

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclasses.dataclass(frozen=True)
class Template:
    """The text around the turns. In `user` and `answer`, "{content}" is the message and "{eos}" the
    tokenizer's eos token. Only `answer` is trained; `assistant` opens an assistant turn (the generation prompt)."""
    name: str
    system: str = ""
    user: str = "{content}"
    assistant: str = ""
    answer: str = "{content}"
    after_answer: str = ""
    image_only_prompt: bool = False  # `plain`: one round, the user turn reduced to its image placeholder


TEMPLATES: dict[str, Template] = {t.name: t for t in (
    # LLaVA's preprocess_plain: "<image>" + caption + "\n"; the caption and "\n" are trained.
    Template("plain", answer="{content}\n", image_only_prompt=True),
    # LLaVA's conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 eos). The space before an answer belongs to the
    # answer segment, so byte-level BPE and SentencePiece both keep it attached to the answer's first word.
    Template("vicuna_v1", system=VICUNA_SYSTEM + " ", user="USER: {content} ", assistant="ASSISTANT:",
             answer=" {content}{eos}"),
    # vicuna_v1 without the system prompt: the same turns at a third of the length, for small demo models.
    Template("vicuna_short", user="USER: {content} ", assistant="ASSISTANT:", answer=" {content}{eos}"),
    # SmolLM2's chat template (the GGUF's Jinja renders the same text).
    Template("chatml", system=f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n",
             user="<|im_start|>user\n{content}<|im_end|>\n", assistant="<|im_start|>assistant\n",
             answer="{content}<|im_end|>", after_answer="\n"),
)}


class InvalidConversation(ValueError):
    """The conversation is not alternating user/assistant turns with string values."""


class TokenizationMismatch(ValueError):
    """Segment-wise ids differ from the whole text's encoding: the template does not suit the tokenizer."""

    def __init__(self, template: str, sample_id, position: int, message: str):
        super().__init__(f"template {template!r}, sample {sample_id!r}: {message}")
        self.template, self.sample_id, self.position = template, sample_id, position


class Tokenized(NamedTuple):
    ids: list[int]
    labels: list[int]            # the id where trained, IGNORE_INDEX elsewhere (aligned with ids)
    image_positions: list[int]   # index in ids of each "<image>" placeholder (one id each: tokenizer.image_id)
    text: str                    # the rendered text (without a BOS prefix)


def instruction_text(conversation: Sequence[Mapping]) -> str:
    """The first user turn without its image placeholder(s), stripped: the fusion's instruction (never an answer)."""
    for turn in conversation:
        if ROLES.get(turn.get("from")) == "user":
            return str(turn.get("value", "")).replace(IMAGE_TOKEN, "").strip()
    return ""


def tokenize_conversation(conversation: Sequence[Mapping], template: str, tokenizer: Tokenizer, *,
                          add_generation_prompt: bool = False, sample_id=None) -> Tokenized:
    """Token ids, labels and placeholder positions of a LLaVA conversation ([{from: human|gpt, value}, ...]).

    A BOS id comes first when `tokenizer.add_bos`. With `add_generation_prompt` the last answer is left out and
    the ids end where the answer would start. Raises `InvalidConversation`, or `TokenizationMismatch` (naming
    the template, `sample_id` and the first differing position).
    """
    if template not in TEMPLATES:
        raise KeyError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
    segments = _render(conversation, TEMPLATES[template], tokenizer.eos_token, add_generation_prompt)
    ids = [tokenizer.bos_id] if tokenizer.add_bos else []
    prefix = len(ids)
    labels, image_positions = [IGNORE_INDEX] * prefix, []
    for text, trained in segments:
        segment_ids, positions = _encode(text, tokenizer)
        image_positions += [len(ids) + p for p in positions]
        ids += segment_ids
        labels += segment_ids if trained else [IGNORE_INDEX] * len(segment_ids)
    for p in image_positions:  # an image is input, never a target
        labels[p] = IGNORE_INDEX

    text = "".join(text for text, _ in segments)
    whole, _ = _encode(text, tokenizer)
    if ids[prefix:] != whole:
        ours = ids[prefix:]
        first = next((i for i, (a, b) in enumerate(zip(ours, whole)) if a != b), min(len(ours), len(whole)))
        near = slice(max(first - 3, 0), first + 3)
        raise TokenizationMismatch(
            template, sample_id, prefix + first,
            f"segment-wise tokens differ from the whole text's at token {prefix + first}: "
            f"{[tokenizer.token(i) for i in ours[near]]} vs {[tokenizer.token(i) for i in whole[near]]}. "
            "The template's segment boundaries do not survive this tokenizer (LLaVA would silently mask the "
            "whole sample); use a template made for this tokenizer.")
    return Tokenized(ids, labels, image_positions, text)


def _encode(text: str, tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """Ids of text with each "<image>" as one `image_id` (the text around it encoded as separate chunks,
    as LLaVA's tokenizer_image_token does), and the placeholders' positions."""
    ids, positions = [], []
    for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            positions.append(len(ids))
            ids.append(tokenizer.image_id)
        if chunk:
            ids += tokenizer.encode(chunk)
    return ids, positions


def _render(conversation, template: Template, eos: str, add_generation_prompt: bool) -> list[tuple[str, bool]]:
    """(text, trained) segments; neighbours with the same flag are joined (only real boundaries remain)."""
    rounds = _rounds(conversation, add_generation_prompt)
    if template.image_only_prompt:
        rounds = rounds[:1]
        rounds = [(IMAGE_TOKEN * question.count(IMAGE_TOKEN), None if add_generation_prompt else answer)
                  for question, answer in rounds]

    def fill(pattern: str, content: str) -> str:
        return pattern.replace("{eos}", eos).replace("{content}", content)

    segments = [(template.system, False)]
    for question, answer in rounds:
        segments.append((fill(template.user, question) + template.assistant, False))
        if answer is not None:
            segments += [(fill(template.answer, answer), True), (template.after_answer, False)]
    joined = []
    for text, trained in segments:
        if joined and joined[-1][1] == trained:
            joined[-1] = (joined[-1][0] + text, trained)
        elif text:
            joined.append((text, trained))
    return joined


def _rounds(conversation, add_generation_prompt: bool) -> list[tuple[str, str | None]]:
    """[(question, answer or None)]: values stripped, a lone placeholder moved to the front of its turn."""
    turns = []
    for turn in conversation:
        if not (isinstance(turn, Mapping) and turn.get("from") in ROLES and isinstance(turn.get("value"), str)):
            raise InvalidConversation(f"bad turn {turn!r}: expected {{from: human|gpt, value: str}}")
        role, value = ROLES[turn["from"]], turn["value"]
        if role == "user" and value.count(IMAGE_TOKEN) == 1:
            # As LLaVA's preprocess_multimodal: "<image>\n" + the rest of the turn.
            value = IMAGE_TOKEN + "\n" + value.replace(IMAGE_TOKEN, "").strip()
        turns.append((role, value.strip()))
    if turns and turns[0][0] == "assistant":  # LLaVA skips a leading assistant turn
        turns = turns[1:]
    if not turns:
        raise InvalidConversation("empty conversation")
    rounds = []
    for i in range(0, len(turns), 2):
        (q_role, question), answer = turns[i], (turns[i + 1] if i + 1 < len(turns) else None)
        if q_role != "user" or (answer is not None and answer[0] != "assistant"):
            raise InvalidConversation(f"turns must alternate user/assistant: {[r for r, _ in turns]}")
        rounds.append((question, None if answer is None else answer[1]))
    if add_generation_prompt:
        rounds[-1] = (rounds[-1][0], None)
    elif rounds[-1][1] is None:
        raise InvalidConversation("the conversation ends with an unanswered user turn")
    return rounds
