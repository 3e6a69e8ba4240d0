"""The composed model: splicing, loss, sharded forward, generation, and eval_shape sizes of the real configs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common
from configs import meteor_7b, meteor_13b, smollm2, tiny
from meteor_jax import config as config_lib
from meteor_jax import sharding
from meteor_jax.models.layers import count_params
from meteor_jax.models.cross_entropy import IGNORE_INDEX, next_token_loss
from meteor_jax.models.meteor import Meteor, config_from_dict, generate, sample_token, splice_image_tokens

T, M = 12, 5


def tiny_model(seed=0, **selection):
    cfg = tiny.get_config()
    cfg.model.selection.update(selection)
    return Meteor(config_from_dict(cfg.model), rngs=nnx.Rngs(seed))


def tiny_batch(cfg, batch=4, seed=0, left_pad=False, T=T):
    """Sample b: [bos, K image slots, question tokens..., padding]; K = cfg.selection.keep slots."""
    rng = np.random.default_rng(seed)
    k = cfg.selection.keep
    tokens = rng.integers(3, cfg.llm.vocab_size, size=(batch, T)).astype(np.int32)
    lengths = np.array([T, T - 3, T - 1, T - 5][:batch])
    mask = np.arange(T)[None, :] < lengths[:, None]
    image_mask = np.zeros((batch, T), bool)
    image_mask[:, 1:1 + k] = True
    if left_pad:  # shift every row right so that padding comes first
        for b in range(batch):
            shift = T - lengths[b]
            tokens[b], mask[b], image_mask[b] = (np.roll(a[b], shift) for a in (tokens, mask, image_mask))
    labels = np.where(mask & ~image_mask, tokens, IGNORE_INDEX)
    labels[:, :1 + k] = IGNORE_INDEX
    instruction = rng.integers(3, cfg.llm.vocab_size, size=(batch, M)).astype(np.int32)
    instruction_mask = np.arange(M)[None, :] < np.array([M, 2, 3, 4][:batch])[:, None]
    size = cfg.vision.image_size
    pixels = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    return {k_: jnp.asarray(v) for k_, v in dict(
        pixels=pixels, tokens=tokens, mask=mask, image_mask=image_mask, labels=labels,
        instruction=instruction, instruction_mask=instruction_mask).items()}


def test_splice_hand_case():
    emb = jnp.zeros((1, 6, 2))
    image = jnp.array([[[1.0, 1.0], [2.0, 2.0]]])
    image_mask = jnp.array([[False, True, True, False, False, False]])
    out = splice_image_tokens(emb, image, image_mask)
    np.testing.assert_array_equal(np.asarray(out[0, :, 0]), [0, 1, 2, 0, 0, 0])


def test_image_slots_receive_selected_tokens_in_order():
    model = tiny_model()
    batch = tiny_batch(model.cfg)

    @nnx.jit
    def run(model, batch):
        selected = model.visual_tokens(batch["pixels"], batch["instruction"], batch["instruction_mask"])
        return selected, model.embed_inputs(batch), model.llm.embed_tokens(batch["tokens"])

    selected, emb, text_emb = run(model, batch)
    k = model.cfg.selection.keep
    np.testing.assert_array_equal(np.asarray(emb[:, 1:1 + k]), np.asarray(selected.tokens))
    np.testing.assert_array_equal(np.asarray(emb[:, 1 + k:]), np.asarray(text_emb[:, 1 + k:]))
    assert np.all(np.diff(np.asarray(selected.indices), axis=1) > 0)


@pytest.mark.parametrize("baseline", ["batch", "greedy"])
def test_reinforce_training_loss_adds_the_score_function_term_only(baseline):
    """estimator="reinforce": in training the K tokens are a draw, the value is the plain NLL of that draw, and the
    gradient is the NLL's plus sum_b (NLL_b - baseline_b) grad log p(draw_b), baseline_b the mean NLL (batch) or
    sample b's NLL with the top K (greedy; each computed row by row here); evaluation keeps the top K."""
    model = tiny_model(estimator="reinforce", baseline=baseline)
    batch = tiny_batch(model.cfg)
    graphdef, params = nnx.split(model, nnx.Param)

    def sampled(p):
        return nnx.merge(graphdef, p).visual_tokens(batch["pixels"], batch["instruction"], batch["instruction_mask"],
                                                    sample=True)

    def nll_of(p, selected):
        return next_token_loss(nnx.merge(graphdef, p)(batch, selected), batch["labels"])[0]

    draw = sampled(params)
    top = nnx.merge(graphdef, params).visual_tokens(batch["pixels"], batch["instruction"], batch["instruction_mask"])
    assert draw.log_prob is not None and top.log_prob is None
    assert not np.array_equal(np.asarray(draw.indices), np.asarray(top.indices))  # a draw, not the top K

    def row_nll(selected):
        return np.array([float(next_token_loss(nnx.merge(graphdef, params)(batch, selected)[b:b + 1],
                                               batch["labels"][b:b + 1])[0]) for b in range(4)])

    per_sample = row_nll(draw)
    advantage = jnp.asarray(per_sample - (per_sample.mean() if baseline == "batch" else row_nll(top)), jnp.float32)
    assert np.all(np.abs(np.asarray(advantage)) > 1e-4)  # no sample's draw is its top K here

    def train_loss(p):
        return nnx.merge(graphdef, p).loss(batch, train=True)[0]

    def expected(p):
        selected = sampled(p)
        return nll_of(p, selected) + jnp.sum(advantage * selected.log_prob)

    np.testing.assert_allclose(float(train_loss(params)), float(nll_of(params, draw)), rtol=1e-6)
    np.testing.assert_allclose(float(nnx.merge(graphdef, params).loss(batch)[0]),
                               float(next_token_loss(nnx.merge(graphdef, params)(batch), batch["labels"])[0]),
                               rtol=1e-6)
    got, want = jax.grad(train_loss)(params), jax.grad(expected)(params)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)
    term = jax.grad(lambda p: jnp.sum(advantage * sampled(p).log_prob))(params)
    assert float(sum(jnp.abs(x).sum() for x in jax.tree.leaves(term))) > 0
    every = tiny_model(estimator="reinforce", keep=16)  # keep = N: nothing to draw, the plain loss
    batch16 = tiny_batch(every.cfg)
    np.testing.assert_array_equal(np.asarray(every.loss(batch16, train=True)[0]), np.asarray(every.loss(batch16)[0]))


@pytest.mark.parametrize("keep", [4, 16])
def test_distill_trains_the_native_expert_toward_the_decoders_saliency(keep):
    """selection.distill: the training loss's value is the plain NLL, and its gradient is the NLL's plus distill *
    the gradient of sum_b CE(p_b, q_b), p_b the share of ||dNLL/dtoken_k||^2 of each token the decoder saw
    (computed here by a separate jax.grad, as a constant) and q_b the native score renormalised over those tokens.
    At keep = N (16 here) every token is a target."""
    model = tiny_model(keep=keep, distill=0.5)
    batch = tiny_batch(model.cfg, T=keep + 8)
    graphdef, params = nnx.split(model, nnx.Param)

    def selected_of(p):
        return nnx.merge(graphdef, p).visual_tokens(batch["pixels"], batch["instruction"], batch["instruction_mask"])

    def nll_of(p, selected):
        return next_token_loss(nnx.merge(graphdef, p)(batch, selected), batch["labels"])[0]

    selected = selected_of(params)
    grad = jax.grad(lambda t: nll_of(params, selected._replace(tokens=t)))(selected.tokens)
    energy = np.sum(np.asarray(grad, np.float64) ** 2, axis=-1)
    target = jnp.asarray(energy / energy.sum(-1, keepdims=True), jnp.float32)
    assert np.all(np.asarray(target).max(-1) < 1) and np.allclose(np.asarray(target).sum(-1), 1, atol=1e-6)

    def expected(p):
        s = selected_of(p)
        q = jnp.take_along_axis(s.native_score, s.indices, axis=1)
        q = q / jnp.sum(q, axis=-1, keepdims=True)
        return nll_of(p, s) - 0.5 * jnp.sum(target * jnp.log(q))

    def train_loss(p):
        return nnx.merge(graphdef, p).loss(batch, train=True)[0]

    np.testing.assert_allclose(float(train_loss(params)), float(nll_of(params, selected)), rtol=1e-6)
    got, want = jax.grad(train_loss)(params), jax.grad(expected)(params)
    jax.tree.map(lambda g, w: np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5), got, want)
    plain = jax.grad(lambda p: nll_of(p, selected_of(p)))(params)
    moved = jax.tree.map(lambda g, w: float(jnp.abs(g - w).max()), got, plain)
    assert max(jax.tree.leaves(moved)) > 1e-4  # the term does reach the parameters


def test_sharded_forward_equals_single_device():
    model = tiny_model()
    batch = tiny_batch(model.cfg, batch=4)
    reference = np.asarray(model(batch))
    total, count = model.loss(batch)

    mesh = sharding.make_mesh(data=4, fsdp=1, tensor=2)
    graphdef, state = nnx.split(model)
    state = jax.device_put(state, sharding.state_shardings(state, mesh))
    assert any(len(v.sharding.device_set) > 1 and not v.sharding.is_fully_replicated
               for v in jax.tree.leaves(state)), "some weight must really be sharded"
    batch = {k: jax.device_put(v, sharding.batch_sharding(mesh, v.ndim)) for k, v in batch.items()}

    @jax.jit
    def forward(state, batch):
        m = nnx.merge(graphdef, state)
        return m(batch), m.loss(batch)

    logits, (total_s, count_s) = forward(state, batch)
    np.testing.assert_allclose(np.asarray(logits), reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(total_s), float(total), rtol=1e-5)
    assert float(count_s) == float(count)


def test_generate_batched_equals_one_at_a_time():
    model = tiny_model(seed=3)
    batch = tiny_batch(model.cfg, batch=4, seed=1, left_pad=True)
    run = nnx.jit(lambda m, b: generate(m, b, max_new_tokens=6, eos_id=5))
    tokens, lengths = run(model, batch)
    for b in range(4):
        row = {k: v[b:b + 1] for k, v in batch.items()}
        keep = np.asarray(row["mask"][0])
        row = {k: (v[:, keep] if v.shape[1] == T else v) for k, v in row.items()}  # drop the padding
        single, length = run(model, row)
        np.testing.assert_array_equal(np.asarray(single[0]), np.asarray(tokens[b]))
        assert int(length[0]) == int(lengths[b])


def test_generate_greedy_matches_full_forward_argmax():
    model = tiny_model(seed=4)
    batch = tiny_batch(model.cfg, batch=1)
    row = {k: (v[:, :T] if v.ndim == 2 and v.shape[1] == T else v) for k, v in batch.items()}
    tokens, _ = nnx.jit(lambda m, b: generate(m, b, max_new_tokens=3, eos_id=-1))(model, row)
    # Re-run the full forward on prompt + generated tokens: each generated token is the argmax of the last logits.
    seq = dict(row)
    forward = nnx.jit(lambda m, b: m(b))
    for step in range(3):
        logits = forward(model, seq)
        assert int(jnp.argmax(logits[0, -1])) == int(tokens[0, step])
        seq = dict(seq, tokens=jnp.concatenate([seq["tokens"], tokens[:, step:step + 1]], 1),
                   mask=jnp.concatenate([seq["mask"], jnp.ones((1, 1), bool)], 1),
                   image_mask=jnp.concatenate([seq["image_mask"], jnp.zeros((1, 1), bool)], 1),
                   labels=jnp.concatenate([seq["labels"], jnp.full((1, 1), IGNORE_INDEX)], 1))


def test_sample_token_top_p():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    seen = {int(sample_token(logits, jax.random.key(i), temperature=1.0, top_p=0.7)[0]) for i in range(200)}
    assert seen == {0, 1}  # the nucleus of mass 0.7 is {0.5, 0.3}
    assert int(sample_token(logits, None)[0]) == 0


def test_config_errors_name_the_field():
    cfg = tiny.get_config().to_dict()
    cfg["model"]["fusion"]["scan_windw"] = 2
    with pytest.raises(ValueError, match=r"config\.model\.fusion: unknown field.*scan_windw"):
        config_lib.validate(cfg)
    cfg = tiny.get_config().to_dict()
    cfg["model"]["selection"]["keep"] = "many"
    with pytest.raises(TypeError, match=r"config\.model\.selection\.keep='many'"):
        config_lib.validate(cfg)
    cfg = tiny.get_config().to_dict()
    cfg["model"]["selection"]["keep"] = True  # ml_collections would take a bool for an int
    with pytest.raises(TypeError, match=r"config\.model\.selection\.keep=True has type bool"):
        config_lib.validate(cfg)
    cfg = tiny.get_config().to_dict()
    cfg["model"]["selection"]["keep"] = 17
    with pytest.raises(ValueError, match="config.model: selection.keep=17"):
        config_lib.validate(cfg)
    with pytest.raises(ValueError, match=r"config\.model\.vision: unknown field.*widht"):
        common.model_config(vision=dict(widht=8), fusion={}, selection={}, llm={})


def _abstract(config):
    return nnx.eval_shape(lambda: Meteor(config_from_dict(config.model), rngs=nnx.Rngs(0)))


# One CLIP ViT-L/14 layer (attention 4·(1024²+1024), two LayerNorms, MLP 1024·4096·2 + 4096 + 1024).
CLIP_L14_LAYER = 4 * (1024 * 1024 + 1024) + 4 * 1024 + 2 * 1024 * 4096 + 4096 + 1024
# CLIPVisionModel ViT-L/14-336: embeddings + pre-LN + 24 layers + post-LN.
CLIP_L14_336 = 1024 * 3 * 14 * 14 + 1024 + 577 * 1024 + 2048 + 24 * CLIP_L14_LAYER + 2048


@pytest.mark.parametrize("module,llm_params", [(meteor_7b, 6_738_415_616), (meteor_13b, 13_015_864_320)])
def test_real_configs_eval_shape(module, llm_params):
    for variant in ("stage1-keep144", "stage2-keep64", "stage2-keep32"):
        config = module.get_config(variant)
        model = _abstract(config)
        assert model.cfg.selection.keep == int(variant.rsplit("keep", 1)[1])
    assert count_params(model.llm) == llm_params
    # LLaVA uses layer -2: the tower keeps 23 of CLIP's 24 layers and no post-LN (≈303.5M in the HF checkpoint).
    assert CLIP_L14_336 == 303_507_456
    assert count_params(model.vision) == CLIP_L14_336 - CLIP_L14_LAYER - 2048
    fusion = count_params(model.fusion)
    assert 10e6 < fusion < 60e6, fusion  # the projector stays small next to the LLM
    # Nothing was materialised.
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(model)))


def test_smollm2_config_eval_shape():
    model = _abstract(smollm2.get_config())
    assert count_params(model.llm) == 134_515_008  # SmolLM2-135M, tied embeddings
