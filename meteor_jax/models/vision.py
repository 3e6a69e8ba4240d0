"""CLIP vision encoder (HF `CLIPVisionModel` architecture) returning LLaVA's features and the [CLS] attention row.

Only the layers up to `select_layer` are built: LLaVA-1.5 reads hidden_states[-2], so the last layer of the
checkpoint (and post_layernorm) would be dead weight. The [CLS] attention row of the selected layer is computed
from that layer's q_cls and K (O(N) per image), so the main attention may use a fused/flash kernel
(models/attention.py, `VisionConfig.attention`).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from meteor_jax.models.attention import attend, check_implementation, choose
from meteor_jax.models.layers import LayerNorm, dense, mesh_of, param, quick_gelu, run_stacked, stack_layers


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    depth: int = 24  # layers in the checkpoint; only `num_layers_used` are built
    num_heads: int = 16
    mlp_dim: int = 4096
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    select_layer: int = -2  # LLaVA-1.5: hidden_states[-2], the output after depth-1 layers
    trainable: bool = False  # when False the outputs are stop_gradient-ed (frozen tower)
    scan_layers: bool = True
    # "patch": CLIP's p×p patch projection. "conv": log2(p) stride-2 3×3 convolutions (GELU between), a
    # small conv stem that learns far faster from scratch on small images (the demo; no CLIP weights offline).
    stem: str = "patch"
    dtype: str = "float32"
    attention: str = "auto"  # the (unmasked) attention's kernel: auto | xla | cudnn | splash (models/attention.py)

    def __post_init__(self):
        check_implementation(self.attention, "vision.attention")
        if self.stem not in ("patch", "conv"):
            raise ValueError(f"vision.stem={self.stem!r}; expected 'patch' or 'conv'")
        if self.stem == "conv" and (self.patch_size & (self.patch_size - 1) or self.patch_size < 2):
            raise ValueError(f"vision.stem='conv' needs a power-of-two patch_size, got {self.patch_size}")
        if self.image_size % self.patch_size:
            raise ValueError(f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.num_heads:
            raise ValueError(f"vision.width {self.width} is not divisible by num_heads {self.num_heads}")
        if not 1 <= self.num_layers_used <= self.depth:
            raise ValueError(
                f"vision.select_layer {self.select_layer} selects hidden_states[{self.num_layers_used}] of a "
                f"{self.depth}-layer tower; it must pick the output of a layer (1..{self.depth}, or -1..-{self.depth})"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def num_layers_used(self) -> int:
        # hidden_states has depth + 1 entries (index 0 = embeddings after pre_layrnorm)
        return self.depth + 1 + self.select_layer if self.select_layer < 0 else self.select_layer

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads


class PatchEmbed(nnx.Module):
    """Non-overlapping p×p patches (HF's stride-p Conv2d without bias); kernel layout HWIO (p, p, C, width)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        p, c = cfg.patch_size, cfg.num_channels
        init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        self.kernel = param(init(rngs.params(), (p, p, c, cfg.width), jnp.float32),
                            ("patch", "patch", "channels", "vision_embed"))

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """(B, H, W, C) → (B, N, width), patches in raster order (as HF's flatten of the conv output)."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        b, g, p = pixels.shape[0], cfg.grid, cfg.patch_size
        # A reshape + one matmul equals the strided conv exactly and maps to the MXU without a conv lowering.
        patches = pixels.astype(dtype).reshape(b, g, p, g, p, cfg.num_channels)
        out = jnp.einsum("byhxwc,hwcd->byxd", patches, self.kernel[...].astype(dtype))
        return out.reshape(b, g * g, cfg.width)


class ConvStem(nnx.Module):
    """log2(p) stride-2 3×3 convolutions, channel width doubling up to `width`: (B, H, W, C) → (B, N, width)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        steps = cfg.patch_size.bit_length() - 1
        widths = [cfg.num_channels] + [max(cfg.width >> (steps - 1 - i), 8) for i in range(steps - 1)] + [cfg.width]
        init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        self.kernels = nnx.List([
            param(init(rngs.params(), (3, 3, cin, cout), jnp.float32), ("conv", "conv", None, None))
            for cin, cout in zip(widths[:-1], widths[1:])
        ])
        self.biases = nnx.List([param(jnp.zeros((cout,), jnp.float32), (None,)) for cout in widths[1:]])

    def __call__(self, pixels: jax.Array) -> jax.Array:
        dtype = jnp.dtype(self.cfg.dtype)
        x = pixels.astype(dtype)
        for i, (kernel, bias) in enumerate(zip(self.kernels, self.biases)):
            if i:
                x = jax.nn.gelu(x)
            x = stride2_conv3x3(x, kernel[...].astype(dtype)) + bias[...].astype(dtype)
        return x.reshape(x.shape[0], -1, self.cfg.width)


def stride2_conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """3×3 convolution, stride 2, padding 1 (NHWC, HWIO) as its 9 strided taps concatenated and one matmul.

    Equal to `lax.conv_general_dilated` (tests/test_vision.py); on CPU the matmul form runs forward and
    backward about 1.5× faster than XLA's convolution, and on accelerators it maps to the matrix unit directly.
    """
    b, h, w, c = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    taps = [padded[:, i:i + h:2, j:j + w:2] for i in range(3) for j in range(3)]  # row-major over (i, j)
    return jnp.concatenate(taps, axis=-1) @ kernel.reshape(9 * c, kernel.shape[-1])


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype = jnp.dtype(cfg.dtype)
        w = cfg.width
        self.q_proj = dense(w, w, ("vision_embed", "vision_heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = dense(w, w, ("vision_embed", "vision_heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.v_proj = dense(w, w, ("vision_embed", "vision_heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = dense(w, w, ("vision_heads", "vision_embed"), use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array, mesh=None) -> tuple[jax.Array, jax.Array]:
        """(B, T, width) → (output (B, T, width), [CLS] attention row over all T keys, head mean (B, T) float32).
        `mesh`: the parameters' mesh (splash runs under shard_map over it)."""
        cfg = self.cfg
        b, t, _ = x.shape
        heads = (b, t, cfg.num_heads, cfg.head_dim)
        q = self.q_proj(x).reshape(heads)
        k = self.k_proj(x).reshape(heads)
        v = self.v_proj(x).reshape(heads)
        scale = cfg.head_dim**-0.5
        out = attend(q, k, v, scale=scale, implementation=choose(cfg.attention, jax.default_backend(), q.dtype),
                     mesh=mesh, head_axes=("vision_heads", "vision_heads"))
        # One query row against all keys: O(T), independent of how the main attention is computed.
        logits = jnp.einsum("bhd,bthd->bht", q[:, 0].astype(jnp.float32), k.astype(jnp.float32)) * scale
        cls_row = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=1)
        return self.out_proj(out.reshape(b, t, cfg.width)), cls_row


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        dtype = jnp.dtype(cfg.dtype)
        self.fc1 = dense(cfg.width, cfg.mlp_dim, ("vision_embed", "vision_mlp"), use_bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = dense(cfg.mlp_dim, cfg.width, ("vision_mlp", "vision_embed"), use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(quick_gelu(self.fc1(x)))


class VisionLayer(nnx.Module):
    """Pre-LN transformer layer (HF `CLIPEncoderLayer`)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps, axis="vision_embed")
        self.attn = VisionAttention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(cfg.width, eps=cfg.layer_norm_eps, axis="vision_embed")
        self.mlp = VisionMLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, mesh=None) -> tuple[jax.Array, jax.Array]:
        attn_out, cls_row = self.attn(self.norm1(x), mesh)
        x = x + attn_out
        x = x + self.mlp(self.norm2(x))
        return x, cls_row


class VisionTower(nnx.Module):
    """CLIP ViT up to `select_layer`: patch features (B, N, width) and the [CLS] attention row (B, N)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, rngs=rngs) if cfg.stem == "patch" else ConvStem(cfg, rngs=rngs)
        init = nnx.initializers.normal(cfg.width**-0.5)
        self.class_embedding = param(init(rngs.params(), (cfg.width,), jnp.float32), ("vision_embed",))
        self.position_embedding = param(
            init(rngs.params(), (cfg.num_patches + 1, cfg.width), jnp.float32), ("position", "vision_embed"))
        self.pre_norm = LayerNorm(cfg.width, eps=cfg.layer_norm_eps, axis="vision_embed")
        self.layers = stack_layers(lambda r: VisionLayer(cfg, rngs=r), cfg.num_layers_used, rngs)

    def __call__(self, pixels: jax.Array) -> tuple[jax.Array, jax.Array]:
        """pixels (B, H, W, C), NHWC, already normalised → (features (B, N, width), cls_attention (B, N) float32).

        cls_attention is the selected layer's softmax row of the [CLS] query over all N+1 keys, averaged over
        heads, restricted to the patch columns (so it sums to 1 minus the CLS self-attention).
        """
        cfg = self.cfg
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if tuple(pixels.shape[1:]) != expected:
            raise ValueError(
                f"vision tower expects NHWC pixels (B, {', '.join(map(str, expected))}), got {pixels.shape}")
        dtype = jnp.dtype(cfg.dtype)
        b = pixels.shape[0]
        patches = self.patch_embed(pixels)
        cls = jnp.broadcast_to(self.class_embedding[...].astype(dtype), (b, 1, cfg.width))
        x = jnp.concatenate([cls, patches], axis=1) + self.position_embedding[...].astype(dtype)
        x = self.pre_norm(x)
        # The carry holds the latest layer's CLS row; after the last (selected) layer it is the one we return.
        cls_row = jnp.zeros((b, cfg.num_patches + 1), jnp.float32)
        mesh = mesh_of(self.position_embedding[...])
        (x, cls_row), _ = run_stacked(
            self.layers, lambda layer, carry, _: (layer(carry[0], mesh), None), (x, cls_row), scan=cfg.scan_layers)
        features, cls_attention = x[:, 1:], cls_row[:, 1:]
        if not cfg.trainable:
            features, cls_attention = jax.lax.stop_gradient(features), jax.lax.stop_gradient(cls_attention)
        return features, cls_attention
