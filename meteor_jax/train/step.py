"""The functional, sharded train step: gradient accumulation over micro-batches, a token-weighted mean loss over
the global batch, skipped (and counted) non-finite updates, and frozen parameters that never change a bit."""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from meteor_jax import sharding
from meteor_jax.train.optim import TRAINED
from meteor_jax.train.state import TrainState

Batch = Mapping[str, jax.Array]


def _batch_spec(mesh: Mesh, rules: Mapping | None) -> NamedSharding:
    # Leading dimension over the 'batch' rule's mesh axes; a rank-1 spec leaves trailing dimensions replicated,
    # so one sharding serves every array of the batch dict.
    return sharding.batch_sharding(mesh, 1, rules)


def _partition(labels, params):
    """Flat parameter leaves split into (trained, frozen) lists plus the way back to the full State."""
    leaves, treedef = jax.tree.flatten(params)
    is_trained = [label == TRAINED for label in jax.tree.leaves(labels)]
    if len(is_trained) != len(leaves):
        raise ValueError(f"labels have {len(is_trained)} leaves but params have {len(leaves)}")

    def join(trained, frozen):
        trained, frozen = iter(trained), iter(frozen)
        return treedef.unflatten([next(trained) if t else next(frozen) for t in is_trained])

    trained = [x for x, t in zip(leaves, is_trained) if t]
    frozen = [x for x, t in zip(leaves, is_trained) if not t]
    return trained, frozen, join


def _micro_batches(batch: Batch, count: int, mesh: Mesh, spec: NamedSharding) -> Batch:
    """(B, ...) → (count, B/count, ...) with micro-batch j = rows j, j+count, j+2·count, ...

    Strided rather than contiguous chunks: each device's contiguous block of the batch then holds rows of every
    micro-batch, so splitting moves no data between devices.
    """
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch arrays disagree on the batch size: {sorted(sizes)}")
    (size,) = sizes
    if size % count:
        raise ValueError(f"batch size {size} is not divisible by micro_batches={count}")
    inner = NamedSharding(mesh, P(None, *spec.spec))

    def split(x):
        x = jnp.swapaxes(x.reshape(size // count, count, *x.shape[1:]), 0, 1)
        return jax.lax.with_sharding_constraint(x, inner)

    return jax.tree.map(split, batch)


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    labels,
    shardings: TrainState,
    mesh: Mesh,
    *,
    rules: Mapping | None = None,
    schedule: Callable[[jax.Array], jax.Array] | float | None = None,
    micro_batches: int = 1,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, batch) -> (state, metrics)`, jit-compiled with explicit shardings; `state` is donated.

    `labels` is the `trainable_labels` tree given to the optimizer; `shardings` comes from `create_train_state`
    (or `abstract_train_state`). The batch (a dict of batch-major arrays, host or device) is laid out over the
    'batch' rule's mesh axes. The batch's leading dimension is split into `micro_batches` chunks whose summed-NLL gradients and token counts
    are accumulated by `lax.scan`; the update uses grad_sum / total_tokens, exactly one big batch's token mean.
    Only parameters labelled TRAINED are differentiated. A non-finite loss, gradient or update (a batch without
    any target token included) leaves params and opt_state unchanged and counts the step in `state.skipped`.
    Metrics: loss (mean per token), num_tokens, grad_norm (trained parameters, before clipping), skipped_step
    (0/1), and with `schedule` (the one given to the optimizer, or a constant) lr: the learning rate of this step's
    update, schedule(step - skipped), since skipped steps do not advance the optimizer's count.
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    rules = sharding.DEFAULT_RULES if rules is None else rules
    batch_spec = _batch_spec(mesh, rules)
    replicated = NamedSharding(mesh, P())
    trained_shardings, _, _ = _partition(labels, shardings.params)

    def step(state: TrainState, batch: Batch):
        trained, frozen, join = _partition(labels, state.params)

        def loss_fn(trained_params, micro):
            with sharding.logical_rules(rules):  # activation constraints under the same rules as the parameters
                return nnx.merge(graphdef, join(trained_params, frozen)).loss(micro, train=True)  # (sum NLL, count)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        if micro_batches == 1:
            (loss_sum, count), grad_sum = grad_fn(trained, batch)
        else:
            def accumulate(carry, micro):
                grads, loss_sum, count = carry
                (loss, n), g = grad_fn(trained, micro)
                return (jax.tree.map(jnp.add, grads, g), loss_sum + loss, count + n), None

            zeros = [jax.lax.with_sharding_constraint(jnp.zeros(p.shape, p.dtype), s)
                     for p, s in zip(trained, trained_shardings)]
            init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
            (grad_sum, loss_sum, count), _ = jax.lax.scan(
                accumulate, init, _micro_batches(batch, micro_batches, mesh, batch_spec))

        # No max(count, 1): a batch without target tokens gives 0/0 = NaN and is skipped like any non-finite step.
        loss = loss_sum / count
        grads = [g / count for g in grad_sum]
        grad_norm = optax.tree.norm(grads)
        # Frozen parameters get zero gradients that multi_transform's set_to_zero discards (and XLA removes).
        full_grads = join(grads, [jnp.zeros(p.shape, p.dtype) for p in frozen])
        updates, opt_state = tx.update(full_grads, state.opt_state, state.params)
        trained_updates, _, _ = _partition(labels, updates)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(optax.tree.norm(trained_updates))

        new_trained = [jnp.where(finite, p + u.astype(p.dtype), p) for p, u in zip(trained, trained_updates)]
        opt_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), opt_state, state.opt_state)
        skipped = (~finite).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1,
            params=join(new_trained, frozen),  # frozen leaves pass through untouched: bit-identical
            opt_state=opt_state,
            skipped=state.skipped + skipped,
        )
        metrics = dict(loss=loss, num_tokens=count, grad_norm=grad_norm, skipped_step=skipped)
        if callable(schedule):
            metrics["lr"] = jnp.asarray(schedule(state.step - state.skipped), jnp.float32)
        elif schedule is not None:
            metrics["lr"] = jnp.asarray(schedule, jnp.float32)
        return new_state, metrics

    return jax.jit(step, in_shardings=(shardings, batch_spec), out_shardings=(shardings, replicated),
                   donate_argnums=0)


def make_eval_step(graphdef: nnx.GraphDef, param_shardings, mesh: Mesh, *, rules: Mapping | None = None):
    """`eval_step(params, batch) -> (sum NLL, token count)`, jit-compiled; sums so callers can pool batches."""
    replicated = NamedSharding(mesh, P())
    rules = sharding.DEFAULT_RULES if rules is None else rules

    def eval_step(params, batch):
        with sharding.logical_rules(rules):
            return nnx.merge(graphdef, params).loss(batch)

    return jax.jit(eval_step, in_shardings=(param_shardings, _batch_spec(mesh, rules)),
                   out_shardings=(replicated, replicated))
