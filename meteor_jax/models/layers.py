"""Small building blocks shared by every model file.

Every parameter carries its logical axis names in the `logical_axes` metadata field (MaxText style);
`meteor_jax.sharding` maps them to mesh axes with one rules table. A custom metadata key (rather than
`nnx.with_partitioning`) keeps module construction independent of any mesh.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from meteor_jax import sharding

Axes = tuple[str | None, ...]

default_kernel_init = nnx.initializers.lecun_normal()


def param(value: jax.Array, axes: Axes) -> nnx.Param:
    """A trainable parameter with logical axis names (one name per dimension)."""
    if len(axes) != value.ndim:
        raise ValueError(f"logical axes {axes} do not match parameter shape {value.shape}")
    return nnx.Param(value, logical_axes=tuple(axes))


def dense(
    in_features: int,
    out_features: int,
    axes: tuple[str | None, str | None],
    *,
    rngs: nnx.Rngs,
    use_bias: bool = False,
    dtype=jnp.float32,
    kernel_init: Callable = default_kernel_init,
) -> nnx.Linear:
    """`nnx.Linear` whose kernel (in, out) and bias (out,) carry logical axis names."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=kernel_init,
        rngs=rngs,
        kernel_metadata={"logical_axes": tuple(axes)},
        bias_metadata={"logical_axes": (axes[1],)},
    )


class GridPositionEmbedding(nnx.Module):
    """Learned row and column embeddings of the g×g patch grid, looked up by each kept visual token's raster index
    and added to it at the LLM input (`model.visual_positions="grid"`).

    Why: the LLM orders the K tokens in 1-D (RoPE), and RoPE rotates queries and keys only, so no position reaches
    the attention's values; a decoder may find a token's row from their order but has to read the column from the
    features. With this table the column is one lookup away. It lives in the projector (the `fusion` slot), so
    the stage-1 recipe trains it."""

    def __init__(self, grid: int, dim: int, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(0.02)  # the LLM token embeddings' scale
        self.grid = grid
        self.row = param(init(rngs.params(), (grid, dim), jnp.float32), ("position", "embed"))
        self.column = param(init(rngs.params(), (grid, dim), jnp.float32), ("position", "embed"))

    def __call__(self, indices: jax.Array) -> jax.Array:
        """(B, K) raster indices into the g×g grid → (B, K, dim) float32."""
        rows, columns = jnp.divmod(indices, self.grid)
        return jnp.take(self.row[...], rows, axis=0) + jnp.take(self.column[...], columns, axis=0)


class RMSNorm(nnx.Module):
    """RMSNorm as in LLaMA/Mamba: statistics in float32, then cast back (HF `LlamaRMSNorm`)."""

    def __init__(self, dim: int, *, eps: float = 1e-6, axis: str | None = "embed"):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), jnp.float32), (axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (self.weight[...] * x32).astype(dtype)


class LayerNorm(nnx.Module):
    """LayerNorm with scale and bias, statistics in float32."""

    def __init__(self, dim: int, *, eps: float = 1e-5, axis: str | None = "embed"):
        self.eps = eps
        self.weight = param(jnp.ones((dim,), jnp.float32), (axis,))
        self.bias = param(jnp.zeros((dim,), jnp.float32), (axis,))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.weight[...] + self.bias[...]).astype(dtype)


def quick_gelu(x: jax.Array) -> jax.Array:
    """CLIP's activation: x * sigmoid(1.702 x)."""
    return x * jax.nn.sigmoid(1.702 * x)


def mesh_of(x: jax.Array):
    """The (abstract) mesh a traced array is laid out on, e.g. that of a parameter given to `jit` with a
    NamedSharding; None outside a mesh (eager single-device arrays, constants)."""
    mesh = getattr(jax.typeof(x).sharding, "mesh", None)
    return None if mesh is None or mesh.empty else mesh


def shard_batch(x: jax.Array, mesh) -> jax.Array:
    """Pin activation `x`'s leading dimension to the mesh axes of the 'batch' rule in force (see
    `sharding.constrain`; a no-op without a mesh, or where those axes are trivial or do not divide it).

    Without it XLA's sharding propagation may meet a batch-sharded activation and an fsdp-sharded weight
    (its 'embed' dimension over the same 'fsdp' axis) in one matmul and resolve it by replicating the
    activation: gathering the whole global batch on every device and all-reducing partial sums over the
    contraction, instead of gathering the weight (FSDP). Temporaries then grow with the device count."""
    return sharding.constrain(x, ("batch",) + (None,) * (x.ndim - 1), mesh)


def count_params(tree) -> int:
    """Number of scalars in the `nnx.Param` leaves of a module, state or abstract (eval_shape) state."""
    state = nnx.state(tree, nnx.Param) if isinstance(tree, nnx.Module) else tree
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


def stack_layers(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """`num_layers` copies of a layer with parameters stacked on a leading 'layers' axis.

    The stacked module is run with `nnx.scan` (or sliced in a Python loop); converters read and write
    layer i as index i of that axis.
    """
    keys = jax.random.split(rngs.params(), num_layers)

    @nnx.vmap(in_axes=0, out_axes=0)
    def create(key):
        return make_layer(nnx.Rngs(params=key))

    stacked = create(keys)
    for _, v in nnx.iter_graph(stacked):
        if isinstance(v, nnx.Variable) and "logical_axes" in v.get_metadata():
            v.set_metadata("logical_axes", ("layers",) + tuple(v.get_metadata()["logical_axes"]))
    return stacked


REMAT_POLICIES = {
    "none": None,
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def run_stacked(stacked: nnx.Module, step: Callable, carry, xs=None, *, scan: bool = True, remat: str = "none"):
    """Run `step(layer, carry, x_i) -> (carry, y_i)` over the layers of a `stack_layers` module.

    A pure `jax.lax.scan` over the split layer state (not `nnx.scan`): nnx transforms refuse Variables created
    at an outer trace level, which is exactly what a frozen module closed over inside `jax.grad` looks like.
    `scan=False` unrolls a Python loop over slices (same result). `xs` (per-layer inputs) and the y_i are
    stacked on the leading axis; either may be None.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; expected one of {sorted(REMAT_POLICIES)}")
    graphdef, state = nnx.split(stacked)

    def body(carry, inputs):
        layer_state, x = inputs
        return step(nnx.merge(graphdef, layer_state), carry, x)

    if remat != "none":
        # Inside a scan CSE cannot merge the recomputation across iterations, so prevent_cse is only needed unrolled.
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan:
        return jax.lax.scan(body, carry, (state, xs))
    num_layers = jax.tree.leaves(state)[0].shape[0]
    ys = []
    for i in range(num_layers):
        carry, y = body(carry, jax.tree.map(lambda a: a[i], (state, xs)))
        ys.append(y)
    return carry, jax.tree.map(lambda *a: jnp.stack(a), *ys)
