"""What the LLM keeps for its backward pass, and how it is laid out over devices.

Two regressions that made the 7B train step's temporaries per device far larger than one layer input per layer:
remat that stops working on the scanned layers, and activations that XLA replicates over the whole global batch
(an fsdp-sharded weight meeting a batch-sharded activation in a matmul, resolved by gathering the batch).
"""
import contextlib
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
from flax import nnx

from meteor_jax import sharding
from meteor_jax.models.llm import LLM, LLMConfig
from meteor_jax.models.cross_entropy import next_token_loss


def _cfg(**kw):
    return LLMConfig(**dict(dict(vocab_size=128, dim=64, num_layers=3, num_heads=4, num_kv_heads=2, mlp_dim=96,
                                 max_seq_len=64), **kw))


def _scan_residuals(cfg, b=2, t=16):
    """Shapes of the per-layer residuals the backward pass takes from the layer scan: outputs of the scan stacked
    over the layers (print_saved_residuals' lines; the scan's final carry, an input of the final norm, is not)."""
    gd, params = nnx.split(LLM(cfg, rngs=nnx.Rngs(0)))
    x = jnp.zeros((b, t, cfg.dim), jnp.float32)
    labels = jnp.zeros((b, t), jnp.int32)

    def loss(params, x):
        logits, _ = nnx.merge(gd, params)(x)
        return next_token_loss(logits, labels)[0]

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        jax.ad_checkpoint.print_saved_residuals(loss, params, x)
    shapes = []
    for line in out.getvalue().splitlines():
        if "output of scan" in line:
            shapes.append(tuple(int(d) for d in re.match(r"\w+\[([\d,]*)\]", line).group(1).split(",")))
    return [s for s in shapes if len(s) == 4 and s[0] == cfg.num_layers]


def test_full_remat_saves_only_each_layers_input():
    cfg = _cfg(remat="full")
    assert _scan_residuals(cfg) == [(cfg.num_layers, 2, 16, cfg.dim)]
    # Without remat the scan hands over many per-layer activations (the check above can tell the difference).
    assert len(_scan_residuals(_cfg(remat="none"))) > 3


def _compiled_temp_bytes(num_devices, per_device_batch=1, t=128):
    cfg = _cfg(vocab_size=512, num_layers=2, num_kv_heads=4, mlp_dim=128, max_seq_len=t, remat="full")
    gd, params = nnx.split(nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0))))
    mesh = sharding.make_mesh(1, num_devices, 1, devices=jax.devices()[:num_devices])
    shardings = sharding.state_shardings(params, mesh)
    params = jax.tree.map(lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, shardings)
    tokens = jax.ShapeDtypeStruct((num_devices * per_device_batch, t), jnp.int32,
                                  sharding=sharding.batch_sharding(mesh, 2))

    def loss(params, tokens):
        model = nnx.merge(gd, params)
        logits, _ = model(model.embed_tokens(tokens))
        return next_token_loss(logits, tokens)[0]

    compiled = jax.jit(jax.grad(loss)).lower(params, tokens).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_fsdp_temporaries_do_not_grow_with_device_count():
    # Same rows per device, 4x the devices (and the global batch): with the activations kept batch-sharded the
    # temporaries per device stay put (they grew ~3.6x when XLA gathered the global batch onto every device).
    assert _compiled_temp_bytes(8) <= 1.1 * _compiled_temp_bytes(2)


def test_activation_constraints_follow_the_rules_table():
    """Activations are pinned through the same logical rules as the weights: the config's 'batch' rule decides."""
    cfg = _cfg()
    gd, params = nnx.split(LLM(cfg, rngs=nnx.Rngs(0)))
    mesh = sharding.make_mesh(2, 4, 1, devices=jax.devices()[:8])
    params = jax.device_put(params, sharding.state_shardings(params, mesh))
    tokens = jnp.zeros((8, 16), jnp.int32)

    def logits_spec(rules):
        def forward(params, tokens):
            with sharding.logical_rules(rules):
                model = nnx.merge(gd, params)
                return model(model.embed_tokens(tokens))[0]

        return jax.jit(forward)(params, tokens).sharding.spec

    assert logits_spec(sharding.DEFAULT_RULES)[0] == ("data", "fsdp")
    assert logits_spec(sharding.rules_with([("batch", "data")]))[0] == "data"
    assert logits_spec(sharding.rules_with([("batch", "fsdp")]))[0] == "fsdp"
