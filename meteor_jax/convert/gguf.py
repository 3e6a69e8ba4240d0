"""LLaMA-architecture GGUF files (llama.cpp): weights into our `LLM` (the tokenizer they carry is built by
`meteor_jax.data.gguf_tokenizer`; the file reader is `meteor_jax.gguf_file`).

The weights are dequantised to float32 one tensor at a time (`gguf.quants.dequantize`). numpy's
view of a GGUF tensor is already in HF order, (out, in) for a linear layer: GGUF lists dimensions
innermost first. llama.cpp's converter permutes the rows of q and k for its interleaved RoPE; our
RoPE is HF's rotate-half, so the rules undo that permutation.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np
from flax import nnx

from meteor_jax.convert.keymap import Rule, load_state, transpose
from meteor_jax.gguf_file import GGUFFile
from meteor_jax.models.llm import LLM, LLMConfig


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
