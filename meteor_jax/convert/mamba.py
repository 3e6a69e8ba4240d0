"""HF transformers `MambaMixer` ↔ our `MambaBlock`: the key table, its transforms and a small loader."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
from flax import nnx

from meteor_jax.convert.keymap import Rule, load_state, transpose
from meteor_jax.models.ssm import MambaBlock


def _conv_to_ours(w: np.ndarray) -> np.ndarray:
    """torch depthwise Conv1d weight (inner, 1, K) → our kernel (K, inner)."""
    return np.ascontiguousarray(w[:, 0, :].T)


def _conv_to_theirs(k: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(k.T[:, None, :])


def mamba_mixer_rules(
    prefix: str = "",
    *,
    ours_prefix: str = "",
    use_bias: bool = False,
    conv_bias: bool = True,
) -> list[Rule]:
    """Rules between `MambaMixer` state-dict keys (under `prefix`, e.g. "backbone.layers.{i}.mixer.") and a
    `MambaBlock` at `ours_prefix` (a dotted path ending in "." or empty). torch Linear weights are (out, in)."""
    o, t = ours_prefix, prefix
    rules = [
        Rule(f"{o}in_proj.kernel", f"{t}in_proj.weight", transpose, transpose),
        Rule(f"{o}conv1d.kernel", f"{t}conv1d.weight", _conv_to_ours, _conv_to_theirs),
        Rule(f"{o}ssm.x_proj.kernel", f"{t}x_proj.weight", transpose, transpose),
        Rule(f"{o}ssm.dt_proj.kernel", f"{t}dt_proj.weight", transpose, transpose),
        Rule(f"{o}ssm.dt_proj.bias", f"{t}dt_proj.bias"),
        Rule(f"{o}ssm.A_log", f"{t}A_log"),
        Rule(f"{o}ssm.D", f"{t}D"),
        Rule(f"{o}out_proj.kernel", f"{t}out_proj.weight", transpose, transpose),
    ]
    if conv_bias:
        rules.append(Rule(f"{o}conv1d.bias", f"{t}conv1d.bias"))
    if use_bias:
        rules += [Rule(f"{o}in_proj.bias", f"{t}in_proj.bias"), Rule(f"{o}out_proj.bias", f"{t}out_proj.bias")]
    return rules


def mamba_block_kwargs(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """`MambaBlock` keyword arguments from a HF `MambaConfig` dict (`config.to_dict()` or config.json)."""
    unsupported = {k: hf_config[k] for k in ("hidden_act",) if k in hf_config and hf_config[k] != "silu"}
    if unsupported:
        raise ValueError(f"MambaMixer setting not supported by MambaBlock: {unsupported}")
    return dict(
        d_model=int(hf_config["hidden_size"]),
        d_state=int(hf_config["state_size"]),
        d_conv=int(hf_config["conv_kernel"]),
        expand=int(hf_config["expand"]),
        dt_rank=hf_config.get("time_step_rank", "auto"),
        conv_bias=bool(hf_config.get("use_conv_bias", True)),
        use_bias=bool(hf_config.get("use_bias", False)),
    )


def load_mamba_block(
    read: Callable[[str], np.ndarray],
    *,
    prefix: str = "",
    **block_kwargs,
) -> MambaBlock:
    """A `MambaBlock` (built with `block_kwargs`) filled from `read(key)` of a `MambaMixer` state dict."""
    abstract = nnx.eval_shape(lambda: MambaBlock(rngs=nnx.Rngs(0), **block_kwargs))
    rules = mamba_mixer_rules(prefix, use_bias=block_kwargs.get("use_bias", False),
                              conv_bias=block_kwargs.get("conv_bias", True))
    state = load_state(nnx.state(abstract), rules, read)
    return nnx.merge(nnx.graphdef(abstract), state)
