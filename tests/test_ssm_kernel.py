"""The Pallas selective scan (interpret mode on CPU) against autodiff of the `lax.scan` reference, and its memory."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meteor_jax.models.fusion import FlashGlobalFusion, FusionConfig
from meteor_jax.models.ssm import SelectiveSSM, _scan_sequential, selective_scan
from meteor_jax.models.ssm_kernel import pallas_selective_scan

import test_ssm

TOL = dict(rtol=1e-5, atol=1e-5)


def scan_inputs(key, batch, length, inner, state):
    """test_ssm's scan inputs and a cotangent for y."""
    args_key, cotangent_key = jax.random.split(key)
    args = test_ssm.scan_inputs(args_key, batch, length, inner, state)
    return args, jax.random.normal(cotangent_key, (batch, length, inner))


def value_and_grads(scan, args, cotangent):
    """y and the gradients of Σ y·cotangent w.r.t. every argument, jitted."""
    @jax.jit
    def run(*a):
        y, pullback = jax.vjp(scan, *a)
        return y, pullback(cotangent)
    return run(*args)


def assert_matches_reference(args, cotangent, **kernel_kwargs):
    """y and the gradients of x, Δ, A, B, C, D: the kernel (+ D·x, as selective_scan adds it) vs the sequential scan."""
    kernel = lambda x, delta, A, B, C, D: pallas_selective_scan(x, delta, A, B, C, **kernel_kwargs) + D * x
    reference = lambda *a: selective_scan(*a, impl="sequential")
    (y, grads), (y_ref, grads_ref) = (value_and_grads(f, args, cotangent) for f in (kernel, reference))
    np.testing.assert_allclose(y, y_ref, **TOL)
    errors = {"y": float(jnp.max(jnp.abs(y - y_ref)))}
    for name, g, g_ref in zip("x delta A B C D".split(), grads, grads_ref):
        assert float(jnp.max(jnp.abs(g_ref))) > 1e-2, name  # not vacuously zero
        np.testing.assert_allclose(g, g_ref, **TOL, err_msg=name)
        errors[name] = float(jnp.max(jnp.abs(g - g_ref)))
    print("max abs errors vs sequential:", errors)  # pytest -s shows them


@pytest.mark.parametrize("batch,length,inner,state,block_e,chunk", [
    (2, 21, 6, 4, 4, 8),  # L not a multiple of chunk, E not a multiple of block_e, batch > 1
    (1, 16, 16, 3, 8, 4),  # everything divides except N (padded to a power of two)
    (3, 5, 8, 4, 8, 64),  # L shorter than one chunk
])
def test_matches_sequential_outputs_and_gradients(batch, length, inner, state, block_e, chunk):
    args, cotangent = scan_inputs(jax.random.key(length), batch, length, inner, state)
    assert_matches_reference(args, cotangent, block_e=block_e, chunk=chunk)


def test_zero_delta_steps_are_identity():
    args, cotangent = scan_inputs(jax.random.key(1), 2, 19, 8, 4)
    x, delta = args[:2]
    holes = np.zeros((2, 19), bool)
    holes[0, :4] = True  # leading, scattered and last positions
    holes[1, [3, 8, 9, 18]] = True
    delta = jnp.where(holes[..., None], 0.0, delta)
    args = (x, delta) + args[2:]
    assert_matches_reference(args, cotangent, block_e=4, chunk=4)
    # x at a Δ = 0 step feeds nothing: every other output is bitwise the same.
    scan = jax.jit(lambda x: pallas_selective_scan(x, *args[1:5], block_e=4, chunk=4))
    y, y_changed = np.asarray(scan(x)), np.asarray(scan(jnp.where(holes[..., None], 100.0, x)))
    np.testing.assert_array_equal(y[~holes], y_changed[~holes])


def test_eager_and_jitted_match_the_reference():
    args, _ = scan_inputs(jax.random.key(2), 1, 6, 4, 2)
    reference = _scan_sequential(*args[:5])
    eager = pallas_selective_scan(*args[:5], block_e=4, chunk=4)
    jitted = jax.jit(pallas_selective_scan, static_argnames=("block_e", "chunk", "interpret"))(
        *args[:5], block_e=4, chunk=4)
    np.testing.assert_allclose(eager, reference, **TOL)
    np.testing.assert_allclose(jitted, reference, **TOL)


def test_selective_ssm_module_matches_sequential():
    def make(impl):
        ssm = SelectiveSSM(12, d_state=4, dt_rank=2, scan_impl=impl, scan_chunk=8, rngs=nnx.Rngs(0))
        ssm.dt_proj.bias.set_value(ssm.dt_proj.bias[...] + 4.0)  # larger Δ: the state carries information
        return ssm

    x = jax.random.normal(jax.random.key(0), (2, 19, 12))
    mask = jnp.ones((2, 19), bool).at[0, :5].set(False).at[1, 7].set(False)

    @nnx.jit
    def loss_and_grads(ssm):
        return nnx.value_and_grad(lambda m: jnp.sum(jnp.sin(m(x, mask))))(ssm)

    (loss, grads), (loss_ref, grads_ref) = loss_and_grads(make("pallas")), loss_and_grads(make("sequential"))
    np.testing.assert_allclose(loss, loss_ref, **TOL)
    for (path, g), (_, g_ref) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(grads_ref)):
        np.testing.assert_allclose(g.get_value(), g_ref.get_value(), **TOL, err_msg=str(path))


def test_fusion_with_pallas_scan_matches_sequential():
    grid, vision_dim, llm_dim = 4, 24, 32

    def fusion(impl):
        cfg = FusionConfig(dim=16, num_layers=1, expand=2, d_state=4, scan_window=2, scan_chunk=4, scan_impl=impl)
        return FlashGlobalFusion(cfg, vision_dim=vision_dim, llm_dim=llm_dim, grid=grid, rngs=nnx.Rngs(0))

    k1, k2 = jax.random.split(jax.random.key(1))
    visual = jax.random.normal(k1, (2, grid * grid, vision_dim))
    text = jax.random.normal(k2, (2, 5, llm_dim))
    mask = jnp.array([[True, True, True, False, False], [True] * 5])
    out, ref = (jax.jit(fusion(impl))(visual, text, mask) for impl in ("pallas", "sequential"))
    np.testing.assert_allclose(out, ref, **TOL)


# ---------------------------------------------------------------- memory


def _all_avals(jaxpr):
    """(primitive name, aval) of every value in a jaxpr and in its sub-jaxprs (pallas kernels' refs included)."""
    for v in jaxpr.invars:
        yield "input", v.aval
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            yield eqn.primitive.name, v.aval
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _all_avals(sub)


def _full_state_values(impl, batch=2, length=32, inner=16, state=4, chunk=8):
    """Values of ≥ Bt·L·E·N elements in the jaxpr of value_and_grad of the scan; and how many pallas_calls."""
    args, cotangent = scan_inputs(jax.random.key(0), batch, length, inner, state)
    loss = lambda *a: jnp.sum(selective_scan(*a, impl=impl, chunk=chunk) * cotangent)
    jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=tuple(range(6))))(*args).jaxpr
    avals = list(_all_avals(jaxpr))
    full = batch * length * inner * state
    big = [(name, aval.shape) for name, aval in avals if math.prod(getattr(aval, "shape", ())) >= full]
    return big, sum(name == "pallas_call" for name, _ in avals)


def test_pallas_scan_never_materialises_the_full_state():
    big, pallas_calls = _full_state_values("pallas")
    assert pallas_calls >= 2  # forward and backward kernels were traced, and their outputs checked
    assert big == [], big
    # The same check finds the (Bt, L, E, N) arrays of the associative scan: it can fail.
    big, _ = _full_state_values("associative")
    assert (2, 32, 16, 4) in [shape for _, shape in big]


# ---------------------------------------------------------------- bad input


def test_bad_shapes_are_rejected():
    (x, delta, A, B, C, _), _ = scan_inputs(jax.random.key(0), 2, 5, 6, 4)
    with pytest.raises(ValueError, match="ranks"):
        pallas_selective_scan(x[0], delta, A, B, C)
    with pytest.raises(ValueError, match=r"B has shape \(2, 5, 3\), expected \(2, 5, 4\)"):
        pallas_selective_scan(x, delta, A, B[..., :3], C)
    with pytest.raises(ValueError, match="delta has shape"):
        pallas_selective_scan(x, delta[:, :4], A, B, C)
    with pytest.raises(ValueError, match="power of two"):
        pallas_selective_scan(x, delta, A, B, C, block_e=6)
