"""Next-token cross-entropy: from logits (`next_token_nll`), and from the decoder's final hidden states through the
output head in blocks of positions (`blockwise_next_token_nll`), the path the loss takes.

The blockwise path exists because most positions of a LLaVA sequence are never trained (the image slots, the
prompt, the padding) and the head is the most expensive matmul of a small decoder: at SmolLM2's vocabulary, 2 x 640
tokens, the head and its loss took 0.8 s of the decoder's 2.1 s fwd+bwd on 2 CPU cores. A block of positions none of
whose targets is trained is skipped in both passes (`lax.cond`: real control flow, no matmul for it); the (B, T, V)
logits never exist, only one block's (B, block, V), recomputed in the backward pass (a custom VJP that keeps the
hidden states and each position's log-sum-exp, and accumulates the head's gradient in place, never adding zeros
for a skipped block). Same numbers as the logits path up to float summation order.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from meteor_jax.models.layers import shard_batch

IGNORE_INDEX = -100


def shift_labels(labels: jax.Array) -> jax.Array:
    """Position t predicts labels[t + 1]: the (B, T) targets, IGNORE_INDEX in the last column."""
    return jnp.concatenate([labels[:, 1:], jnp.full_like(labels[:, :1], IGNORE_INDEX)], axis=1)


def _nll_from_parts(lse: jax.Array, picked: jax.Array, targets: jax.Array, vocab_size: int) -> jax.Array:
    """lse - picked where trained, 0 where IGNORE_INDEX, NaN for a target outside [0, V) (never a silently finite
    loss)."""
    nll = jnp.where((targets < 0) | (targets >= vocab_size), jnp.nan, lse - picked)
    return jnp.where(targets != IGNORE_INDEX, nll, 0.0)


def _picked_logit(logits: jax.Array, targets: jax.Array) -> jax.Array:
    # Compared against the vocabulary iota rather than gathered: elementwise, so it fuses into the logsumexp, where
    # a gather would put a (B, T, V) scatter into the backward pass (2.7-3.7x slower on 2 CPU cores).
    vocab = jnp.arange(logits.shape[-1], dtype=targets.dtype)
    return jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)


def next_token_nll(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(B, T) NLL of labels[t + 1] at position t from (B, T, V) logits, 0 where the target is IGNORE_INDEX, and
    the target count. The labels are shifted rather than the logits (a slice of the logits would put a (B, T, V)
    pad into the backward pass). A target outside [0, V) gives NaN."""
    targets = shift_labels(labels)
    logits = logits.astype(jnp.float32)
    nll = _nll_from_parts(jax.nn.logsumexp(logits, axis=-1), _picked_logit(logits, targets), targets, logits.shape[-1])
    return nll, jnp.sum(targets != IGNORE_INDEX).astype(jnp.float32)


def next_token_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(summed NLL, target count) of `next_token_nll`."""
    nll, count = next_token_nll(logits, labels)
    return jnp.sum(nll), count


def _to_blocks(x: jax.Array, block: int, fill) -> jax.Array:
    """(B, T, ...) → (T / block, B, block, ...), the last block padded with `fill`."""
    b, t = x.shape[:2]
    n = -(-t // block)
    x = jnp.pad(x, [(0, 0), (0, n * block - t)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(b, n, block, *x.shape[2:]), 1, 0)


def _from_blocks(x: jax.Array, t: int) -> jax.Array:
    """The inverse of `_to_blocks`: (n, B, block, ...) → (B, t, ...)."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :t]


class _Head:
    """The output head's matmuls for either weight layout: tied (V, D) embedding or untied (D, V) kernel."""

    def __init__(self, weight: jax.Array, tied: bool, dtype, mesh):
        self.weight = weight.astype(dtype)  # cast once, outside the loop over blocks
        self.tied, self.dtype, self.mesh = tied, dtype, mesh
        self.vocab_size = weight.shape[0] if tied else weight.shape[1]

    def logits(self, h: jax.Array) -> jax.Array:  # (B, C, D) → (B, C, V) float32
        spec = "bcd,vd->bcv" if self.tied else "bcd,dv->bcv"
        return shard_batch(jnp.einsum(spec, h.astype(self.dtype), self.weight,
                                      preferred_element_type=jnp.float32), self.mesh)

    def input_grad(self, dlogits: jax.Array) -> jax.Array:  # (B, C, V) → (B, C, D) float32
        spec = "bcv,vd->bcd" if self.tied else "bcv,dv->bcd"
        return jnp.einsum(spec, dlogits, self.weight, preferred_element_type=jnp.float32)

    def weight_grad(self, h: jax.Array, dlogits: jax.Array) -> jax.Array:  # the weight's shape, float32
        spec = "bcd,bcv->vd" if self.tied else "bcd,bcv->dv"
        return jnp.einsum(spec, h.astype(self.dtype), dlogits, preferred_element_type=jnp.float32)


def _trained(targets: jax.Array) -> jax.Array:
    return jnp.any(targets != IGNORE_INDEX)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _blockwise_nll(hidden, weight, targets, block, tied, dtype, mesh):
    return _blockwise_fwd(hidden, weight, targets, block, tied, dtype, mesh)[0]


def _blockwise_fwd(hidden, weight, targets, block, tied, dtype, mesh):
    head = _Head(weight, tied, dtype, mesh)
    blocked_targets = _to_blocks(targets, block, IGNORE_INDEX)

    def one_block(_, xs):
        h, t = xs

        def compute(h, t):
            logits = head.logits(h)
            return jax.nn.logsumexp(logits, axis=-1), _picked_logit(logits, t)

        zeros = jnp.zeros(t.shape, jnp.float32)
        return None, jax.lax.cond(_trained(t), compute, lambda h, t: (zeros, zeros), h, t)

    _, (lse, picked) = jax.lax.scan(one_block, None, (_to_blocks(hidden, block, 0), blocked_targets))
    nll = _from_blocks(_nll_from_parts(lse, picked, blocked_targets, head.vocab_size), targets.shape[1])
    return nll, (hidden, weight, targets, lse)


def _blockwise_bwd(block, tied, dtype, mesh, residuals, grad_nll):
    hidden, weight, targets, lse = residuals
    head = _Head(weight, tied, dtype, mesh)
    blocked_targets = _to_blocks(targets, block, IGNORE_INDEX)

    def one_block(grad_weight, xs):
        h, t, block_lse, g = xs

        def compute(grad_weight):
            probs = jnp.exp(head.logits(h) - block_lse[..., None])
            vocab = jnp.arange(probs.shape[-1], dtype=t.dtype)
            scale = jnp.where(t != IGNORE_INDEX, g, 0.0)[..., None]
            dlogits = (scale * (probs - (vocab == t[..., None]))).astype(dtype)
            return grad_weight + head.weight_grad(h, dlogits), head.input_grad(dlogits)

        return jax.lax.cond(_trained(t), compute, lambda gw: (gw, jnp.zeros(h.shape, jnp.float32)), grad_weight)

    grad_weight, grad_hidden = jax.lax.scan(
        one_block, jnp.zeros(weight.shape, jnp.float32),
        (_to_blocks(hidden, block, 0), blocked_targets, lse, _to_blocks(grad_nll, block, 0.0)))
    return (_from_blocks(grad_hidden, targets.shape[1]).astype(hidden.dtype), grad_weight.astype(weight.dtype),
            None)


_blockwise_nll.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_next_token_nll(hidden: jax.Array, weight: jax.Array, labels: jax.Array, *, tied: bool, block: int,
                             dtype=jnp.float32, mesh=None) -> tuple[jax.Array, jax.Array]:
    """`next_token_nll(hidden @ head, labels)` without the (B, T, V) logits (module docstring).

    hidden (B, T, D): the final-normed hidden states; weight: the head, the (V, D) embedding if `tied`, else the
    (D, V) kernel; both are cast to `dtype` for the matmuls, which accumulate in float32. `block`: positions per
    block (at most T; the last block is padded). Returns ((B, T) float32 NLL, target count)."""
    if block < 1:
        raise ValueError(f"block={block} must be >= 1")
    targets = shift_labels(labels)
    block = min(block, targets.shape[1])  # never pad a short sequence up to a block
    nll = _blockwise_nll(hidden, weight, targets, block, tied, jnp.dtype(dtype), mesh)
    return nll, jnp.sum(targets != IGNORE_INDEX).astype(jnp.float32)
