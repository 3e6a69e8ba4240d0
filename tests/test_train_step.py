"""The functional train step: sharded == single device, micro-batch accumulation == one big batch (token-weighted),
frozen parameters bit-identical, non-finite steps skipped and counted, the LLaVA schedule, the stage labels."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from meteor_jax import sharding
from meteor_jax.models.cross_entropy import IGNORE_INDEX
from meteor_jax.models.meteor import Meteor, config_from_dict
from meteor_jax.train import (
    FROZEN, TRAINED, create_train_state, make_eval_step, make_optimizer, make_schedule, make_train_step,
    train_state_from_params, trainable_labels,
)
from test_meteor import tiny_batch

STAGE1, STAGE2 = ("fusion",), ("fusion", "llm")
MESH8, MESH1 = (2, 2, 2), (1, 1, 1)  # (data, fsdp, tensor)
LR = 1e-2
# The same programs with less LLVM optimisation: compiling, not running, dominates these tests on CPU.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def top_level(path) -> str:
    return str(path[0].key)


def as_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def mesh_of(shape):
    return sharding.make_mesh(*shape, devices=jax.devices()[:math.prod(shape)])


def tiny_config():
    """configs/tiny.py with one fusion block and the sequential scan: every part of the model, fewer ops to compile."""
    config = tiny.get_config().model
    config.fusion.update(num_layers=1, scan_impl="sequential")
    return config_from_dict(config)


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config()

    def make():
        return Meteor(cfg, rngs=nnx.Rngs(0))

    abstract = nnx.state(nnx.eval_shape(make))
    # Two tiny batches side by side: 8 rows whose valid-token counts differ row to row. Host arrays, as from the
    # data loader: the step's in_shardings lay them out.
    a, b = as_numpy(tiny_batch(cfg, batch=4, seed=0)), as_numpy(tiny_batch(cfg, batch=4, seed=1))
    batch = {k: np.concatenate([a[k], b[k]]) for k in a}
    schedule = make_schedule(10, lr=LR, warmup_ratio=0.0)  # peak lr from the first update on
    labels = {STAGE2: trainable_labels(abstract, STAGE2)}
    # A large eps keeps Adam's first update lr·g/(|g| + eps) a smooth function of the gradient. With eps=1e-8 it is
    # lr·sign(g): float32 rounding flips the sign of entries that are zero up to noise, and runs whose gradients
    # agree to 1e-5 could differ by 2·lr there.
    txs = {STAGE2: make_optimizer(labels[STAGE2], schedule, eps=0.1)}
    mesh8 = mesh_of(MESH8)
    graphdef, state, shardings = create_train_state(make, txs[STAGE2], mesh8)
    return dict(cfg=cfg, batch=batch, schedule=schedule, labels=labels, txs=txs, graphdef=graphdef, mesh8=mesh8,
                state8=state, shardings8=shardings, initial={(STAGE2, MESH8): (as_numpy(state), shardings)},
                steps={})


def fresh_state(setup, stage, mesh_shape):
    """The common step-0 TrainState of `stage`, laid out for `mesh_shape` (a new copy: steps donate theirs)."""
    key = (stage, mesh_shape)
    if key not in setup["initial"]:
        params = jax.tree.map(jnp.asarray, setup["initial"][(STAGE2, MESH8)][0].params)
        state, shardings = train_state_from_params(params, setup["txs"][stage], mesh_of(mesh_shape))
        setup["initial"][key] = (as_numpy(state), shardings)
    state, shardings = setup["initial"][key]
    return jax.device_put(state, shardings)


def train_step(setup, stage, mesh_shape, micro_batches=1):
    """(compiled step, fresh state); each step function is compiled once and shared by the tests."""
    key = (stage, mesh_shape, micro_batches)
    state = fresh_state(setup, stage, mesh_shape)
    if key not in setup["steps"]:
        shardings = setup["initial"][(stage, mesh_shape)][1]
        step = make_train_step(
            setup["graphdef"], setup["txs"][stage], setup["labels"][stage], shardings, mesh_of(mesh_shape),
            schedule=setup["schedule"], micro_batches=micro_batches)
        setup["steps"][key] = step.lower(state, setup["batch"]).compile(FAST_COMPILE)
    return setup["steps"][key], state


def assert_trees_close(actual, expected, rtol=1e-5):
    """Leaf by leaf, max |actual - expected| ≤ rtol · max |expected| (gradients of tiny entries are noise-level)."""
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        assert x.shape == y.shape, jax.tree_util.keystr(path)
        err, scale = np.abs(x - y).max(initial=0.0), np.abs(y).max(initial=0.0)
        assert err <= rtol * scale, f"{jax.tree_util.keystr(path)}: max error {err:.3g} vs scale {scale:.3g}"


def test_state_is_sharded_and_adam_moments_follow_params(setup):
    state, shardings = setup["state8"], setup["shardings8"]
    assert int(state.step) == 0 and int(state.skipped) == 0
    kernel = state.params["llm"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert not kernel.sharding.is_fully_replicated  # (layers, embed→fsdp, mlp→tensor)
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    adam = state.opt_state.inner_states[TRAINED].inner_state[1][0]
    assert adam.mu["llm"]["layers"]["mlp"]["gate_proj"]["kernel"].sharding == kernel.sharding
    assert adam.nu["llm"]["layers"]["mlp"]["gate_proj"]["kernel"].sharding == kernel.sharding
    assert adam.count.sharding.is_fully_replicated
    # Every array of the state sits where the shardings say.
    for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
        assert x.sharding == s


def test_stage_labels():
    cfg = tiny_config()
    abstract = nnx.state(nnx.eval_shape(lambda: Meteor(cfg, rngs=nnx.Rngs(0))))
    for stage, trained in ((STAGE1, {"fusion"}), (STAGE2, {"fusion", "llm"})):
        labels = trainable_labels(abstract, stage)
        seen = {}
        for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]:
            seen.setdefault(top_level(path), set()).add(label)
        assert seen == {m: {TRAINED if m in trained else FROZEN} for m in ("vision", "fusion", "llm")}
    deeper = trainable_labels(abstract, ("llm.embed",))
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(deeper)[0]}
    assert [k for k, v in flat.items() if v == TRAINED] == ["['llm']['embed']['embedding'].value"]
    with pytest.raises(ValueError, match=r"'projector'.*\['fusion', 'llm', 'vision'\]"):
        trainable_labels(abstract, ("fusion", "projector"))


def test_schedule_warmup_then_cosine():
    lr, total = 1e-3, 100
    schedule = make_schedule(total, lr=lr, warmup_ratio=0.03)  # ceil(3.0) = 3 warm-up steps
    warmup = 3

    def expected(step):
        if step < warmup:
            return lr * step / warmup
        progress = (step - warmup) / (total - warmup)
        return lr * 0.5 * (1 + math.cos(math.pi * progress))

    for step in (0, 1, 2, 3, 4, 50, 99, 100):
        np.testing.assert_allclose(float(schedule(step)), expected(step), rtol=1e-5, atol=lr * 1e-6)
    # HF rounds the warm-up up: 3% of 10 steps is one step.
    assert float(make_schedule(10, lr=1.0, warmup_ratio=0.03)(1)) == pytest.approx(1.0)
    floor = make_schedule(total, lr=lr, warmup_ratio=0.0, end_lr_ratio=0.1)
    np.testing.assert_allclose(float(floor(total)), 0.1 * lr, rtol=1e-6)
    np.testing.assert_allclose(float(floor(50)), 0.1 * lr + 0.9 * lr * 0.5 * (1 + math.cos(math.pi * 0.5)), rtol=1e-5)


def test_sharded_step_equals_single_device(setup):
    step8, state8 = train_step(setup, STAGE2, MESH8)
    step1, state1 = train_step(setup, STAGE2, MESH1)
    new8, metrics8 = step8(state8, setup["batch"])
    new1, metrics1 = step1(state1, setup["batch"])
    for name in ("loss", "grad_norm", "num_tokens", "lr"):
        np.testing.assert_allclose(float(metrics8[name]), float(metrics1[name]), rtol=1e-5, err_msg=name)
    assert int(metrics8["skipped_step"]) == 0
    assert float(metrics8["lr"]) == pytest.approx(LR)
    assert_trees_close(new8.opt_state, new1.opt_state)  # Adam's mu and nu hold the gradients
    assert_trees_close(new8.params, new1.params)
    kernel = new8.params["llm"]["layers"]["mlp"]["gate_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")  # the layout is kept
    assert int(new8.step) == 1 and int(new8.skipped) == 0


def test_micro_batches_accumulate_to_one_big_batch(setup):
    batch = setup["batch"]
    full_step, state_full = train_step(setup, STAGE2, MESH8)
    micro_step, state_micro = train_step(setup, STAGE2, MESH8, micro_batches=2)
    new_full, m_full = full_step(state_full, batch)
    new_micro, m_micro = micro_step(state_micro, batch)
    for name in ("loss", "grad_norm", "num_tokens"):
        np.testing.assert_allclose(float(m_micro[name]), float(m_full[name]), rtol=1e-5, err_msg=name)
    assert_trees_close(new_micro.opt_state, new_full.opt_state)
    assert_trees_close(new_micro.params, new_full.params)

    # The micro-batches (rows 0, 2, 4, 6 and rows 1, 3, 5, 7) hold different numbers of target tokens, so the mean
    # of per-micro-batch means differs from the token mean the step reports.
    params = fresh_state(setup, STAGE2, MESH8).params
    halves = [{k: v[j::2] for k, v in batch.items()} for j in range(2)]
    eval_step = make_eval_step(setup["graphdef"], setup["shardings8"].params, setup["mesh8"])
    eval_step = eval_step.lower(params, halves[0]).compile(FAST_COMPILE)
    sums, counts = zip(*(map(float, eval_step(params, half)) for half in halves))
    assert counts[0] != counts[1] and sum(counts) == float(m_full["num_tokens"])
    np.testing.assert_allclose(sum(sums) / sum(counts), float(m_micro["loss"]), rtol=1e-5)
    per_micro_mean = np.mean([s / c for s, c in zip(sums, counts)])
    assert abs(per_micro_mean - float(m_micro["loss"])) > 1e-3


def test_frozen_parameters_bit_identical(setup):
    step, state = train_step(setup, STAGE2, MESH8)
    before = setup["initial"][(STAGE2, MESH8)][0].params
    new, metrics = step(state, setup["batch"])
    assert int(metrics["skipped_step"]) == 0
    changed = {}
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(as_numpy(new.params))[0], jax.tree.leaves(before)):
        changed.setdefault(top_level(path), []).append(not np.array_equal(x, y))
    assert not any(changed["vision"]), "the frozen vision tower must not change a bit"
    for module in STAGE2:
        assert sum(changed[module]) > len(changed[module]) // 2, f"{module} should train"
    # No optimizer state is kept for frozen parameters.
    adam = new.opt_state.inner_states[TRAINED].inner_state[1][0]
    assert {top_level(p) for p, _ in jax.tree_util.tree_flatten_with_path(adam.mu)[0]} == set(STAGE2)


def test_non_finite_step_is_skipped_and_counted(setup):
    step, state = train_step(setup, STAGE2, MESH8)
    batch = setup["batch"]
    state, metrics = step(state, batch)  # one normal update first, so the optimizer state is non-trivial
    assert int(metrics["skipped_step"]) == 0
    before = as_numpy(state)
    poisoned = dict(batch, pixels=batch["pixels"].copy())
    poisoned["pixels"][3, 0, 0, 0] = np.nan
    state, metrics = step(state, poisoned)
    assert int(metrics["skipped_step"]) == 1
    assert not np.isfinite(float(metrics["loss"]))
    assert int(state.step) == 2 and int(state.skipped) == 1
    for x, y in zip(jax.tree.leaves(as_numpy(state.params)), jax.tree.leaves(before.params)):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(jax.tree.leaves(as_numpy(state.opt_state)), jax.tree.leaves(before.opt_state)):
        np.testing.assert_array_equal(x, y)

    # A batch without any target token has no mean: skipped as well, not a zero-gradient Adam step.
    empty = dict(batch, labels=np.full_like(batch["labels"], IGNORE_INDEX))
    state, metrics = step(state, empty)
    assert int(metrics["skipped_step"]) == 1 and float(metrics["num_tokens"]) == 0
    assert int(state.skipped) == 2

    # Training resumes; the lr is that of the optimizer's second update (skipped steps do not advance it).
    state, metrics = step(state, batch)
    assert int(metrics["skipped_step"]) == 0 and int(state.step) == 4 and int(state.skipped) == 2
    np.testing.assert_allclose(float(metrics["lr"]), float(setup["schedule"](1)), rtol=1e-6)
    assert not np.array_equal(np.asarray(state.params["fusion"]["align_fc1"]["kernel"]),
                              before.params["fusion"]["align_fc1"]["kernel"])


def test_non_finite_update_is_skipped(setup):
    """Finite loss and gradients but an infinite learning rate: the update itself is non-finite."""
    labels = setup["labels"][STAGE2]
    tx = make_optimizer(labels, lambda count: jnp.inf)
    mesh = mesh_of(MESH1)
    before = setup["initial"][(STAGE2, MESH8)][0]
    state, shardings = train_state_from_params(jax.tree.map(jnp.asarray, before.params), tx, mesh)
    step = make_train_step(setup["graphdef"], tx, labels, shardings, mesh)
    state, metrics = step.lower(state, setup["batch"]).compile(FAST_COMPILE)(state, setup["batch"])
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["grad_norm"]))
    assert int(metrics["skipped_step"]) == 1 and int(state.skipped) == 1 and int(state.step) == 1
    for x, y in zip(jax.tree.leaves(as_numpy(state.params)), jax.tree.leaves(before.params)):
        np.testing.assert_array_equal(x, y)
