"""Test setup: 8 forced CPU devices (so sharding is real) and float32 everywhere.

The environment must be set before JAX initialises its backends, hence at import time here.
"""
import os

# The suite is dominated by XLA compilation of tiny programs: less LLVM optimisation halves it (same programs).
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session", autouse=True)
def _eight_devices():
    assert jax.device_count() == 8, f"expected 8 forced CPU devices, got {jax.devices()}"


@pytest.fixture(scope="session")
def easy_vqa_data_dir(tmp_path_factory) -> str:
    """easy-vqa as tfds (the full build), once for the whole suite; tests only read it."""
    from meteor_jax.data import tfds as our_tfds

    path = tmp_path_factory.mktemp("easy_vqa_tfds")
    our_tfds.easy_vqa_builder(path)
    return str(path)
