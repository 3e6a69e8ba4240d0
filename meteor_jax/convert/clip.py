"""HF CLIP vision weights ↔ `VisionTower`: config translation and the key table.

Checkpoints come in two key layouts: CLIPModel (and transformers-4 CLIPVisionModel) files prefix every vision
key with "vision_model.", transformers-5 CLIPVisionModel files have no prefix; LLaVA checkpoints nest either
under further prefixes. The loader finds the prefix from the patch-embedding key. Keys of layers after the
selected one and post_layernorm have no counterpart here by design (the tower stops at `select_layer`).
"""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from flax import nnx

from meteor_jax.convert.keymap import Rule, SafetensorsReader, load_state, transpose
from meteor_jax.models.vision import VisionConfig, VisionTower
from meteor_jax.sharding import state_shardings

# CLIPVisionConfig defaults, for config.json files written with only the non-default values.
_HF_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 32,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

_PATCH_KEY = "embeddings.patch_embedding.weight"


def vision_config_from_hf(hf_config: dict, **overrides) -> VisionConfig:
    """VisionConfig from a CLIPVisionConfig dict, or a CLIPConfig/LLaVA dict holding one under "vision_config"."""
    vision = hf_config.get("vision_config", hf_config)
    hf = {**_HF_DEFAULTS, **{k: v for k, v in vision.items() if v is not None}}
    if hf["hidden_act"] != "quick_gelu":
        raise ValueError(
            f"CLIP vision config: hidden_act={hf['hidden_act']!r} is not supported; the tower implements quick_gelu"
        )
    fields = dict(
        image_size=hf["image_size"],
        patch_size=hf["patch_size"],
        width=hf["hidden_size"],
        depth=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        mlp_dim=hf["intermediate_size"],
        num_channels=hf["num_channels"],
        layer_norm_eps=hf["layer_norm_eps"],
    )
    unknown = set(overrides) - {f.name for f in dataclasses.fields(VisionConfig)}
    if unknown:
        raise ValueError(f"unknown VisionConfig override(s): {sorted(unknown)}")
    return VisionConfig(**{**fields, **overrides})


def _conv_to_ours(w: np.ndarray) -> np.ndarray:  # torch OIHW → HWIO
    return np.ascontiguousarray(w.transpose(2, 3, 1, 0))


def _conv_to_theirs(w: np.ndarray) -> np.ndarray:  # HWIO → torch OIHW
    return np.ascontiguousarray(w.transpose(3, 2, 0, 1))


def clip_vision_rules(cfg: VisionConfig, prefix: str = "vision_model.") -> list[Rule]:
    """Key table for the `cfg.num_layers_used` built layers (stacked keys cover exactly those layers)."""
    del cfg  # the table is the same for every size; the abstract state decides how many layers are read
    p = prefix
    layer = p + "encoder.layers.{i}."
    rules = [
        Rule("patch_embed.kernel", p + _PATCH_KEY, _conv_to_ours, _conv_to_theirs),
        Rule("class_embedding", p + "embeddings.class_embedding"),
        Rule("position_embedding", p + "embeddings.position_embedding.weight"),
        Rule("pre_norm.weight", p + "pre_layrnorm.weight"),
        Rule("pre_norm.bias", p + "pre_layrnorm.bias"),
    ]
    for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
        rules += [Rule(f"layers.{ours}.weight", layer + f"{theirs}.weight"),
                  Rule(f"layers.{ours}.bias", layer + f"{theirs}.bias")]
    linears = [(f"attn.{n}", f"self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "out_proj")]
    linears += [("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")]
    for ours, theirs in linears:
        # torch Linear weight is (out, in); ours is (in, out)
        rules += [Rule(f"layers.{ours}.kernel", layer + f"{theirs}.weight", transpose, transpose),
                  Rule(f"layers.{ours}.bias", layer + f"{theirs}.bias")]
    return rules


def detect_prefix(keys) -> str:
    """The prefix in front of the vision keys, found from the (unique) patch-embedding key."""
    candidates = [k[: -len(_PATCH_KEY)] for k in keys if k.endswith(_PATCH_KEY)]
    if len(candidates) != 1:
        raise ValueError(
            f"cannot find the CLIP vision keys: expected exactly one key ending in {_PATCH_KEY!r}, "
            f"found {candidates or 'none'}; pass prefix= explicitly"
        )
    return candidates[0]


def load_clip_vision(
    path: str | os.PathLike,
    *,
    mesh=None,
    rules=None,
    prefix: str | None = None,
    **overrides,
) -> VisionTower:
    """A `VisionTower` from a HF directory (config.json + safetensors).

    `mesh`/`rules` (sharding rules, default `sharding.DEFAULT_RULES`): each tensor is put straight onto its
    sharding. `prefix`: the vision key prefix, detected when None. `overrides`: VisionConfig fields
    (select_layer, trainable, scan_layers, dtype, ...).
    """
    path = os.fspath(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = vision_config_from_hf(json.load(f), **overrides)
    reader = SafetensorsReader(path)
    if prefix is None:
        prefix = detect_prefix(reader.keys())
    abstract = nnx.eval_shape(lambda: VisionTower(cfg, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = None
    if mesh is not None:
        shardings = state_shardings(abstract_state, mesh, rules)
    state = load_state(abstract_state, clip_vision_rules(cfg, prefix), reader, shardings)
    return nnx.merge(graphdef, state)
