"""Optimizer of the LLaVA-1.5 recipe: AdamW, global-norm clipping, linear warm-up then cosine decay.

Which modules train is data, not code: a label per parameter ("trained"/"frozen") drives
`optax.multi_transform`, so stage 1 (fusion only) and stage 2 (fusion + LLM) differ by one config tuple.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import optax
from flax import nnx

TRAINED = "trained"
FROZEN = "frozen"


def make_schedule(total_steps: int, *, lr: float, warmup_ratio: float = 0.03, end_lr_ratio: float = 0.0) -> optax.Schedule:
    """Linear warm-up from 0 over ceil(warmup_ratio·total_steps) steps (HF Trainer's rounding), then cosine to
    end_lr_ratio·lr at total_steps. The update at optimizer count c uses schedule(c); count 0 has lr 0, as in HF."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
    warmup_steps = math.ceil(total_steps * warmup_ratio)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=lr * end_lr_ratio,
    )


def _dotted(path) -> str:
    """('llm', 'layers', 'attn', ...) key path → 'llm.layers.attn...' (the Variable's own `.value` key dropped)."""
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value":
            continue
        names.append(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))))
    return ".".join(names)


def trainable_labels(params_state: nnx.State, trainable: Sequence[str]):
    """A pytree like `params_state` with TRAINED where the parameter's dotted path starts with one of `trainable`
    (module names such as "fusion", "llm", or deeper prefixes like "llm.layers"), FROZEN elsewhere.

    Works on concrete or abstract (eval_shape) states. A name matching no parameter raises, listing the
    top-level modules.
    """
    if isinstance(trainable, str):
        trainable = (trainable,)
    paths = [_dotted(path) for path, _ in jax.tree_util.tree_flatten_with_path(params_state)[0]]
    top_level = sorted({p.split(".")[0] for p in paths})

    def matches(path: str, name: str) -> bool:
        return path == name or path.startswith(name + ".")

    unknown = [name for name in trainable if not any(matches(p, name) for p in paths)]
    if unknown:
        raise ValueError(f"trainable modules {unknown} match no parameter; valid top-level modules: {top_level}")

    def label(path, _):
        path = _dotted(path)
        return TRAINED if any(matches(path, name) for name in trainable) else FROZEN

    return jax.tree_util.tree_map_with_path(label, params_state)


def make_optimizer(
    labels,
    schedule: optax.ScalarOrSchedule,
    *,
    weight_decay: float = 0.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = 1.0,
) -> optax.GradientTransformation:
    """AdamW with global-norm clipping on the trained parameters; exact zero updates (and no state) for frozen ones.

    Clipping and weight decay see only the trained parameters, so frozen weights neither inflate the norm nor decay.
    """
    trained = [optax.clip_by_global_norm(clip_norm)] if clip_norm else []
    trained.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return optax.multi_transform({TRAINED: optax.chain(*trained), FROZEN: optax.set_to_zero()}, labels)
