"""Speed and compiled memory of the selective-scan implementations, forward + backward, on this machine's default device.

    python -m meteor_jax.bench --scan batch,length,inner,state [--steps 5]

The fusion geometry is batch × L 640 × E 256 × N 16 (a 24×24 grid plus the instruction, E = 2·128). On CPU the
pallas scan runs in Pallas interpret mode, which says nothing about its speed on an accelerator.
"""
from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp

from meteor_jax import cli
from meteor_jax.models.ssm import SCAN_IMPLS, selective_scan


def _inputs(batch: int, length: int, inner: int, state: int, seed: int = 0):
    k = jax.random.split(jax.random.key(seed), 7)
    x = jax.random.normal(k[0], (batch, length, inner))
    delta = jax.nn.softplus(jax.random.normal(k[1], (batch, length, inner)) - 4.0)  # Mamba-like Δ ≈ 0.02
    A = -jnp.broadcast_to(jnp.arange(1, state + 1, dtype=jnp.float32), (inner, state))
    B, C = (jax.random.normal(kk, (batch, length, state)) for kk in k[2:4])
    D = jnp.ones((inner,))
    cotangent = jax.random.normal(k[4], (batch, length, inner))
    return (x, delta, A, B, C, D), cotangent


def _compiled_bytes(compiled) -> int | None:
    """Temp + output bytes of a compiled program, or None where the backend reports no memory analysis."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # some backends raise instead of returning None
        return None
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


def bench_scans(batch: int = 2, length: int = 640, inner: int = 256, state: int = 16,
                impls: tuple[str, ...] = SCAN_IMPLS, steps: int = 5, warmup: int = 1,
                chunk: int = 64) -> list[dict]:
    """Per impl: the median seconds of a jitted value_and_grad of Σ y·cotangent (w.r.t. x, Δ, A, B, C, D) over
    `steps` timed calls after `warmup` untimed ones, its compiled temp + output bytes (None if unknown), and
    both as ratios to the sequential scan (None without it)."""
    args, cotangent = _inputs(batch, length, inner, state)
    rows = []
    for impl in impls:
        loss = lambda *a, impl=impl: jnp.sum(selective_scan(*a, impl=impl, chunk=chunk) * cotangent)
        step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(len(args)))))
        compiled = step.lower(*args).compile()
        run = lambda: jax.block_until_ready(compiled(*args))
        for _ in range(warmup):
            run()
        rows.append(dict(impl=impl, batch=batch, length=length, inner=inner, state=state, chunk=chunk,
                         median_s=statistics.median(cli.timed(run, steps)), memory_bytes=_compiled_bytes(compiled),
                         backend=jax.default_backend()))
    base = next((r for r in rows if r["impl"] == "sequential"), None)
    for r in rows:
        r["time_vs_sequential"] = r["median_s"] / base["median_s"] if base else None
        r["memory_vs_sequential"] = (r["memory_bytes"] / base["memory_bytes"]
                                     if base and r["memory_bytes"] and base["memory_bytes"] else None)
    return rows

