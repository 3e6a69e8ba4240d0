"""Orbax checkpoints: bit-identical round trip (async, with the next step donating the saved buffers), keep-N,
restore onto a different mesh, data-iterator state, partial restore of the fusion weights, kill-and-resume."""

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from meteor_jax import sharding
from meteor_jax.checkpoint import Checkpointer, restore_params_subset
from meteor_jax.models.meteor import Meteor, config_from_dict
from meteor_jax.train import (
    abstract_train_state, create_train_state, make_optimizer, make_schedule, make_train_step, trainable_labels,
)
from test_meteor import tiny_batch

STEPS = 6


@pytest.fixture(scope="module")
def run():
    """A stage-1 run on the 8-device mesh: the initial state, a compiled step and six fixed batches."""
    config = tiny.get_config().model
    config.fusion.update(num_layers=1, scan_impl="sequential")  # fewer ops to compile; every part still there
    cfg = config_from_dict(config)

    def make():
        return Meteor(cfg, rngs=nnx.Rngs(0))

    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    labels = trainable_labels(nnx.state(nnx.eval_shape(make)), ("fusion",))
    tx = make_optimizer(labels, make_schedule(STEPS, lr=1e-2, warmup_ratio=0.2))
    graphdef, state, shardings = create_train_state(make, tx, mesh)
    batches = [as_numpy(tiny_batch(cfg, batch=4, seed=i)) for i in range(STEPS)]  # host data, as from the loader
    # The same program with less LLVM optimisation: compiling, not running, dominates these tests on CPU.
    step = make_train_step(graphdef, tx, labels, shardings, mesh).lower(state, batches[0]).compile(
        {"xla_backend_optimization_level": 0})
    return dict(make=make, tx=tx, mesh=mesh, initial=as_numpy(state), shardings=shardings, step=step,
                batches=batches)


def as_numpy(tree):
    return jax.tree.map(np.asarray, tree)


def fresh(run):
    return jax.device_put(run["initial"], run["shardings"])


def trained(run, steps=2):
    """A state after `steps` updates (the first update has lr 0: warm-up)."""
    state = fresh(run)
    for k in range(steps):
        state, _ = run["step"](state, run["batches"][k])
    return state


def assert_identical(actual, expected):
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree.leaves(expected)):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y), jax.tree_util.keystr(path)


def target_on(run, mesh):
    return abstract_train_state(run["make"], run["tx"], mesh)[1]


def test_async_save_restore_keep_n(run, tmp_path):
    state = fresh(run)
    snapshots = {}
    with Checkpointer(tmp_path, keep=2, save_every=1, async_save=True) as ckpt:
        assert ckpt.latest_step() is None
        for k in range(1, 4):
            state, _ = run["step"](state, run["batches"][k])
            snapshots[k] = as_numpy(state)
            assert ckpt.save(k, state, {"step": k})
            # The next step donates (deletes) the buffers just handed to the asynchronous save.
        state, _ = run["step"](state, run["batches"][0])
        ckpt.wait()
        assert list(ckpt.all_steps()) == [2, 3]  # keep=2 deleted step 1
        assert ckpt.latest_step() == 3
        target = target_on(run, run["mesh"])
        for k in (2, 3):
            restored, data = ckpt.restore(k, target)
            assert data == {"step": k}
            assert_identical(restored, snapshots[k])
            for x, t in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
                assert x.sharding == t.sharding
        assert int(ckpt.restore(None, target)[0].step) == 3  # None: the latest
        with pytest.raises(FileNotFoundError, match="step 1"):
            ckpt.restore(1, target)


def test_save_every(run, tmp_path):
    state = fresh(run)
    with Checkpointer(tmp_path, keep=None, save_every=3) as ckpt:
        saved = [k for k in range(1, 8) if ckpt.save(k, state)]
        assert ckpt.save(8, state, force=True)
        ckpt.wait()
        assert not ckpt.save(6, state, force=True)  # an existing step is kept, not an error
        assert saved == [3, 6] and list(ckpt.all_steps()) == [3, 6, 8]


def test_restore_onto_a_different_mesh(run, tmp_path):
    state = trained(run)
    saved = as_numpy(state)
    saved_shardings = [x.sharding for x in jax.tree.leaves(state)]
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
        ckpt.wait()
        for shape in [(8, 1, 1), (1, 1, 8), (1, 4, 2)]:  # (data, fsdp, tensor); saved with (2, 2, 2)
            target = target_on(run, sharding.make_mesh(*shape))
            restored, data = ckpt.restore(1, target)
            assert data is None
            assert_identical(restored, saved)
            leaves = jax.tree.leaves(restored)
            for x, t in zip(leaves, jax.tree.leaves(target)):
                assert x.sharding == t.sharding
            # The layout really changed (data=8 replicates every weight; the others split them differently).
            assert any(not x.sharding.is_equivalent_to(s, x.ndim) for x, s in zip(leaves, saved_shardings))


def test_data_state_round_trip(run, tmp_path):
    data_states = [
        {"epoch": 2, "position": [3, 5], "seed": 7},
        bytes(range(256)),  # e.g. grain's DataLoader iterator state (JSON bytes); any bytes round-trip
        None,
    ]
    state = fresh(run)
    target = target_on(run, run["mesh"])
    with Checkpointer(tmp_path, keep=None) as ckpt:
        for k, data_state in enumerate(data_states, start=1):
            ckpt.save(k, state, data_state)
        ckpt.wait()
        for k, data_state in enumerate(data_states, start=1):
            restored = ckpt.restore(k, target)[1]
            assert restored == data_state and type(restored) is type(data_state)
    with Checkpointer(tmp_path / "other") as ckpt, pytest.raises(TypeError, match="data_state"):
        ckpt.save(1, state, ["not", "supported"])


def test_restore_params_subset_takes_only_fusion(run, tmp_path):
    state = trained(run)
    trained_np = as_numpy(state.params)
    with Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, state)
    # Stage 2 starts from its own (here: perturbed initial) vision and LLM weights and the stage-1 fusion weights.
    own = jax.tree.map(lambda x: x + 1.0, run["initial"].params)
    params = restore_params_subset(tmp_path, 1, jax.device_put(own, run["shardings"].params), keys=("fusion",))
    assert_identical(params["fusion"], trained_np["fusion"])
    assert_identical(params["vision"], own["vision"])
    assert_identical(params["llm"], own["llm"])
    initial = run["initial"].params
    assert not np.array_equal(trained_np["fusion"]["align_fc1"]["kernel"], initial["fusion"]["align_fc1"]["kernel"])

    # An abstract target on another mesh: only the fusion weights are read, onto that mesh's shardings.
    target = target_on(run, sharding.make_mesh(1, 1, 8)).params
    params = restore_params_subset(tmp_path, None, target)
    assert_identical(params["fusion"], trained_np["fusion"])
    for x, t in zip(jax.tree.leaves(params["fusion"]), jax.tree.leaves(target["fusion"])):
        assert x.sharding == t.sharding
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params["llm"]))
    with pytest.raises(KeyError, match="projector.*fusion"):
        restore_params_subset(tmp_path, 1, target, keys=("projector",))


def test_kill_and_resume(run, tmp_path):
    step, batches = run["step"], run["batches"]
    state, losses = fresh(run), []
    with Checkpointer(tmp_path, save_every=3) as ckpt:
        for k in range(1, STEPS + 1):
            state, metrics = step(state, batches[k - 1])
            losses.append(float(metrics["loss"]))
            ckpt.save(k, state, {"next_batch": k})
    final = as_numpy(state)
    del state  # the "killed" run: nothing survives but the checkpoint directory

    with Checkpointer(tmp_path, save_every=3) as ckpt:  # a new process
        assert list(ckpt.all_steps()) == [3, 6]
        state, data = ckpt.restore(3, target_on(run, run["mesh"]))
    assert int(state.step) == 3 and data == {"next_batch": 3}
    resumed = []
    for k in range(data["next_batch"], STEPS):
        state, metrics = step(state, batches[k])
        resumed.append(float(metrics["loss"]))
    assert resumed == losses[3:]
    assert_identical(state, final)
    # Stage 1: six updates moved the fusion weights and left the vision tower and the LLM bit-identical.
    assert_identical(final.params["vision"], run["initial"].params["vision"])
    assert_identical(final.params["llm"], run["initial"].params["llm"])
    assert not np.array_equal(final.params["fusion"]["align_fc1"]["kernel"],
                              run["initial"].params["fusion"]["align_fc1"]["kernel"])
