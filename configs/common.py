"""Shared pieces of the run configs (big_vision style: each config file holds a whole run).

`model_config(...)` returns the `config.model` section with every field of the model dataclasses written
out, so a config file shows the whole model and any field can be overridden on the command line
(`--config.model.selection.keep=64`). Fields and types are checked by `meteor_jax.config.merge`, the same
check `meteor_jax.config.validate` applies to the whole run at start-up.
"""
from __future__ import annotations

import ml_collections

from meteor_jax import config as config_lib

CLIP_L14_336 = dict(image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096)
VICUNA_7B = dict(vocab_size=32000, dim=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008,
                 rope_theta=10000.0, rms_norm_eps=1e-5, max_seq_len=4096, tie_embeddings=False)
VICUNA_13B = dict(VICUNA_7B, dim=5120, num_layers=40, num_heads=40, num_kv_heads=40, mlp_dim=13824)
SMOLLM2_135M = dict(vocab_size=49152, dim=576, num_layers=30, num_heads=9, num_kv_heads=3, mlp_dim=1536,
                    rope_theta=100000.0, rms_norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True)


def model_config(*, vision: dict, fusion: dict, selection: dict, llm: dict, dtype: str = "float32",
                 projector: str = "meteor"):
    """`projector`: "meteor" or a baseline of meteor_jax/models/projectors.py ("mlp", "pool", "cls_prune",
    "random"); every baseline is the top-level module `fusion`, so `train.trainable=("fusion",)` trains it."""
    model = config_lib.model_defaults()
    for name, values in dict(vision=vision, fusion=fusion, selection=selection, llm=llm).items():
        if "dtype" in model[name]:
            values = {"dtype": dtype, **values}
        config_lib.merge(model[name], values, f"config.model.{name}")
    model.unlock()
    model.projector = projector
    return model


def parse_arg(arg: str | None, variants: dict[str, dict], default: str) -> dict:
    """`file.py:name` variants; an unknown name is an error that lists the known ones."""
    name = arg or default
    if name not in variants:
        raise ValueError(f"unknown config variant {name!r}; choose one of {sorted(variants)}")
    return variants[name]


def base_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A whole run config: the given model section plus every run section at its default
    (meteor_jax.config.RUN_DEFAULTS); the calling config file then sets what differs."""
    config = config_lib.defaults()
    config.model = model
    return config
