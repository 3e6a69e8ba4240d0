"""The run configuration: every section but `model` with its defaults, and start-up validation.

A config file (ml_collections, big_vision style) holds a whole run; `configs/common.py` starts from
`run_defaults()` and the file overrides what it needs. `validate(config)` runs before anything else and
names the bad field: an unknown section or field (a typo would otherwise be ignored silently), a value of
the wrong type, or a value out of range.
"""
from __future__ import annotations

from typing import Any, Mapping

import ml_collections

from meteor_jax import sharding
from meteor_jax.data.features import FeatureSpec
from meteor_jax.models.meteor import MeteorConfig, config_from_dict

RUN_DEFAULTS: dict[str, Any] = dict(
    seed=0,
    # "word:easy_vqa" (a word-level tokenizer trained on the easy-vqa text), "gguf:smollm2", "gguf:/x.gguf",
    # a tokenizer.json file or a Hugging Face directory.
    tokenizer="",
    # Pretrained weights: local Hugging Face directories (config.json + safetensors) or "gguf:smollm2"/"gguf:PATH"
    # for the LLM. Empty: random initialisation. `llava`: a LlavaForConditionalGeneration directory (llava-hf
    # LLaVA-1.5) giving the vision tower, the LLM and, for a baseline model.projector, its MLP projector (then
    # leave vision and llm empty).
    weights=dict(vision="", llm="", llava=""),
    # Take these modules' weights from another run's checkpoint (stage 2 starts from stage 1's fusion).
    init=dict(checkpoint="", modules=("fusion",)),
    data=dict(
        train="easy_vqa:train",  # easy_vqa:SPLIT | llava_json:FILE.json | llava_pretrain:SPLIT | llava_instruct:SPLIT
        eval="easy_vqa:test",  # same forms; "" for none
        data_dir="",  # tfds data dir; "" = WORKDIR/tfds
        manual_dir="",  # LLaVA json + images for the llava_* tfds builders
        image_folder="",  # images of a llava_json file
        template="vicuna_v1",
        max_len=2048,
        instruction_len=64,
        worker_count=0,
        read_threads=16,  # grain reader threads when worker_count is 0
        prefetch=2,
        image_cache=0,  # decoded images kept per process (S×S×3 uint8 + the encoded bytes as key); 0 = decode each time
        max_skip_fraction=0.05,  # more skipped samples than this (after 200) stops the run: a broken data setup
        # Question-type proportions of the training stream, ((type, weight), ...) with the types of
        # meteor_jax/data/balance.py ("yes/no", "colour", "shape", "other"); () = the source's own mix.
        balance=(),
    ),
    mesh=dict(data=-1, fsdp=1, tensor=1),
    sharding_rules=(),  # ((logical_name, mesh_axes), ...) overriding meteor_jax.sharding.DEFAULT_RULES
    train=dict(
        trainable=("fusion",),  # top-level modules trained: stage 1 ("fusion",), stage 2 ("fusion", "llm")
        batch_size=256,  # global batch
        micro_batches=1,  # gradient accumulation: batch_size / micro_batches samples per forward
        num_epochs=1.0,
        num_steps=0,  # > 0 overrides num_epochs
        lr=1e-3,
        warmup_ratio=0.03,
        weight_decay=0.0,
        clip_norm=1.0,
        log_every=50,
        checkpoint_every=1000,
        keep_checkpoints=3,
    ),
    eval=dict(batch_size=256, max_new_tokens=16, num_examples=-1),
)


def run_defaults() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(RUN_DEFAULTS)


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def _check(section: Mapping, defaults: Mapping, where: str) -> None:
    unknown = sorted(set(section) - set(defaults))
    if unknown:
        raise ValueError(f"config{where}: unknown field(s) {unknown}; known: {sorted(defaults)}")
    for key, value in section.items():
        default = defaults[key]
        if isinstance(default, Mapping):
            if not isinstance(value, Mapping):
                raise TypeError(f"config{where}.{key} must be a section, got {value!r}")
            _check(value, default, f"{where}.{key}")
        elif not _same_kind(value, default):
            raise TypeError(f"config{where}.{key}={value!r} has type {type(value).__name__}, "
                            f"expected {type(default).__name__}")


def validate(config: ml_collections.ConfigDict) -> MeteorConfig:
    """Check a run config; returns the model config. Raises ValueError/TypeError/KeyError naming the field."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if "model" not in raw:
        raise ValueError("config: missing the `model` section")
    model = config_from_dict(raw.pop("model"))
    _check(raw, RUN_DEFAULTS, "")
    train, data = raw.get("train", {}), raw.get("data", {})
    batch = train.get("batch_size", RUN_DEFAULTS["train"]["batch_size"])
    micro = train.get("micro_batches", 1)
    if batch < 1 or micro < 1 or batch % micro:
        raise ValueError(f"config.train.batch_size={batch} must be a positive multiple of micro_batches={micro}")
    if train.get("lr", 1.0) <= 0:
        raise ValueError(f"config.train.lr={train['lr']} must be > 0")
    max_len = data.get("max_len", RUN_DEFAULTS["data"]["max_len"])
    if max_len <= model.selection.keep:
        raise ValueError(f"config.data.max_len={max_len} leaves no room for text after "
                         f"{model.selection.keep} image tokens")
    for entry in data.get("balance", ()):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool) and entry[1] >= 0):
            raise ValueError(f"config.data.balance entry {entry!r} must be a (question type, weight >= 0) pair")
    if max_len > model.llm.max_seq_len:
        raise ValueError(f"config.data.max_len={max_len} exceeds config.model.llm.max_seq_len={model.llm.max_seq_len}")
    return model


def feature_spec(config: ml_collections.ConfigDict, model_cfg: MeteorConfig) -> FeatureSpec:
    """How this run turns records into model inputs (sequence lengths, image slots, image size, template)."""
    return FeatureSpec(max_len=config.data.max_len, instruction_len=config.data.instruction_len,
                       num_image_tokens=model_cfg.selection.keep, image_size=model_cfg.vision.image_size,
                       template=config.data.template)


def sharding_rules(config: ml_collections.ConfigDict) -> dict:
    return sharding.rules_with(config.sharding_rules)
