"""Shared pieces of the run configs (big_vision style: each config file holds a whole run).

`model_config(...)` returns the `config.model` section with every field of the model dataclasses written
out, so a config file shows the whole model and any field can be overridden on the command line
(`--config.model.selection.keep=64`). Unknown or ill-typed fields are rejected by
`meteor_jax.models.meteor.config_from_dict`, naming the field.
"""
from __future__ import annotations

import dataclasses

import ml_collections

from meteor_jax.models.fusion import FusionConfig
from meteor_jax.models.llm import LLMConfig
from meteor_jax.models.selection import SelectionConfig
from meteor_jax.models.vision import VisionConfig

CLIP_L14_336 = dict(image_size=336, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096)
VICUNA_7B = dict(vocab_size=32000, dim=4096, num_layers=32, num_heads=32, num_kv_heads=32, mlp_dim=11008,
                 rope_theta=10000.0, rms_norm_eps=1e-5, max_seq_len=4096, tie_embeddings=False)
VICUNA_13B = dict(VICUNA_7B, dim=5120, num_layers=40, num_heads=40, num_kv_heads=40, mlp_dim=13824)
SMOLLM2_135M = dict(vocab_size=49152, dim=576, num_layers=30, num_heads=9, num_kv_heads=3, mlp_dim=1536,
                    rope_theta=100000.0, rms_norm_eps=1e-5, max_seq_len=8192, tie_embeddings=True)


def _section(cls, overrides: dict, dtype: str | None) -> ml_collections.ConfigDict:
    values = {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
    if dtype is not None and "dtype" in values:
        values["dtype"] = dtype
    unknown = set(overrides) - set(values)
    if unknown:
        raise KeyError(f"{cls.__name__} has no field(s) {sorted(unknown)}")
    values.update(overrides)
    # Fields whose default is None must accept a value later: ml_collections types a None field as "any".
    return ml_collections.ConfigDict(values)


def model_config(*, vision: dict, fusion: dict, selection: dict, llm: dict, dtype: str = "float32",
                 projector: str = "meteor"):
    """`projector`: "meteor" or a baseline of meteor_jax/models/projectors.py ("mlp", "pool", "cls_prune",
    "random"); every baseline is the top-level module `fusion`, so `train.trainable=("fusion",)` trains it."""
    return ml_collections.ConfigDict(dict(
        vision=_section(VisionConfig, vision, dtype),
        fusion=_section(FusionConfig, fusion, dtype),
        selection=_section(SelectionConfig, selection, None),
        llm=_section(LLMConfig, llm, dtype),
        projector=projector,
    ))


def parse_arg(arg: str | None, variants: dict[str, dict], default: str) -> dict:
    """`file.py:name` variants; an unknown name is an error that lists the known ones."""
    name = arg or default
    if name not in variants:
        raise ValueError(f"unknown config variant {name!r}; choose one of {sorted(variants)}")
    return variants[name]


def base_config(model: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A whole run config: the given model section plus every run section at its default
    (meteor_jax.config.RUN_DEFAULTS); the calling config file then sets what differs."""
    from meteor_jax.config import run_defaults

    config = run_defaults()
    config.model = model
    return config
