"""HF LLaVA-1.5 (`LlavaForConditionalGeneration`, e.g. llava-hf/llava-1.5-7b-hf) → our vision tower, projector and
LLM: CLIP + `multi_modal_projector` (mlp2x_gelu) + LLaMA/Vicuna, one tensor at a time onto the mesh.

Two key layouts exist and both load:
  transformers >= 5   model.vision_tower.*, model.multi_modal_projector.*, model.language_model.*, lm_head.weight
  transformers 4      vision_tower.*,       multi_modal_projector.*,       language_model.model.*,
                      language_model.lm_head.weight   (the files on the Hugging Face hub)
The vision and LLM key tables are those of convert/clip.py and convert/llama.py under these prefixes; the
projector's linear_1/linear_2 become `fusion.align_fc1/align_fc2` of a baseline projector
(models/projectors.py). With `model.projector="meteor"` only the vision tower and the LLM are taken (a LLaVA
checkpoint as the source of CLIP and Vicuna) and Flash Global Fusion keeps its own initialisation.

LLaVA-1.5 reads the CLIP layer `vision_feature_layer` (-2) without its [CLS] token
(`vision_feature_select_strategy="default"`), which is what `VisionTower` returns for `select_layer=-2`.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

from flax import nnx

from meteor_jax.convert.clip import clip_vision_rules, detect_prefix, vision_config_from_hf
from meteor_jax.convert.keymap import Rule, SafetensorsReader, architecture_mismatches, load_state, transpose
from meteor_jax.convert.llama import llama_config_from_hf, llama_rules
from meteor_jax.models.fusion import FusionConfig
from meteor_jax.models.meteor import Meteor, MeteorConfig
from meteor_jax.models.selection import SelectionConfig

# LlavaConfig's vision tower when config.json has no vision_config (CLIP ViT-L/14-336); a missing text_config is
# LlamaConfig's defaults (Vicuna-7B's shape), as convert/llama.py assumes anyway.
_DEFAULT_VISION = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, patch_size=14,
                       image_size=336, num_hidden_layers=24, num_attention_heads=16)

def _read_config(path: str | os.PathLike) -> dict:
    with open(os.path.join(os.fspath(path), "config.json")) as f:
        return json.load(f)


def _check_llava(hf: Mapping[str, Any]) -> None:
    if hf.get("model_type", "llava") != "llava":
        raise ValueError(f"LLaVA config: model_type {hf.get('model_type')!r} is not 'llava' "
                         "(LlavaForConditionalGeneration)")
    layer = hf.get("vision_feature_layer", -2)
    if not isinstance(layer, int):
        raise ValueError(f"LLaVA config: vision_feature_layer={layer!r}: only one feature layer is supported")
    strategy = hf.get("vision_feature_select_strategy", "default")
    if strategy != "default":
        raise ValueError(f"LLaVA config: vision_feature_select_strategy={strategy!r} is not supported; the vision "
                         "tower returns the patch tokens without [CLS] ('default')")
    act = hf.get("projector_hidden_act", "gelu")
    if act != "gelu":
        raise ValueError(f"LLaVA config: projector_hidden_act={act!r} is not supported; the projector is "
                         "mlp2x_gelu with the exact (erf) GELU, 'gelu'")
    if not hf.get("multimodal_projector_bias", True):
        raise ValueError("LLaVA config: multimodal_projector_bias=False is not supported; the projector has biases")
    vision_type = (hf.get("vision_config") or _DEFAULT_VISION).get("model_type", "clip_vision_model")
    if vision_type not in ("clip_vision_model", "clip"):
        raise ValueError(f"LLaVA config: vision tower {vision_type!r} is not supported (CLIP only)")


def meteor_config_from_llava(hf_config: Mapping[str, Any] | str | os.PathLike, *, projector: str = "mlp",
                             keep: int | None = None, dtype: str = "float32") -> MeteorConfig:
    """The MeteorConfig of a LLaVA-1.5 checkpoint (a config.json dict or the directory holding it): its CLIP
    tower and LLM, `projector` (default "mlp", LLaVA-1.5 itself), K = `keep` (default all N patches)."""
    hf = dict(hf_config) if isinstance(hf_config, Mapping) else _read_config(hf_config)
    _check_llava(hf)
    vision = vision_config_from_hf(hf.get("vision_config") or _DEFAULT_VISION,
                                   select_layer=hf.get("vision_feature_layer", -2), dtype=dtype)
    text = dict(hf.get("text_config") or {})
    tie = bool(hf.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    llm = llama_config_from_hf(text, tie_embeddings=tie, dtype=dtype)
    selection = SelectionConfig(keep=vision.num_patches if keep is None else keep)
    return MeteorConfig(vision=vision, fusion=FusionConfig(dtype=dtype), selection=selection, llm=llm,
                        projector=projector)


def _layout(keys) -> tuple[str, str, str]:
    """(LLM prefix for LLaMA keys "model.*", LM head key, projector prefix) of a LLaVA safetensors key set."""
    keys = set(keys)
    if any(k.startswith("model.language_model.") for k in keys):  # transformers >= 5
        return "model.language_model.", "lm_head.weight", "model.multi_modal_projector."
    if any(k.startswith("language_model.model.") for k in keys):  # transformers 4 (the hub's files)
        return "language_model.model.", "language_model.lm_head.weight", "multi_modal_projector."
    raise ValueError("not a LlavaForConditionalGeneration checkpoint: no 'model.language_model.*' or "
                     "'language_model.model.*' keys")


def llava_rules(model_cfg: MeteorConfig, keys) -> dict[str, list[Rule]]:
    """{our module name: key table} for a LLaVA checkpoint with these safetensors `keys`."""
    llm_prefix, head_key, projector_prefix = _layout(keys)

    def llm_key(theirs: str) -> str:
        return head_key if theirs == "lm_head.weight" else llm_prefix + theirs.removeprefix("model.")

    tables = {
        "vision": clip_vision_rules(model_cfg.vision, detect_prefix(keys)),
        "llm": [dataclasses.replace(r, theirs=llm_key(r.theirs)) for r in llama_rules(model_cfg.llm)],
    }
    if model_cfg.projector != "meteor":
        p = projector_prefix
        tables["fusion"] = [
            Rule("align_fc1.kernel", p + "linear_1.weight", transpose, transpose),
            Rule("align_fc1.bias", p + "linear_1.bias"),
            Rule("align_fc2.kernel", p + "linear_2.weight", transpose, transpose),
            Rule("align_fc2.bias", p + "linear_2.bias"),
        ]
    return tables


def load_llava(path: str | os.PathLike, model_cfg: MeteorConfig, *, mesh=None, rules=None) -> dict[str, nnx.State]:
    """{module name: nnx param State} of a LLaVA-1.5 directory (config.json + safetensors) for a model of
    `model_cfg`: "vision", "llm" and, for a baseline projector, "fusion" (the LLaVA MLP projector).

    The checkpoint must have the architecture `model_cfg` describes (runtime fields such as dtype, scan_layers,
    remat, max_seq_len come from `model_cfg`): a mismatch raises, naming every differing field. With a mesh each
    tensor goes straight onto its sharding from `rules` (default `sharding.DEFAULT_RULES`)."""
    path = os.fspath(path)
    theirs = meteor_config_from_llava(_read_config(path), projector=model_cfg.projector,
                                      keep=model_cfg.selection.keep)
    diffs = (architecture_mismatches("vision.", theirs.vision, model_cfg.vision)
             + architecture_mismatches("llm.", theirs.llm, model_cfg.llm))
    if model_cfg.projector != "meteor" and theirs.vision.select_layer != model_cfg.vision.select_layer:
        diffs.append(f"vision.select_layer: the projector was trained on layer {theirs.vision.select_layer} "
                     f"(vision_feature_layer), config {model_cfg.vision.select_layer}")
    if diffs:
        raise ValueError(f"LLaVA checkpoint {path} does not match config.model: " + "; ".join(diffs))
    reader = SafetensorsReader(path)
    abstract = nnx.eval_shape(lambda: Meteor(model_cfg, rngs=nnx.Rngs(0)))
    loaded = {}
    for name, table in llava_rules(model_cfg, reader.keys()).items():
        abstract_state = nnx.state(getattr(abstract, name), nnx.Param)
        shardings = None
        if mesh is not None:
            from meteor_jax.sharding import state_shardings

            shardings = state_shardings(abstract_state, mesh, rules)
        loaded[name] = load_state(abstract_state, table, reader, shardings)
    return loaded
