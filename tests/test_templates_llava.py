"""Templates on real tokenizers, label for label against LLaVA's own preprocessing.

The LLaMA/Vicuna tokenizer is built here, offline: a small SentencePiece BPE model trained with LLaMA's settings
(byte fallback, split digits, dummy prefix, identity normalisation, <unk>=0 <s>=1 </s>=2) on text generated below,
converted to a `tokenizer.json` by transformers' slow→fast LlamaConverter in both layouts (legacy: normaliser
Prepend("▁") + Replace; non-legacy: Metaspace prepend_scheme="first"), and loaded through `load_tokenizer` as a
checkpoint's tokenizer directory would be. The references are ports of LLaVA's preprocess_v1 (conv_vicuna_v1) and
preprocess_plain (llava/train/train.py, haotian-liu/LLaVA), and for chatml a per-message reference on SmolLM2.
"""
import io
import json
import random
import types

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import AddedToken, decoders, processors

from meteor_jax.data import pipeline, templates
from meteor_jax.data.features import FeatureSpec
from meteor_jax.data.templates import IGNORE_INDEX, SMOLLM_SYSTEM, TokenizationMismatch, tokenize_conversation
from meteor_jax.data.tokenizer import Tokenizer, load_tokenizer

IMAGE_TOKEN_INDEX = -200  # LLaVA's id for the placeholder (ours is tokenizer.image_id)
LAYOUTS = {"legacy": True, "non_legacy": False}


# ---------------------------------------------------------------------------------------- a LLaMA-style tokenizer

def _corpus(lines=150, seed=0) -> list[str]:
    """A few KB of English-like text. Upper-case words make "US" and "ER" frequent pieces, and "USER" appears only
    glued to punctuation: so " USER" is "▁US" "ER" while "USER" with no space before it (after "</s>") is one
    piece. That is what LLaVA's non-legacy `-1` assumes (see test_llava_non_legacy_off_by_one)."""
    rng = random.Random(seed)
    words = ("a an the of in on is are there what which how many color shape red blue green white black yellow "
             "circle square car cat dog man woman person people picture image photo sign street table left right "
             "top bottom yes no chat between curious user and artificial intelligence assistant gives helpful "
             "detailed polite answers to questions question answer using single word or phrase describe briefly "
             "US USA ERROR SERVER HOUSE ASSIST ANT IST OK NASA").split()
    glued = ["$USER", "/USER/", "SUPERUSER", "(USER)", "USER_ID", "USERNAME"]
    out = []
    for _ in range(lines):
        line = [rng.choice(words) for _ in range(rng.randint(4, 12))]
        if rng.random() < 0.4:
            line.insert(rng.randrange(len(line)), rng.choice(glued))
        line[0] = line[0].capitalize()
        out.append(" ".join(line) + rng.choice(".?!,:;") + f" {rng.randint(0, 9999)} "
                   + rng.choice(["(A)", '"ok"', "'s", "5%", "$3", "-", "&"]))
    return out


def _train_llama_spm(lines: list[str], vocab_size: int) -> bytes:
    """A SentencePiece BPE model with LLaMA's trainer and normaliser settings (its tokenizer.model's trainer_spec)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        character_coverage=0.99995, byte_fallback=True, split_digits=True, split_by_unicode_script=True,
        split_by_whitespace=True, split_by_number=True, treat_whitespace_as_suffix=False,
        allow_whitespace_only_pieces=True, max_sentencepiece_length=16, max_sentence_length=4192,
        normalization_rule_name="identity", add_dummy_prefix=True, remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=1, minloglevel=2)
    return model.getvalue()


def _convert(model_file: str, legacy: bool) -> tokenizers.Tokenizer:
    """transformers' LlamaConverter on the model file, with a LLaMA tokenizer.json's BOS post-processor.

    transformers 5.x has no slow LlamaTokenizer to hand the converter, so a stand-in carries the attributes the
    converter reads. Its SentencePiece extractor is replaced: in transformers 5.23 SpmConverter calls
    `SentencePieceExtractor.extract(vocab_scores)`, whose signature became `extract(model_type, ...)`, so BPE
    models do not convert (AttributeError). The replacement is 4.x's extract: the vocab and generate_merges."""
    from transformers.convert_slow_tokenizer import LlamaConverter, generate_merges

    processor = spm.SentencePieceProcessor(model_file=model_file)

    class Extractor:
        def __init__(self, path):
            self.sp = spm.SentencePieceProcessor(model_file=path)

        def extract(self, vocab_scores=None):
            vocab = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())}
            return vocab, generate_merges(vocab, vocab_scores)

    class Converter(LlamaConverter):
        SpmExtractor = Extractor

    slow = types.SimpleNamespace(vocab_file=model_file, legacy=legacy, add_prefix_space=True,
                                 convert_ids_to_tokens=processor.id_to_piece)
    tok = Converter(slow).converted()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return tok


def _llama_dir(tmp_path, model: bytes, legacy: bool):
    """A checkpoint's tokenizer files: tokenizer.model, tokenizer.json and Vicuna's tokenizer_config.json."""
    (tmp_path / "tokenizer.model").write_bytes(model)
    _convert(str(tmp_path / "tokenizer.model"), legacy).save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": None, "legacy": legacy, "model_max_length": 4096,
        "tokenizer_class": "LlamaTokenizer"}))
    return tmp_path


@pytest.fixture(scope="module")
def spm_model():
    return _train_llama_spm(_corpus(), vocab_size=450)


@pytest.fixture(scope="module")
def llama(tmp_path_factory, spm_model):
    """{layout: our Tokenizer loaded from the tokenizer directory}, both layouts from one SentencePiece model."""
    return {name: load_tokenizer(str(_llama_dir(tmp_path_factory.mktemp(name), spm_model, legacy)))
            for name, legacy in LAYOUTS.items()}


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("gguf:smollm2")


def _slow_encode(model: bytes, text: str, legacy: bool) -> list[int]:
    """What LLaVA's slow LlamaTokenizer (sentencepiece itself) gives for text, no BOS: split at the special
    "</s>"; legacy puts a dummy "▁" before every piece of text, non-legacy only before the first."""
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model)
    proto.normalizer_spec.add_dummy_prefix = False
    with_prefix = spm.SentencePieceProcessor(model_proto=model)
    without = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    ids = []
    for k, piece in enumerate(text.split("</s>")):
        if k:
            ids.append(2)
        if piece:
            ids += (with_prefix if legacy or k == 0 else without).encode(piece)
    return ids


# ------------------------------------------------------------------------------------------------------ data

def h(value):
    return {"from": "human", "value": value}


def g(value):
    return {"from": "gpt", "value": value}


# llava_v1_5_mix665k-style conversations: several rounds, with and without the image, a placeholder before or after
# the question, one-word / digit / multiple-choice / long answers, punctuation, and characters outside the
# vocabulary (byte fallback: é, ï, «», –, 日本語, an emoji).
CONVERSATIONS = [
    [h("<image>\nWhat is the color of the car in the picture?"), g("The car in the picture is red."),
     h("How many people are there?"), g("There are 3 people: two adults and a child."),
     h("Is it daytime?"), g("Yes")],
    [h("How many dogs are there?\nAnswer the question using a single word or phrase.\n<image>"), g("2"),
     h("What year is shown on the sign?\nAnswer the question using a single word or phrase."), g("1998"),
     h("What is the man holding?\nAnswer the question using a single word or phrase."), g("Umbrella")],
    [h("<image>\nWhat does the sign say?"), g("Café «Le Jardin» – 日本語 😀"),
     h("Translate the word naïve."), g("naïve (adj.): \"innocent\"; 5% of 100 = 5.")],
    [h("<image>\nWhich option is right?\nA. red\nB. blue\nAnswer with the option's letter from the given choices "
       "directly."), g("B")],
    [h("Write a short list."), g("Sure!\n\n1. First item\n2. Second item, with $5.99 & 100%.\n\nDone."),
     h("Thanks"), g("You're welcome!")],
    [g("Hello there."), h("<image>\nDescribe the image briefly."), g("A cat sits on a mat, next to 2 dogs.")],
    [h("<image>\nWhat is in the image?"), g("日本 is written on it.")],
]
CAPTIONS = ["A red car parked on the street.", "3 dogs playing in the park", "Café «日本» 😀", "the US ERROR sign"]


def _has_image(conversation) -> bool:
    return any("<image>" in turn["value"] for turn in conversation)


# ---------------------------------------------------------------------------------------------- LLaVA, ported

class HFTokenizer:
    """What LLaVA's preprocessing uses of a transformers tokenizer: tokenizer(text).input_ids (BOS first),
    bos_token_id, pad_token_id (LLaVA sets pad = unk for v1), legacy and model_max_length."""

    def __init__(self, tok: Tokenizer, legacy: bool):
        self._tok = tok.tokenizer
        self.bos_token_id, self.pad_token_id, self.legacy, self.model_max_length = 1, 0, legacy, 4096

    def __call__(self, text):
        return types.SimpleNamespace(input_ids=self._tok.encode(text, add_special_tokens=True).ids)


def llava_tokenizer_image_token(prompt, tokenizer) -> list[int]:
    """tokenizer_image_token: each text chunk around "<image>" tokenized on its own; one BOS (the first chunk's)
    is kept, the later chunks' BOS dropped, IMAGE_TOKEN_INDEX between chunks."""
    chunks = [tokenizer(chunk).input_ids for chunk in prompt.split("<image>")]
    offset = 1 if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id else 0
    ids = chunks[0][:1] if offset else []
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += chunk[offset:]
    return ids


def llava_preprocess_multimodal(conversation):
    """preprocess_multimodal (mm_use_im_start_end False): a turn holding "<image>" becomes "<image>\\n" + the rest."""
    out = []
    for turn in conversation:
        value = turn["value"]
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        out.append({"from": turn["from"], "value": value})
    return out


LLAVA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                "The assistant gives helpful, detailed, and polite answers to the user's questions.")


def llava_preprocess_v1(conversation, tokenizer: HFTokenizer, has_image: bool):
    """preprocess_v1 with conv_vicuna_v1 (SeparatorStyle.TWO, sep " ", sep2 "</s>", roles USER/ASSISTANT).

    Returns (input_ids, labels, consistent): `consistent` False where LLaVA prints "WARNING: tokenization
    mismatch" (its labels are then all IGNORE_INDEX)."""
    source = llava_preprocess_multimodal(conversation) if has_image else conversation
    if source[0]["from"] != "human":  # LLaVA skips a leading gpt turn
        source = source[1:]
    roles = {"human": "USER", "gpt": "ASSISTANT"}
    seps = [" ", "</s>"]
    prompt = LLAVA_SYSTEM + seps[0]  # Conversation.get_prompt, SeparatorStyle.TWO
    for j, turn in enumerate(source):
        assert roles[turn["from"]] == ("USER", "ASSISTANT")[j % 2]
        prompt += f"{roles[turn['from']]}: {turn['value']}{seps[j % 2]}" if turn["value"] else f"{roles[turn['from']]}:"

    def tokenize(text):
        return llava_tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text).input_ids

    input_ids = np.asarray(tokenize(prompt))
    target = input_ids.copy()
    total_len = int((target != tokenizer.pad_token_id).sum())
    sep = seps[0] + "ASSISTANT" + ": "
    cur_len = 1
    target[:cur_len] = IGNORE_INDEX
    for i, rou in enumerate(prompt.split(seps[1])):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(tokenize(rou))  # its BOS stands in for the round's "</s>"
        instruction_len = len(tokenize(parts[0])) - 2  # less BOS and the "▁" that " " alone becomes
        if i != 0 and not tokenizer.legacy:  # and IS_TOKENIZER_GREATER_THAN_0_14 (tokenizers 0.23 here)
            round_len -= 1
            instruction_len -= 1
        target[cur_len:cur_len + instruction_len] = IGNORE_INDEX
        cur_len += round_len
    target[cur_len:] = IGNORE_INDEX
    consistent = True
    if cur_len < tokenizer.model_max_length and cur_len != total_len:
        target[:] = IGNORE_INDEX  # LLaVA: print("WARNING: tokenization mismatch: ...") and train on nothing
        consistent = False
    return input_ids.tolist(), target.tolist(), consistent


def llava_preprocess_plain(conversation, tokenizer: HFTokenizer):
    """preprocess_plain: "<image>" + the first answer + "\\n" (conv_llava_plain's sep); the image part untrained."""
    first, answer = conversation[0], conversation[1]
    assert "<image>" in first["value"]
    input_ids = np.asarray(llava_tokenizer_image_token("<image>" + answer["value"] + "\n", tokenizer))
    target = input_ids.copy()
    target[:len(llava_tokenizer_image_token("<image>", tokenizer))] = IGNORE_INDEX
    return input_ids.tolist(), target.tolist()


def chatml_reference(conversation, tok: Tokenizer):
    """LLaVA-style chatml preprocessing (as LLaVA-NeXT's preprocess_qwen builds it, message by message, each
    encoded on its own, "<image>" split out as in tokenizer_image_token), with SmolLM2's system prompt, training
    exactly each answer and its <|im_end|> (not the "<|im_start|>assistant\\n" before it nor the "\\n" after)."""
    source = llava_preprocess_multimodal(conversation)
    if source[0]["from"] != "human":
        source = source[1:]

    def encode(text):
        ids = []
        for k, chunk in enumerate(text.split("<image>")):
            if k:
                ids.append(IMAGE_TOKEN_INDEX)
            ids += tok.encode(chunk)
        return ids

    ids = encode(f"<|im_start|>system\n{SMOLLM_SYSTEM}<|im_end|>\n")
    labels = [IGNORE_INDEX] * len(ids)
    for turn in source:
        if turn["from"] == "human":
            part = encode(f"<|im_start|>user\n{turn['value']}<|im_end|>\n")
            ids, labels = ids + part, labels + [IGNORE_INDEX] * len(part)
        else:
            head, body, tail = encode("<|im_start|>assistant\n"), encode(turn["value"] + "<|im_end|>"), encode("\n")
            ids += head + body + tail
            labels += [IGNORE_INDEX] * len(head) + body + [IGNORE_INDEX] * len(tail)
    return ids, labels


# ------------------------------------------------------------------------------------------------ helpers

_SPM_SURFACE = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])


def _ours_as_llava(tokenized, tok):
    """Our ids with the image slots written as LLaVA's IMAGE_TOKEN_INDEX (ours hold tokenizer.image_id)."""
    ids = list(tokenized.ids)
    for p in tokenized.image_positions:
        assert ids[p] == tok.image_id
        ids[p] = IMAGE_TOKEN_INDEX
    return ids


def _trained_runs(labels):
    runs, start = [], None
    for k, label in enumerate(list(labels) + [IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = k
        elif label == IGNORE_INDEX and start is not None:
            runs.append((start, k))
            start = None
    return runs


def _answers(conversation):
    turns = conversation[1:] if conversation[0]["from"] == "gpt" else conversation
    return [t["value"] for t in turns if t["from"] == "gpt"]


# ------------------------------------------------------------------------------------------------------ tests

@pytest.mark.parametrize("layout", LAYOUTS)
def test_tokenizer_is_llama_like(layout, llama, spm_model):
    """The converted tokenizer has LLaMA's layout and encodes like sentencepiece itself (LLaVA's slow tokenizer)."""
    tok, legacy = llama[layout], LAYOUTS[layout]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, True)
    assert [tok.token(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    if legacy:
        normalizer = repr(tok.tokenizer.normalizer)
        assert "Prepend" in normalizer and "Replace" in normalizer and tok.tokenizer.pre_tokenizer is None
    else:
        assert tok.tokenizer.normalizer is None and "prepend_scheme=first" in repr(tok.tokenizer.pre_tokenizer)
    assert [tok.token(i) for i in tok.encode("é")] == ["▁", "<0xC3>", "<0xA9>"]  # byte fallback
    assert [tok.token(i) for i in tok.encode("12")] == ["▁", "1", "2"]  # split digits
    # The property LLaVA's non-legacy -1 relies on: "USER" right after "</s>" is one token ("USER"), one fewer than
    # the round's " USER" tokenized alone ("▁US" "ER"); legacy puts the "▁" back after "</s>" as the slow tokenizer.
    after_eos = tok.encode("</s>USER")[1:]
    assert len(after_eos) == (2 if legacy else 1) and len(tok.encode("USER")) == 2
    for conversation in CONVERSATIONS:
        text = tokenize_conversation(conversation, "vicuna_v1", tok).text.replace("<image>", "")
        assert tok.encode(text) == _slow_encode(spm_model, text, legacy)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vicuna_v1_labels_equal_llava(layout, llama):
    """Stage 2 (mix665k, vicuna_v1) on a LLaMA tokenizer: our ids and labels equal LLaVA's preprocess_v1, sample by
    sample, with no skip; LLaVA is self-consistent on every one of these conversations in both layouts."""
    tok = llama[layout]
    reference = HFTokenizer(tok, LAYOUTS[layout])
    for conversation in CONVERSATIONS:
        ours = tokenize_conversation(conversation, "vicuna_v1", tok, sample_id="s")
        ids, labels, consistent = llava_preprocess_v1(conversation, reference, _has_image(conversation))
        assert consistent, conversation
        assert _ours_as_llava(ours, tok) == ids
        assert ours.labels == labels
        # The trained runs are exactly " answer</s>", one run per round.
        runs = _trained_runs(ours.labels)
        surfaces = [_SPM_SURFACE.decode([tok.token(i) for i in ours.ids[a:b]]) for a, b in runs]
        assert surfaces == [f" {answer}</s>" for answer in _answers(conversation)]
        assert all(ours.ids[b - 1] == tok.eos_id for a, b in runs)  # the eos as the special token, not characters
        assert ours.ids.count(tok.bos_id) == 1 and ours.ids[0] == tok.bos_id

        # The generation prompt: the ids end where the last answer starts in the training ids.
        prompt = tokenize_conversation(conversation, "vicuna_v1", tok, add_generation_prompt=True)
        assert prompt.text.endswith("ASSISTANT:") and prompt.ids == ours.ids[:runs[-1][0]]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_segment_wise_encoding_differs(layout, llama):
    """Why the segment-wise encoding had to go: on this tokenizer the prompt and answer pieces, each encoded on
    its own (the former method), give other ids than the whole text, so the former code raised TokenizationMismatch:
    legacy, for every conversation (each piece alone gets one more dummy "▁" in front, the answer's " Red</s>" too);
    non-legacy, for every multi-round one (the "USER: ..." piece after an "</s>" alone starts "▁US" "ER", inside the
    text "USER")."""
    tok = llama[layout]
    for conversation in CONVERSATIONS:
        pieces = templates._render(conversation, templates.TEMPLATES["vicuna_v1"], tok.eos_token, False)
        segments = []  # (text, trained), neighbours with the same flag joined, as the former code encoded them
        for text, trained, _ in pieces:
            if segments and segments[-1][1] == trained:
                segments[-1] = (segments[-1][0] + text, trained)
            else:
                segments.append((text, trained))
        segment_wise = [1]
        for text, _ in segments:
            for k, chunk in enumerate(text.split("<image>")):
                segment_wise += ([tok.image_id] if k else []) + (tok.encode(chunk) if chunk else [])
        ours = tokenize_conversation(conversation, "vicuna_v1", tok)
        multi_round = len(_answers(conversation)) > 1
        assert (segment_wise != ours.ids) == (LAYOUTS[layout] or multi_round), conversation


@pytest.mark.parametrize("layout", LAYOUTS)
def test_plain_labels_equal_llava(layout, llama):
    """Stage 1 (LCS-558K, plain): "<image>" + caption + "\\n", only caption and "\\n" trained, as preprocess_plain."""
    tok = llama[layout]
    reference = HFTokenizer(tok, LAYOUTS[layout])
    for caption in CAPTIONS:
        for question in ("<image>\nRender a clear and concise summary of the photo.", "Describe it.\n<image>"):
            conversation = [h(question), g(caption)]
            ours = tokenize_conversation(conversation, "plain", tok)
            ids, labels = llava_preprocess_plain(conversation, reference)
            assert _ours_as_llava(ours, tok) == ids and ours.labels == labels
            assert ours.ids[:2] == [tok.bos_id, tok.image_id]
            prompt = tokenize_conversation(conversation, "plain", tok, add_generation_prompt=True)
            assert prompt.ids == ours.ids[:2]


def test_chatml_labels_equal_reference_smollm2(smollm2):
    """chatml on SmolLM2 (byte-level BPE): the answers and their <|im_end|> are trained, nothing else; the ids are
    those of the model's own chat template where there is no image."""
    for conversation in CONVERSATIONS:
        ours = tokenize_conversation(conversation, "chatml", smollm2)
        ids, labels = chatml_reference(conversation, smollm2)
        assert _ours_as_llava(ours, smollm2) == ids and ours.labels == labels
        runs = _trained_runs(ours.labels)
        assert [smollm2.decode(ours.ids[a:b], skip_special_tokens=False) for a, b in runs] == [
            f"{answer}<|im_end|>" for answer in _answers(conversation)]
        if not _has_image(conversation):
            messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                        for t in (conversation[1:] if conversation[0]["from"] == "gpt" else conversation)]
            assert ours.ids == smollm2.apply_chat_template(messages, tokenize=True)
        prompt = tokenize_conversation(conversation, "chatml", smollm2, add_generation_prompt=True)
        assert prompt.ids == ours.ids[:runs[-1][0]]


def test_llava_non_legacy_off_by_one(tmp_path):
    """LLaVA's quirk: for rounds after the first, non-legacy, preprocess_v1 subtracts 1, assuming " USER" (the
    round tokenized alone) is one token more than "USER" right after "</s>" (inside the whole text). A vocabulary
    with "▁USER" as one piece breaks that: LLaVA prints "tokenization mismatch" and trains every multi-round
    sample on nothing (single-round ones are fine), while the legacy layout and our labels stay exact."""
    model = _train_llama_spm(_corpus(), vocab_size=500)  # the same text, more merges: "▁USER" is one piece
    for name, legacy in LAYOUTS.items():
        (tmp_path / name).mkdir()
        tok = load_tokenizer(str(_llama_dir(tmp_path / name, model, legacy)))
        assert [tok.token(i) for i in tok.encode(" USER")][-1] == "▁USER"
        reference = HFTokenizer(tok, legacy)
        for conversation in CONVERSATIONS:
            multi_round = len(_answers(conversation)) > 1
            _, labels, consistent = llava_preprocess_v1(conversation, reference, _has_image(conversation))
            assert consistent == (legacy or not multi_round), (name, conversation)
            ours = tokenize_conversation(conversation, "vicuna_v1", tok)
            if consistent:
                assert ours.labels == labels
            surfaces = [_SPM_SURFACE.decode([tok.token(i) for i in ours.ids[a:b]])
                        for a, b in _trained_runs(ours.labels)]
            assert surfaces == [f" {answer}</s>" for answer in _answers(conversation)]


def _png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_token_across_boundary_is_a_counted_skip(llama):
    """A sample whose token straddles the trained/untrained boundary is skipped under its own reason by the
    trainer's pipeline, and the run goes on. The straddling token: ": Yes" added to the tokenizer (as a user of
    the data might add a phrase token), which glues the untrained ":" of "ASSISTANT:" to the trained " Yes"."""
    base = llama["legacy"]
    glued = tokenizers.Tokenizer.from_str(base.tokenizer.to_str())
    glued.add_tokens([AddedToken(": Yes", normalized=False)])
    tok = Tokenizer(glued, eos_id=base.eos_id, bos_id=base.bos_id, pad_id=base.pad_id, add_bos=True)
    with pytest.raises(TokenizationMismatch) as err:
        tokenize_conversation(CONVERSATIONS[0], "vicuna_v1", tok, sample_id="yes-sample")  # its last answer: "Yes"
    assert err.value.reason == "token across label boundary" and "yes-sample" in str(err.value)
    assert "': Yes'" in str(err.value)  # the token, at the ":" of the last "ASSISTANT:"
    base_ids = tokenize_conversation(CONVERSATIONS[0], "vicuna_v1", base).ids
    assert tok.token(base_ids[err.value.position]) == ":"
    assert _SPM_SURFACE.decode([tok.token(i) for i in base_ids[err.value.position + 1:]]) == " Yes</s>"
    tokenize_conversation(CONVERSATIONS[0][:4], "vicuna_v1", tok)  # the same sample without that round: no error

    png = _png()
    records = [{"id": f"r{k}", "image_bytes": png if _has_image(c) else None, "conversations": c}
               for k, c in enumerate(CONVERSATIONS)]  # only CONVERSATIONS[0] has an answer "Yes"
    records.append({"id": "yes-2", "image_bytes": None, "conversations": [h("Is it red?"), g("Yes, it is.")]})
    spec = FeatureSpec(max_len=256, instruction_len=16, num_image_tokens=4, image_size=8, template="vicuna_v1")
    for tokenizer, skipped in ((base, {}), (tok, {"token across label boundary": 2})):
        ds = pipeline.make_dataset(records, tokenizer, spec, batch_size=2, seed=0, shuffle=False, num_epochs=1,
                                   drop_remainder=False, process_index=0, process_count=1)
        rows = sum(len(batch["tokens"]) for batch in ds)
        assert ds.skip_counter.skipped == skipped and rows == ds.skip_counter.kept == len(records) - sum(
            skipped.values())
