"""Baseline projectors (`model.projector`): the ways other methods turn the N CLIP patch features into the K
visual tokens the LLM sees, on the same pipeline as LLaVA-Meteor (same data with K image slots, trainer,
evaluation and checkpoints; only the module between the vision tower and the LLM differs).

  meteor     Flash Global Fusion + Visual-Native Selection (models/fusion.py, models/selection.py)
  mlp        LLaVA-1.5: `mlp2x_gelu` on all N patch features (selection.keep must equal N)
  pool       average pooling of the g×g patch grid to √K×√K windows (M3 / DeCo style), then `mlp2x_gelu`
  cls_prune  the K patches with the largest [CLS] attention of the selected CLIP layer, on the raw CLIP features,
             in raster order (FasterVLM), then `mlp2x_gelu`
  random     K patches drawn at random per image, in raster order, then `mlp2x_gelu`

Every baseline shares one module, `BaselineProjector`, whose only weights are LLaVA-1.5's `mlp2x_gelu`
(Linear d_v→d_llm, exact-erf GELU, Linear d_llm→d_llm), so a llava-hf `multi_modal_projector` loads into each
of them (convert/llava.py). It sits where Meteor's fusion sits, under the top-level name `fusion`: that name
means "the projector" in `train.trainable`, `init.modules` and checkpoints, so the stage-1 recipe (train
`("fusion",)`) trains any of them unchanged.
Reduction comes before the MLP (the MLP acts per token, so selecting first only saves work; pooling first is
what DeCo does).

The random draw is deterministic: the key is `selection.seed` folded with a hash of the image's pixels, so the
same image keeps the same K patches in every step, in training and in evaluation, and different images keep
different subsets. Batch composition, padding rows and the device layout do not change a row's draw.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from meteor_jax.models.layers import dense
from meteor_jax.models.selection import Selection, image_hash, per_example_uniform, visual_expert

PROJECTORS = ("meteor", "mlp", "pool", "cls_prune", "random")


def check_projector(projector: str, keep: int, grid: int) -> None:
    """A clear error for a projector/K combination that cannot work (called by MeteorConfig)."""
    n = grid * grid
    if projector not in PROJECTORS:
        raise ValueError(f"model.projector={projector!r}; expected one of {PROJECTORS}")
    if projector == "mlp" and keep != n:
        raise ValueError(f"model.projector='mlp' feeds all {n} patch tokens to the LLM: set selection.keep={n} "
                         f"(got {keep}), or use 'pool', 'cls_prune' or 'random' to keep fewer")
    if projector == "pool":
        side = math.isqrt(keep)
        if side * side != keep or grid % side:
            divisors = [d * d for d in range(1, grid + 1) if grid % d == 0]
            raise ValueError(f"model.projector='pool' averages the {grid}×{grid} patch grid over equal square "
                             f"windows: selection.keep={keep} must be one of {divisors}")


def average_pool(features: jax.Array, grid: int, keep: int) -> jax.Array:
    """(B, g·g, D) raster-order patch features → (B, K, D): the mean over each (g/√K)×(g/√K) window, windows
    in raster order (a 2-D average pool with stride = window)."""
    b, n, d = features.shape
    side = math.isqrt(keep)
    w = grid // side
    x = features.reshape(b, side, w, side, w, d)
    return jnp.mean(x.astype(jnp.float32), axis=(2, 4)).astype(features.dtype).reshape(b, keep, d)


def top_k_raster(score: jax.Array, keep: int) -> jax.Array:
    """(B, N) scores → (B, K) indices of the K largest, sorted into raster order (ties: the lower index)."""
    return jnp.sort(jax.lax.top_k(score, keep)[1], axis=-1).astype(jnp.int32)


def random_scores(pixels: jax.Array, n: int, seed: int) -> jax.Array:
    """(B, N) uniform scores, a function of (seed, image content) only; their top K is a uniform K-subset."""
    return per_example_uniform(image_hash(pixels), n, seed)


class BaselineProjector(nnx.Module):
    """Reduce the N patch features to K (by `kind`), then LLaVA-1.5's `mlp2x_gelu`: Linear d_v→d_llm, GELU (exact
    erf, HF "gelu"), Linear d_llm→d_llm, with biases. HF `LlavaMultiModalProjector.linear_1/linear_2` ↔
    `align_fc1/align_fc2` (the names of the same MLP at the end of Flash Global Fusion).

    Returns a `Selection` like Meteor's: tokens (B, K, d_llm); indices (B, K), the ascending raster indices of
    the kept patches (`pool`: the top-left patch of each window); visual_score the renormalised [CLS] attention;
    native_score uniform (there is no native expert); score what was ranked (`cls_prune`: the visual score,
    `random`: the random draw, otherwise uniform)."""

    def __init__(self, kind: str, *, vision_dim: int, llm_dim: int, grid: int, keep: int, seed: int = 0,
                 dtype: str = "float32", rngs: nnx.Rngs):
        if kind == "meteor":
            raise ValueError("BaselineProjector: 'meteor' is FlashGlobalFusion + select, not a baseline")
        check_projector(kind, keep, grid)
        self.kind, self.grid, self.keep, self.seed = kind, grid, keep, seed
        self.dtype = jnp.dtype(dtype)
        self.align_fc1 = dense(vision_dim, llm_dim, ("vision_embed", "mlp"), use_bias=True, dtype=self.dtype,
                               rngs=rngs)
        self.align_fc2 = dense(llm_dim, llm_dim, ("mlp", "embed"), use_bias=True, dtype=self.dtype, rngs=rngs)

    def mlp(self, x: jax.Array) -> jax.Array:
        """`mlp2x_gelu` on (B, K, d_v) → (B, K, d_llm)."""
        return self.align_fc2(jax.nn.gelu(self.align_fc1(x.astype(self.dtype)), approximate=False))

    def __call__(self, features: jax.Array, cls_attention: jax.Array, pixels: jax.Array) -> Selection:
        """features (B, N, d_v) raster order, cls_attention (B, N), pixels (B, H, W, C) (`random` hashes them)."""
        b, n, _ = features.shape
        k, g = self.keep, self.grid
        s_v = visual_expert(cls_attention)
        uniform = jnp.full((b, n), 1.0 / n, jnp.float32)
        score = uniform
        if self.kind == "pool":
            reduced = average_pool(features, g, k)
            side = math.isqrt(k)
            w = g // side
            window = jnp.arange(k, dtype=jnp.int32)
            indices = jnp.broadcast_to((window // side) * w * g + (window % side) * w, (b, k))
        else:
            if self.kind == "mlp":
                indices = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
            else:
                score = s_v if self.kind == "cls_prune" else random_scores(pixels, n, self.seed)
                indices = top_k_raster(score, k)
            reduced = features if k == n else jnp.take_along_axis(features, indices[..., None], axis=1)
        return Selection(self.mlp(reduced), indices, s_v, uniform, score)
