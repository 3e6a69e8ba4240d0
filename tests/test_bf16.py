"""bf16 compute end to end (vision, fusion, selection, LLM): the matmuls run in bf16 while the float32 islands
(softmax, norm statistics, the SSM state, the loss) stay float32, and the numbers stay close to float32."""
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import tiny
from meteor_jax.models.meteor import Meteor, config_from_dict
from test_meteor import tiny_batch


def _models():
    model32 = Meteor(config_from_dict(tiny.get_config().model), rngs=nnx.Rngs(0))
    cfg16 = tiny.get_config().model
    for section in ("vision", "fusion", "llm"):
        cfg16[section].dtype = "bfloat16"
    graphdef16 = nnx.graphdef(nnx.eval_shape(lambda: Meteor(config_from_dict(cfg16), rngs=nnx.Rngs(0))))
    return model32, nnx.merge(graphdef16, nnx.state(model32))  # the same float32 parameters


def _primitive_dtypes(jaxpr, names) -> Counter:
    """(primitive, input dtypes) → count over the jaxpr and every sub-jaxpr (scans, jits, custom VJPs)."""
    counts = Counter()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            counts[(eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars))] += 1
        for value in eqn.params.values():
            for item in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(item, "jaxpr", None)
                if inner is not None:
                    counts.update(_primitive_dtypes(getattr(inner, "jaxpr", inner), names))
    return counts


def test_bf16_matmuls_with_float32_softmax_norms_and_state():
    model32, model16 = _models()
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model16, nnx.Param)))
    batch = tiny_batch(model32.cfg)
    counts = _primitive_dtypes(jax.make_jaxpr(lambda b: model16.loss(b))(batch).jaxpr,
                               {"dot_general", "exp", "reduce_max", "rsqrt", "log"})
    matmuls = {k: v for k, v in counts.items() if k[0] == "dot_general"}
    bf16 = sum(v for k, v in matmuls.items() if k[1] == ("bfloat16", "bfloat16"))
    # The float32 matmuls left are the [CLS] attention row (the selection's score) only.
    assert bf16 >= 0.9 * sum(matmuls.values()), matmuls
    islands = {k: v for k, v in counts.items() if k[0] != "dot_general"}
    assert islands and all(dtypes == ("float32",) for _, dtypes in islands), islands


def test_bf16_logits_loss_and_gradients_close_to_float32():
    model32, model16 = _models()
    batch = tiny_batch(model32.cfg)
    logits32, logits16 = np.asarray(model32(batch)), np.asarray(model16(batch))
    assert logits16.dtype == np.float32
    assert np.abs(logits16 - logits32).max() <= 0.05 * np.abs(logits32).max()

    def mean_loss(model):
        total, count = model.loss(batch)
        return total / count

    def grads(model):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return jax.value_and_grad(lambda p: mean_loss(nnx.merge(graphdef, p, rest)))(params)

    (loss32, g32), (loss16, g16) = grads(model32), grads(model16)
    assert abs(float(loss16) - float(loss32)) <= 0.01 * abs(float(loss32))
    for name in ("vision", "fusion", "llm"):
        a = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g32[name])])
        b = np.concatenate([np.ravel(x) for x in jax.tree.leaves(g16[name])])
        assert b.dtype == np.float32
        cosine = float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        assert cosine >= 0.99, (name, cosine)
