"""Baseline projectors (model.projector), the Meteor ablation switches, and the llava-hf LLaVA-1.5 loader's logits
parity with `transformers.LlavaForConditionalGeneration`."""
import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import meteor_7b, tiny
from meteor_jax import config as config_lib
from meteor_jax import sharding
from meteor_jax.models.fusion import FlashGlobalFusion, FusionConfig, scan_order
from meteor_jax.models.layers import count_params
from meteor_jax.models.meteor import Meteor, MeteorConfig, config_from_dict
from meteor_jax.models.projectors import BaselineProjector, average_pool, image_hash, random_scores
from meteor_jax.models.selection import SelectionConfig, select

BASELINES = ("mlp", "pool", "cls_prune", "random")
GRID, DV, DLLM = 4, 12, 16
N = GRID * GRID


def _projector(kind, keep, seed=0):
    return BaselineProjector(kind, vision_dim=DV, llm_dim=DLLM, grid=GRID, keep=keep, seed=seed, rngs=nnx.Rngs(0))


def _features(batch=2, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(batch, N, DV)).astype(np.float32)
    cls = rng.dirichlet(np.ones(N + 1), size=batch)[:, 1:].astype(np.float32)
    pixels = rng.normal(size=(batch, 8, 8, 3)).astype(np.float32)
    return jnp.asarray(features), jnp.asarray(cls), jnp.asarray(pixels)


def _mlp_reference(projector, x):
    """LLaVA-1.5 mlp2x_gelu in numpy (exact erf GELU), from the module's weights."""
    erf = np.vectorize(math.erf)
    w1, b1 = np.asarray(projector.align_fc1.kernel[...]), np.asarray(projector.align_fc1.bias[...])
    w2, b2 = np.asarray(projector.align_fc2.kernel[...]), np.asarray(projector.align_fc2.bias[...])
    h = np.asarray(x, np.float64) @ w1 + b1
    return (0.5 * h * (1 + erf(h / np.sqrt(2)))) @ w2 + b2


def _tiny_model_config(projector, keep, **model_fields):
    config = tiny.get_config()
    config.model.update(projector=projector, **model_fields)
    config.model.selection.keep = keep
    return config_from_dict(config.model)


# ------------------------------------------------------------------------------------------- the baselines


@pytest.mark.parametrize("kind,keep", [("meteor", 4), ("mlp", 16), ("pool", 4), ("cls_prune", 4), ("random", 9)])
def test_full_model_shapes_with_each_projector(kind, keep):
    """jax.eval_shape of the whole Meteor forward: K tokens of width d_llm reach K image slots of the LLM."""
    cfg = _tiny_model_config(kind, keep)
    model = nnx.eval_shape(lambda: Meteor(cfg, rngs=nnx.Rngs(0)))
    b, t, m = 2, keep + 6, 5
    image_mask = np.zeros((b, t), bool)
    image_mask[:, 1:1 + keep] = True
    batch = dict(pixels=jax.ShapeDtypeStruct((b, 32, 32, 3), jnp.float32),
                 tokens=jax.ShapeDtypeStruct((b, t), jnp.int32), mask=jax.ShapeDtypeStruct((b, t), bool),
                 image_mask=jnp.asarray(image_mask), instruction=jax.ShapeDtypeStruct((b, m), jnp.int32),
                 instruction_mask=jax.ShapeDtypeStruct((b, m), bool))
    graphdef, state = nnx.split(model)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, batch)
    assert logits.shape == (b, t, cfg.llm.vocab_size)
    selected = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s).visual_tokens(
        x["pixels"], x["instruction"], x["instruction_mask"]), state, batch)
    assert selected.tokens.shape == (b, keep, cfg.llm.dim) and selected.indices.shape == (b, keep)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    assert set(params) == {"vision", "fusion", "llm"}  # the projector is `fusion` for every kind (stage 1 trains it)
    if kind != "meteor":
        assert set(params["fusion"]) == {"align_fc1", "align_fc2"}


@pytest.mark.parametrize("kind,keep", [("mlp", 16), ("pool", 4), ("pool", 1), ("cls_prune", 5), ("random", 5)])
def test_baseline_output_is_mlp_of_the_kept_features(kind, keep):
    features, cls, pixels = _features()
    projector = _projector(kind, keep)
    out = projector(features, cls, pixels)
    assert out.tokens.shape == (2, keep, DLLM) and out.indices.shape == (2, keep)
    idx = np.asarray(out.indices)
    assert np.all(np.diff(idx, axis=1) > 0) and idx.min() >= 0 and idx.max() < N, "distinct, raster order"
    f = np.asarray(features)
    if kind == "pool":
        side, w = int(np.sqrt(keep)), GRID // int(np.sqrt(keep))
        kept = f.reshape(2, side, w, side, w, DV).mean(axis=(2, 4)).reshape(2, keep, DV)
    else:
        kept = np.take_along_axis(f, idx[..., None], axis=1)
    np.testing.assert_allclose(np.asarray(out.tokens), _mlp_reference(projector, kept), rtol=1e-5, atol=1e-5)


def test_average_pool_equals_a_numpy_2d_average_pool():
    x = np.random.default_rng(1).normal(size=(2, 36, 3)).astype(np.float32)  # a 6×6 grid
    grid = x.reshape(2, 6, 6, 3)
    for keep, w in ((9, 2), (4, 3), (1, 6), (36, 1)):
        side = 6 // w
        expected = np.stack([[grid[b, i * w:(i + 1) * w, j * w:(j + 1) * w].mean(axis=(0, 1))
                              for i in range(side) for j in range(side)] for b in range(2)])
        np.testing.assert_allclose(np.asarray(average_pool(jnp.asarray(x), 6, keep)), expected, rtol=1e-6, atol=1e-6)
    # pool reports each window by its top-left patch
    np.testing.assert_array_equal(np.asarray(_projector("pool", 4)(*_features()).indices[0]), [0, 2, 8, 10])


def test_cls_prune_keeps_the_top_k_by_cls_attention_in_raster_order():
    features, _, pixels = _features(batch=1)
    cls = np.full((1, N), 0.01, np.float32)
    cls[0, [13, 2, 7, 9, 4]] = [0.30, 0.20, 0.15, 0.10, 0.05]  # the 5th largest (4) must not be kept with K=4
    out = _projector("cls_prune", 4)(features, jnp.asarray(cls), pixels)
    np.testing.assert_array_equal(np.asarray(out.indices[0]), [2, 7, 9, 13])
    # With the real tower: the kept patches are the top K of the selected layer's [CLS] attention row.
    cfg = _tiny_model_config("cls_prune", 4)
    model = Meteor(cfg, rngs=nnx.Rngs(0))
    pix = jnp.asarray(np.random.default_rng(2).normal(size=(2, 32, 32, 3)), jnp.float32)
    _, cls_row = model.vision(pix)
    selected = model.visual_tokens(pix, jnp.zeros((2, 3), jnp.int32), jnp.ones((2, 3), bool))
    expected = np.sort(np.argsort(-np.asarray(cls_row), axis=1, kind="stable")[:, :4], axis=1)
    np.testing.assert_array_equal(np.asarray(selected.indices), expected)


def test_random_keeps_k_distinct_patches_drawn_per_image():
    features, cls, pixels = _features(batch=3)
    projector = _projector("random", 5)
    idx = np.asarray(projector(features, cls, pixels).indices)
    assert np.all(np.diff(idx, axis=1) > 0), "K distinct patches in raster order"
    assert len({tuple(r) for r in idx}) == 3, "different images keep different patches"
    # A row's draw depends on its image only: not on its batch position, the other rows, jit, or the features.
    swapped = np.asarray(jax.jit(projector)(features[::-1] * 2, cls[::-1], pixels[::-1]).indices)
    np.testing.assert_array_equal(swapped, idx[::-1])
    other_seed = np.asarray(_projector("random", 5, seed=1)(features, cls, pixels).indices)
    assert not np.array_equal(other_seed, idx)
    # The hash sees every value: one changed pixel (by one ulp) changes it, identical images share it.
    same = np.repeat(np.asarray(pixels[:1]), 4, axis=0)
    same[1, 0, 0, 0] = np.nextafter(same[1, 0, 0, 0], np.float32(np.inf))
    same[2, 7, 7, 2] = np.nextafter(same[2, 7, 7, 2], np.float32(np.inf))
    hashes = np.asarray(image_hash(jnp.asarray(same)))
    assert len(set(hashes[:3])) == 3 and hashes[3] == hashes[0]
    # Over many images every patch is kept about K/N of the time (a uniform K-subset per image).
    many = jnp.asarray(np.random.default_rng(3).normal(size=(400, 4, 4, 3)), jnp.float32)
    kept = np.asarray(jax.lax.top_k(random_scores(many, 64, 0), 8)[1])
    counts = np.bincount(kept.ravel(), minlength=64)
    assert counts.min() > 20 and counts.max() < 85, counts  # expectation 400·8/64 = 50


def test_baselines_share_one_parameter_layout_that_shards():
    shapes = []
    for kind, keep in (("mlp", 16), ("pool", 4), ("cls_prune", 4), ("random", 4)):
        model = nnx.eval_shape(lambda: Meteor(_tiny_model_config(kind, keep), rngs=nnx.Rngs(0)))
        state = nnx.state(model.fusion, nnx.Param)
        shapes.append(jax.tree.map(lambda x: x.shape, nnx.to_pure_dict(state)))
        mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
        specs = [s.spec for s in jax.tree.leaves(sharding.state_shardings(state, mesh))]  # every weight has axes
        assert any(any(p is not None for p in spec) for spec in specs)
    assert all(s == shapes[0] for s in shapes), "a llava-hf multi_modal_projector must load into every baseline"


def test_stage_1_trains_the_baseline_projector():
    """The stage-1 default `train.trainable=("fusion",)` trains exactly the projector, whichever it is."""
    from meteor_jax.config import RUN_DEFAULTS
    from meteor_jax.train.optim import TRAINED, trainable_labels

    model = nnx.eval_shape(lambda: Meteor(_tiny_model_config("cls_prune", 4), rngs=nnx.Rngs(0)))
    labels = nnx.to_pure_dict(trainable_labels(nnx.state(model, nnx.Param), RUN_DEFAULTS["train"]["trainable"]))
    trained = {name for name, tree in labels.items() if TRAINED in jax.tree.leaves(tree)}
    assert trained == {"fusion"} and set(jax.tree.leaves(labels["fusion"])) == {TRAINED}


def test_llava_15_7b_projector_size():
    config = meteor_7b.get_config("stage1-keep144")
    for kind, keep in (("mlp", 576), ("pool", 144), ("cls_prune", 64), ("random", 32)):
        config.model.projector, config.model.selection.keep = kind, keep
        model = nnx.eval_shape(lambda: Meteor(config_from_dict(config.model), rngs=nnx.Rngs(0)))
        # LLaVA-1.5-7B's mm_projector: 1024·4096 + 4096 + 4096·4096 + 4096
        assert count_params(model.fusion) == 20_979_712


def test_projector_config_errors():
    with pytest.raises(ValueError, match=r"selection.keep=16"):
        _tiny_model_config("mlp", 4)
    with pytest.raises(ValueError, match=r"keep=9 must be one of \[1, 4, 16\]"):
        _tiny_model_config("pool", 9)
    with pytest.raises(ValueError, match="model.projector='fgf'"):
        _tiny_model_config("fgf", 4)
    config = tiny.get_config().to_dict()
    config["model"]["projector"] = 3
    with pytest.raises(TypeError, match="model.projector"):
        config_lib.validate(config)
    with pytest.raises(ValueError, match="local_kernel"):
        FusionConfig(local_kernel=-1)
    assert MeteorConfig().projector == "meteor"


# ------------------------------------------------------------------------------------------- grid positions


def _visual_inputs(cfg, seed: int):
    """Random pixels and a 2-row instruction batch (the first row padded) for `Meteor.visual_tokens`."""
    rng = np.random.default_rng(seed)
    pixels = jnp.asarray(rng.normal(size=(2, cfg.vision.image_size, cfg.vision.image_size, 3)), jnp.float32)
    instruction = jnp.asarray(rng.integers(1, cfg.llm.vocab_size, (2, 5)), jnp.int32)
    return pixels, instruction, jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)


@pytest.mark.parametrize("kind,keep", [("cls_prune", 5), ("meteor", 4), ("mlp", 16)])
def test_grid_positions_add_the_kept_cells_row_and_column_embeddings(kind, keep):
    """model.visual_positions="grid": each kept token gains row[i // g] + column[i % g] of its raster index i
    (checked by hand against the projector's own output); the scores and indices are the projector's."""
    cfg = _tiny_model_config(kind, keep, visual_positions="grid")
    model = Meteor(cfg, rngs=nnx.Rngs(0))
    pixels, instruction, instruction_mask = _visual_inputs(cfg, seed=3)
    with_positions = model.visual_tokens(pixels, instruction, instruction_mask)

    features, cls_attention = model.vision(pixels)
    if kind == "meteor":
        text = model.llm.embed_tokens(instruction)
        plain = select(model.fusion(features, text, instruction_mask), cls_attention, text, instruction_mask,
                       cfg.selection)
    else:
        plain = model.fusion(features, cls_attention, pixels)
    idx = np.asarray(plain.indices)
    g = cfg.vision.grid
    row, column = np.asarray(model.fusion.grid_position.row[...]), np.asarray(model.fusion.grid_position.column[...])
    expected = np.asarray(plain.tokens) + row[idx // g] + column[idx % g]
    np.testing.assert_allclose(np.asarray(with_positions.tokens), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(with_positions.indices), idx)
    np.testing.assert_array_equal(np.asarray(with_positions.score), np.asarray(plain.score))
    assert row.shape == column.shape == (g, cfg.llm.dim) and not np.allclose(row, column)


@pytest.mark.parametrize("kind", ["meteor", "random"])
def test_scored_grid_positions_are_added_before_meteor_selects(kind):
    """model.visual_positions="grid_scored": Meteor's experts score fused + row + column of every cell (checked by
    calling `select` on those sums by hand) and keep those sums; a baseline adds the table after its selection, as
    with "grid" (the same tokens)."""
    cfg = _tiny_model_config(kind, 4, visual_positions="grid_scored")
    model = Meteor(cfg, rngs=nnx.Rngs(0))
    pixels, instruction, instruction_mask = _visual_inputs(cfg, seed=5)
    scored = model.visual_tokens(pixels, instruction, instruction_mask)
    g = cfg.vision.grid
    row, column = np.asarray(model.fusion.grid_position.row[...]), np.asarray(model.fusion.grid_position.column[...])
    cells = np.arange(g * g)
    table = row[cells // g] + column[cells % g]  # (N, dim)
    features, cls_attention = model.vision(pixels)
    if kind == "meteor":
        text = model.llm.embed_tokens(instruction)
        fused = model.fusion(features, text, instruction_mask) + table
        expected = select(fused, cls_attention, text, instruction_mask, cfg.selection)
        np.testing.assert_allclose(np.asarray(scored.native_score), np.asarray(expected.native_score), rtol=1e-5,
                                   atol=1e-7)
        blind = select(fused - table, cls_attention, text, instruction_mask, cfg.selection)
        assert not np.allclose(np.asarray(scored.native_score), np.asarray(blind.native_score))  # the cells count
    else:
        plain = model.fusion(features, cls_attention, pixels)
        expected = plain._replace(tokens=plain.tokens + table[np.asarray(plain.indices)])
    np.testing.assert_array_equal(np.asarray(scored.indices), np.asarray(expected.indices))
    np.testing.assert_allclose(np.asarray(scored.tokens), np.asarray(expected.tokens), rtol=1e-5, atol=1e-6)


def test_grid_positions_belong_to_the_projector_and_bad_values_fail():
    from meteor_jax.config import RUN_DEFAULTS
    from meteor_jax.train.optim import TRAINED, trainable_labels

    model = nnx.eval_shape(lambda: Meteor(_tiny_model_config("cls_prune", 4, visual_positions="grid"),
                                          rngs=nnx.Rngs(0)))
    labels = nnx.to_pure_dict(trainable_labels(nnx.state(model, nnx.Param), RUN_DEFAULTS["train"]["trainable"]))
    assert set(labels["fusion"]["grid_position"]) == {"row", "column"}
    assert set(jax.tree.leaves(labels["fusion"]["grid_position"])) == {TRAINED}  # stage 1 trains it
    assert "grid_position" not in nnx.to_pure_dict(nnx.state(
        nnx.eval_shape(lambda: Meteor(_tiny_model_config("cls_prune", 4), rngs=nnx.Rngs(0))), nnx.Param))["fusion"]
    assert MeteorConfig().visual_positions == "none"
    with pytest.raises(ValueError, match=r"model.visual_positions='2d'; expected one of \('none', 'grid', 'grid_sc"):
        MeteorConfig(visual_positions="2d")


# ------------------------------------------------------------------------------------------- Meteor ablations


def _fusion(**overrides):
    cfg = FusionConfig(**{**dict(dim=8, num_layers=1, expand=2, d_state=4, scan_window=2, scan_impl="sequential"),
                          **overrides})
    return FlashGlobalFusion(cfg, vision_dim=DV, llm_dim=DLLM, grid=GRID, rngs=nnx.Rngs(0))


def test_fusion_without_instruction_ignores_it():
    visual = jax.random.normal(jax.random.key(0), (2, N, DV))
    text_a, text_b = jax.random.normal(jax.random.key(1), (2, 2, 5, DLLM))
    mask_a, mask_b = jnp.ones((2, 5), bool), jnp.arange(5)[None] < jnp.array([[1], [3]])
    blind = _fusion(use_instruction=False)
    assert "text_in" not in nnx.to_pure_dict(nnx.state(blind, nnx.Param))  # no dead instruction weights
    blind = jax.jit(lambda v, t, m, f=blind: f(v, t, m))
    np.testing.assert_array_equal(np.asarray(blind(visual, text_a, mask_a)), np.asarray(blind(visual, text_b, mask_b)))
    seeing = jax.jit(lambda v, t, m, f=_fusion(): f(v, t, m))
    assert np.abs(np.asarray(seeing(visual, text_a, mask_a) - seeing(visual, text_b, mask_a))).max() > 1e-4


@pytest.mark.parametrize("local_kernel,bidirectional,causal", [(0, False, True), (1, False, True), (3, False, False),
                                                               (0, True, False)])
def test_no_local_step_and_unidirectional_scan(local_kernel, bidirectional, causal):
    """Without the local step, a unidirectional scan is causal in scan order: a visual token depends on no token
    later in the sequence. The 3×3 local step (or the backward scan) makes it see later tokens."""
    fusion = _fusion(local_kernel=local_kernel, bidirectional=bidirectional, num_layers=2)
    has_local = "local_kernel" in nnx.to_pure_dict(nnx.state(fusion, nnx.Param))["blocks"][0]
    assert has_local == (local_kernel > 1)
    visual = jax.random.normal(jax.random.key(2), (1, N, DV))
    text, mask = jax.random.normal(jax.random.key(3), (1, 3, DLLM)), jnp.ones((1, 3), bool)
    jac = jax.jit(jax.jacrev(lambda v: fusion(v, text, mask)[0]))(visual)  # (N out, D, 1, N in, DV)
    order = scan_order(GRID, 2)
    influence = np.abs(np.asarray(jac[:, :, 0])).sum(axis=(1, 3))[np.ix_(order, order)]  # [p, q]: scan pos q → p
    later = np.triu(influence, k=1)
    if causal:
        np.testing.assert_array_equal(later, 0.0)
        assert np.all(np.diag(influence) > 0)
    else:
        assert later.max() > 0


def _selection_inputs(seed=0):
    rng = np.random.default_rng(seed)
    fused = jnp.asarray(rng.normal(size=(2, N, 8)), jnp.float32)
    cls = jnp.asarray(rng.uniform(size=(2, N)), jnp.float32)
    text = jnp.asarray(rng.normal(size=(2, 4, 8)), jnp.float32)
    return fused, cls, text, jnp.ones((2, 4), bool)


def test_native_only_ignores_the_cls_row_and_visual_only_ignores_the_instruction():
    fused, cls, text, mask = _selection_inputs()
    cls_other = jnp.asarray(np.random.default_rng(9).uniform(size=(2, N)), jnp.float32)
    text_other = jnp.asarray(np.random.default_rng(9).normal(size=(2, 4, 8)), jnp.float32)

    def pick(aggregate, c, t):
        return np.asarray(select(fused, c, t, mask, SelectionConfig(keep=4, aggregate=aggregate)).indices)

    def top4(score):
        return np.sort(np.argsort(-np.asarray(score), axis=1, kind="stable")[:, :4], axis=1)

    native = pick("native", cls, text)
    np.testing.assert_array_equal(native, pick("native", cls_other, text))
    np.testing.assert_array_equal(native, top4(select(fused, cls, text, mask, SelectionConfig(keep=4)).native_score))
    visual = pick("visual", cls, text)
    np.testing.assert_array_equal(visual, pick("visual", cls, text_other))
    np.testing.assert_array_equal(visual, top4(cls))
    # The default mix depends on both experts (so these invariances are not trivially true).
    mean = pick("mean", cls, text)
    assert not np.array_equal(mean, pick("mean", cls_other, text))
    assert not np.array_equal(mean, pick("mean", cls, text_other))

    def kept_sum(t, agg):
        return jnp.sum(select(fused, cls, t, mask, SelectionConfig(keep=4, aggregate=agg)).tokens)

    # Straight-through: only the native expert's score carries a gradient to the instruction.
    grad = jax.jit(jax.grad(kept_sum), static_argnums=1)
    assert float(jnp.abs(grad(text, "native")).sum()) > 0
    np.testing.assert_array_equal(np.asarray(grad(text, "visual")), 0.0)


# ------------------------------------------------------------------------------------------- llava-hf loader


HF_VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                 intermediate_size=64)
HF_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5)
IMAGE_TOKEN = 127


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    """A tiny random LlavaForConditionalGeneration saved with save_pretrained, and its logits on two prompts."""
    import torch

    from meteor_jax.compare_torch import random_llava

    model = random_llava(HF_VISION, HF_TEXT, seed=0)  # its image token is the last id, IMAGE_TOKEN
    path = tmp_path_factory.mktemp("llava")
    model.save_pretrained(path)
    rng = np.random.default_rng(0)
    n = (HF_VISION["image_size"] // HF_VISION["patch_size"]) ** 2
    text = rng.integers(3, 120, size=(2, 7))
    ids = np.concatenate([np.ones((2, 1), np.int64), np.full((2, n), IMAGE_TOKEN), text], axis=1)
    pixels = rng.normal(size=(2, 3, 32, 32)).astype(np.float32)  # NCHW, normalised
    def run(pixel_values):
        with torch.no_grad():
            return model(input_ids=torch.as_tensor(ids), pixel_values=torch.as_tensor(pixel_values),
                         attention_mask=torch.ones(ids.shape, dtype=torch.long)).logits.numpy()

    logits = run(pixels)
    # The image reaches the text logits, so parity covers the vision tower and the projector.
    assert np.abs(run(pixels[::-1].copy()) - logits)[:, n + 1:].max() > 0.1
    return path, ids, pixels, logits


def test_llava_loader_logits_parity(llava_dir):
    """Converted through the real weight-loading path (config.weights.llava), sharded over 8 devices."""
    from meteor_jax.convert.llava import meteor_config_from_llava
    from meteor_jax.run import Run

    path, ids, pixels, hf_logits = llava_dir
    model_cfg = meteor_config_from_llava(path)
    assert (model_cfg.projector, model_cfg.selection.keep, model_cfg.vision.select_layer) == ("mlp", 16, -2)
    config = config_lib.defaults()
    config.model = dataclasses.asdict(model_cfg)
    config.mesh.update(data=2, fsdp=2, tensor=2)
    config.data.max_len = ids.shape[1]
    config.weights.llava = str(path)
    run = Run.from_config(config)
    loaded = run.converted_weights()
    assert set(loaded) == {"vision", "fusion", "llm"}
    graphdef, params = run.random_params(loaded)
    batch = dict(pixels=pixels.transpose(0, 2, 3, 1), tokens=ids.astype(np.int32), mask=np.ones(ids.shape, bool),
                 image_mask=ids == IMAGE_TOKEN, instruction=np.zeros((2, 4), np.int32),
                 instruction_mask=np.zeros((2, 4), bool))
    logits = jax.jit(lambda p, b: nnx.merge(graphdef, p)(b))(params, {k: jnp.asarray(v) for k, v in batch.items()})
    err = float(np.abs(np.asarray(logits) - hf_logits).max())
    print(f"llava-hf logits max |diff| {err:.2e} (logits scale {np.abs(hf_logits).max():.2f})")
    assert err <= 1e-4
    config.weights.vision = "x"
    with pytest.raises(ValueError, match="weights.llava"):
        Run.from_config(config)


def test_llava_loader_key_layouts_and_checks(llava_dir, tmp_path):
    """The transformers-5 key layout loads the same weights as the hub's (transformers-4) one; a config that
    does not match the checkpoint is refused naming the field; with projector 'meteor' only CLIP + LLM load."""
    import shutil

    from safetensors.numpy import load_file, save_file

    from meteor_jax.convert.llava import load_llava, meteor_config_from_llava

    path = llava_dir[0]
    tensors = load_file(str(path / "model.safetensors"))
    assert "multi_modal_projector.linear_1.weight" in tensors  # save_pretrained writes the hub layout

    def v5(key):
        for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                         ("multi_modal_projector.", "model.multi_modal_projector."),
                         ("vision_tower.", "model.vision_tower.")):
            if key.startswith(old):
                return new + key[len(old):]
        raise AssertionError(key)

    save_file({v5(k): v for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    shutil.copy(path / "config.json", tmp_path / "config.json")
    model_cfg = meteor_config_from_llava(path, projector="pool", keep=4)
    hub, new = load_llava(path, model_cfg), load_llava(tmp_path, model_cfg)
    assert set(hub) == set(new) == {"vision", "fusion", "llm"}
    for a, b in zip(jax.tree.leaves(hub), jax.tree.leaves(new)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(hub["fusion"]["align_fc1"]["kernel"][...]),
                                  tensors["multi_modal_projector.linear_1.weight"].T)

    wrong = dataclasses.replace(model_cfg, llm=dataclasses.replace(model_cfg.llm, mlp_dim=96))
    with pytest.raises(ValueError, match=r"llm.mlp_dim: checkpoint 64 vs config 96"):
        load_llava(path, wrong)
    other_layer = dataclasses.replace(model_cfg, vision=dataclasses.replace(model_cfg.vision, select_layer=-1))
    with pytest.raises(ValueError, match="vision_feature_layer"):
        load_llava(path, other_layer)
    meteor = meteor_config_from_llava(path, projector="meteor", keep=4)
    assert set(load_llava(path, dataclasses.replace(meteor, fusion=FusionConfig(dim=8, scan_window=2)))) == {
        "vision", "llm"}
