"""Visual-Native Selection (DESIGN §2.3): two experts score the fused tokens, the top K survive.

Visual expert: the [CLS] attention row of the vision tower (renormalised over patches).
Native expert: softmax over tokens of the mean cosine similarity between each fused token (already in
the LLM's embedding space) and the valid instruction tokens, at temperature τ.
K is static, so every shape is static; kept tokens stay in raster order.
Ablations: `aggregate="visual"` ranks by the visual expert alone, `aggregate="native"` by the native expert alone
(the straight-through gate then uses that expert's score too).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

AGGREGATES = ("mean", "rank", "split", "visual", "native")


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    keep: int = 144  # K; K = N disables selection
    temperature: float = 0.1  # τ of the native expert
    aggregate: str = "mean"  # mean | rank | split | visual (visual expert only) | native (native expert only)
    alpha: float = 0.5  # weight of the visual expert in `mean` (and in the straight-through gate)
    straight_through: bool = True
    seed: int = 0  # model.projector="random": the seed of the per-image draw (models/projectors.py)

    def __post_init__(self):
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"selection.aggregate={self.aggregate!r}; expected one of {AGGREGATES}")
        if self.keep < 1:
            raise ValueError(f"selection.keep={self.keep} must be >= 1")
        if self.temperature <= 0:
            raise ValueError(f"selection.temperature={self.temperature} must be > 0")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"selection.alpha={self.alpha} must lie in [0, 1]")


class Selection(NamedTuple):
    tokens: jax.Array  # (B, K, D) kept tokens, raster order
    indices: jax.Array  # (B, K) raster indices, ascending
    visual_score: jax.Array  # (B, N)
    native_score: jax.Array  # (B, N)
    score: jax.Array  # (B, N) the aggregate used for ranking


def visual_expert(cls_attention: jax.Array) -> jax.Array:
    """[CLS] attention over patches renormalised to sum to one."""
    a = cls_attention.astype(jnp.float32)
    return a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), 1e-12)


def native_expert(fused: jax.Array, text: jax.Array, text_mask: jax.Array, temperature: float) -> jax.Array:
    """softmax_i(mean_j cos(H_i, T_j) / τ) over valid instruction tokens j; uniform when there are none."""
    h = fused.astype(jnp.float32)
    t = text.astype(jnp.float32)
    h = h / jnp.maximum(jnp.linalg.norm(h, axis=-1, keepdims=True), 1e-6)
    t = t / jnp.maximum(jnp.linalg.norm(t, axis=-1, keepdims=True), 1e-6)
    cos = jnp.einsum("bnd,bmd->bnm", h, t)
    m = text_mask.astype(jnp.float32)[:, None, :]
    mean_cos = jnp.sum(cos * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return jax.nn.softmax(mean_cos / temperature, axis=-1)


def _ranks(score: jax.Array) -> jax.Array:
    """0 for the lowest score, N-1 for the highest (ties: the lower index ranks higher, as top_k)."""
    n = score.shape[-1]
    order = jnp.argsort(-score, axis=-1, stable=True)  # best first
    ranks = jnp.argsort(order, axis=-1)  # position of each token in that order
    return (n - 1 - ranks).astype(jnp.float32)


def _top_k_indices(score: jax.Array, k: int) -> jax.Array:
    return jax.lax.top_k(score, k)[1]


def select(
    fused: jax.Array,
    cls_attention: jax.Array,
    text: jax.Array,
    text_mask: jax.Array,
    cfg: SelectionConfig,
) -> Selection:
    """Keep K of the N fused tokens (B, N, D) by the aggregated expert scores."""
    n = fused.shape[1]
    if cfg.keep > n:
        raise ValueError(f"selection.keep={cfg.keep} exceeds the number of visual tokens {n}")
    s_v = visual_expert(cls_attention)
    s_n = native_expert(fused, text, text_mask, cfg.temperature)
    if cfg.aggregate == "visual":
        gate = s_v
    elif cfg.aggregate == "native":
        gate = s_n
    else:
        gate = cfg.alpha * s_v + (1.0 - cfg.alpha) * s_n  # differentiable score for the straight-through gate
    if cfg.aggregate in ("mean", "visual", "native"):
        score = gate
    elif cfg.aggregate == "rank":
        score = _ranks(s_v) + _ranks(s_n)
    else:  # split: the visual expert keeps ceil(K/2), the native expert fills the rest from the tokens left
        k_v = (cfg.keep + 1) // 2
        visual_idx = _top_k_indices(s_v, k_v)
        taken = _mark(visual_idx, n)
        native_idx = _top_k_indices(jnp.where(taken, -jnp.inf, s_n), cfg.keep - k_v)
        score = jnp.where(taken, 2.0, 0.0) + jnp.where(_mark(native_idx, n), 1.0, 0.0)
    if cfg.keep == n:
        indices = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), s_v.shape)
    else:
        indices = jnp.sort(_top_k_indices(score, cfg.keep), axis=-1).astype(jnp.int32)
    tokens = jnp.take_along_axis(fused, indices[..., None], axis=1)
    if cfg.straight_through and cfg.keep < n:
        g = jnp.take_along_axis(gate, indices, axis=1)
        # g - sg(g) is exactly 0 in the forward pass, so the kept values are bit-identical.
        tokens = tokens * (1.0 + (g - jax.lax.stop_gradient(g)))[..., None].astype(tokens.dtype)
    return Selection(tokens, indices, s_v, s_n, score)


def _mark(indices: jax.Array, n: int) -> jax.Array:
    """(B, k) indices → (B, n) boolean membership."""
    return jnp.any(indices[..., None] == jnp.arange(n), axis=-2)
