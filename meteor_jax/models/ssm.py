"""Selective state-space model (Mamba S6): the scan, the selective SSM layer and a Mamba mixer block.

Recurrence per channel e and state n:
    h_t = exp(Δ_t A) ⊙ h_{t-1} + Δ_t B_t x_t ,   y_t = C_t · h_t + D ⊙ x_t.
The state math runs in float32 whatever the compute dtype. Four scans compute the same thing
(`selective_scan(impl=...)`): sequential (`lax.scan`, the reference), associative (materialises
(Bt, L, E, N)), chunked (associative inside rematerialised chunks) and pallas (fused Pallas kernels with a
custom VJP, `ssm_kernel.py`; tested in interpret mode on CPU only). Which one is fastest depends on the
backend, so it is a config choice.
"""
from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from meteor_jax.models.layers import dense, param
from meteor_jax.models.ssm_kernel import pallas_selective_scan

ScanImpl = Literal["associative", "chunked", "pallas", "sequential"]
SCAN_IMPLS = ("associative", "chunked", "pallas", "sequential")


def _combine(left, right):
    """Composition of two affine steps h ↦ a h + b (left first): (a1,b1)∘(a2,b2) = (a1 a2, a2 b1 + b2)."""
    a1, b1 = left
    a2, b2 = right
    return a1 * a2, a2 * b1 + b2


def _discretise(x, delta, A, B):
    """exp(Δ A) and Δ B x, both (..., E, N), from x, Δ (..., E), A (E, N), B (..., N)."""
    decay = jnp.exp(delta[..., None] * A)
    drive = (delta * x)[..., None] * B[..., None, :]
    return decay, drive


def _scan_sequential(x, delta, A, B, C):
    """`lax.scan` over time: the reference; holds one (Bt, E, N) state at a time."""
    def step(h, inputs):
        x_t, delta_t, B_t, C_t = inputs
        decay, drive = _discretise(x_t, delta_t, A, B_t)
        h = decay * h + drive
        return h, jnp.einsum("ben,bn->be", h, C_t)

    h0 = jnp.zeros(x.shape[:1] + A.shape, jnp.float32)
    time_major = [jnp.swapaxes(t, 0, 1) for t in (x, delta, B, C)]
    _, y = jax.lax.scan(step, h0, time_major)
    return jnp.swapaxes(y, 0, 1)


def _scan_associative(x, delta, A, B, C):
    """One associative scan over the full length: materialises (Bt, L, E, N) twice."""
    decay, drive = _discretise(x, delta, A, B)
    _, h = jax.lax.associative_scan(_combine, (decay, drive), axis=1)
    return jnp.einsum("blen,bln->ble", h, C)


def _scan_chunked(x, delta, A, B, C, chunk: int):
    """Associative scan inside chunks, state carried across chunks by `lax.scan`.

    The chunk body is rematerialised, so only (Bt, chunk, E, N) lives at once and the backward pass
    keeps one (Bt, E, N) state per chunk.
    """
    batch, length, _ = x.shape
    chunk = max(1, min(chunk, length))
    num_chunks = -(-length // chunk)
    pad = num_chunks * chunk - length
    if pad:
        # Δ = 0 is the identity step (decay 1, drive 0), so padding at the end changes nothing.
        x, delta, B, C = (jnp.pad(t, ((0, 0), (0, pad), (0, 0))) for t in (x, delta, B, C))

    def to_chunks(t):  # (Bt, L, F) -> (num_chunks, Bt, chunk, F)
        return jnp.swapaxes(t.reshape(batch, num_chunks, chunk, t.shape[-1]), 0, 1)

    @jax.checkpoint
    def body(h0, inputs):
        x_c, delta_c, B_c, C_c = inputs
        decay, drive = _discretise(x_c, delta_c, A, B_c)
        decay_cum, drive_cum = jax.lax.associative_scan(_combine, (decay, drive), axis=1)
        h = decay_cum * h0[:, None] + drive_cum
        return h[:, -1], jnp.einsum("bcen,bcn->bce", h, C_c)

    h0 = jnp.zeros((batch,) + A.shape, jnp.float32)
    _, y = jax.lax.scan(body, h0, [to_chunks(t) for t in (x, delta, B, C)])
    y = jnp.swapaxes(y, 0, 1).reshape(batch, num_chunks * chunk, -1)
    return y[:, :length]


def selective_scan(
    x: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    *,
    impl: ScanImpl = "chunked",
    chunk: int = 64,
) -> jax.Array:
    """Mamba S6 scan. x, delta (Bt, L, E); A (E, N), negative; B, C (Bt, L, N); D (E,) or None.

    Returns y (Bt, L, E) in x.dtype; the state is float32 and starts at zero.
    """
    if impl not in SCAN_IMPLS:
        raise ValueError(f"unknown scan impl {impl!r}; expected one of {SCAN_IMPLS}")
    out_dtype = x.dtype
    x32, delta32, A32, B32, C32 = (t.astype(jnp.float32) for t in (x, delta, A, B, C))
    if impl == "sequential":
        y = _scan_sequential(x32, delta32, A32, B32, C32)
    elif impl == "associative":
        y = _scan_associative(x32, delta32, A32, B32, C32)
    elif impl == "pallas":
        y = pallas_selective_scan(x32, delta32, A32, B32, C32, chunk=chunk)
    else:
        y = _scan_chunked(x32, delta32, A32, B32, C32, chunk)
    if D is not None:
        y = y + D.astype(jnp.float32) * x32
    return y.astype(out_dtype)


def causal_depthwise_conv1d(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """Causal depthwise conv over time: y_t = Σ_k kernel[k] x_{t-K+1+k} (+ bias). x (Bt, L, C), kernel (K, C).

    Equals torch's `Conv1d(groups=C, padding=K-1)` truncated to the first L outputs, with kernel = weight[:, 0, :].T.
    """
    width, length = kernel.shape[0], x.shape[1]
    padded = jnp.pad(x, ((0, 0), (width - 1, 0), (0, 0)))
    kernel = kernel.astype(x.dtype)
    # K is small (Mamba uses 4): a sum of shifted slices beats a general convolution here.
    y = sum(padded[:, k:k + length] * kernel[k] for k in range(width))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y


class CausalConv1d(nnx.Module):
    """Depthwise causal conv1d with kernel (K, channels) and optional bias; torch's default init."""

    def __init__(self, channels: int, kernel_size: int, *, use_bias: bool = True, axis: str | None = "fusion_inner",
                 dtype: str = "float32", rngs: nnx.Rngs):
        bound = 1.0 / math.sqrt(kernel_size)  # torch Conv1d: fan_in = in_channels/groups * K = K
        self.dtype = jnp.dtype(dtype)
        self.kernel = param(jax.random.uniform(rngs.params(), (kernel_size, channels), jnp.float32, -bound, bound),
                            ("conv", axis))
        self.bias = (param(jax.random.uniform(rngs.params(), (channels,), jnp.float32, -bound, bound), (axis,))
                     if use_bias else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        bias = self.bias[...] if self.bias is not None else None
        return causal_depthwise_conv1d(x.astype(self.dtype), self.kernel[...], bias)


def _inverse_softplus(y: jax.Array) -> jax.Array:
    return y + jnp.log(-jnp.expm1(-y))


class SelectiveSSM(nnx.Module):
    """The selective SSM of a Mamba mixer: input-dependent Δ, B, C from x, then the scan.

    `x` is the post-conv activation (Bt, L, inner). Where `mask` (Bt, L) is False, Δ is 0: the position
    neither decays nor feeds the state, so padding influences no other position.
    """

    def __init__(
        self,
        inner: int,
        *,
        d_state: int = 16,
        dt_rank: int,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        scan_impl: ScanImpl = "chunked",
        scan_chunk: int = 64,
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        if scan_impl not in SCAN_IMPLS:
            raise ValueError(f"unknown scan impl {scan_impl!r}; expected one of {SCAN_IMPLS}")
        self.d_state, self.dt_rank = d_state, dt_rank
        self.scan_impl, self.scan_chunk = scan_impl, scan_chunk
        self.dtype = jnp.dtype(dtype)
        self.x_proj = dense(inner, dt_rank + 2 * d_state, ("fusion_inner", "dt_rank"), rngs=rngs, dtype=self.dtype)

        # Mamba's dt init: weight uniform ±dt_rank^-0.5·scale; bias such that softplus(bias) is log-uniform in
        # [dt_min, dt_max] (floored), so every channel starts with its own time scale.
        dt_std = dt_rank ** -0.5 * dt_scale
        self.dt_proj = dense(
            dt_rank, inner, ("dt_rank", "fusion_inner"), rngs=rngs, use_bias=True, dtype=self.dtype,
            kernel_init=lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -dt_std, dt_std),
        )
        log_dt = jax.random.uniform(rngs.params(), (inner,), jnp.float32, math.log(dt_min), math.log(dt_max))
        dt = jnp.maximum(jnp.exp(log_dt), dt_init_floor)
        self.dt_proj.bias.set_value(_inverse_softplus(dt))

        # S4D-real: A = -(1..N) for every channel, stored as log.
        a = jnp.broadcast_to(jnp.arange(1, d_state + 1, dtype=jnp.float32), (inner, d_state))
        self.A_log = param(jnp.log(a), ("fusion_inner", "ssm_state"))
        self.D = param(jnp.ones((inner,), jnp.float32), ("fusion_inner",))

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        dt_low, B, C = jnp.split(self.x_proj(x), [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
        # The dt bias is added in float32 (as Mamba's kernel does): dt ≈ 1e-3 would lose its scale in bf16.
        dt = dt_low @ self.dt_proj.kernel[...].astype(self.dtype)
        delta = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_proj.bias[...])
        if mask is not None:
            delta = jnp.where(mask[..., None], delta, 0.0)
        A = -jnp.exp(self.A_log[...])
        return selective_scan(x, delta, A, B, C, self.D[...], impl=self.scan_impl, chunk=self.scan_chunk)


class MambaBlock(nnx.Module):
    """Mamba mixer (HF `MambaMixer`): in_proj → causal depthwise conv → SiLU → selective SSM → ⊙SiLU(z) → out_proj."""

    def __init__(
        self,
        d_model: int,
        *,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        conv_bias: bool = True,
        use_bias: bool = False,
        scan_impl: ScanImpl = "chunked",
        scan_chunk: int = 64,
        dtype: str = "float32",
        rngs: nnx.Rngs,
    ):
        inner = expand * d_model
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        self.inner, self.dtype = inner, jnp.dtype(dtype)
        self.in_proj = dense(d_model, 2 * inner, ("fusion_embed", "fusion_inner"), rngs=rngs, use_bias=use_bias,
                             dtype=self.dtype)
        self.conv1d = CausalConv1d(inner, d_conv, use_bias=conv_bias, dtype=dtype, rngs=rngs)
        self.ssm = SelectiveSSM(inner, d_state=d_state, dt_rank=int(dt_rank), scan_impl=scan_impl,
                                scan_chunk=scan_chunk, dtype=dtype, rngs=rngs)
        self.out_proj = dense(inner, d_model, ("fusion_inner", "fusion_embed"), rngs=rngs, use_bias=use_bias,
                              dtype=self.dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """x (Bt, L, d_model); mask (Bt, L) bool, False = padding (influences no other position)."""
        x, z = jnp.split(self.in_proj(x.astype(self.dtype)), 2, axis=-1)
        if mask is not None:
            # Zero padding before the conv, which would otherwise carry it into the next d_conv-1 positions.
            x = jnp.where(mask[..., None], x, 0)
        x = jax.nn.silu(self.conv1d(x))
        y = self.ssm(x, mask)
        return self.out_proj(y * jax.nn.silu(z))
