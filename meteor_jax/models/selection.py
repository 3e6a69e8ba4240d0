"""Visual-Native Selection (DESIGN §2.3): two experts score the fused tokens, the top K survive.

Visual expert: the [CLS] attention row of the vision tower (renormalised over patches).
Native expert: softmax over tokens of the mean cosine similarity between each fused token (already in
the LLM's embedding space) and the valid instruction tokens, at temperature τ.
K is static, so every shape is static; kept tokens stay in raster order.
Ablations: `aggregate="visual"` ranks by the visual expert alone, `aggregate="native"` by the native expert alone
(the straight-through gate then uses that expert's score too).

Training the experts through a hard top-K: the forward pass is always the hard selection; `estimator` picks the
straight-through gradient. `gate` scales each kept token by 1 + g − sg(g) (g its aggregate score), so only the
kept tokens' scores get a gradient, and only through the tokens' scale, which the decoder's pre-norm largely hides.
`soft` adds m − sg(m) to every kept token, m the score-weighted mean of all N (stop-gradient) tokens: every
token's score, kept or dropped, gets ⟨Σ_k ∂L/∂kept_k, token⟩, the first-order gain of moving the kept tokens
toward that token. `reinforce` keeps the gate and, in training, draws the K tokens from the aggregate score as a
distribution (Gumbel top-K, `noise`); the model's loss adds the score-function term (models/meteor.py), which
rewards the draws that lowered the loss whichever tokens they held. Evaluation always keeps the top K.

`distill` > 0 adds, in training, a cross-entropy from the decoder's own saliency over the tokens it was given (the
share of ‖∂NLL/∂token‖² of each, stop-gradient) to the native expert's score renormalised over those tokens, weighted
by `distill` (models/meteor.py). With keep = N (the all-token stage) every token gets a target, so the native expert
learns which tokens the decoder reads for each question before any token is dropped.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

AGGREGATES = ("mean", "rank", "split", "visual", "native")
ESTIMATORS = ("gate", "soft", "reinforce")
BASELINES = ("batch", "greedy")
_GOLDEN = 0x9E3779B1  # odd: multiplying by it is a bijection mod 2^32


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
    keep: int = 144  # K; K = N disables selection
    temperature: float = 0.1  # τ of the native expert
    aggregate: str = "mean"  # mean | rank | split | visual (visual expert only) | native (native expert only)
    alpha: float = 0.5  # weight of the visual expert in `mean` (and in the straight-through gate)
    straight_through: bool = True
    # gate: kept tokens scaled by their score | soft: + the score-weighted mean of all tokens | reinforce: gate, and
    # in training the K tokens are sampled from the scores and the loss adds a score-function term (models/meteor.py)
    estimator: str = "gate"
    # reinforce's baseline, subtracted from a sample's NLL: batch: the batch's mean NLL | greedy: the same sample's
    # NLL with the top K kept (self-critical; one more decoder forward, no backward), so how hard a sample is
    # cancels out and only how much better or worse the draw did than the model's own choice is left
    baseline: str = "batch"
    # weight of the native expert's cross-entropy to the decoder's saliency (training only; projector meteor, the
    # baselines have no native expert and ignore it, as every estimator setting)
    distill: float = 0.0
    seed: int = 0  # the seed of the per-image draw of model.projector="random" and of estimator="reinforce"

    def __post_init__(self):
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"selection.aggregate={self.aggregate!r}; expected one of {AGGREGATES}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"selection.estimator={self.estimator!r}; expected one of {ESTIMATORS}")
        if self.distill < 0:
            raise ValueError(f"selection.distill={self.distill} must be >= 0")
        if self.baseline not in BASELINES:
            raise ValueError(f"selection.baseline={self.baseline!r}; expected one of {BASELINES}")
        if self.estimator == "reinforce" and self.aggregate not in ("mean", "visual", "native"):
            raise ValueError(f"selection.estimator='reinforce' samples from the aggregate score as a distribution: "
                             f"aggregate must be mean, visual or native, got {self.aggregate!r}")
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
    log_prob: jax.Array | None = None  # (B,) log-probability of a sampled selection (select's `noise`), else None


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


def image_hash(pixels: jax.Array) -> jax.Array:
    """(B, ...) arrays → (B,) uint32: a position-weighted sum of the float32 bit patterns mod 2^32. Rows that
    differ in any value hash differently unless the weighted differences cancel mod 2^32."""
    b = pixels.shape[0]
    bits = jax.lax.bitcast_convert_type(pixels.astype(jnp.float32).reshape(b, -1), jnp.uint32)
    weights = jnp.arange(bits.shape[1], dtype=jnp.uint32) * jnp.uint32(_GOLDEN) | jnp.uint32(1)
    return jnp.sum(bits * weights, axis=1, dtype=jnp.uint32)


def per_example_uniform(hashes: jax.Array, n: int, seed: int) -> jax.Array:
    """(B,) uint32 → (B, N) uniform [0, 1) draws from `seed` folded with each row's hash."""
    base = jax.random.key(seed)
    keys = jax.vmap(lambda h: jax.random.fold_in(base, h))(hashes)
    return jax.vmap(lambda k: jax.random.uniform(k, (n,)))(keys)


def gumbel_noise(pixels: jax.Array, instruction: jax.Array, n: int, seed: int) -> jax.Array:
    """(B, N) standard Gumbel noise, a function of (seed, image, instruction): the same sample keeps its draw
    across steps and devices, different questions about one image get different draws."""
    hashes = image_hash(pixels) * jnp.uint32(_GOLDEN) + image_hash(instruction)
    u = per_example_uniform(hashes, n, seed)
    return -jnp.log(-jnp.log(jnp.clip(u, 1e-12, 1.0 - 1e-7)))


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
    noise: jax.Array | None = None,
) -> Selection:
    """Keep K of the N fused tokens (B, N, D) by the aggregated expert scores. With `noise` ((B, N) Gumbel, only
    for estimator="reinforce" in training) the K tokens are a sample without replacement from the aggregate
    distribution instead of its top K (Gumbel top-K), and `log_prob` is that sample's Plackett-Luce
    log-probability in draw order."""
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
    log_prob = None
    if noise is not None and cfg.estimator != "reinforce":
        raise ValueError(f"select: sampling noise is for selection.estimator='reinforce', not {cfg.estimator!r}")
    if cfg.keep == n:
        indices = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), s_v.shape)
    elif noise is not None:
        log_gate = jnp.log(jnp.maximum(gate, 1e-30))
        drawn = _top_k_indices(log_gate + noise, cfg.keep)  # draw order
        picked = jnp.take_along_axis(gate, drawn, axis=1)
        left = 1.0 - (jnp.cumsum(picked, axis=1) - picked)  # mass not yet drawn before each draw
        log_prob = jnp.sum(jnp.take_along_axis(log_gate, drawn, axis=1) - jnp.log(jnp.maximum(left, 1e-30)), axis=1)
        indices = jnp.sort(drawn, axis=-1).astype(jnp.int32)
    else:
        indices = jnp.sort(_top_k_indices(score, cfg.keep), axis=-1).astype(jnp.int32)
    tokens = jnp.take_along_axis(fused, indices[..., None], axis=1)
    if cfg.straight_through and cfg.keep < n:
        g = jnp.take_along_axis(gate, indices, axis=1)
        # g - sg(g) is exactly 0 in the forward pass, so the kept values are bit-identical.
        tokens = tokens * (1.0 + (g - jax.lax.stop_gradient(g)))[..., None].astype(tokens.dtype)
        if cfg.estimator == "soft":
            mix = jnp.einsum("bn,bnd->bd", gate, jax.lax.stop_gradient(fused).astype(jnp.float32))
            tokens = tokens + (mix - jax.lax.stop_gradient(mix))[:, None, :].astype(tokens.dtype)
    return Selection(tokens, indices, s_v, s_n, score, log_prob)


def _mark(indices: jax.Array, n: int) -> jax.Array:
    """(B, k) indices → (B, n) boolean membership."""
    return jnp.any(indices[..., None] == jnp.arange(n), axis=-2)
