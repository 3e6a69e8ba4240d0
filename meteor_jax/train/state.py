"""The training state pytree and its sharded creation: abstract shapes → shardings → one jit-compiled init whose
outputs land directly on their shardings (no array is ever whole on one device)."""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meteor_jax import sharding


@struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: train steps taken, skipped ones included (= batches consumed)
    params: nnx.State  # the model's nnx.Param variables, float32
    opt_state: optax.OptState
    skipped: jax.Array  # int32 scalar: steps whose update was skipped (non-finite loss, gradient or update)


def _names(path) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


def opt_state_shardings(abstract_opt_state, abstract_params, param_shardings, mesh: Mesh):
    """Shardings for an optimizer state. A leaf whose key path ends with a parameter's key path and whose shape
    equals that parameter's (Adam mu/nu, any per-parameter buffer) takes the parameter's sharding; everything
    else (step counts, scalars) is replicated."""
    params = {
        _names(path): (leaf.shape, spec)
        for (path, leaf), spec in zip(
            jax.tree_util.tree_flatten_with_path(abstract_params)[0], jax.tree.leaves(param_shardings)
        )
    }
    replicated = NamedSharding(mesh, P())

    def one(path, leaf):
        names = _names(path)
        for start in range(len(names)):
            match = params.get(names[start:])
            if match is not None and match[0] == leaf.shape:
                return match[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def _abstract_params(make_model: Callable[[], nnx.Module]):
    graphdef, state = nnx.split(nnx.eval_shape(make_model))
    others = sorted(
        {type(v).__name__ for v in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
         if not isinstance(v, nnx.Param)}
    )
    if others:
        raise ValueError(f"the model holds non-parameter variables {others}; TrainState keeps only nnx.Param")
    return graphdef, state


def _state_shardings(abstract_params, tx: optax.GradientTransformation, mesh: Mesh, rules: Mapping | None):
    param_shardings = sharding.state_shardings(abstract_params, mesh, rules)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = NamedSharding(mesh, P())
    return TrainState(
        step=replicated,
        params=param_shardings,
        opt_state=opt_state_shardings(abstract_opt, abstract_params, param_shardings, mesh),
        skipped=replicated,
    ), abstract_opt


def abstract_train_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh,
                         rules: Mapping | None = None):
    """(graphdef, TrainState of jax.ShapeDtypeStruct carrying their target shardings, TrainState of shardings).

    Nothing is allocated: the target for a checkpoint restore onto `mesh`.
    """
    graphdef, abstract_params = _abstract_params(make_model)
    shardings, abstract_opt = _state_shardings(abstract_params, tx, mesh, rules)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    abstract = TrainState(step=scalar, params=abstract_params, opt_state=abstract_opt, skipped=scalar)
    return graphdef, with_shardings(abstract, shardings), shardings


def with_shardings(tree, shardings):
    """jax.ShapeDtypeStruct leaves (shape and dtype of `tree`'s arrays or structs) carrying `shardings`."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def create_train_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh,
                       rules: Mapping | None = None):
    """(graphdef, TrainState, TrainState of shardings): the model built by `make_model` and a fresh optimizer
    state, initialised by one jit whose outputs are laid out by the shardings."""
    graphdef, abstract_params = _abstract_params(make_model)
    shardings, _ = _state_shardings(abstract_params, tx, mesh, rules)

    def init():
        params = nnx.state(make_model(), nnx.Param)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          skipped=jnp.zeros((), jnp.int32))

    return graphdef, jax.jit(init, out_shardings=shardings)(), shardings


def train_state_from_params(params: nnx.State, tx: optax.GradientTransformation, mesh: Mesh,
                            rules: Mapping | None = None):
    """(TrainState, TrainState of shardings) from existing parameters (e.g. loaded weights for stage 2) and a
    fresh optimizer state at step 0. `params` is consumed: its buffers are donated to the new state."""
    abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shardings, _ = _state_shardings(abstract_params, tx, mesh, rules)
    params = jax.device_put(params, shardings.params)  # a no-op where already laid out so

    def init(params):
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          skipped=jnp.zeros((), jnp.int32))

    state = jax.jit(init, in_shardings=(shardings.params,), out_shardings=shardings, donate_argnums=0)(params)
    return state, shardings
