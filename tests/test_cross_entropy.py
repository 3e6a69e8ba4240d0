"""Next-token cross-entropy: the logits form against the textbook one, and the blockwise head + loss (the path
`Meteor.loss` takes) against the logits form, values and gradients."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from meteor_jax.models.cross_entropy import IGNORE_INDEX, blockwise_next_token_nll, next_token_loss, next_token_nll
from meteor_jax.models.llm import LLMConfig
from meteor_jax.models.meteor import Meteor
from test_meteor import tiny_batch, tiny_model

B, T, D, V = 3, 13, 6, 11


def test_next_token_loss_hand_case():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = jnp.array([[IGNORE_INDEX, 1, IGNORE_INDEX]])
    total, count = next_token_loss(logits, labels)
    assert float(count) == 1.0
    np.testing.assert_allclose(float(total), -np.log(0.25), rtol=1e-6)


def test_next_token_loss_equals_gathered_log_softmax():
    """The fused form (shifted labels, iota compare) against the textbook one, values and gradients; a target
    outside the vocabulary is NaN, not a finite loss."""
    logits = 3.0 * jax.random.normal(jax.random.key(0), (3, 7, 11))
    labels = jax.random.randint(jax.random.key(1), (3, 7), 0, 11)
    labels = jnp.where(jax.random.bernoulli(jax.random.key(2), 0.4, (3, 7)), IGNORE_INDEX, labels)

    def reference(logits):
        targets = labels[:, 1:]
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(targets != IGNORE_INDEX, nll, 0.0))

    total, count = next_token_loss(logits, labels)
    assert float(count) == float(jnp.sum(labels[:, 1:] != IGNORE_INDEX))
    np.testing.assert_allclose(float(total), float(reference(logits)), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(lambda x: next_token_loss(x, labels)[0])(logits), jax.grad(reference)(logits),
                               rtol=1e-5, atol=1e-6)
    assert np.isnan(float(next_token_loss(logits, labels.at[0, 3].set(11))[0]))


def head_problem(tied: bool, seed: int = 0):
    """hidden (B, T, D), the head weight in either layout, labels with IGNORE_INDEX stretches: row 1 has no target
    at all, row 2 none in positions 2-9 (so small blocks are skipped whole)."""
    keys = jax.random.split(jax.random.key(seed), 4)
    hidden = jax.random.normal(keys[0], (B, T, D))
    weight = jax.random.normal(keys[1], (V, D) if tied else (D, V))
    labels = jax.random.randint(keys[2], (B, T), 0, V)
    labels = jnp.where(jax.random.bernoulli(keys[3], 0.3, (B, T)), IGNORE_INDEX, labels)
    labels = labels.at[1].set(IGNORE_INDEX).at[2, 3:11].set(IGNORE_INDEX)
    return hidden, weight, labels


def logits_of(hidden, weight, tied):
    return jnp.einsum("btd,vd->btv" if tied else "btd,dv->btv", hidden, weight)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("block", [1, 4, 5, T, 32])
def test_blockwise_equals_logits_form(tied, block):
    """Every block size, including ones that do not divide T and one beyond it: the same (B, T) NLL, count, and
    gradients of a weighted sum to the hidden states and the head."""
    hidden, weight, labels = head_problem(tied)
    cotangent = jax.random.normal(jax.random.key(9), (B, T))

    def blockwise(h, w):
        nll, count = blockwise_next_token_nll(h, w, labels, tied=tied, block=block)
        return jnp.sum(nll * cotangent), (nll, count)

    def reference(h, w):
        nll, count = next_token_nll(logits_of(h, w, tied), labels)
        return jnp.sum(nll * cotangent), (nll, count)

    (_, (nll, count)), grads = jax.value_and_grad(blockwise, argnums=(0, 1), has_aux=True)(hidden, weight)
    (_, (want_nll, want_count)), want_grads = jax.value_and_grad(reference, argnums=(0, 1), has_aux=True)(
        hidden, weight)
    assert float(count) == float(want_count) > 0
    np.testing.assert_allclose(nll, want_nll, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(nll)[1] == 0.0)  # no target in row 1
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_blocks_without_targets_are_skipped():
    """A block none of whose targets is trained is never computed, in either pass: NaN hidden states there leave
    the loss and every gradient finite (the logits form multiplies them by zero and gets NaN)."""
    hidden, weight, labels = head_problem(tied=True)
    labels = labels.at[:, 5:9].set(IGNORE_INDEX).at[0, 4].set(1)  # targets at 4-7 untrained, at 3 trained (row 0)
    hidden = hidden.at[:, 4:8].set(jnp.nan)

    def loss(w, block):
        return jnp.sum(blockwise_next_token_nll(hidden, w, labels, tied=True, block=block)[0])

    value, grad = jax.value_and_grad(loss)(weight, 4)  # blocks [0, 4), [4, 8) (skipped), [8, 12), [12, 13)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad))
    grad_hidden = jax.grad(lambda h: jnp.sum(blockwise_next_token_nll(h, weight, labels, tied=True, block=4)[0]))(
        hidden)
    assert np.all(np.asarray(grad_hidden)[:, 4:8] == 0.0) and np.all(np.isfinite(grad_hidden))
    # Block 3 puts positions 4 and 5 in the computed block [3, 6), and the logits form computes everything.
    assert np.isnan(np.asarray(jax.grad(loss)(weight, 3))).any()
    logits_form = jax.grad(lambda w: next_token_loss(logits_of(hidden, w, True), labels)[0])(weight)
    assert np.isnan(np.asarray(logits_form)).any()


def test_blockwise_out_of_range_target_is_nan():
    hidden, weight, labels = head_problem(tied=False)
    nll, _ = blockwise_next_token_nll(hidden, weight, labels.at[0, 3].set(V), tied=False, block=4)
    assert np.isnan(float(nll[0, 2])) and np.isfinite(float(jnp.sum(nll[1:])))


def test_blockwise_bfloat16_close_to_float32():
    """bf16 matmuls accumulating in float32: within bf16 tolerance of the float32 values and gradients."""
    hidden, weight, labels = head_problem(tied=True)

    def loss(h, w, dtype):
        return jnp.sum(blockwise_next_token_nll(h, w, labels, tied=True, block=4, dtype=dtype)[0])

    value32, grads32 = jax.value_and_grad(loss, argnums=(0, 1))(hidden, weight, jnp.float32)
    value16, grads16 = jax.value_and_grad(loss, argnums=(0, 1))(hidden, weight, jnp.bfloat16)
    np.testing.assert_allclose(float(value16), float(value32), rtol=2e-2)
    for got, want in zip(grads16, grads32):
        assert got.dtype == want.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=0.1, atol=0.1 * float(jnp.abs(want).max()))


def test_model_loss_equals_loss_of_logits():
    """`Meteor.loss` (blockwise, several blocks) against the loss of the model's full logits: value and every
    parameter's gradient."""
    base = tiny_model()
    cfg = dataclasses.replace(base.cfg, llm=dataclasses.replace(base.cfg.llm, loss_block=5))
    model = Meteor(cfg, rngs=nnx.Rngs(0))
    batch = tiny_batch(cfg)
    graphdef, params = nnx.split(model)

    def blockwise(p):
        return nnx.merge(graphdef, p).loss(batch)

    def reference(p):
        return next_token_loss(nnx.merge(graphdef, p)(batch), batch["labels"])

    (total, count), grads = jax.jit(jax.value_and_grad(blockwise, has_aux=True))(params)
    (want_total, want_count), want = jax.jit(jax.value_and_grad(reference, has_aux=True))(params)
    assert float(count) == float(want_count) > 0
    np.testing.assert_allclose(float(total), float(want_total), rtol=1e-5)
    # Float summation order differs (blocks): within 1e-4 of each parameter's largest gradient (measured: 2e-6),
    # plus 1e-6 for the attention key biases, whose gradient is zero (softmax ignores a shift shared by all keys)
    # and whose computed values are rounding noise of 1e-7.
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, atol=1e-4 * float(jnp.abs(w).max()) + 1e-6), grads,
                 want)


def test_loss_block_must_be_positive():
    with pytest.raises(ValueError, match="loss_block"):
        LLMConfig(loss_block=0)
    with pytest.raises(ValueError, match="block"):
        blockwise_next_token_nll(jnp.zeros((1, 2, 3)), jnp.zeros((4, 3)), jnp.zeros((1, 2), jnp.int32), tied=True,
                                 block=0)
