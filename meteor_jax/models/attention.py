"""Self-attention through the platform's fused kernel: cuDNN flash attention on GPU, splash attention (Pallas) on
TPU, XLA's dot_product_attention elsewhere, all from one description of the structure instead of a dense mask:

  causal        query i sees keys j <= i (queries and keys are the same T slots: self-attention, no cache)
  segment_ids   (B, T) int32, or None (every token real); tokens attend only within their own segment id.
                The LLM passes its padding mask as ids (1 real, 0 padding): real tokens see real tokens,
                padding sees padding, so no softmax row is empty on any backend and real rows are exactly
                those of a dense `causal & key_valid` mask.

cuDNN takes padding as per-row lengths (`key_value_seq_lengths`), which describes right-padded rows only
(training batches are right-padded: data/features.py). `attend` checks the layout at run time and sends a batch
whose ids are not "real prefix, padding suffix" (left-padded prompts, a packed row) to the XLA path instead.

Decoding with a KV cache stays on XLA with an explicit mask (models/llm.py): its queries sit at an offset in the
cache (causal in slot order from `index`, not from 0), left-padded prompts leave holes at the start, and a
single-query step has no T x S score matrix for a flash kernel to save.

The cuDNN and splash paths are written from the JAX sources (jax.nn.dot_product_attention, jax.experimental.
pallas.ops.tpu.splash_attention) and are untested here (no GPU/TPU in the test environment): only the XLA
path and the chooser run in the tests.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from meteor_jax import sharding

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_PLATFORM_OF = {"cudnn": "gpu", "splash": "tpu"}  # what each fused kernel runs on
_CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)  # cuDNN flash attention has no float32 kernel


def check_implementation(name: str, where: str = "attention") -> None:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{where}={name!r}; expected one of {IMPLEMENTATIONS}")


def choose(implementation: str, platform: str, dtype) -> str:
    """The kernel for `implementation` on `platform` ("cpu" | "gpu" | "tpu", jax.default_backend()) at compute
    `dtype`. "auto": cudnn on GPU for bfloat16/float16 (XLA for float32, which cuDNN cannot run), splash on TPU,
    XLA elsewhere. An explicit kernel the platform cannot run is an error, not a silent fallback."""
    check_implementation(implementation)
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    if implementation == "auto":
        if platform == "gpu" and jnp.dtype(dtype) in map(jnp.dtype, _CUDNN_DTYPES):
            return "cudnn"
        return "splash" if platform == "tpu" else "xla"
    needs = _PLATFORM_OF.get(implementation)
    if needs and platform != needs:
        raise ValueError(f"attention={implementation!r} runs on {needs.upper()} only; this is {platform!r} "
                         "(use 'auto' or 'xla')")
    if implementation == "cudnn" and jnp.dtype(dtype) not in map(jnp.dtype, _CUDNN_DTYPES):
        raise ValueError(f"attention='cudnn' needs bfloat16 or float16 activations, got {jnp.dtype(dtype)}")
    return implementation


def attend(q, k, v, *, scale: float, causal: bool = False, segment_ids=None, implementation: str = "xla",
           mesh=None, head_axes: tuple[str, str] = ("q_heads", "kv_heads")):
    """Self-attention of q (B, T, N, H) over k, v (B, T, K, H) (K divides N: grouped-query heads), with the
    structure described in the module docstring. `implementation`: a concrete kernel (see `choose`). `mesh`: the
    activations' mesh, needed by splash only (a Pallas kernel is not partitioned by XLA: it runs under shard_map
    over the batch and `head_axes` logical axes)."""
    if implementation == "xla":
        return _xla(q, k, v, scale, causal, segment_ids)
    if implementation == "cudnn":
        return _cudnn(q, k, v, scale, causal, segment_ids)
    if implementation == "splash":
        return _splash_sharded(q, k, v, scale, causal, segment_ids, mesh, head_axes)
    raise ValueError(f"attend: implementation={implementation!r}; expected 'xla', 'cudnn' or 'splash' "
                     "(resolve 'auto' with choose())")


def _xla(q, k, v, scale, causal, segment_ids):
    # The segment mask is (B, 1, T, T) bool; XLA's causal mask is and-ed with it inside dot_product_attention.
    mask = None if segment_ids is None else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=causal, implementation="xla")


def _cudnn(q, k, v, scale, causal, segment_ids):
    """cuDNN flash attention (untested here). Padding as lengths: exact for right-padded rows; other layouts go
    to `_xla` through a runtime branch (the predicate is one reduction over the (B, T) ids)."""
    if segment_ids is None:
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal, implementation="cudnn")
    t = segment_ids.shape[1]
    real = segment_ids != 0
    lengths = jnp.sum(real, axis=1, dtype=jnp.int32)
    binary = jnp.all((segment_ids == 0) | (segment_ids == 1))
    right_padded = binary & jnp.all(real == (jnp.arange(t) < lengths[:, None]))

    def fused(q, k, v):
        # A row with no real token would be an empty softmax: give it one (padding) key; its outputs are unused.
        # Padding queries see the real keys here (not the padding ones as on XLA): rows nobody reads.
        return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=causal,
                                            key_value_seq_lengths=jnp.maximum(lengths, 1),
                                            implementation="cudnn")

    return jax.lax.cond(right_padded, fused, lambda q, k, v: _xla(q, k, v, scale, causal, segment_ids), q, k, v)


_SPLASH_BLOCK = 128  # splash's block sizes must be multiples of the 128 lanes; sequences are padded up to them


@functools.lru_cache(maxsize=None)
def _splash_kernel(num_heads: int, length: int, causal: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    block = splash.BlockSizes(block_q=_SPLASH_BLOCK, block_kv=_SPLASH_BLOCK, block_kv_compute=_SPLASH_BLOCK,
                              block_q_dkv=_SPLASH_BLOCK, block_kv_dkv=_SPLASH_BLOCK,
                              block_kv_dkv_compute=_SPLASH_BLOCK, block_q_dq=_SPLASH_BLOCK,
                              block_kv_dq=_SPLASH_BLOCK)
    head_mask = splash.CausalMask((length, length)) if causal else splash.FullMask((length, length))
    return splash.make_splash_mha(splash.MultiHeadMask([head_mask] * num_heads), block_sizes=block,
                                  head_shards=1, q_seq_shards=1)


def _splash(q, k, v, scale, causal, segment_ids):
    """Splash attention (Pallas TPU kernel; untested here). The kernel is per example with heads first, so the
    batch is vmapped and (B, T, heads, H) transposed to (heads, T, H); it does not scale the logits, so q is
    pre-scaled. T is padded to a multiple of the block with segment id -1 (a segment of its own: padded slots
    see only each other; real tokens never see them) and cut off again."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    b, t, n, _ = q.shape
    padded = -(-t // _SPLASH_BLOCK) * _SPLASH_BLOCK
    ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - t)), constant_values=-1)
    heads_first = lambda x: jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))).transpose(0, 2, 1, 3)  # noqa: E731
    kernel = _splash_kernel(n, padded, causal)
    out = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids)))(
        heads_first(q * jnp.asarray(scale, q.dtype)), heads_first(k), heads_first(v), ids)
    return out.transpose(0, 2, 1, 3)[:, :t]


def _splash_sharded(q, k, v, scale, causal, segment_ids, mesh, head_axes):
    """`_splash` per shard: batch over the 'batch' rule's axes, heads over the heads' axes when both q and k/v
    heads split evenly (each shard then holds whole GQA groups), else replicated heads."""
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    if mesh is None or mesh.size == 1:
        return _splash(q, k, v, scale, causal, segment_ids)
    rules = sharding.current_rules()
    q_spec = sharding.logical_to_spec(("batch", None, head_axes[0], None), q.shape, mesh, rules)
    kv_spec = sharding.logical_to_spec(("batch", None, head_axes[1], None), k.shape, mesh, rules)
    if q_spec[2] != kv_spec[2]:
        q_spec, kv_spec = P(q_spec[0], None, None, None), P(kv_spec[0], None, None, None)
    return jax.shard_map(lambda q, k, v, ids: _splash(q, k, v, scale, causal, ids), mesh=mesh,
                         in_specs=(q_spec, kv_spec, kv_spec, P(q_spec[0], None)), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)
