"""The tokenizer a llama.cpp GGUF carries, rebuilt from its `tokenizer.ggml.*` metadata as a `tokenizers.Tokenizer`
(byte-level BPE) with the pre-tokenizer that `tokenizer.ggml.pre` names, as llama.cpp does: for 'smollm' every
numeric character is split off first (as in SmolLM2's own tokenizer.json)."""
from __future__ import annotations

import functools

from meteor_jax.gguf_file import GGUFFile

# llama.cpp token types (gguf.TokenType): 3 = control (special), 4 = user-defined (added, not special).
_CONTROL, _USER_DEFINED = 3, 4


@functools.lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte → printable character map, in which byte-level BPE vocabularies are spelled."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _pre_tokenizer(pre: str):
    """The split llama.cpp applies for `tokenizer.ggml.pre`, then byte-level mapping."""
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "codeshell"):
        # llama.cpp isolates every digit before the GPT-2 regex (SmolLM2's own tokenizer.json does too).
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in ("gpt2", "default"):
        return byte_level
    raise NotImplementedError(f"GGUF pre-tokenizer {pre!r} is not supported (supported: smollm, starcoder, gpt2)")


def gguf_tokenizer_fields(path=None) -> dict:
    """The byte-level BPE tokenizer a GGUF describes (`tokenizer.ggml.model == "gpt2"`), as the fields of a
    `meteor_jax.data.tokenizer.Tokenizer` (see `load_gguf_tokenizer` there)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    kind = f.metadata("tokenizer.ggml.model")
    if kind != "gpt2":
        raise NotImplementedError(f"{f.path}: tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = f.metadata("tokenizer.ggml.tokens")
    token_types = f.metadata("tokenizer.ggml.token_type", [1] * len(tokens))
    alphabet = _byte_alphabet()
    letters = set(alphabet.values())
    # Tokens are stored spelled in the byte alphabet; respell any that are not (seen in some files).
    vocab = {(t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError(f"{f.path}: the token list has duplicates")
    merges = [tuple(m.split(" ", 1)) for m in f.metadata("tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, continuing_subword_prefix="", end_of_word_suffix="",
                               fuse_unk=False))
    tok.pre_tokenizer = _pre_tokenizer(f.metadata("tokenizer.ggml.pre", "gpt2"))
    tok.decoder = decoders.ByteLevel()
    # Control tokens stay whole and are skipped on decode when asked; user-defined ones stay whole too.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, token_types) if kind == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED])
    if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
        raise ValueError(f"{f.path}: tokenizer has {tok.get_vocab_size()} tokens, the file lists {len(tokens)}")
    return dict(
        tokenizer=tok,
        bos_id=f.metadata("tokenizer.ggml.bos_token_id", None),
        eos_id=f.metadata("tokenizer.ggml.eos_token_id"),
        pad_id=f.metadata("tokenizer.ggml.padding_token_id", None),
        chat_template=f.metadata("tokenizer.chat_template", None),
        add_bos=bool(f.metadata("tokenizer.ggml.add_bos_token", False)),
    )
