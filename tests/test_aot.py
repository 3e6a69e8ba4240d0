"""Ahead-of-time compilation of the real train step (meteor_jax/aot.py): topology names, the per-device memory
report of the tiny model compiled for the 8 CPU devices, its invariants, and (with libtpu installed) a TPU target."""
import importlib.util
import math

import jax
import numpy as np
import pytest
from flax import nnx

from configs import tiny
from meteor_jax import aot, sharding
from meteor_jax.models.meteor import Meteor, config_from_dict
from meteor_jax.run import Run

FSDP = 4  # mesh (data 2, fsdp 4, tensor 1) on the 8 CPU devices


@pytest.mark.parametrize("name, topology, devices, hbm_gib", [
    ("v5p-64", "v5p:2x4x4", 32, 95),  # v5p-N counts TensorCores: 2 per chip, one megacore device per chip
    ("v5p-8", "v5p:2x2x1", 4, 95),
    ("v4-64", "v4:2x4x4", 32, 32),
    ("v4-128", "v4:4x4x4", 64, 32),
    ("v5e-256", "v5e:16x16", 256, 16),  # v5e-N / v6e-N count chips
    ("v5litepod-16", "v5e:4x4", 16, 16),
    ("v6e-64", "v6e:8x8", 64, 32),
    ("v6e-8", "v6e:2x4", 8, 32),
    ("v6e-1", "v6e:1x1", 1, 32),
    ("v5p:4x4x12", "v5p:4x4x12", 192, 95),
])
def test_tpu_topology_names(name, topology, devices, hbm_gib):
    target = aot.parse_topology(name)
    assert (target.platform, target.topology, target.num_devices) == ("tpu", topology, devices)
    assert target.hbm_bytes == hbm_gib * aot.GiB
    assert target.chip_config == ("megacore" if name.startswith(("v4", "v5p")) else "default")


def test_other_topology_names():
    assert aot.parse_topology("cpu:8") == aot.Target("cpu:8", "cpu", "cpu", 8, None)
    h100 = aot.parse_topology("h100x8")
    assert (h100.platform, h100.topology, h100.num_devices, h100.hbm_bytes) == ("gpu", "1x1x8", 8, 84_978_434_048)
    assert aot.parse_topology("h200x16").topology == "1x2x8"  # two hosts of 8
    assert aot.parse_topology("gpu:4").generation == "h100"
    assert 'device_description_str: "NVIDIA H200"' in aot.gpu_target_config("h200")
    for bad in ("v5p-7", "v5p-24", "v5e-12", "v6e:4x4x4", "tpu-8", "gpu:12", "h100x0"):
        with pytest.raises(ValueError):
            aot.parse_topology(bad)


def tiny_config():
    config = tiny.get_config()
    config.model.fusion.update(num_layers=1, scan_impl="sequential")  # fewer ops to compile, every part still real
    config.mesh = dict(data=2, fsdp=-1, tensor=1)
    return config


@pytest.fixture(scope="module")
def compiled():
    return aot.compile_train_step(tiny_config(), "cpu:8")


def test_mesh_and_abstract_inputs(compiled):
    assert dict(compiled.mesh.shape) == {"data": 2, "fsdp": FSDP, "tensor": 1}
    # Nothing was allocated: the state and batch are shape structs with their target shardings.
    for leaf in jax.tree.leaves((compiled.state, compiled.batch)):
        assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding.mesh.shape == compiled.mesh.shape
    config = tiny_config()
    assert {k: (v.shape, v.dtype) for k, v in compiled.batch.items()} == {
        "pixels": ((16, 32, 32, 3), np.float32), "tokens": ((16, 32), np.int32), "mask": ((16, 32), np.bool_),
        "image_mask": ((16, 32), np.bool_), "instruction": ((16, config.data.instruction_len), np.int32),
        "instruction_mask": ((16, config.data.instruction_len), np.bool_), "labels": ((16, 32), np.int32)}


def test_batch_matches_the_pipeline_features():
    """The abstract batch has the keys, dtypes and per-sample shapes of what the data pipeline produces."""
    from meteor_jax.data import features
    from meteor_jax.data.tokenizer import train_word_tokenizer

    config = tiny_config()
    run = Run.from_config(config, devices=jax.devices()[:8])
    spec = run.spec
    tokenizer = train_word_tokenizer(["what shape is this", "circle", "USER ASSISTANT"])
    record = dict(id="a", conversations=[{"from": "human", "value": "<image>\nwhat shape is this?"},
                                         {"from": "gpt", "value": "circle"}])
    image = np.zeros((spec.image_size, spec.image_size, 3), np.float32)
    sample = features.make_features(record, tokenizer, spec, image=image)
    sample.pop("truncated")  # removed by the pipeline's skip counter
    batch = aot.abstract_batch(run)
    assert {k: (v.shape[1:], np.dtype(v.dtype)) for k, v in batch.items()} == {
        k: (v.shape, v.dtype) for k, v in sample.items()}


def test_report_invariants(compiled):
    report = aot.memory_report(compiled)
    state, per_device, analysis = compiled.state, report["per_device"], report["memory_analysis"]

    # Parameters per device by hand: each parameter is split FSDP ways along its first dimension whose logical
    # name the rules map to 'fsdp' and which FSDP divides (the tensor axis has size 1), else replicated.
    abstract = nnx.state(nnx.eval_shape(lambda: Meteor(config_from_dict(tiny_config().model.to_dict()),
                                                       rngs=nnx.Rngs(0))), nnx.Param)
    expected, total = 0, 0
    for var in jax.tree.leaves(abstract, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        shape, names = var.get_value().shape, var.get_metadata()["logical_axes"]
        ways = FSDP if any(sharding.DEFAULT_RULES[n] == "fsdp" and d % FSDP == 0 for n, d in zip(names, shape)) else 1
        size = math.prod(shape) * 4  # float32
        assert size % ways == 0
        expected += size // ways
        total += size
    assert per_device["params"] == expected
    assert report["state_total"]["params"] == total
    assert total // FSDP <= expected < total  # sharded, though some small vectors are replicated

    # Adam: mu and nu per trained parameter (all of them here) plus a few replicated counters.
    assert report["trained_parameters"] == report["parameters"] == total // 4
    assert 2 * per_device["params"] <= per_device["opt_state"] <= 2 * per_device["params"] + 1024
    assert per_device["batch"] == aot.total_bytes(compiled.batch) // 8  # batch over data x fsdp

    # XLA's memory analysis: the arguments are the state and the batch, and the donated state is aliased.
    state_bytes = aot.bytes_per_device(state)
    assert analysis["argument"] == state_bytes + per_device["batch"]
    assert analysis["alias"] >= per_device["params"] + per_device["opt_state"]
    assert analysis["output"] >= analysis["alias"]
    assert analysis["temp"] > 0 and analysis["generated_code"] >= 0
    assert per_device["total"] == (analysis["argument"] + analysis["output"] - analysis["alias"] + analysis["temp"]
                                   + analysis["generated_code"])
    assert per_device["activations_and_temporaries"] == (per_device["total"] - state_bytes - per_device["batch"])
    assert per_device["activations_and_temporaries"] > 0

    # Fits: against the device memory given (none is known for CPU).
    assert report["hbm_per_device"] is None and report["fits"] is None
    assert aot.memory_report(compiled, hbm_bytes=per_device["total"])["fits"] is True
    assert aot.memory_report(compiled, hbm_bytes=per_device["total"] - 1)["fits"] is False
    text = aot.format_report(aot.memory_report(compiled, hbm_bytes=2 * aot.GiB))
    assert "parameters" in text and "optimizer state" in text and text.rstrip().endswith("fits                   yes")


def test_cli_needs_a_topology():
    from absl import app

    from meteor_jax import main

    main.FLAGS(["main", "--config=configs/tiny.py", "--compile_only"])
    try:
        with pytest.raises(app.UsageError, match="--topology"):
            main.main(["main"])
    finally:
        main.FLAGS.unparse_flags()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed (requirements-test.txt)")
def test_tpu_target_compiles():
    """With libtpu, a TPU topology compiles on this CPU-only machine; one v5e chip has 16 GiB."""
    config = tiny_config()
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    report = aot.memory_report(aot.compile_train_step(config, "v5e-8"))
    assert report["device_kind"] == "TPU v5 lite" and report["num_devices"] == 8
    assert report["hbm_per_device"] == 16 * aot.GiB and report["fits"] is True
    assert report["memory_analysis"]["argument"] > 0 and report["memory_analysis"]["generated_code"] > 0


def _has_cuda_plugin() -> bool:
    try:
        return importlib.util.find_spec("jax_plugins.xla_cuda13") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(not _has_cuda_plugin(), reason="the CUDA PJRT plugin (jax-cuda13-plugin) is not installed")
def test_gpu_devices_without_a_gpu():
    """The CUDA plugin describes 2 hosts of 8 H200s from the target config alone (compiling is left to the CLI:
    minutes of ptxas for even the tiny model)."""
    devices = aot.target_devices(aot.parse_topology("h200x16"))
    assert len(devices) == 16 and devices[0].device_kind == "NVIDIA H200"
    assert {d.process_index for d in devices} == {0, 1}
