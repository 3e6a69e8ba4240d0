"""Flash Global Fusion (DESIGN §2.2): instruction-aware, globally mixed visual tokens via selective SSMs.

Each block gathers a local 3×3 neighbourhood on the patch grid (depthwise conv), then runs one
*single* selective scan over `[instruction ; visual tokens in window order]` (and, when bidirectional,
a second scan with its own parameters over `[instruction ; reversed visual order]`), so every visual
token sees the instruction and, through the state, the whole image. The fused tokens are aligned to the
LLM width by LLaVA-1.5's `mlp2x_gelu`.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from meteor_jax.models.layers import LayerNorm, RMSNorm, dense, param
from meteor_jax.models.ssm import SelectiveSSM


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    dim: int = 1024  # fusion width d
    num_layers: int = 2
    expand: int = 2  # inner width E = expand * d
    d_state: int = 16
    dt_rank: int | None = None  # None -> ceil(d / 16), as Mamba
    local_kernel: int = 3  # depthwise k×k on the grid before the scan; 0 or 1: no local step (ablation)
    scan_window: int = 4  # w: w×w windows in raster order, raster inside; 1 (or the grid size) = plain raster
    bidirectional: bool = True
    use_instruction: bool = True  # False: visual-only scans, no instruction parameters (ablation)
    scan_impl: str = "chunked"  # associative | chunked | pallas | sequential (models/ssm.py)
    scan_chunk: int = 64
    dtype: str = "float32"

    def __post_init__(self):
        if self.local_kernel < 0:
            raise ValueError(f"fusion.local_kernel={self.local_kernel} must be >= 0 (0 or 1: no local step)")

    @property
    def has_local(self) -> bool:
        return self.local_kernel > 1

    @property
    def inner(self) -> int:
        return self.expand * self.dim

    @property
    def rank(self) -> int:
        return self.dt_rank or math.ceil(self.dim / 16)


def scan_order(grid: int, window: int) -> np.ndarray:
    """Raster indices of the g×g grid in local-to-single order: w×w windows in raster order,
    tokens inside a window in raster order. A permutation of range(g*g)."""
    if window < 1 or grid % window:
        raise ValueError(f"fusion.scan_window={window} must divide the patch grid size {grid}")
    rows, cols = np.divmod(np.arange(grid * grid), grid)
    window_id = (rows // window) * (grid // window) + cols // window
    within = (rows % window) * window + cols % window
    return np.lexsort((within, window_id)).astype(np.int32)


class FusionBlock(nnx.Module):
    """One local-to-single selective-SSM block with a residual connection."""

    def __init__(self, cfg: FusionConfig, grid: int, *, rngs: nnx.Rngs):
        self.cfg, self.grid = cfg, grid
        dtype = jnp.dtype(cfg.dtype)
        d, e = cfg.dim, cfg.inner
        self.norm = RMSNorm(d, eps=1e-5, axis="fusion_embed")
        self.in_proj = dense(d, 2 * e, ("fusion_embed", "fusion_inner"), dtype=dtype, rngs=rngs)
        k = cfg.local_kernel
        if cfg.has_local:
            # Depthwise k×k kernel; initialised like Mamba's depthwise conv1d (uniform ±1/sqrt(fan_in)).
            bound = 1.0 / k
            self.local_kernel = param(jax.random.uniform(rngs.params(), (k, k, e), jnp.float32, -bound, bound),
                                      ("conv", "conv", "fusion_inner"))
            self.local_bias = param(jnp.zeros((e,), jnp.float32), ("fusion_inner",))
        else:  # no local step: no parameters for it
            self.local_kernel = self.local_bias = None
        ssm_kwargs = dict(d_state=cfg.d_state, dt_rank=cfg.rank, scan_impl=cfg.scan_impl,
                          scan_chunk=cfg.scan_chunk, dtype=cfg.dtype, rngs=rngs)
        self.ssm_forward = SelectiveSSM(e, **ssm_kwargs)
        self.ssm_backward = SelectiveSSM(e, **ssm_kwargs) if cfg.bidirectional else None
        self.out_proj = dense(e, d, ("fusion_inner", "fusion_embed"), dtype=dtype, rngs=rngs)
        scan_order(grid, cfg.scan_window)  # validate the window now, not at the first call

    def local(self, xv: jax.Array) -> jax.Array:
        """Depthwise k×k conv over the patch grid: every token gathers its neighbourhood."""
        b, n, e = xv.shape
        g, k = self.grid, self.cfg.local_kernel
        kernel = self.local_kernel[...].astype(xv.dtype)
        # A sum of k² shifted slices ("SAME" padding), as causal_depthwise_conv1d: a depthwise conv with a small
        # kernel is elementwise work, and XLA's grouped convolution runs it several times slower on CPU.
        lo = (k - 1) // 2
        padded = jnp.pad(xv.reshape(b, g, g, e), ((0, 0), (lo, k - 1 - lo), (lo, k - 1 - lo), (0, 0)))
        y = sum(padded[:, i:i + g, j:j + g] * kernel[i, j] for i in range(k) for j in range(k))
        return (y + self.local_bias[...].astype(xv.dtype)).reshape(b, n, e)

    def __call__(self, u: jax.Array, num_text: int, text_mask: jax.Array) -> jax.Array:
        """u: (B, M + N, d) = [instruction ; visual in raster order]; text_mask (B, M) bool."""
        order = scan_order(self.grid, self.cfg.scan_window)  # a trace-time constant
        x, z = jnp.split(self.in_proj(self.norm(u)), 2, axis=-1)
        xt, xv = x[:, :num_text], x[:, num_text:]
        xt = jax.nn.silu(xt)
        xv = jax.nn.silu(self.local(xv) if self.cfg.has_local else xv)
        visual_mask = jnp.ones(xv.shape[:2], bool)
        mask = jnp.concatenate([text_mask, visual_mask], axis=1)

        def scan(ssm: SelectiveSSM, visual_order: np.ndarray) -> jax.Array:
            y = ssm(jnp.concatenate([xt, xv[:, visual_order]], axis=1), mask=mask)
            yv = y[:, num_text:][:, np.argsort(visual_order)]  # back to raster order (a gather, not a scatter)
            return jnp.concatenate([y[:, :num_text], yv], axis=1)

        y = scan(self.ssm_forward, order)
        if self.ssm_backward is not None:
            y = y + scan(self.ssm_backward, order[::-1])
        return u + self.out_proj(y * jax.nn.silu(z))


class FlashGlobalFusion(nnx.Module):
    """Visual features (B, N, d_v) + instruction embeddings (B, M, d_llm) → fused tokens (B, N, d_llm)."""

    def __init__(self, cfg: FusionConfig, *, vision_dim: int, llm_dim: int, grid: int, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        d = cfg.dim
        self.visual_norm = LayerNorm(vision_dim, axis="vision_embed")
        self.visual_in = dense(vision_dim, d, ("vision_embed", "fusion_embed"), use_bias=True, dtype=dtype, rngs=rngs)
        if cfg.use_instruction:
            self.text_norm = LayerNorm(llm_dim, axis="embed")
            self.text_in = dense(llm_dim, d, ("embed", "fusion_embed"), use_bias=True, dtype=dtype, rngs=rngs)
        else:  # the scans never see the instruction: no parameters for it
            self.text_norm = self.text_in = None
        self.blocks = nnx.List([FusionBlock(cfg, grid, rngs=rngs) for _ in range(cfg.num_layers)])
        self.out_norm = LayerNorm(d, axis="fusion_embed")
        # LLaVA-1.5 mlp2x_gelu: Linear d→d_llm, GELU, Linear d_llm→d_llm.
        self.align_fc1 = dense(d, llm_dim, ("fusion_embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
        self.align_fc2 = dense(llm_dim, llm_dim, ("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, visual: jax.Array, text: jax.Array, text_mask: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.cfg.dtype)
        uv = self.visual_in(self.visual_norm(visual.astype(dtype)))
        if self.cfg.use_instruction:
            ut = self.text_in(self.text_norm(text.astype(dtype)))
            # Padded instruction positions are zeroed here and skipped by the scans (delta = 0).
            ut = jnp.where(text_mask[..., None], ut, 0)
            mask = text_mask.astype(bool)
        else:
            ut = jnp.zeros((visual.shape[0], 0, self.cfg.dim), dtype)
            mask = jnp.zeros((visual.shape[0], 0), bool)
        num_text = ut.shape[1]
        u = jnp.concatenate([ut, uv], axis=1)
        for block in self.blocks:
            u = block(u, num_text, mask)
        h = self.out_norm(u[:, num_text:])
        return self.align_fc2(jax.nn.gelu(self.align_fc1(h), approximate=False))
