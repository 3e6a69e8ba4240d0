"""The run configuration: every section with its defaults, and the one start-up validator.

A config file (ml_collections, big_vision style) holds a whole run; `configs/common.py` starts from these defaults
and the file overrides what it needs. `validate(config)` runs before anything else: the config is merged into a
locked copy of the defaults (`merge`), so an unknown section or field (a typo would otherwise be ignored silently)
or a value ml_collections cannot cast to the default's type is an error naming the field; then the cross-field
checks. The model section's defaults are the model dataclasses' own (`model_defaults`).
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from typing import Any, Mapping

import ml_collections

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
        image_placement="front",  # "front": "<image>\n" + question, as LLaVA; "after_text": question + "\n<image>"
        max_len=2048,
        instruction_len=64,
        worker_count=0,
        read_threads=16,  # grain reader threads when worker_count is 0
        prefetch=2,
        image_cache=0,  # decoded images kept per process (S×S×3 float32 + the encoded bytes as key); 0 = decode each time
        feature_cache=0,  # records whose features are kept per process (the first ones read); 0 = prepare each time
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


def model_defaults() -> ml_collections.ConfigDict:
    """`config.model` with every field of the model dataclasses at its default."""
    return ml_collections.ConfigDict({
        name: {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls)
        else getattr(MeteorConfig(), name)  # a plain field of the model (projector)
        for name, cls in typing.get_type_hints(MeteorConfig).items()})


def defaults() -> ml_collections.ConfigDict:
    """A whole run config at its defaults (the model section included)."""
    config = ml_collections.ConfigDict(RUN_DEFAULTS)
    config.model = model_defaults()
    return config


def merge(target: ml_collections.ConfigDict, values: Mapping, where: str = "config") -> ml_collections.ConfigDict:
    """Write `values` (nested mappings) into `target`, which is locked first: no field can be added, and each value
    must cast to its default's type (ml_collections' rules; a bool for a number is refused too). Errors name the
    dotted field. Returns `target`."""
    target.lock()
    for key, value in values.items():
        if key not in target:
            raise ValueError(f"{where}: unknown field(s) {[key]}; known: {sorted(target)}")
        default = target[key]
        if isinstance(default, ml_collections.ConfigDict):
            if not isinstance(value, Mapping):
                raise TypeError(f"{where}.{key} must be a section, got {value!r}")
            merge(default, value, f"{where}.{key}")
            continue
        if isinstance(value, bool) and isinstance(default, (int, float)) and not isinstance(default, bool):
            raise TypeError(f"{where}.{key}={value!r} has type bool, expected {type(default).__name__}")
        try:
            setattr(target, key, value)
        except TypeError as e:
            raise TypeError(f"{where}.{key}={value!r} has type {type(value).__name__}, expected "
                            f"{type(default).__name__}") from e
    return target


def with_keep(config: Mapping, keep: int) -> dict:
    """A copy of `config` (as plain dicts) keeping `keep` visual tokens. The prompt length grows or shrinks with the
    image slots, so the text keeps the room it had; RoPE positions are computed, not stored, so a longer maximum
    needs no new parameters."""
    raw = config.to_dict() if hasattr(config, "to_dict") else copy.deepcopy(dict(config))
    raw["data"]["max_len"] += keep - raw["model"]["selection"]["keep"]
    raw["model"]["selection"]["keep"] = keep
    raw["model"]["llm"]["max_seq_len"] = max(raw["model"]["llm"]["max_seq_len"], raw["data"]["max_len"])
    return raw


def _cross_field_checks(config: ml_collections.ConfigDict, model: MeteorConfig) -> None:
    train, data = config.train, config.data
    if train.batch_size < 1 or train.micro_batches < 1 or train.batch_size % train.micro_batches:
        raise ValueError(f"config.train.batch_size={train.batch_size} must be a positive multiple of "
                         f"micro_batches={train.micro_batches}")
    if train.lr <= 0:
        raise ValueError(f"config.train.lr={train.lr} must be > 0")
    if data.max_len <= model.selection.keep:
        raise ValueError(f"config.data.max_len={data.max_len} leaves no room for text after "
                         f"{model.selection.keep} image tokens")
    if data.max_len > model.llm.max_seq_len:
        raise ValueError(f"config.data.max_len={data.max_len} exceeds config.model.llm.max_seq_len="
                         f"{model.llm.max_seq_len}")
    if config.weights.llava and (config.weights.vision or config.weights.llm):
        raise ValueError("config.weights.llava holds the vision tower and the LLM: leave config.weights.vision "
                         "and config.weights.llm empty")
    for entry in data.balance:
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str)
                and isinstance(entry[1], (int, float)) and not isinstance(entry[1], bool) and entry[1] >= 0):
            raise ValueError(f"config.data.balance entry {entry!r} must be a (question type, weight >= 0) pair")


def validate(config: Mapping) -> tuple[ml_collections.ConfigDict, MeteorConfig]:
    """(the config with every field present, checked and locked; the model config). Raises ValueError (unknown
    field, bad value) or TypeError (wrong type), naming the field."""
    raw = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    if "model" not in raw:
        raise ValueError("config: missing the `model` section")
    checked = merge(defaults(), raw)
    try:
        model = config_from_dict(checked.model)
    except ValueError as e:  # the model dataclasses' own checks (e.g. keep > visual tokens)
        raise ValueError(f"config.model: {e}") from e
    _cross_field_checks(checked, model)
    return checked, model


def feature_spec(config: ml_collections.ConfigDict, model_cfg: MeteorConfig) -> FeatureSpec:
    """How this run turns records into model inputs (sequence lengths, image slots, image size, template)."""
    return FeatureSpec(max_len=config.data.max_len, instruction_len=config.data.instruction_len,
                       num_image_tokens=model_cfg.selection.keep, image_size=model_cfg.vision.image_size,
                       template=config.data.template, image_placement=config.data.image_placement)
