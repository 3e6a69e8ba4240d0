"""Selective scan (four implementations), SelectiveSSM masking and init, MambaBlock parity with HF MambaMixer."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file
from transformers import MambaConfig
from transformers.models.mamba.modeling_mamba import MambaMixer

from meteor_jax.convert.keymap import SafetensorsReader, export_state
from meteor_jax.convert.mamba import load_mamba_block, mamba_block_kwargs, mamba_mixer_rules
from meteor_jax.models.ssm import SCAN_IMPLS, MambaBlock, SelectiveSSM, causal_depthwise_conv1d, selective_scan
from meteor_jax.sharding import DEFAULT_RULES, make_mesh, state_shardings
from jax.sharding import PartitionSpec as P

CHUNK = 8  # small, so tests cross several chunks; every L below is not a multiple of it

# Jitted entry points: eager op-by-op dispatch of the scans is far slower than compiling them.
scan = jax.jit(selective_scan, static_argnames=("impl", "chunk"))


@nnx.jit
def apply(module, x, mask=None):
    return module(x, mask)


def scan_inputs(key, batch=2, length=21, channels=6, d_state=4):
    k = jax.random.split(key, 6)
    x = jax.random.normal(k[0], (batch, length, channels))
    delta = jax.nn.softplus(jax.random.normal(k[1], (batch, length, channels)) - 1.0)
    A = -jnp.exp(jax.random.normal(k[2], (channels, d_state)))
    B = jax.random.normal(k[3], (batch, length, d_state))
    C = jax.random.normal(k[4], (batch, length, d_state))
    D = jax.random.normal(k[5], (channels,))
    return x, delta, A, B, C, D


def rel_err(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


# ---------------------------------------------------------------- the scan


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_hand_computed_tiny_case(impl):
    # A = -ln 2: decay exp(Δ A) = 0.5 for Δ = 1, 0.25 for Δ = 2.
    # h1 = 1·1·1 = 1            y1 = 1·1   + 0.5·1 = 1.5
    # h2 = 0.5·1 + 1·2·2 = 4.5  y2 = 1·4.5 + 0.5·2 = 5.5
    # h3 = 0.25·4.5 + 2·1·3 = 7.125   y3 = 2·7.125 + 0.5·3 = 15.75
    x = jnp.array([1.0, 2.0, 3.0]).reshape(1, 3, 1)
    delta = jnp.array([1.0, 1.0, 2.0]).reshape(1, 3, 1)
    A = jnp.array([[-math.log(2.0)]])
    B = jnp.array([1.0, 2.0, 1.0]).reshape(1, 3, 1)
    C = jnp.array([1.0, 1.0, 2.0]).reshape(1, 3, 1)
    D = jnp.array([0.5])
    y = scan(x, delta, A, B, C, D, impl=impl, chunk=2)
    np.testing.assert_allclose(np.asarray(y).ravel(), [1.5, 5.5, 15.75], rtol=1e-6)
    y_no_skip = scan(x, delta, A, B, C, None, impl=impl, chunk=2)
    np.testing.assert_allclose(np.asarray(y_no_skip).ravel(), [1.0, 4.5, 14.25], rtol=1e-6)


def test_scan_impls_agree_in_outputs_and_gradients():
    args = scan_inputs(jax.random.key(0))
    cotangent = jax.random.normal(jax.random.key(1), args[0].shape)

    def output_and_grads(impl):
        @jax.jit
        def run(*a):
            y, pullback = jax.vjp(lambda *a: selective_scan(*a, impl=impl, chunk=CHUNK), *a)
            return y, pullback(cotangent)
        return run(*args)

    results = {impl: output_and_grads(impl) for impl in SCAN_IMPLS}
    y_ref, grads_ref = results["sequential"]
    for impl in ("associative", "chunked", "pallas"):
        y, grads = results[impl]
        assert rel_err(y, y_ref) <= 1e-5, impl
        for name, g, g_ref in zip("x delta A B C D".split(), grads, grads_ref):
            assert rel_err(g, g_ref) <= 1e-5, (impl, name, rel_err(g, g_ref))
    # Gradients are not trivially zero (the comparison above could otherwise pass vacuously).
    assert all(float(jnp.max(jnp.abs(g))) > 1e-3 for g in grads_ref)


def test_chunked_scan_handles_short_and_bf16_inputs():
    x, delta, A, B, C, D = scan_inputs(jax.random.key(2), length=5)
    ref = scan(x, delta, A, B, C, D, impl="sequential")
    assert rel_err(scan(x, delta, A, B, C, D, impl="chunked", chunk=64), ref) <= 1e-5  # L < chunk
    y16 = scan(x.astype(jnp.bfloat16), delta, A, B, C, D, impl="chunked", chunk=2)
    assert y16.dtype == jnp.bfloat16
    assert rel_err(y16.astype(jnp.float32), ref) <= 2e-2


def test_unknown_scan_impl_is_rejected():
    args = scan_inputs(jax.random.key(0))
    with pytest.raises(ValueError, match="associative.*chunked.*sequential"):
        selective_scan(*args, impl="parallel")
    with pytest.raises(ValueError, match="unknown scan impl"):
        SelectiveSSM(8, dt_rank=1, scan_impl="fast", rngs=nnx.Rngs(0))


def test_causal_depthwise_conv_matches_torch():
    x = np.random.default_rng(0).standard_normal((2, 9, 5)).astype(np.float32)
    conv = torch.nn.Conv1d(5, 5, kernel_size=4, groups=5, padding=3)
    expected = conv(torch.from_numpy(x).transpose(1, 2))[..., :9].transpose(1, 2).detach().numpy()
    kernel = conv.weight.detach().numpy()[:, 0, :].T
    got = causal_depthwise_conv1d(jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(conv.bias.detach().numpy()))
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-6)


# ---------------------------------------------------------------- SelectiveSSM: mask and init


def make_ssm(impl, inner=12, seed=0):
    ssm = SelectiveSSM(inner, d_state=4, dt_rank=2, scan_impl=impl, scan_chunk=CHUNK, rngs=nnx.Rngs(seed))
    # Larger dt than the init range, so the state really carries information across positions.
    ssm.dt_proj.bias.set_value(ssm.dt_proj.bias[...] + 4.0)
    return ssm


MASK = np.ones((2, 19), bool)
MASK[0, :5] = False  # prefix padding
MASK[1, [2, 3, 9, 16, 18]] = False  # scattered holes, the last position included


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_ssm_mask_removes_masked_positions(impl):
    ssm = make_ssm(impl)
    x = jax.random.normal(jax.random.key(0), (2, 19, 12))
    mask = jnp.asarray(MASK)
    # Changing x at masked positions changes no output elsewhere (bitwise: masked steps are exactly (1, 0)).
    x_changed = jnp.where(MASK[..., None], x, 100.0 * jax.random.normal(jax.random.key(1), x.shape))
    y, y_changed = np.asarray(apply(ssm, x, mask)), np.asarray(apply(ssm, x_changed, mask))
    np.testing.assert_array_equal(y[MASK], y_changed[MASK])
    everything = jnp.ones_like(mask)  # an all-True mask (not None) reuses the compiled masked call
    leaked = np.asarray(apply(ssm, x_changed, everything)), np.asarray(apply(ssm, x, everything))
    assert not np.allclose(leaked[0][MASK], leaked[1][MASK])
    # The unmasked outputs are those of the scan over the sequence with the masked positions removed.
    compact = x[np.asarray(MASK)].reshape(2, -1, 12)
    np.testing.assert_allclose(y[MASK].reshape(2, -1, 12), np.asarray(apply(ssm, compact, None)), rtol=1e-6, atol=1e-6)


def test_selective_ssm_init():
    inner, d_state, dt_min, dt_max = 64, 8, 1e-3, 1e-1
    ssm = SelectiveSSM(inner, d_state=d_state, dt_rank=4, dt_min=dt_min, dt_max=dt_max, rngs=nnx.Rngs(3))
    A = -np.exp(np.asarray(ssm.A_log[...]))
    np.testing.assert_allclose(A, -np.broadcast_to(np.arange(1, d_state + 1), (inner, d_state)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(ssm.D[...]), np.ones(inner))
    dt = np.asarray(jax.nn.softplus(ssm.dt_proj.bias[...]))
    assert dt.min() >= dt_min * (1 - 1e-4) and dt.max() <= dt_max * (1 + 1e-4)
    assert dt.max() / dt.min() > 10  # spread log-uniformly, not a constant
    w = np.abs(np.asarray(ssm.dt_proj.kernel[...]))
    assert w.max() <= 4 ** -0.5 and w.max() > 0.5 * 4 ** -0.5


# ---------------------------------------------------------------- MambaBlock


def test_every_block_parameter_has_known_logical_axes():
    block = MambaBlock(32, d_state=8, use_bias=True, rngs=nnx.Rngs(0))
    for path, v in nnx.to_flat_state(nnx.state(block, nnx.Param)):
        axes = v.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == v.get_value().ndim, path
        assert all(a is None or a in DEFAULT_RULES for a in axes), (path, axes)


def test_block_masked_positions_influence_no_other_position():
    # The scan's own masking is tested per impl above; here the conv masking, with the fastest-compiling scan.
    block = MambaBlock(16, d_state=4, scan_impl="sequential", rngs=nnx.Rngs(1))
    x = jax.random.normal(jax.random.key(0), (2, 19, 16))
    x_changed = jnp.where(MASK[..., None], x, 50.0 * jax.random.normal(jax.random.key(1), x.shape))
    y, y_changed = apply(block, x, jnp.asarray(MASK)), apply(block, x_changed, jnp.asarray(MASK))
    np.testing.assert_array_equal(np.asarray(y)[MASK], np.asarray(y_changed)[MASK])
    # With prefix padding the causal conv sees the same zeros as at the sequence start: same as no padding.
    unpadded = apply(block, x[:1, 5:])
    np.testing.assert_allclose(np.asarray(y)[0, 5:], np.asarray(unpadded)[0], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def hf_mixer(tmp_path_factory):
    config = MambaConfig(hidden_size=32, state_size=8, expand=2, conv_kernel=4, use_conv_bias=True, use_bias=False,
                         num_hidden_layers=1)
    torch.manual_seed(0)
    mixer = MambaMixer(config, layer_idx=0).eval()
    with torch.no_grad():  # HF inits D = 1 and identical A rows: make them random so the parity is real
        mixer.D.normal_()
        mixer.A_log.add_(0.3 * torch.randn_like(mixer.A_log))
        mixer.dt_proj.bias.add_(3.0 + torch.randn_like(mixer.dt_proj.bias))
        mixer.conv1d.bias.normal_()
    directory = tmp_path_factory.mktemp("mamba_mixer")
    save_file({k: v.contiguous() for k, v in mixer.state_dict().items()}, str(directory / "model.safetensors"))
    x = torch.randn(2, 21, 32)
    with torch.no_grad():
        y = mixer(x).numpy()
    return config, mixer, directory, x.numpy(), y


@pytest.mark.parametrize("impl", SCAN_IMPLS)
def test_block_matches_hf_mamba_mixer(hf_mixer, impl):
    config, _, directory, x, y_ref = hf_mixer
    kwargs = mamba_block_kwargs(config.to_dict())
    block = load_mamba_block(SafetensorsReader(directory), scan_impl=impl, scan_chunk=CHUNK, **kwargs)
    y = np.asarray(apply(block, jnp.asarray(x)))
    assert np.abs(y_ref).max() > 1e-2
    assert np.abs(y - y_ref).max() <= 1e-4, np.abs(y - y_ref).max()


def test_mixer_conversion_round_trips(hf_mixer):
    config, mixer, directory, _, _ = hf_mixer
    block = load_mamba_block(SafetensorsReader(directory), **mamba_block_kwargs(config.to_dict()))
    exported = dict(export_state(nnx.state(block), mamba_mixer_rules()))
    theirs = {k: v.detach().numpy() for k, v in mixer.state_dict().items()}
    assert exported.keys() == theirs.keys()
    for key, value in theirs.items():
        np.testing.assert_array_equal(exported[key], value, err_msg=key)


def test_sharded_block_matches_unsharded():
    block = MambaBlock(32, d_state=8, scan_chunk=CHUNK, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (4, 21, 32))
    expected = apply(block, x)
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, state = nnx.split(block)
    shardings = state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    assert state["in_proj"]["kernel"].get_value().sharding.spec == P("fsdp", "tensor")
    with jax.set_mesh(mesh):
        y = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    np.testing.assert_allclose(np.asarray(y), np.asarray(expected), rtol=1e-5, atol=1e-6)
