"""Decoder LLM: the LLaMA architecture (Vicuna, LLaMA-2/3, Mistral-style, SmolLM2).

Token embedding, pre-RMSNorm layers with rotary position embeddings (HF rotate-half convention, so HF q/k weights
load without permutation), grouped-query attention through models/attention.py (the platform's fused kernel,
`LLMConfig.attention`), SwiGLU MLP, final RMSNorm and a tied or untied head (the loss through it in blocks of
positions: `next_token_nll`, models/cross_entropy.py). Layers are stacked on a leading 'layers' axis and run with
`jax.lax.scan` (or a Python loop over slices, same numbers); a remat policy from the config wraps each layer.
Positions are explicit, so left-padded batches and KV-cache decoding share one code path.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from meteor_jax.models.attention import attend, check_implementation, choose
from meteor_jax.models.cross_entropy import blockwise_next_token_nll
from meteor_jax.models.layers import REMAT_POLICIES, RMSNorm, dense, mesh_of, run_stacked, shard_batch, stack_layers


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    vocab_size: int = 32000
    dim: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int | None = None  # None -> dim // num_heads
    mlp_dim: int = 11008
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    max_seq_len: int = 4096
    scan_layers: bool = True  # scan over the stacked layers; False = Python loop over slices (same numbers)
    remat: str = "none"  # "none" | "full" | "dots" | "dots_no_batch" (jax.checkpoint_policies)
    dtype: str = "float32"  # compute dtype
    # LLaMA-3.1 RoPE scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings);
    # None = plain RoPE. A tuple keeps the config hashable (it is static in the module graph).
    rope_scaling: tuple[float, float, float, int] | None = None
    # Attention kernel without a KV cache (training, scoring): "auto" (cuDNN flash attention on GPU at bf16/fp16,
    # splash on TPU, XLA otherwise) | "xla" | "cudnn" | "splash". Decoding with a cache always uses XLA.
    attention: str = "auto"
    # The loss runs the output head over blocks of this many positions and skips the blocks without a trained
    # target (models/cross_entropy.py): the image slots, the prompt and the padding cost no head matmul.
    loss_block: int = 128

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"llm.num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim is None and self.dim % self.num_heads:
            raise ValueError(f"llm.dim {self.dim} is not divisible by num_heads {self.num_heads}; set llm.head_dim")
        if self.head_size % 2:
            raise ValueError(f"llm head_dim {self.head_size} must be even for rotary embeddings")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"llm.remat={self.remat!r}; expected one of {sorted(REMAT_POLICIES)}")
        if self.rope_scaling is not None and len(self.rope_scaling) != 4:
            raise ValueError(
                "llm.rope_scaling must be (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings)"
            )
        jnp.dtype(self.dtype)  # fails clearly on an unknown dtype name
        if self.loss_block < 1:
            raise ValueError(f"llm.loss_block={self.loss_block} must be >= 1")
        check_implementation(self.attention, "llm.attention")

    @property
    def head_size(self) -> int:
        return self.head_dim if self.head_dim is not None else self.dim // self.num_heads


@struct.dataclass
class KVCache:
    """Per-layer keys/values of the tokens seen so far, in slot order."""

    k: jax.Array  # (num_layers, B, S, num_kv_heads, head_dim) compute dtype
    v: jax.Array
    valid: jax.Array  # (B, S) bool: slot holds a real (non-padding) token
    index: jax.Array  # () int32: next slot to write


def rope_inv_freq(cfg: LLMConfig) -> np.ndarray:
    """Inverse frequencies (head_dim/2,) float32, as HF computes them (incl. the llama3 scaling rule)."""
    hd = cfg.head_size
    inv_freq = 1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))
    inv_freq = inv_freq.astype(np.float32)
    if cfg.rope_scaling is None:
        return inv_freq
    factor, low_freq_factor, high_freq_factor, old_context_len = cfg.rope_scaling
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly.
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(cfg: LLMConfig, positions: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape (B, T, head_dim) for explicit positions; angles in float32 (as HF)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(cfg))
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on (B, T, heads, head_dim)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        hd = cfg.head_size
        self.q_proj = dense(cfg.dim, cfg.num_heads * hd, ("embed", "q_heads"), dtype=dtype, rngs=rngs)
        self.k_proj = dense(cfg.dim, cfg.num_kv_heads * hd, ("embed", "kv_heads"), dtype=dtype, rngs=rngs)
        self.v_proj = dense(cfg.dim, cfg.num_kv_heads * hd, ("embed", "kv_heads"), dtype=dtype, rngs=rngs)
        self.o_proj = dense(cfg.num_heads * hd, cfg.dim, ("q_heads", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, structure, kv, index, mesh=None):
        """x (B,T,D); kv = this layer's cache (k, v) each (B,S,KV,hd), or None; structure: with a cache the
        (B,1,T,S) bool mask over the slots, without one the (B,T) int32 segment ids of causal self-attention;
        mesh: the parameters' mesh (splash runs under shard_map over it).

        Returns (output (B,T,D), updated (k, v) or None).
        """
        cfg = self.cfg
        b, t, _ = x.shape
        hd = cfg.head_size
        q = apply_rope(self.q_proj(x).reshape(b, t, cfg.num_heads, hd), cos, sin)
        k = apply_rope(self.k_proj(x).reshape(b, t, cfg.num_kv_heads, hd), cos, sin)
        v = self.v_proj(x).reshape(b, t, cfg.num_kv_heads, hd)
        if kv is not None:
            k_cache, v_cache = kv
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, index, 0, 0))
            kv = (k, v)
            # Queries at an offset in the cache, holes where prompts were left-padded: an explicit mask on XLA
            # (models/attention.py says why the fused kernels do not fit). GQA: K/V heads broadcast over groups.
            out = jax.nn.dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), mask=structure,
                                               scale=hd**-0.5)
        else:
            out = attend(q, k, v, scale=hd**-0.5, causal=True, segment_ids=structure, mesh=mesh,
                         implementation=choose(cfg.attention, jax.default_backend(), q.dtype))
        return self.o_proj(out.reshape(b, t, cfg.num_heads * hd)), kv


class MLP(nnx.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.gate_proj = dense(cfg.dim, cfg.mlp_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up_proj = dense(cfg.dim, cfg.mlp_dim, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down_proj = dense(cfg.mlp_dim, cfg.dim, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm LLaMA block (HF `LlamaDecoderLayer`)."""

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        self.attn_norm = RMSNorm(cfg.dim, eps=cfg.rms_norm_eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.dim, eps=cfg.rms_norm_eps)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, structure, kv, index, mesh=None):
        attn_out, kv = self.attn(self.attn_norm(x), cos, sin, structure, kv, index, mesh)
        x = x + attn_out
        x = x + self.mlp(self.mlp_norm(x))
        return x, kv


class LLM(nnx.Module):
    """LLaMA decoder over input embeddings (so callers can splice image tokens in before the layers)."""

    def __init__(self, cfg: LLMConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.dim,
            param_dtype=jnp.float32,
            embedding_init=nnx.initializers.normal(0.02),
            embedding_metadata={"logical_axes": ("vocab", "embed")},
            rngs=rngs,
        )
        self.layers = stack_layers(lambda r: DecoderLayer(cfg, rngs=r), cfg.num_layers, rngs)
        self.norm = RMSNorm(cfg.dim, eps=cfg.rms_norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = dense(cfg.dim, cfg.vocab_size, ("embed", "vocab"), dtype=jnp.dtype(cfg.dtype), rngs=rngs)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.cfg.dtype)

    def embed_tokens(self, tokens: jax.Array) -> jax.Array:
        """(B, T) int → (B, T, dim) in the compute dtype."""
        return jnp.take(self.embed.embedding[...], tokens, axis=0).astype(self.compute_dtype)

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache of `max_len` slots (prompt + generated tokens must fit: writes past the end clamp)."""
        cfg = self.cfg
        shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_size)
        return KVCache(
            k=jnp.zeros(shape, self.compute_dtype),
            v=jnp.zeros(shape, self.compute_dtype),
            valid=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Final-normed hidden (B, T, D) → float32 logits (B, T, V), accumulated in float32."""
        dtype = self.compute_dtype
        h = hidden.astype(dtype)
        if self.cfg.tie_embeddings:
            return jnp.einsum("btd,vd->btv", h, self.embed.embedding[...].astype(dtype),
                              preferred_element_type=jnp.float32)
        return jnp.einsum("btd,dv->btv", h, self.lm_head.kernel[...].astype(dtype),
                          preferred_element_type=jnp.float32)

    def next_token_nll(self, hidden: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(B, T) NLL of labels[t + 1] at position t and the target count, from the final-normed hidden states
        (`return_hidden=True`): `cross_entropy.next_token_nll(self.logits(hidden), labels)` without the (B, T, V)
        logits, the head run only over blocks of `loss_block` positions that hold a trained target."""
        tied = self.cfg.tie_embeddings
        weight = self.embed.embedding[...] if tied else self.lm_head.kernel[...]
        return blockwise_next_token_nll(hidden, weight, labels, tied=tied, block=self.cfg.loss_block,
                                        dtype=self.compute_dtype, mesh=mesh_of(self.embed.embedding[...]))

    def __call__(
        self,
        x: jax.Array,
        *,
        positions: jax.Array | None = None,
        mask: jax.Array | None = None,
        cache: KVCache | None = None,
        return_hidden: bool = False,
    ) -> tuple[jax.Array, KVCache | None]:
        """x (B, T, dim) embeddings; positions (B, T) int (RoPE); mask (B, T) bool, True = real token.

        Without a cache: causal attention over the T tokens, keys restricted to mask=True.
        With a cache: the new k/v go to slots [index, index+T), queries see valid slots up to their own.
        Defaults: mask all True, positions = slot numbers. Returns (logits float32 or final-normed hidden, cache).
        """
        cfg = self.cfg
        b, t, _ = x.shape
        # Activations stay split over the batch axes of the parameters' mesh (see `shard_batch`).
        mesh = mesh_of(self.embed.embedding[...])
        x = shard_batch(x.astype(self.compute_dtype), mesh)
        mask = jnp.ones((b, t), bool) if mask is None else mask.astype(bool)
        start = jnp.zeros((), jnp.int32) if cache is None else cache.index
        query_slots = start + jnp.arange(t, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(query_slots, (b, t))
        if cache is None:
            # Causal self-attention within segments, 1 real / 0 padding: real tokens see the real tokens before
            # them (whatever the padding layout), padding sees padding, so no softmax row is empty.
            structure, kv = mask.astype(jnp.int32), None
        else:
            key_valid = jax.lax.dynamic_update_slice(cache.valid, mask, (0, start))
            key_slots = jnp.arange(cache.valid.shape[1], dtype=jnp.int32)
            kv = (cache.k, cache.v)
            causal = key_slots[None, :] <= query_slots[:, None]
            # Every query also sees its own slot, so a padding query never has an empty softmax row (NaN-free);
            # real queries are unaffected since their own slot is valid and causal.
            own = key_slots[None, :] == query_slots[:, None]
            structure = ((key_valid[:, None, :] & causal[None]) | own[None])[:, None]  # (B, 1, T, S)
        cos, sin = rope_tables(cfg, positions, self.compute_dtype)
        x, kv = self._run_layers(x, cos, sin, structure, kv, start, mesh)
        hidden = self.norm(x)
        if cache is not None:
            cache = KVCache(k=kv[0], v=kv[1], valid=key_valid, index=start + t)
        return (hidden if return_hidden else shard_batch(self.logits(hidden), mesh)), cache

    def _run_layers(self, x, cos, sin, structure, kv, index, mesh=None):
        def step(layer, x, layer_kv):
            x, layer_kv = layer(x, cos, sin, structure, layer_kv, index, mesh)
            return shard_batch(x, mesh), layer_kv

        return run_stacked(self.layers, step, x, kv, scan=self.cfg.scan_layers, remat=self.cfg.remat)
