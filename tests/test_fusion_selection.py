"""Flash Global Fusion and Visual-Native Selection behave as DESIGN §2.2–2.3 say."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meteor_jax.models.fusion import FlashGlobalFusion, FusionConfig, scan_order
from meteor_jax.models.selection import SelectionConfig, gumbel_noise, native_expert, select

GRID, VISION_DIM, LLM_DIM = 4, 24, 32


def test_scan_order_hand_case():
    # 4×4 grid, 2×2 windows: window (0,0) = raster 0,1,4,5; window (0,1) = 2,3,6,7; ...
    expected = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    np.testing.assert_array_equal(scan_order(4, 2), expected)
    np.testing.assert_array_equal(scan_order(4, 1), np.arange(16))
    np.testing.assert_array_equal(scan_order(4, 4), np.arange(16))


@pytest.mark.parametrize("grid,window", [(24, 4), (24, 3), (24, 6), (8, 4), (6, 2), (5, 5)])
def test_scan_order_is_exact_permutation(grid, window):
    order = scan_order(grid, window)
    np.testing.assert_array_equal(np.sort(order), np.arange(grid * grid))
    x = np.random.default_rng(0).normal(size=grid * grid)
    np.testing.assert_array_equal(x[order][np.argsort(order)], x)
    # Tokens of one window are contiguous in the sequence.
    rows, cols = np.divmod(order, grid)
    window_id = (rows // window) * (grid // window) + cols // window
    assert np.all(np.diff(window_id) >= 0)


def test_scan_window_must_divide_grid():
    with pytest.raises(ValueError, match="scan_window"):
        scan_order(24, 5)


def _fusion(**overrides):
    cfg = FusionConfig(**{**dict(dim=16, num_layers=2, expand=2, d_state=4, scan_window=2, scan_chunk=4,
                                 scan_impl="sequential"), **overrides})
    return FlashGlobalFusion(cfg, vision_dim=VISION_DIM, llm_dim=LLM_DIM, grid=GRID, rngs=nnx.Rngs(0))


def _inputs(batch=2, m=5):
    k1, k2 = jax.random.split(jax.random.key(1))
    visual = jax.random.normal(k1, (batch, GRID * GRID, VISION_DIM))
    text = jax.random.normal(k2, (batch, m, LLM_DIM))
    mask = jnp.array([[True, True, True, False, False], [True, True, True, True, True]])[:batch, :m]
    return visual, text, mask


@pytest.mark.parametrize("bidirectional", [True, False])
def test_every_fused_token_depends_on_the_instruction(bidirectional):
    fusion = _fusion(bidirectional=bidirectional)
    visual, text, mask = _inputs()
    out = fusion(visual, text, mask)
    assert out.shape == (2, GRID * GRID, LLM_DIM)
    # Jacobian of every fused visual token (summed over channels) w.r.t. the instruction of sample 0.
    jac = jax.jit(jax.jacrev(lambda t: fusion(visual[:1], t, mask[:1]).sum(-1)[0]))(text[:1])  # (N, 1, M, D)
    per_token = jnp.abs(jac[:, 0]).sum(axis=-1)  # (N, M)
    assert np.all(np.asarray(per_token[:, :3]) > 0), "a visual token ignores a valid instruction token"
    np.testing.assert_array_equal(np.asarray(per_token[:, 3:]), 0.0)  # padding has no influence at all


@pytest.mark.parametrize("kernel", [3, 2, 5])
def test_local_step_equals_depthwise_convolution(kernel):
    """The fusion block's local step (shifted sums) equals XLA's depthwise convolution with "SAME" padding."""
    block = _fusion(local_kernel=kernel).blocks[0]
    e = block.cfg.inner
    xv = jax.random.normal(jax.random.key(2), (2, GRID * GRID, e))
    w = block.local_kernel[...]
    reference = jax.lax.conv_general_dilated(
        xv.reshape(2, GRID, GRID, e), w[:, :, None, :], window_strides=(1, 1), padding="SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=e) + block.local_bias[...]
    np.testing.assert_allclose(block.local(xv), reference.reshape(2, GRID * GRID, e), rtol=1e-5, atol=1e-6)


def test_padded_instruction_values_are_ignored():
    fusion = _fusion()
    visual, text, mask = _inputs()
    noise = jnp.where(mask[..., None], 0.0, 100.0)
    run = jax.jit(lambda t: fusion(visual, t, mask))
    np.testing.assert_array_equal(np.asarray(run(text)), np.asarray(run(text + noise)))


def test_fusion_scan_implementations_agree():
    visual, text, mask = _inputs()
    outs = [jax.jit(_fusion(scan_impl=impl))(visual, text, mask) for impl in ("sequential", "associative", "chunked")]
    for out in outs[1:]:
        np.testing.assert_allclose(np.asarray(out), np.asarray(outs[0]), rtol=1e-5, atol=1e-5)


def test_every_visual_token_sees_the_whole_image():
    fusion = _fusion(num_layers=1)
    visual, text, mask = _inputs(batch=1)
    jac = jax.jit(jax.jacrev(lambda v: fusion(v, text, mask).sum(-1)[0]))(visual)  # (N, 1, N, Dv)
    influence = np.asarray(jnp.abs(jac[:, 0]).sum(axis=-1))  # (N out, N in)
    assert np.all(influence > 0), "with a bidirectional single scan every token reaches every other"


# ---------------------------------------------------------------- selection


def _selection_inputs(n=16, d=8, m=4, seed=0):
    rng = np.random.default_rng(seed)
    fused = jnp.asarray(rng.normal(size=(2, n, d)), jnp.float32)
    cls = jnp.asarray(rng.uniform(size=(2, n)), jnp.float32)
    text = jnp.asarray(rng.normal(size=(2, m, d)), jnp.float32)
    mask = jnp.asarray([[True, True, False, False], [True, True, True, True]])
    return fused, cls, text, mask


def test_native_expert_hand_computed():
    fused = jnp.array([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    text = jnp.array([[[3.0, 0.0], [0.0, -1.0], [5.0, 5.0]]])
    mask = jnp.array([[True, True, False]])
    # cosines with the two valid tokens: token0 (1, 0) → mean 0.5; token1 (0, -1) → mean -0.5;
    # token2 (1/√2, -1/√2) → mean 0.
    mean_cos = np.array([0.5, -0.5, 0.0])
    expected = np.exp(mean_cos / 0.1) / np.exp(mean_cos / 0.1).sum()
    np.testing.assert_allclose(np.asarray(native_expert(fused, text, mask, 0.1))[0], expected, rtol=1e-6)


@pytest.mark.parametrize("aggregate", ["mean", "rank", "split"])
def test_selection_keeps_top_k_in_raster_order(aggregate):
    fused, cls, text, mask = _selection_inputs()
    cfg = SelectionConfig(keep=5, aggregate=aggregate)
    out = select(fused, cls, text, mask, cfg)
    idx = np.asarray(out.indices)
    assert idx.shape == (2, 5)
    assert np.all(np.diff(idx, axis=1) > 0), "kept tokens must be unique and in raster order"
    s_v, s_n = np.asarray(out.visual_score), np.asarray(out.native_score)
    np.testing.assert_allclose(s_v.sum(-1), 1.0, rtol=1e-6)
    for b in range(2):
        if aggregate == "mean":
            expected = np.argsort(-(0.5 * s_v[b] + 0.5 * s_n[b]), kind="stable")[:5]
        elif aggregate == "rank":
            rank = lambda s: np.argsort(np.argsort(s, kind="stable"), kind="stable")  # noqa: E731
            expected = np.argsort(-(rank(s_v[b]) + rank(s_n[b])), kind="stable")[:5]
        else:
            visual = np.argsort(-s_v[b], kind="stable")[:3]
            rest = [i for i in np.argsort(-s_n[b], kind="stable") if i not in visual][:2]
            expected = np.concatenate([visual, rest])
        np.testing.assert_array_equal(idx[b], np.sort(expected))
        np.testing.assert_array_equal(np.asarray(out.tokens)[b], np.asarray(fused)[b, idx[b]])


def test_keep_all_is_identity():
    fused, cls, text, mask = _selection_inputs()
    out = select(fused, cls, text, mask, SelectionConfig(keep=16))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(fused))


def test_straight_through_value_unchanged_and_gradient_reaches_native_expert():
    fused, cls, text, mask = _selection_inputs()

    def kept_sum(t, straight_through):
        cfg = SelectionConfig(keep=5, straight_through=straight_through)
        return jnp.sum(select(fused, cls, t, mask, cfg).tokens)

    assert float(kept_sum(text, True)) == float(kept_sum(text, False))
    grad = jax.jit(jax.grad(kept_sum), static_argnums=1)
    grad_st, grad_plain = grad(text, True), grad(text, False)
    assert float(jnp.abs(grad_st[:, :2]).sum()) > 0, "straight-through must pass a gradient to the native expert"
    np.testing.assert_array_equal(np.asarray(grad_plain), 0.0)


def test_soft_estimator_value_unchanged_and_gradient_reaches_every_score_by_hand():
    fused, cls, text, mask = _selection_inputs()
    cls = cls / jnp.sum(cls, axis=-1, keepdims=True)  # already normalised: d gate_i / d cls_j = δij - gate_i
    weights = jnp.asarray(np.random.default_rng(1).normal(size=(2, 5, fused.shape[-1])), jnp.float32)

    def loss(a, estimator):
        cfg = SelectionConfig(keep=5, aggregate="visual", estimator=estimator)
        return jnp.sum(select(fused, a, text, mask, cfg).tokens * weights)

    assert float(loss(cls, "soft")) == float(loss(cls, "gate"))
    got = np.asarray(jax.grad(loss)(cls, "soft"))
    idx = np.asarray(select(fused, cls, text, mask, SelectionConfig(keep=5, aggregate="visual")).indices)
    f, w, a = np.asarray(fused, np.float64), np.asarray(weights, np.float64), np.asarray(cls, np.float64)
    for b in range(2):
        d_gate = f[b] @ w[b].sum(axis=0)  # soft: every token's score moves the score-weighted mean of all tokens
        for slot, i in enumerate(idx[b]):  # gate: a kept token is scaled by its own score
            d_gate[i] += f[b, i] @ w[b, slot]
        np.testing.assert_allclose(got[b], d_gate - d_gate @ a[b], rtol=1e-5, atol=1e-5)
        dropped = np.setdiff1d(np.arange(16), idx[b])
        assert np.all(np.abs(got[b, dropped]) > 0), "the soft estimator must reach the dropped tokens' scores"
    gate_only = np.asarray(jax.grad(loss)(cls, "gate"))
    for b in range(2):  # the gate estimator alone moves every dropped score by the same amount (the normalisation)
        dropped = np.setdiff1d(np.arange(16), idx[b])
        np.testing.assert_allclose(gate_only[b, dropped], np.full(len(dropped), gate_only[b, dropped[0]]), rtol=1e-5)


def test_reinforce_draws_from_the_scores_with_the_plackett_luce_log_probability():
    rows, n = 20_000, 4
    gate = np.array([0.5, 0.25, 0.15, 0.10])
    cls = jnp.asarray(np.tile(gate, (rows, 1)), jnp.float32)
    fused = jnp.ones((rows, n, 2), jnp.float32)
    text, mask = jnp.ones((rows, 1, 2), jnp.float32), jnp.ones((rows, 1), bool)
    pixels = jnp.arange(rows, dtype=jnp.float32)[:, None]  # one distinct "image" per row
    noise = gumbel_noise(pixels, jnp.zeros((rows, 1), jnp.int32), n, seed=0)
    cfg = SelectionConfig(keep=1, aggregate="visual", estimator="reinforce")
    one = select(fused, cls, text, mask, cfg, noise)
    freq = np.bincount(np.asarray(one.indices)[:, 0], minlength=n) / rows
    np.testing.assert_allclose(freq, gate, atol=0.01)  # a draw, not the top 1 (which is always token 0)
    np.testing.assert_allclose(np.asarray(one.log_prob), np.log(gate[np.asarray(one.indices)[:, 0]]), rtol=1e-6)
    two = select(fused[:8], cls[:8], text[:8], mask[:8], dataclasses.replace(cfg, keep=2), noise[:8])
    drawn = np.argsort(-(np.log(gate) + np.asarray(noise[:8])), axis=1)[:, :2]  # draw order
    expected = np.log(gate[drawn[:, 0]]) + np.log(gate[drawn[:, 1]] / (1 - gate[drawn[:, 0]]))
    np.testing.assert_allclose(np.asarray(two.log_prob), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(two.indices), np.sort(drawn, axis=1))
    assert select(fused[:8], cls[:8], text[:8], mask[:8], cfg).log_prob is None  # no noise: the top K
    with pytest.raises(ValueError, match="reinforce"):
        select(fused[:8], cls[:8], text[:8], mask[:8], SelectionConfig(keep=1), noise[:8])
    with pytest.raises(ValueError, match="aggregate"):
        SelectionConfig(estimator="reinforce", aggregate="rank")


def test_gumbel_noise_is_a_function_of_image_and_instruction():
    pixels = jnp.asarray(np.random.default_rng(0).normal(size=(3, 4, 4, 3)), jnp.float32)
    question = jnp.asarray([[5, 6, 7], [5, 6, 7], [5, 6, 8]], jnp.int32)
    same_image = jnp.stack([pixels[0]] * 3)
    a = np.asarray(gumbel_noise(same_image, question, 16, seed=0))
    np.testing.assert_array_equal(a[0], a[1])  # same image, same question
    assert not np.allclose(a[0], a[2])  # same image, another question
    b = np.asarray(gumbel_noise(pixels, question[:1].repeat(3, 0), 16, seed=0))
    assert not np.allclose(b[0], b[1])  # another image
    assert not np.allclose(a, np.asarray(gumbel_noise(same_image, question, 16, seed=1)))


def test_bad_selection_config_is_rejected():
    with pytest.raises(ValueError, match="aggregate"):
        SelectionConfig(aggregate="max")
    with pytest.raises(ValueError, match="estimator"):
        SelectionConfig(estimator="gumbel")
    with pytest.raises(ValueError, match=r"selection.baseline='mean'; expected one of \('batch', 'greedy'\)"):
        SelectionConfig(estimator="reinforce", baseline="mean")
    fused, cls, text, mask = _selection_inputs()
    with pytest.raises(ValueError, match="exceeds"):
        select(fused, cls, text, mask, SelectionConfig(keep=17))
