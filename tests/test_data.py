"""Sample-level data code: tokenizers, templates (exact label masks), features, images, LLaVA JSON."""
import io
import json
import pickle

import numpy as np
import pytest
import tokenizers
from PIL import Image
from tokenizers import models, pre_tokenizers, trainers

from meteor_jax.data.features import FeatureSpec, SkipSample, make_features, make_prompt_features
from meteor_jax.data.images import load_image
from meteor_jax.data.llava import LlavaJsonSource
from meteor_jax.data.templates import (IGNORE_INDEX, TokenizationMismatch, instruction_text,
                                       tokenize_conversation)
from meteor_jax.data.tokenizer import Tokenizer, load_tokenizer, train_word_tokenizer

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
BACKGROUND = (122, 116, 104)  # LLaVA's int(255 * CLIP mean)

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions.",
    "USER: ASSISTANT:",
    "what color is the shape? what shape is it? what is in the image?",
    "red blue circle triangle a red circle",
]


def conversation(first_question="<image>\nWhat color is the shape?"):
    return [{"from": "human", "value": first_question}, {"from": "gpt", "value": "red"},
            {"from": "human", "value": "what shape is it?"}, {"from": "gpt", "value": "circle"}]


@pytest.fixture(scope="module")
def word_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_word_tokenizer(CORPUS, path)
    return load_tokenizer(f"word:{path}")


@pytest.fixture(scope="module")
def smollm2():
    return load_tokenizer("gguf:smollm2")


def parse_expected(marked: str):
    """'a [b c] d' → tokens [a, b, c, d] and trained flags [F, T, T, F] (brackets mark trained tokens)."""
    tokens, trained, inside = [], [], False
    for word in marked.split():
        inside |= word.startswith("[")
        tokens.append(word.strip("[]"))
        trained.append(inside)
        inside &= not word.endswith("]")
    return tokens, trained


def check_mask(tokenized, tok, marked):
    tokens, trained = parse_expected(marked)
    assert [tok.token(i) for i in tokenized.ids] == tokens
    assert [label != IGNORE_INDEX for label in tokenized.labels] == trained
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(tokenized.ids, tokenized.labels))


def test_ignore_index_matches_model():
    from meteor_jax.models import cross_entropy

    assert IGNORE_INDEX == cross_entropy.IGNORE_INDEX == -100


# ------------------------------------------------------------------------------------------------ tokenizers

def test_word_tokenizer(word_tok, tmp_path):
    assert [word_tok.token(i) for i in range(5)] == ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    assert (word_tok.pad_id, word_tok.bos_id, word_tok.eos_id, word_tok.image_id) == (0, 1, 2, 4)
    assert word_tok.add_bos and word_tok.eos_token == "</s>" and word_tok.bos_token == "<s>"
    ids = word_tok.encode("What COLOR</s><image> is it?")  # lowercased; specials whole; no BOS/EOS added
    assert [word_tok.token(i) for i in ids] == ["what", "color", "</s>", "<image>", "is", "it", "?"]
    assert word_tok.decode(ids) == "what color is it ?"
    assert word_tok.encode("purple") == [3]  # <unk>
    assert pickle.loads(pickle.dumps(word_tok)).encode("red circle") == word_tok.encode("red circle")
    # The same file read as an HF tokenizer directory, bos/eos from tokenizer_config.json.
    word_tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "pad_token": "<pad>", "add_bos_token": True}))
    hf = load_tokenizer(str(tmp_path))
    assert (hf.bos_id, hf.eos_id, hf.pad_id, hf.image_id, hf.add_bos) == (1, 2, 0, 4, True)


def test_smollm2_tokenizer(smollm2):
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id, smollm2.image_id) == (1, 2, 2, 2)
    assert smollm2.eos_token == "<|im_end|>" and not smollm2.add_bos and smollm2.vocab_size == 49152
    assert smollm2.encode("<|im_start|>user")[0] == 1


# ------------------------------------------------------------------------------------------------- templates

def test_plain_mask(word_tok):
    # Stage 1: the prompt is the image alone; the first caption (+ "\n", dropped by this tokenizer) is trained.
    check_mask(tokenize_conversation(conversation(), "plain", word_tok), word_tok, "<s> <image> [red]")
    prompt = tokenize_conversation(conversation(), "plain", word_tok, add_generation_prompt=True)
    check_mask(prompt, word_tok, "<s> <image>")


def test_vicuna_v1_mask(word_tok):
    tokenized = tokenize_conversation(conversation("What color is the shape? <image>"), "vicuna_v1", word_tok)
    check_mask(tokenized, word_tok,
               "<s> a chat between a curious user and an artificial intelligence assistant . the assistant gives "
               "helpful , detailed , and polite answers to the user ' s questions . "
               "user : <image> what color is the shape ? assistant : [red </s>] "
               "user : what shape is it ? assistant : [circle </s>]")
    assert tokenized.text.endswith(" USER: <image>\nWhat color is the shape? ASSISTANT: red</s>"
                                   "USER: what shape is it? ASSISTANT: circle</s>")  # placeholder moved first
    assert tokenized.image_positions == [32]
    prompt = tokenize_conversation(conversation(), "vicuna_v1", word_tok, add_generation_prompt=True)
    assert prompt.text.endswith("ASSISTANT: red</s>USER: what shape is it? ASSISTANT:")
    assert prompt.ids == tokenized.ids[:-2]  # the last answer and its </s> left out


def test_image_after_text_mask(word_tok):
    # "after_text": the placeholder follows the question (wherever the data put it), so a causal decoder's visual
    # tokens see the question; later turns, labels and the generation prompt are as with "front".
    for question in ("<image>\nWhat color is the shape?", "What color is the <image> shape?"):
        tokenized = tokenize_conversation(conversation(question), "vicuna_short", word_tok,
                                          image_placement="after_text")
        check_mask(tokenized, word_tok, "<s> user : what color is the shape ? <image> assistant : [red </s>] "
                                        "user : what shape is it ? assistant : [circle </s>]")
        assert tokenized.image_positions == [9]
    # A placeholder taken from mid-turn leaves both its spaces, as LLaVA's replace does.
    assert tokenized.text.startswith("USER: What color is the  shape?\n<image> ASSISTANT: red</s>")
    front = tokenize_conversation(conversation(), "vicuna_short", word_tok)
    assert front.image_positions == [3] and sorted(front.ids) == sorted(tokenized.ids)
    prompt = tokenize_conversation(conversation(), "vicuna_short", word_tok, add_generation_prompt=True,
                                   image_placement="after_text")
    assert prompt.ids == tokenized.ids[:-2]
    with pytest.raises(ValueError, match="image_placement='middle'"):
        tokenize_conversation(conversation(), "vicuna_short", word_tok, image_placement="middle")


def test_chatml_mask_smollm2(smollm2):
    tokenized = tokenize_conversation(conversation(), "chatml", smollm2)
    trained = [smollm2.token(i) for i, label in zip(tokenized.ids, tokenized.labels) if label != IGNORE_INDEX]
    assert trained == ["red", "<|im_end|>", "circle", "<|im_end|>"]
    # Trained runs are exactly the answers + <|im_end|>; the "\n" after <|im_end|> is not trained.
    runs = np.flatnonzero(np.diff(np.r_[0, np.asarray(tokenized.labels) != IGNORE_INDEX, 0]))
    assert [smollm2.decode(tokenized.ids[a:b], skip_special_tokens=False) for a, b in runs.reshape(-1, 2)] == [
        "red<|im_end|>", "circle<|im_end|>"]
    assert smollm2.token(tokenized.ids[tokenized.image_positions[0] - 1]) == "Ċ"  # "<|im_start|>user\n<image>"

    # Same text as SmolLM2's own Jinja chat template; same ids as the whole text encoded at once.
    messages = [{"role": "user" if t["from"] == "human" else "assistant", "content": t["value"]}
                for t in conversation()]
    assert tokenized.text == smollm2.apply_chat_template(messages)
    text_only = conversation("What color is the shape?")
    messages[0]["content"] = "What color is the shape?"
    assert tokenize_conversation(text_only, "chatml", smollm2).ids == smollm2.apply_chat_template(messages, tokenize=True)
    prompt = tokenize_conversation(text_only, "chatml", smollm2, add_generation_prompt=True)
    assert prompt.ids == smollm2.apply_chat_template(messages[:3], add_generation_prompt=True, tokenize=True)


def _trained_tokenizer(model, trainer, pre_tokenizer, corpus, specials=("<pad>", "<s>", "</s>", "<unk>", "<image>")):
    tok = tokenizers.Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizer
    tok.train_from_iterator(corpus, trainer(special_tokens=list(specials), show_progress=False))
    return tok


def test_sentencepiece_style_whole_text(word_tok):
    # A LLaMA-like tokenizer (Metaspace, "▁" prepended only at the start of the text): after "</s>" the whole text
    # has "USER", a segment encoded alone "▁USER". The ids are those of the whole text; labels follow the offsets.
    conv = conversation("What color is the shape?")
    text = tokenize_conversation(conv, "vicuna_v1", word_tok).text
    corpus = [text, "USER: what shape is it? ASSISTANT:"]
    tok = _trained_tokenizer(models.BPE(unk_token="<unk>"), trainers.BpeTrainer,
                             pre_tokenizers.Metaspace(prepend_scheme="first"), corpus)
    tok = Tokenizer(tok, pad_id=0, bos_id=1, eos_id=2, add_bos=True)
    assert tok.encode("USER:") != tok.encode("</s>USER:")[1:]  # the segment-wise encoding would differ
    tokenized = tokenize_conversation(conv, "vicuna_v1", tok, sample_id="sample-7")
    assert tokenized.ids == [1] + tok.encode(text)
    trained = [tok.token(i) for i, label in zip(tokenized.ids, tokenized.labels) if label != IGNORE_INDEX]
    assert "".join(trained) == "▁red</s>▁circle</s>" and trained[-1] == "</s>"


def test_token_across_label_boundary(word_tok):
    # eos written as a plain word (not a special token): whitespace splitting glues "red</s>USER:" into one word,
    # half answer, half prompt: no exact label exists. Raised here, a counted skip in make_features.
    conv = conversation("What color is the shape?")
    text = tokenize_conversation(conv, "vicuna_v1", word_tok).text
    corpus = [text, "red</s> </s>", "USER: what shape is it? ASSISTANT:"]
    tok = _trained_tokenizer(models.WordLevel(unk_token="<unk>"), trainers.WordLevelTrainer,
                             pre_tokenizers.WhitespaceSplit(), corpus, specials=("<pad>", "<unk>"))
    tok = Tokenizer(tok, pad_id=0, eos_id=tok.token_to_id("</s>"))
    with pytest.raises(TokenizationMismatch, match="vicuna_v1.*sample-7.*'red</s>USER:'") as err:
        tokenize_conversation(conv, "vicuna_v1", tok, sample_id="sample-7")
    assert err.value.reason == TokenizationMismatch.TOKEN_ACROSS_BOUNDARY == "token across label boundary"
    assert tok.token(tok.encode(text)[err.value.position]) == "red</s>USER:"
    with pytest.raises(SkipSample) as skip:
        make_features({"id": "sample-7", "conversations": conv}, tok, _spec(), image=None)
    assert skip.value.reason == "token across label boundary" and "sample-7" in str(skip.value)


def test_eos_not_one_token(word_tok):
    # The eos id's text "</s>" is in the vocabulary but not a special token: the text's "</s>" is cut into
    # punctuation (each an <unk>), all inside the answer, so no token straddles; the model would never see the eos.
    data = json.loads(word_tok.tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "</s>"]
    tok = Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(data)), pad_id=0, bos_id=1, eos_id=2, add_bos=True)
    assert tok.eos_token == "</s>" and tok.eos_id not in tok.encode("red</s>")
    with pytest.raises(TokenizationMismatch, match="not as the eos token") as err:
        tokenize_conversation(conversation(), "vicuna_v1", tok, sample_id=3)
    assert err.value.reason == "eos not one token"
    with pytest.raises(SkipSample, match="eos not one token"):
        make_features({"id": 3, "conversations": conversation("What is it?")}, tok, _spec(), image=None)
    # A generation prompt writes no eos after its last turn, but the earlier answers' eos still count.
    with pytest.raises(TokenizationMismatch):
        tokenize_conversation(conversation(), "vicuna_v1", tok, add_generation_prompt=True)
    tokenize_conversation(conversation()[:1], "vicuna_v1", tok, add_generation_prompt=True)


def test_instruction_text():
    assert instruction_text(conversation("Describe the picture.\n<image>")) == "Describe the picture."
    assert instruction_text([{"from": "gpt", "value": "hi"}, *conversation()]) == "What color is the shape?"


# -------------------------------------------------------------------------------------------------- features

def _spec(template="vicuna_v1", **kw):
    return FeatureSpec(**{**dict(max_len=64, instruction_len=8, num_image_tokens=5, image_size=4,
                                 template=template), **kw})


def _image(spec):
    return np.random.default_rng(0).normal(size=(spec.image_size, spec.image_size, 3)).astype(np.float32)


@pytest.mark.parametrize("template", ["plain", "vicuna_v1", "chatml"])
def test_features_invariants(template, word_tok, smollm2):
    tok = smollm2 if template == "chatml" else word_tok
    spec = _spec(template, max_len=96)
    record = {"id": 3, "image": "x.png", "conversations": conversation()}
    f = make_features(record, tok, spec, image=_image(spec))
    assert {k: (v.shape, v.dtype) for k, v in f.items()} == {
        "pixels": ((4, 4, 3), np.float32), "tokens": ((96,), np.int32), "mask": ((96,), bool),
        "image_mask": ((96,), bool), "labels": ((96,), np.int32), "instruction": ((8,), np.int32),
        "instruction_mask": ((8,), bool), "truncated": ((), bool)}
    np.testing.assert_array_equal(f["pixels"], _image(spec))
    slots = np.flatnonzero(f["image_mask"])
    assert len(slots) == 5 and np.all(np.diff(slots) == 1)  # exactly K contiguous slots
    assert np.all(f["tokens"][slots] == tok.image_id)
    n = f["mask"].sum()
    assert f["mask"][:n].all() and not f["mask"][n:].any() and not f["truncated"]  # right padding
    assert np.all(f["tokens"][n:] == tok.pad_id)
    trained = f["labels"] != IGNORE_INDEX
    assert not trained[slots].any() and not trained[n:].any() and not trained[:slots[0]].any()
    np.testing.assert_array_equal(f["labels"][trained], f["tokens"][trained])
    # The instruction: the first question without the placeholder, no answer text.
    m = f["instruction_mask"].sum()
    assert f["instruction_mask"][:m].all() and not f["instruction_mask"][m:].any()
    assert f["instruction"][:m].tolist() == tok.encode("What color is the shape?")
    assert tok.image_id not in f["instruction"][:m]
    assert "red" not in tok.decode(f["instruction"][:m]) and "<image>" not in tok.decode(f["instruction"][:m])


@pytest.mark.parametrize("template", ["vicuna_v1", "chatml"])
def test_prompt_features(template, word_tok, smollm2):
    tok = smollm2 if template == "chatml" else word_tok
    spec = _spec(template, max_len=96)
    f = make_prompt_features({"id": 3, "conversations": conversation()}, tok, spec, image=_image(spec))
    assert "labels" not in f and f["tokens"].shape == (96,)
    n = f["mask"].sum()
    assert not f["mask"][:-n].any() and f["mask"][-n:].all() and np.all(f["tokens"][:-n] == tok.pad_id)
    slots = np.flatnonzero(f["image_mask"])
    assert len(slots) == 5 and np.all(np.diff(slots) == 1) and slots[0] >= 96 - n
    generation_prompt = {"vicuna_v1": ["assistant", ":"], "chatml": ["<|im_start|>", "ass", "istant", "Ċ"]}
    tail = [tok.token(i) for i in f["tokens"][-len(generation_prompt[template]):]]
    assert tail == generation_prompt[template]
    before = [tok.token(i) for i in f["tokens"][-len(generation_prompt[template]) - 6:]]
    assert "circle" not in before and ("shape" in before or "Ġshape" in before)  # last answer left out


def test_features_image_after_text(word_tok):
    spec = _spec(image_placement="after_text")
    record = {"id": 3, "image": "x.png", "conversations": conversation()}
    f = make_features(record, word_tok, spec, image=_image(spec))
    slots = np.flatnonzero(f["image_mask"])
    assert len(slots) == 5 and np.all(np.diff(slots) == 1)
    before = [word_tok.token(i) for i in f["tokens"][:slots[0]]]
    assert before[-6:] == ["what", "color", "is", "the", "shape", "?"]  # the question, then the K image slots
    front = make_features(record, word_tok, _spec(), image=_image(spec))
    np.testing.assert_array_equal(f["instruction"], front["instruction"])  # the fusion's instruction is the same
    assert (f["labels"] != IGNORE_INDEX).sum() == (front["labels"] != IGNORE_INDEX).sum() == 4
    with pytest.raises(ValueError, match="FeatureSpec.image_placement"):
        _spec(image_placement="end")


def test_text_only_sample(word_tok):
    spec = _spec()
    f = make_features({"id": 0, "conversations": conversation("What color is red?")}, word_tok, spec, image=None)
    assert not f["image_mask"].any() and np.all(f["pixels"] == 0)
    assert (f["labels"] != IGNORE_INDEX).sum() == 4  # red </s> circle </s>


def test_placeholder_errors(word_tok):
    spec, image = _spec(), _image(_spec())

    def reason(question, img, **extra):
        with pytest.raises(SkipSample) as err:
            make_features({"id": 1, "conversations": conversation(question), **extra}, word_tok, spec, image=img)
        return err.value.reason

    assert reason("What color is it?", image) == "image without placeholder"
    assert reason("<image> What color? <image>", image) == "multiple image placeholders"
    assert reason("<image>\nWhat color?", None) == "placeholder without image"
    assert reason("<image>\nWhat color?", None, image="gone.png") == "missing image"
    with pytest.raises(SkipSample, match="malformed conversation"):
        make_features({"id": 2, "conversations": conversation()[:3]}, word_tok, spec, image=image)
    with pytest.raises(SkipSample, match="malformed conversation"):
        make_features({"id": 2, "conversations": [{"from": "robot", "value": "?"}]}, word_tok, spec, image=image)


def test_over_long(word_tok):
    record = {"id": 5, "conversations": conversation()}
    full = make_features(record, word_tok, _spec(max_len=128), image=_image(_spec()))
    n = full["mask"].sum()
    slots = np.flatnonzero(full["image_mask"])
    cut = make_features(record, word_tok, _spec(max_len=n - 6), image=_image(_spec()))
    assert cut["truncated"] and cut["mask"].all() and cut["image_mask"].sum() == 5
    np.testing.assert_array_equal(cut["tokens"], full["tokens"][:n - 6])  # text cut at the end only
    np.testing.assert_array_equal(cut["labels"], full["labels"][:n - 6])
    with pytest.raises(SkipSample) as err:  # the slots themselves would be cut
        make_features(record, word_tok, _spec(max_len=int(slots[-1])), image=_image(_spec()))
    assert err.value.reason == "image slots beyond max_len"
    first_trained = int(np.argmax(full["labels"] != IGNORE_INDEX))
    with pytest.raises(SkipSample, match="no trained tokens"):
        make_features(record, word_tok, _spec(max_len=first_trained), image=_image(_spec()))
    with pytest.raises(SkipSample, match="prompt beyond max_len"):
        make_prompt_features(record, word_tok, _spec(max_len=40), image=_image(_spec()))


# ---------------------------------------------------------------------------------------------------- images

def _encoded(image, fmt="PNG", **kw):
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kw)
    return buffer.getvalue()


def _rgb255(pixels):
    """Normalised pixels back to 0..255."""
    return (pixels * np.asarray(STD, np.float32) + np.asarray(MEAN, np.float32)) * 255


def test_image_modes_become_rgb(tmp_path):
    palette = Image.new("P", (2, 2))
    palette.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
    palette.putdata([0, 1, 1, 0])
    rgba = Image.new("RGBA", (2, 2), (255, 0, 0, 255))
    rgba.putpixel((1, 1), (0, 255, 0, 0))  # fully transparent: composited on the mean colour
    grey16 = Image.fromarray(np.array([[0, 65535], [32896, 65535]], np.uint16))
    cases = {
        "L": (_encoded(Image.new("L", (2, 2), 100)), [[[100] * 3] * 2] * 2),
        "RGBA": (_encoded(rgba), [[[255, 0, 0], [255, 0, 0]], [[255, 0, 0], list(BACKGROUND)]]),
        "P": (_encoded(palette), [[[10, 20, 30], [200, 100, 0]], [[200, 100, 0], [10, 20, 30]]]),
        "CMYK": (_encoded(Image.new("CMYK", (2, 2), (0, 255, 0, 0)), "TIFF"), [[[255, 0, 255]] * 2] * 2),
        "I;16": (_encoded(grey16), [[[0] * 3, [255] * 3], [[128] * 3, [255] * 3]]),
    }
    for mode, (data, expected) in cases.items():
        assert Image.open(io.BytesIO(data)).mode == mode
        pixels = load_image(data, 2, MEAN, STD)
        assert pixels.shape == (2, 2, 3) and pixels.dtype == np.float32, mode
        np.testing.assert_allclose(_rgb255(pixels), expected, atol=1e-3, err_msg=mode)
    path = tmp_path / "grey.png"  # a path works as well as bytes; resizing keeps a flat colour flat
    Image.new("L", (8, 8), 100).save(path)
    np.testing.assert_allclose(_rgb255(load_image(path, 4, MEAN, STD)), np.full((4, 4, 3), 100), atol=1e-3)


@pytest.mark.parametrize("size", [(2, 1), (1, 2)])
def test_pad_to_square_with_mean_colour(size):
    image = Image.new("RGB", size)
    image.putdata([(255, 0, 0), (0, 0, 255)])
    pixels = load_image(_encoded(image), 2, MEAN, STD)  # 2×2 after padding: no resize
    if size == (2, 1):  # wide: the image is the top row (LLaVA pastes at (0, (2 - 1) // 2))
        expected = [[(255, 0, 0), (0, 0, 255)], [BACKGROUND, BACKGROUND]]
    else:  # tall: the image is the left column
        expected = [[(255, 0, 0), BACKGROUND], [(0, 0, 255), BACKGROUND]]
    normalised = (np.asarray(expected, np.float32) / 255 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    np.testing.assert_allclose(pixels, normalised, rtol=1e-6, atol=1e-6)


def test_jpeg():
    data = _encoded(Image.new("RGB", (16, 12), (30, 160, 90)), "JPEG", quality=95)
    pixels = load_image(data, 8, MEAN, STD)  # padded to 16×16 (2 rows above), resized to 8×8
    assert pixels.shape == (8, 8, 3)
    np.testing.assert_allclose(_rgb255(pixels[3:5]), np.full((2, 8, 3), (30, 160, 90)), atol=4)


def test_bad_images(tmp_path):
    png = _encoded(Image.new("RGB", (8, 8), (1, 2, 3)))
    for data in (b"not an image at all", png[: len(png) // 2], b""):
        with pytest.raises(SkipSample) as err:
            load_image(data, 4, MEAN, STD)
        assert err.value.reason == "corrupt image"
    (tmp_path / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(SkipSample, match="corrupt image"):
        load_image(tmp_path / "garbage.png", 4, MEAN, STD)
    with pytest.raises(SkipSample) as err:
        load_image(str(tmp_path / "absent.png"), 4, MEAN, STD)
    assert err.value.reason == "missing image" and "absent.png" in str(err.value)


# ----------------------------------------------------------------------------------------------- LLaVA JSON

def test_llava_json_source(tmp_path, word_tok):
    (tmp_path / "images" / "coco").mkdir(parents=True)
    Image.new("RGB", (6, 4), (0, 128, 255)).save(tmp_path / "images" / "coco" / "1.jpg")
    records = [
        {"id": "1", "image": "coco/1.jpg", "conversations": conversation("What color is the shape?\n<image>")},
        {"id": "2", "conversations": conversation("What color is red?")},
        {"id": "3", "image": "coco/missing.jpg", "conversations": conversation()},
    ]
    (tmp_path / "data.json").write_text(json.dumps(records))
    source = LlavaJsonSource(tmp_path / "data.json", tmp_path / "images")
    assert len(source) == 3
    first = source[np.int64(0)]
    assert first["image_bytes"] == (tmp_path / "images" / "coco" / "1.jpg").read_bytes()
    assert {k: first[k] for k in records[0]} == records[0]
    assert source[1]["image_bytes"] is None and source[2]["image_bytes"] is None
    first["conversations"].clear()  # records are fresh copies
    assert source[0]["conversations"] == records[0]["conversations"]
    assert pickle.loads(pickle.dumps(source))[1] == source[1]  # grain ships sources to worker processes

    spec = _spec(image_size=4)
    features = []
    for record in source:
        image = None if record["image_bytes"] is None else load_image(record["image_bytes"], 4, MEAN, STD)
        try:
            features.append(make_features(record, word_tok, spec, image=image))
        except SkipSample as e:
            features.append(e.reason)
    assert features[0]["image_mask"].sum() == 5 and features[0]["pixels"].std() > 0
    assert not features[1]["image_mask"].any()
    assert features[2] == "missing image"
