"""models/attention.py: the XLA segment-id path against the dense mask the LLM used to build, the LLM's no-cache
path against its cache path (which keeps that dense mask), and the per-platform chooser. The cuDNN and splash
kernels need a GPU / TPU and are not run here."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meteor_jax.models.attention import attend, choose
from meteor_jax.models.llm import LLM, LLMConfig
from meteor_jax.models.vision import VisionConfig

# Right-padded, left-padded, interleaved and all-padding rows.
MASKS = np.array([[1] * 9 + [0] * 3, [0] * 4 + [1] * 8, [1, 1, 0, 1, 0, 1, 1, 1, 0, 0, 1, 1], [0] * 12], bool)


def dense_mask(mask):
    """The LLM's former mask: causal & key-valid, plus every query's own slot."""
    t = mask.shape[1]
    causal = np.tril(np.ones((t, t), bool))
    return ((mask[:, None, :] & causal[None]) | np.eye(t, dtype=bool)[None])[:, None]


def test_segment_ids_equal_the_dense_mask_on_real_queries():
    rng = np.random.default_rng(0)
    b, t, n, kv, h = MASKS.shape[0], MASKS.shape[1], 4, 2, 8
    q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, kv, kv))
    dense = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=dense_mask(MASKS), scale=h**-0.5))
    segments = jax.jit(lambda q, k, v: attend(q, k, v, scale=h**-0.5, causal=True,
                                              segment_ids=jnp.asarray(MASKS, jnp.int32), implementation="xla"))
    ours, reference = np.asarray(segments(q, k, v)), np.asarray(dense(q, k, v))
    np.testing.assert_array_equal(ours[MASKS], reference[MASKS])
    assert np.isfinite(ours).all()  # padding rows (all-padding one included) have a non-empty softmax


def test_llm_no_cache_path_equals_the_dense_mask_path():
    """Without a cache the LLM attends by segment ids; a cache prefill still builds the dense mask. Same logits on
    every real position, bit for bit, for every padding layout."""
    cfg = LLMConfig(vocab_size=64, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=32,
                    attention="xla")
    model = LLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 64, MASKS.shape), jnp.int32)
    mask = jnp.asarray(MASKS)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)

    @jax.jit
    def both(state):
        llm = nnx.merge(graphdef, state)
        x = llm.embed_tokens(tokens)
        plain, _ = llm(x, positions=positions, mask=mask)
        cached, _ = llm(x, positions=positions, mask=mask, cache=llm.init_cache(*MASKS.shape))
        return plain, cached

    plain, cached = map(np.asarray, both(state))
    np.testing.assert_array_equal(plain[MASKS], cached[MASKS])


def test_choose_per_platform():
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert choose("auto", "cpu", bf16) == "xla"
    assert choose("auto", "gpu", bf16) == "cudnn"
    assert choose("auto", "cuda", jnp.float16) == "cudnn"
    assert choose("auto", "gpu", f32) == "xla"  # cuDNN flash attention has no float32 kernel
    assert choose("auto", "tpu", f32) == "splash"
    assert choose("xla", "tpu", bf16) == "xla"
    assert choose("cudnn", "gpu", bf16) == "cudnn"
    assert choose("splash", "tpu", f32) == "splash"
    with pytest.raises(ValueError, match="GPU only"):
        choose("cudnn", "cpu", bf16)
    with pytest.raises(ValueError, match="TPU only"):
        choose("splash", "gpu", bf16)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        choose("cudnn", "gpu", f32)
    with pytest.raises(ValueError, match="expected one of"):
        choose("flash", "gpu", bf16)


def test_config_fields_are_validated():
    with pytest.raises(ValueError, match="llm.attention='flash'"):
        LLMConfig(attention="flash")
    with pytest.raises(ValueError, match="vision.attention='fused'"):
        VisionConfig(attention="fused")
