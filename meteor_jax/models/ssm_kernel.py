"""The selective scan as fused Pallas kernels with a custom VJP: no (Bt, L, E, N) array in device memory.

Forward: one program per (batch, block of `block_e` channels) keeps its state h (block_e, N) in float32 and
walks t = 0..L-1, writing y_t and, at the start of every chunk, h (the residual: (Bt, L/chunk, E, N)).
Backward: the same programs walk the chunks in reverse; each recomputes its chunk's states from the saved
boundary state into a (chunk+1, block_e, N) workspace, then runs the reverse recurrence

    gh_t = C_t gy_t + exp(Δ_{t+1} A) ⊙ gh_{t+1}
    gC_t = Σ_e gy_t h_t,  gB_t = Σ_e gh_t Δ_t x_t,  gx_t = Δ_t Σ_n gh_t B_t,
    gΔ_t = Σ_n gh_t ⊙ (A exp(Δ_t A) h_{t-1} + B_t x_t),  gA = Σ_t gh_t Δ_t exp(Δ_t A) h_{t-1}.

gB, gC and gA are summed over channels, so each program writes its block's partial sum and JAX adds them.

Status: tested in interpret mode on CPU only (against autodiff of the `lax.scan` reference). It is written
with the GPU (Triton) and TPU (Mosaic) constraints in mind but has never been compiled for either:
- blocks are powers of two (`block_e`; N is padded to one) and E, L, N are padded in the wrapper (Δ = 0,
  x = B = C = 0 is an identity step that feeds nothing back), so no shape has to divide;
- Triton has no scratch memory, so the recompute workspace is an extra *output* (one chunk per program,
  Bt·(chunk+1)·E·N floats), written and read back by the same program. On Triton that relies on every
  thread reading back what it wrote itself (same tile layout for the store and the load) — unverified;
- each program holds whole (L, block_e) rows of x, Δ, y, ... (VMEM on TPU: ~L·block_e·4 bytes per array),
  and loads one time row per step as a 1-D vector; Mosaic may want 2-D (1, block_e) rows instead.
Parallelism is Bt·E/block_e programs, sequential in time: the point is memory, not speed.
Sharding: on the project's Auto-axis mesh a batch-sharded call runs (interpret mode lowers to plain HLO, which
GSPMD partitions or gathers); with Explicit mesh axes the kernel's integer row indexing is refused ("sharded ref
can only be indexed by slices"). On an accelerator the kernel is an opaque custom call: run it under shard_map.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _pad_axis(t: jax.Array, axis: int, size: int, value: float = 0.0) -> jax.Array:
    pad = size - t.shape[axis]
    if pad == 0:
        return t
    widths = [(0, 0)] * t.ndim
    widths[axis] = (0, pad)
    return jnp.pad(t, widths, constant_values=value)


def _forward_kernel(x_ref, delta_ref, A_ref, B_ref, C_ref, y_ref, starts_ref, *, chunk: int, num_chunks: int):
    """One (batch, channel block): y_t for every t, and the state before every chunk into `starts_ref`."""
    A = A_ref[...]

    def chunk_body(c, h):
        starts_ref[c] = h

        def step(i, h):
            t = c * chunk + i
            delta_t, x_t = delta_ref[t], x_ref[t]
            h = jnp.exp(delta_t[:, None] * A) * h + (delta_t * x_t)[:, None] * B_ref[t][None, :]
            y_ref[t] = jnp.sum(h * C_ref[t][None, :], axis=1)
            return h

        return jax.lax.fori_loop(0, chunk, step, h)

    jax.lax.fori_loop(0, num_chunks, chunk_body, jnp.zeros(A.shape, jnp.float32))


def _backward_kernel(x_ref, delta_ref, A_ref, B_ref, C_ref, gy_ref, starts_ref,
                     gx_ref, gdelta_ref, gA_ref, gB_ref, gC_ref, states_ref, *, chunk: int, num_chunks: int):
    """One (batch, channel block), chunks in reverse. `states_ref[i]` = h_{start+i-1} (row 0: the saved start)."""
    A = A_ref[...]
    zeros = jnp.zeros(A.shape, jnp.float32)

    def chunk_body(k, carry):
        c = num_chunks - 1 - k
        start = c * chunk

        def recompute(i, h):
            t = start + i
            delta_t = delta_ref[t]
            h = jnp.exp(delta_t[:, None] * A) * h + (delta_t * x_ref[t])[:, None] * B_ref[t][None, :]
            states_ref[i + 1] = h
            return h

        h0 = starts_ref[c]
        states_ref[0] = h0
        h_last = jax.lax.fori_loop(0, chunk, recompute, h0)

        def step(j, carry):
            # h_t comes down the carry (it was h_{t-1} of step t+1): one workspace load per step.
            gh_next, decay_next, gA, h_t = carry
            i = chunk - 1 - j
            t = start + i
            x_t, delta_t, B_t, gy_t = x_ref[t], delta_ref[t], B_ref[t], gy_ref[t]
            h_prev = states_ref[i]
            decay_t = jnp.exp(delta_t[:, None] * A)
            gh = gy_t[:, None] * C_ref[t][None, :] + decay_next * gh_next
            gC_ref[t] = jnp.sum(gy_t[:, None] * h_t, axis=0)
            gB_ref[t] = jnp.sum(gh * (delta_t * x_t)[:, None], axis=0)
            gh_B = jnp.sum(gh * B_t[None, :], axis=1)
            gx_ref[t] = delta_t * gh_B
            decayed_prev = decay_t * h_prev
            gdelta_ref[t] = jnp.sum(gh * A * decayed_prev, axis=1) + gh_B * x_t
            gA = gA + gh * delta_t[:, None] * decayed_prev
            return gh, decay_t, gA, h_prev

        gh_next, decay_next, gA = carry
        gh_next, decay_next, gA, _ = jax.lax.fori_loop(0, chunk, step, (gh_next, decay_next, gA, h_last))
        return gh_next, decay_next, gA

    # After the last step nothing flows back: gh_L = 0 (its decay is then irrelevant).
    _, _, gA = jax.lax.fori_loop(0, num_chunks, chunk_body, (zeros, zeros, zeros))
    gA_ref[...] = gA


def _specs(length: int, state: int, block_e: int):
    """BlockSpecs over the grid (batch b, channel block j): kernels see the batch dim squeezed out."""
    rows_e = pl.BlockSpec((None, length, block_e), lambda b, j: (b, 0, j))  # x, Δ, y, gy, gx, gΔ
    rows_n = pl.BlockSpec((None, length, state), lambda b, j: (b, 0, 0))  # B, C
    a_block = pl.BlockSpec((block_e, state), lambda b, j: (j, 0))
    return rows_e, rows_n, a_block


def _forward(x, delta, A, B, C, block_e, chunk, interpret):
    batch, length, inner = x.shape
    state = A.shape[1]
    num_chunks = length // chunk
    rows_e, rows_n, a_block = _specs(length, state, block_e)
    starts = pl.BlockSpec((None, num_chunks, block_e, state), lambda b, j: (b, 0, j, 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, chunk=chunk, num_chunks=num_chunks),
        out_shape=(jax.ShapeDtypeStruct((batch, length, inner), jnp.float32),
                   jax.ShapeDtypeStruct((batch, num_chunks, inner, state), jnp.float32)),
        grid=(batch, inner // block_e),
        in_specs=[rows_e, rows_e, a_block, rows_n, rows_n],
        out_specs=(rows_e, starts),
        interpret=interpret,
        name="selective_scan_fwd",
    )(x, delta, A, B, C)


def _backward(x, delta, A, B, C, gy, starts, block_e, chunk, interpret):
    batch, length, inner = x.shape
    state = A.shape[1]
    num_chunks, num_blocks = length // chunk, inner // block_e
    rows_e, rows_n, a_block = _specs(length, state, block_e)
    starts_spec = pl.BlockSpec((None, num_chunks, block_e, state), lambda b, j: (b, 0, j, 0))
    per_program = lambda *shape: pl.BlockSpec((None, None, *shape), lambda b, j: (b, j) + (0,) * len(shape))
    f32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
    gx, gdelta, gA, gB, gC, _ = pl.pallas_call(
        functools.partial(_backward_kernel, chunk=chunk, num_chunks=num_chunks),
        out_shape=(f32(batch, length, inner), f32(batch, length, inner),
                   f32(batch, num_blocks, block_e, state),
                   f32(batch, num_blocks, length, state), f32(batch, num_blocks, length, state),
                   f32(batch, num_blocks, chunk + 1, block_e, state)),  # the recompute workspace
        grid=(batch, num_blocks),
        in_specs=[rows_e, rows_e, a_block, rows_n, rows_n, rows_e, starts_spec],
        out_specs=(rows_e, rows_e, per_program(block_e, state), per_program(length, state),
                   per_program(length, state), per_program(chunk + 1, block_e, state)),
        interpret=interpret,
        name="selective_scan_bwd",
    )(x, delta, A, B, C, gy, starts)
    # gA's partials are per (batch, block): blocks tile E, so the batch sum and a reshape give (E, N).
    return gx, gdelta, gA.sum(0).reshape(inner, state), gB.sum(1), gC.sum(1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _padded_scan(x, delta, A, B, C, block_e, chunk, interpret):
    return _forward(x, delta, A, B, C, block_e, chunk, interpret)[0]


def _padded_scan_fwd(x, delta, A, B, C, block_e, chunk, interpret):
    y, starts = _forward(x, delta, A, B, C, block_e, chunk, interpret)
    return y, (x, delta, A, B, C, starts)


def _padded_scan_bwd(block_e, chunk, interpret, residuals, gy):
    x, delta, A, B, C, starts = residuals
    return _backward(x, delta, A, B, C, gy, starts, block_e, chunk, interpret)


_padded_scan.defvjp(_padded_scan_fwd, _padded_scan_bwd)


def _check_shapes(x, delta, A, B, C):
    if x.ndim != 3 or A.ndim != 2 or B.ndim != 3 or C.ndim != 3 or delta.ndim != 3:
        raise ValueError("selective scan expects x, delta (Bt, L, E), A (E, N), B, C (Bt, L, N); got ranks "
                         f"x {x.ndim}, delta {delta.ndim}, A {A.ndim}, B {B.ndim}, C {C.ndim}")
    batch, length, inner = x.shape
    state = A.shape[1]
    expected = {"delta": (delta.shape, x.shape), "A": (A.shape, (inner, state)),
                "B": (B.shape, (batch, length, state)), "C": (C.shape, (batch, length, state))}
    for name, (got, want) in expected.items():
        if tuple(got) != tuple(want):
            raise ValueError(f"selective scan: {name} has shape {tuple(got)}, expected {want} "
                             f"from x {tuple(x.shape)} and A {tuple(A.shape)}")


def pallas_selective_scan(x, delta, A, B, C, *, block_e: int | None = None, chunk: int = 64,
                          interpret: bool | None = None) -> jax.Array:
    """y_t = C_t · h_t (no D term) for x, delta (Bt, L, E), A (E, N), B, C (Bt, L, N); float32 (Bt, L, E).

    `block_e` channels per program (a power of two; default min(64, E rounded up to a power of two)); the
    backward pass keeps one state per `chunk` steps. `interpret=None`: interpret mode on CPU only.
    """
    _check_shapes(x, delta, A, B, C)
    batch, length, inner = x.shape
    state = A.shape[1]
    if block_e is None:
        block_e = min(64, _next_power_of_2(inner))
    if block_e < 1 or block_e & (block_e - 1):
        raise ValueError(f"block_e={block_e} must be a power of two")
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be >= 1")
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    chunk = min(chunk, length)  # a chunk longer than L would only make the workspace bigger
    length_p = -(-length // chunk) * chunk
    inner_p = -(-inner // block_e) * block_e
    state_p = _next_power_of_2(state)
    # Padding: Δ = 0 (decay 1, drive 0) and B = C = 0 leave every real state and output as it is, and the
    # padded channels/states/steps receive zero gradient; A's padding only has to be finite.
    x, delta = (_pad_axis(_pad_axis(t.astype(jnp.float32), 1, length_p), 2, inner_p) for t in (x, delta))
    B, C = (_pad_axis(_pad_axis(t.astype(jnp.float32), 1, length_p), 2, state_p) for t in (B, C))
    A = _pad_axis(_pad_axis(A.astype(jnp.float32), 0, inner_p, -1.0), 1, state_p, -1.0)
    y = _padded_scan(x, delta, A, B, C, block_e, chunk, bool(interpret))
    return y[:, :length, :inner]
