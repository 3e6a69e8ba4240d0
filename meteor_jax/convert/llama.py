"""HF LLaMA (`LlamaForCausalLM`, also Mistral-style and Vicuna/SmolLM2 checkpoints) ↔ `LLM`.

HF stores nn.Linear weights as (out, in); ours are (in, out), hence the transposes. HF's q/k rows are already
in the rotate-half RoPE layout that `LLM` uses, so no permutation is needed.
"""
from __future__ import annotations

import dataclasses
import json
import os

from flax import nnx

from meteor_jax.convert.keymap import Rule, SafetensorsReader, export_state, load_state, transpose, write_safetensors
from meteor_jax.models.llm import LLM, LLMConfig

_MODEL_TYPES = ("llama", "mistral")

# LlamaConfig defaults, for config.json files that omit them.
_HF_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}


def _rope_settings(hf: dict) -> tuple[float, tuple[float, float, float, int] | None]:
    """(rope_theta, rope_scaling) from either transformers-5 `rope_parameters` or the older top-level keys."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError("LLaMA config: per-layer-type rope_parameters are not supported")
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        try:
            scaling = (
                float(params["factor"]),
                float(params["low_freq_factor"]),
                float(params["high_freq_factor"]),
                int(params.get("original_max_position_embeddings") or hf["max_position_embeddings"]),
            )
        except KeyError as e:
            raise ValueError(f"LLaMA config: llama3 rope scaling is missing {e.args[0]!r}") from None
        return theta, scaling
    raise ValueError(
        f"LLaMA config: rope scaling type {rope_type!r} is not supported (supported: none/'default', 'llama3')"
    )


def llama_config_from_hf(hf_config: dict, **overrides) -> LLMConfig:
    """LLMConfig from a HF LlamaConfig/MistralConfig dict; `overrides` replace LLMConfig fields (e.g. dtype)."""
    model_type = hf_config.get("model_type", "llama")
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"LLaMA config: model_type {model_type!r} is not LLaMA-compatible (supported: {_MODEL_TYPES})")
    hf = {**_HF_DEFAULTS, **{k: v for k, v in hf_config.items() if v is not None}}
    if hf["hidden_act"] != "silu":
        raise ValueError(f"LLaMA config: hidden_act={hf['hidden_act']!r} is not supported; the MLP is SwiGLU (silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf[flag]:
            raise ValueError(f"LLaMA config: {flag}=True is not supported; the projections have no bias")
    theta, scaling = _rope_settings(hf)
    max_seq_len = int(hf["max_position_embeddings"])
    # Mistral's sliding window equals full attention for sequences no longer than the window: cap the length.
    if hf.get("sliding_window") is not None and hf.get("use_sliding_window", True):
        max_seq_len = min(max_seq_len, int(hf["sliding_window"]))
    num_heads = int(hf["num_attention_heads"])
    head_dim = hf.get("head_dim")
    fields = dict(
        vocab_size=int(hf["vocab_size"]),
        dim=int(hf["hidden_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        # Keep head_dim None when it is the derived value, so the config reads like a default one.
        head_dim=None if head_dim is None or int(head_dim) == int(hf["hidden_size"]) // num_heads else int(head_dim),
        mlp_dim=int(hf["intermediate_size"]),
        rope_theta=theta,
        rms_norm_eps=float(hf["rms_norm_eps"]),
        tie_embeddings=bool(hf["tie_word_embeddings"]),
        max_seq_len=max_seq_len,
        rope_scaling=scaling,
    )
    known = {f.name for f in dataclasses.fields(LLMConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown LLMConfig override(s): {sorted(unknown)}")
    return LLMConfig(**{**fields, **overrides})


def llm_config_to_hf(cfg: LLMConfig) -> dict:
    """A LlamaConfig dict (config.json) for `cfg`, loadable by `transformers.LlamaForCausalLM`."""
    rope_parameters = {"rope_type": "default", "rope_theta": float(cfg.rope_theta)}
    if cfg.rope_scaling is not None:
        factor, low, high, original = cfg.rope_scaling
        rope_parameters.update(rope_type="llama3", factor=float(factor), low_freq_factor=float(low),
                               high_freq_factor=float(high), original_max_position_embeddings=int(original))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": float(cfg.rope_theta),  # read by transformers < 5
        "rope_parameters": rope_parameters,  # read by transformers >= 5
        "rope_scaling": None if cfg.rope_scaling is None else dict(rope_parameters),
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "torch_dtype": "float32",
        "dtype": "float32",
    }


def llama_rules(cfg: LLMConfig) -> list[Rule]:
    """Key table between `LLM` parameters and HF `LlamaForCausalLM` keys."""
    layer = "model.layers.{i}."
    linear = lambda ours, theirs: Rule(ours, theirs, transpose, transpose)  # noqa: E731
    rules = [
        Rule("embed.embedding", "model.embed_tokens.weight"),
        Rule("layers.attn_norm.weight", layer + "input_layernorm.weight"),
        linear("layers.attn.q_proj.kernel", layer + "self_attn.q_proj.weight"),
        linear("layers.attn.k_proj.kernel", layer + "self_attn.k_proj.weight"),
        linear("layers.attn.v_proj.kernel", layer + "self_attn.v_proj.weight"),
        linear("layers.attn.o_proj.kernel", layer + "self_attn.o_proj.weight"),
        Rule("layers.mlp_norm.weight", layer + "post_attention_layernorm.weight"),
        linear("layers.mlp.gate_proj.kernel", layer + "mlp.gate_proj.weight"),
        linear("layers.mlp.up_proj.kernel", layer + "mlp.up_proj.weight"),
        linear("layers.mlp.down_proj.kernel", layer + "mlp.down_proj.weight"),
        Rule("norm.weight", "model.norm.weight"),
    ]
    if not cfg.tie_embeddings:
        rules.append(linear("lm_head.kernel", "lm_head.weight"))
    return rules


def abstract_llm(cfg: LLMConfig) -> LLM:
    """The model with shapes only (no memory), for shardings and loading."""
    return nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0)))


def load_llama(path: str | os.PathLike, *, mesh=None, rules=None, **overrides) -> LLM:
    """Load a HF LLaMA directory (config.json + safetensors) into `LLM`.

    With a mesh, every tensor goes straight onto its sharding from `rules` (logical → mesh axes; default
    `sharding.DEFAULT_RULES`), never materialising the full model on one device. `overrides` set LLMConfig fields.
    """
    path = os.fspath(path)
    with open(os.path.join(path, "config.json")) as f:
        cfg = llama_config_from_hf(json.load(f), **overrides)
    graphdef, abstract_state = nnx.split(abstract_llm(cfg))
    shardings = None
    if mesh is not None:
        from meteor_jax.sharding import state_shardings

        shardings = state_shardings(abstract_state, mesh, rules)
    state = load_state(abstract_state, llama_rules(cfg), SafetensorsReader(path), shardings)
    return nnx.merge(graphdef, state)


def save_llama(llm: LLM, path: str | os.PathLike, *, max_shard_bytes: int = 4 << 30) -> None:
    """Write `llm` as a HF LlamaForCausalLM directory (config.json + float32 safetensors)."""
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(llm_config_to_hf(llm.cfg), f, indent=2)
    write_safetensors(path, export_state(nnx.state(llm, nnx.Param), llama_rules(llm.cfg)),
                      max_shard_bytes=max_shard_bytes)
