"""Conversation templates: a LLaVA conversation → token ids with an exact label mask.

The template renders the conversation as text in pieces (prompt parts untrained, answers and their eos trained),
which marks every character trained or not. The rendered text is then encoded ONCE, as a whole, with character
offsets (`tokenizers` Encoding.offsets), so the ids are exactly the tokenizer's ids for that text; each token's label
comes from the characters it covers. The only split is at each "<image>" placeholder, which becomes one
`tokenizer.image_id` while the text around it is encoded chunk by chunk, as LLaVA's tokenizer_image_token does.

This suits SentencePiece tokenizers (LLaMA/Vicuna, legacy Prepend("▁") normaliser or Metaspace "first"), where a
piece such as " Red</s>" encodes differently alone than inside the text, as well as byte-level BPE (SmolLM2).
Ids and labels equal LLaVA's preprocess_v1 / preprocess_plain ones wherever LLaVA is self-consistent
(tests/test_templates_llava.py checks it on a LLaMA-style tokenizer in both layouts).

A sample is refused with `TokenizationMismatch` (which data/features.py turns into a counted skip with the
exception's `reason`) only when its labels cannot be exact: a token covers both trained and untrained characters
("token across label boundary", e.g. a word-level tokenizer gluing "red</s>USER:"), or an eos the template wrote is
not encoded as the single eos token ("eos not one token": the tokenizer does not know its eos as a special token,
and the model would never learn to stop). LLaVA prints "tokenization mismatch" there and trains the sample on nothing.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, NamedTuple, Sequence

from meteor_jax.data.tokenizer import IMAGE_TOKEN, Tokenizer

IGNORE_INDEX = -100  # must equal meteor_jax.models.cross_entropy.IGNORE_INDEX (a test checks)

VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SMOLLM_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # its chat template's default

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
# Where a user turn's lone "<image>" goes: "front" (LLaVA's preprocess_multimodal: "<image>\n" + the question) or
# "after_text" (the question + "\n<image>"), so that in a causal decoder every visual token sees the question.
IMAGE_PLACEMENTS = ("front", "after_text")


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
    """The tokenizer's tokens do not allow an exact label mask for this sample (see the module docstring).

    `reason`: a short stable string (the skip counter's key), `position`: the index in the ids (BOS included) of the
    offending token, or of where the eos should be.
    """
    TOKEN_ACROSS_BOUNDARY = "token across label boundary"
    EOS_NOT_ONE_TOKEN = "eos not one token"

    def __init__(self, template: str, sample_id, position: int, message: str, reason: str = TOKEN_ACROSS_BOUNDARY):
        super().__init__(f"template {template!r}, sample {sample_id!r}: {message}")
        self.template, self.sample_id, self.position, self.reason = template, sample_id, position, reason


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
                          add_generation_prompt: bool = False, sample_id=None,
                          image_placement: str = "front") -> Tokenized:
    """Token ids, labels and placeholder positions of a LLaVA conversation ([{from: human|gpt, value}, ...]).

    A BOS id comes first when `tokenizer.add_bos` (as an id, never as text; the tokenizer's own post-processor is
    not used, so there is exactly one). With `add_generation_prompt` the last answer is left out and the ids are
    those of the text that ends where the answer would start. A token is trained when all the characters it covers
    are (answers with the space before them and their eos); a token that covers no character (a prepended "▁")
    takes the label of the character at its position. `image_placement` (IMAGE_PLACEMENTS) says where a user turn's
    single placeholder goes. Raises `InvalidConversation`, or `TokenizationMismatch` (naming the template,
    `sample_id`, the token's position and a `reason`).
    """
    if template not in TEMPLATES:
        raise KeyError(f"unknown template {template!r}; known: {sorted(TEMPLATES)}")
    eos = tokenizer.eos_token
    pieces = _render(conversation, TEMPLATES[template], eos, add_generation_prompt, image_placement)
    text = "".join(piece for piece, _, _ in pieces)
    trained = bytearray(len(text))  # 1 where the character is trained
    eos_starts, at = [], 0
    for piece, is_trained, is_eos in pieces:
        if is_trained:
            trained[at:at + len(piece)] = b"\x01" * len(piece)
        if is_eos:
            eos_starts.append(at)
        at += len(piece)

    ids = [tokenizer.bos_id] if tokenizer.add_bos else []
    labels, image_positions = [IGNORE_INDEX] * len(ids), []
    spans: list[tuple[int, int] | None] = [None] * len(ids)  # each token's [start, end) in text (None: BOS, image)
    chunk_start = 0
    for i, chunk in enumerate(text.split(IMAGE_TOKEN)):
        if i:  # an image is input, never a target
            image_positions.append(len(ids))
            ids.append(tokenizer.image_id)
            labels.append(IGNORE_INDEX)
            spans.append(None)
            chunk_start += len(IMAGE_TOKEN)
        chunk_end = chunk_start + len(chunk)
        chunk_ids, offsets = tokenizer.encode_with_offsets(chunk) if chunk else ([], [])
        for token_id, (start, end) in zip(chunk_ids, offsets):
            start, end = chunk_start + start, chunk_start + end
            if end > start:
                covered = sum(trained[start:end])
                if 0 < covered < end - start:
                    raise TokenizationMismatch(
                        template, sample_id, len(ids),
                        f"token {len(ids)} {tokenizer.token(token_id)!r} covers {text[start:end]!r}, of which only "
                        f"{covered} of {end - start} characters are trained (context: "
                        f"{text[max(start - 20, 0):end + 20]!r}): its label cannot be exact. LLaVA would print "
                        "'tokenization mismatch' and train the sample on nothing; use a template whose answer "
                        "boundaries this tokenizer keeps.")
                on = covered > 0
            else:  # no character of its own: the label of the character at its position, within this chunk
                on = bool(trained[min(max(start, chunk_start), chunk_end - 1)])
            spans.append((start, end))
            ids.append(token_id)
            labels.append(token_id if on else IGNORE_INDEX)
        chunk_start = chunk_end

    where = {span: k for k, span in reversed(list(enumerate(spans)))}  # span → index of its first token
    for start in eos_starts:
        index = where.get((start, start + len(eos)))
        if index is None or ids[index] != tokenizer.eos_id:
            near = [tokenizer.token(t) for t, span in zip(ids, spans)
                    if span is not None and span[0] < start + len(eos) and span[1] > start]
            raise TokenizationMismatch(
                template, sample_id, len(ids) if index is None else index,
                f"the eos {eos!r} written at character {start} is encoded as {near}, not as the eos token "
                f"(id {tokenizer.eos_id}): the tokenizer must know {eos!r} as a special token, or the model never "
                "learns to stop.", reason=TokenizationMismatch.EOS_NOT_ONE_TOKEN)
    return Tokenized(ids, labels, image_positions, text)


def _render(conversation, template: Template, eos: str, add_generation_prompt: bool,
            image_placement: str = "front") -> list[tuple[str, bool, bool]]:
    """The rendered text as (text, trained, is_eos) pieces in order; `is_eos` marks each eos the template wrote."""
    rounds = _rounds(conversation, add_generation_prompt, image_placement)
    if template.image_only_prompt:
        rounds = rounds[:1]
        rounds = [(IMAGE_TOKEN * question.count(IMAGE_TOKEN), None if add_generation_prompt else answer)
                  for question, answer in rounds]

    def fill(pattern: str, content: str, trained: bool) -> list[tuple[str, bool, bool]]:
        out = []
        for k, part in enumerate(pattern.split("{eos}")):
            if k:
                out.append((eos, trained, True))
            out.append((part.replace("{content}", content), trained, False))
        return out

    pieces = [(template.system, False, False)]
    for question, answer in rounds:
        pieces += fill(template.user + template.assistant, question, False)
        if answer is not None:
            pieces += fill(template.answer, answer, True) + [(template.after_answer, False, False)]
    return [piece for piece in pieces if piece[0]]


def _rounds(conversation, add_generation_prompt: bool, image_placement: str = "front") -> list[tuple[str, str | None]]:
    """[(question, answer or None)]: values stripped, a lone placeholder moved to the front of its turn ("front")
    or to its end ("after_text")."""
    if image_placement not in IMAGE_PLACEMENTS:
        raise ValueError(f"image_placement={image_placement!r}; expected one of {IMAGE_PLACEMENTS}")
    turns = []
    for turn in conversation:
        if not (isinstance(turn, Mapping) and turn.get("from") in ROLES and isinstance(turn.get("value"), str)):
            raise InvalidConversation(f"bad turn {turn!r}: expected {{from: human|gpt, value: str}}")
        role, value = ROLES[turn["from"]], turn["value"]
        if role == "user" and value.count(IMAGE_TOKEN) == 1:
            rest = value.replace(IMAGE_TOKEN, "").strip()
            # "front" as LLaVA's preprocess_multimodal: "<image>\n" + the rest of the turn.
            value = IMAGE_TOKEN + "\n" + rest if image_placement == "front" else rest + "\n" + IMAGE_TOKEN
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
