"""CLIP vision tower: HF `CLIPVisionModel` parity through the real loader, scan/loop, freezing, full-size shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from meteor_jax.convert.clip import clip_vision_rules, load_clip_vision, vision_config_from_hf
from meteor_jax.convert.keymap import export_state
from meteor_jax.models.layers import count_params
from meteor_jax.models.vision import VisionConfig, VisionTower, stride2_conv3x3
from meteor_jax.sharding import make_mesh

TINY = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=128)


def _randomise(model: torch.nn.Module) -> None:
    """HF initialises norms to 1/0 and biases to 0: give them real values so every parameter matters."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
            elif name.endswith("class_embedding"):
                p.normal_(0.0, 1.0)
            elif "position_embedding" in name:
                p.normal_(0.0, 0.5)


def _reference(model: CLIPVisionModel, pixels_nchw: torch.Tensor):
    with torch.no_grad():
        out = model(pixel_values=pixels_nchw, output_hidden_states=True, output_attentions=True)
    return out.hidden_states, out.attentions


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**TINY, attn_implementation="eager")).eval().float()
    _randomise(model)
    path = tmp_path_factory.mktemp("clip_vision")
    model.save_pretrained(path)
    pixels = torch.randn(2, 3, 32, 32)
    hidden, attentions = _reference(model, pixels)
    return path, pixels, hidden, attentions


def _nhwc(pixels: torch.Tensor) -> jax.Array:
    return jnp.asarray(pixels.permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module")
def run_loaded(clip_dir):
    """Outputs of the loaded tower per (select_layer, scan_layers), each computed once (compiles are slow on CPU)."""
    path, pixels, _, _ = clip_dir
    cache = {}

    def run(select_layer=-2, scan_layers=True):
        if (select_layer, scan_layers) not in cache:
            tower = load_clip_vision(path, select_layer=select_layer, scan_layers=scan_layers)
            assert tower.cfg.num_layers_used == 3 + 1 + select_layer
            cache[select_layer, scan_layers] = tuple(np.asarray(a) for a in tower(_nhwc(pixels)))
        return cache[select_layer, scan_layers]

    return run


@pytest.mark.parametrize("select_layer", [-2, -1])
def test_parity_with_hf(clip_dir, run_loaded, select_layer):
    _, _, hidden, attentions = clip_dir
    features, cls_attention = run_loaded(select_layer)
    assert features.shape == (2, 16, 64) and cls_attention.shape == (2, 16)
    np.testing.assert_allclose(features, hidden[select_layer][:, 1:].numpy(), rtol=0, atol=1e-4)
    hf_cls = attentions[select_layer][:, :, 0, 1:].mean(1).numpy()
    np.testing.assert_allclose(cls_attention, hf_cls, rtol=0, atol=1e-5)
    # patch columns only: the CLS self-attention share is missing from the row
    assert np.all(cls_attention.sum(-1) < 1.0)


def test_scan_and_loop_agree(run_loaded):
    for scanned, looped in zip(run_loaded(-2, True), run_loaded(-2, False)):
        np.testing.assert_allclose(scanned, looped, rtol=0, atol=1e-5)


def test_export_round_trip(clip_dir):
    """The key table in the other direction gives back the checkpoint tensors (built layers only)."""
    path, _, _, _ = clip_dir
    tower = load_clip_vision(path)
    exported = dict(export_state(nnx.state(tower), clip_vision_rules(tower.cfg, prefix="")))
    with safe_open(str(path / "model.safetensors"), framework="numpy") as f:
        expected = {k for k in f.keys() if not k.startswith(("post_layernorm", "encoder.layers.2."))}
        assert set(exported) == expected
        for key, value in exported.items():
            np.testing.assert_array_equal(value, f.get_tensor(key))


def test_clip_model_checkpoint_with_prefix(tmp_path):
    """A full CLIPModel checkpoint: config under "vision_config", keys under "vision_model."."""
    torch.manual_seed(1)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = CLIPModel(CLIPConfig(vision_config=TINY, text_config=text, attn_implementation="eager")).eval()
    _randomise(model)
    model.save_pretrained(tmp_path)
    pixels = torch.randn(1, 3, 32, 32)
    hidden, _ = _reference(model.vision_model, pixels)
    features, _ = load_clip_vision(tmp_path)(_nhwc(pixels))
    np.testing.assert_allclose(np.asarray(features), hidden[-2][:, 1:].numpy(), rtol=0, atol=1e-4)


def test_sharded_load(clip_dir):
    path, pixels, hidden, _ = clip_dir
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    tower = load_clip_vision(path, mesh=mesh)
    q = tower.layers.attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
    features, _ = tower(_nhwc(pixels))
    np.testing.assert_allclose(np.asarray(features), hidden[-2][:, 1:].numpy(), rtol=0, atol=1e-4)


@pytest.mark.parametrize("trainable", [False, True])
def test_frozen_tower_passes_no_gradient(clip_dir, trainable):
    path, pixels, _, _ = clip_dir
    tower = load_clip_vision(path, trainable=trainable)  # loading is cheaper than a random init on CPU
    rng = np.random.default_rng(0)
    w_feat, w_cls = rng.normal(size=(2, 16, 64)), rng.normal(size=(2, 16))
    x = _nhwc(pixels)

    def loss(model):
        features, cls_attention = model(x)
        return jnp.sum(features * w_feat) + jnp.sum(cls_attention * w_cls)

    grads = jax.tree.leaves(nnx.jit(nnx.grad(loss))(tower))
    assert len(grads) == 5 + 16  # patch, class, position, pre_norm (2); 16 stacked per-layer tensors
    if trainable:
        assert all(float(jnp.abs(g).max()) > 0 for g in grads)
    else:
        assert all(float(jnp.abs(g).max()) == 0 for g in grads)


def test_config_errors():
    with pytest.raises(ValueError, match="quick_gelu"):
        vision_config_from_hf({"vision_config": {**TINY, "hidden_act": "gelu"}})
    with pytest.raises(ValueError, match="select_layer"):
        VisionConfig(depth=4, select_layer=0)
    with pytest.raises(ValueError, match="override"):
        vision_config_from_hf(TINY, selected_layer=-2)
    cfg = vision_config_from_hf({"vision_config": TINY}, select_layer=-1, dtype="bfloat16")
    assert (cfg.width, cfg.depth, cfg.num_heads, cfg.mlp_dim, cfg.grid) == (64, 3, 4, 128, 4)
    assert (cfg.num_layers_used, cfg.dtype) == (3, "bfloat16")


def test_full_size_parameter_count():
    """CLIP ViT-L/14-336 as abstract shapes: same count as HF (minus post_layernorm); LLaVA drops one layer."""
    hf_cfg = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16)
    with torch.device("meta"):
        hf_count = sum(p.numel() for p in CLIPVisionModel(hf_cfg).parameters())
    full_cfg = vision_config_from_hf(hf_cfg.to_dict(), select_layer=-1)
    assert full_cfg == VisionConfig(select_layer=-1)
    full = count_params(nnx.eval_shape(lambda: VisionTower(full_cfg, rngs=nnx.Rngs(0))))
    assert full == hf_count - 2 * 1024
    llava = count_params(nnx.eval_shape(lambda: VisionTower(VisionConfig(), rngs=nnx.Rngs(0))))
    per_layer = 4 * (1024 * 1024 + 1024) + 2 * (1024 * 4096) + 4096 + 1024 + 4 * 1024
    assert full - llava == per_layer
    assert 3.0e8 < full < 3.1e8


@pytest.mark.parametrize("height,channels", [(64, 3), (8, 16), (6, 5)])
def test_conv_stem_step_equals_xla_convolution(height, channels):
    """The conv stem's matmul form of a stride-2 3×3 convolution equals XLA's convolution, values and gradients."""
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, height, height, channels))
    w = jax.random.normal(kw, (3, 3, channels, 7))
    reference = lambda x, w: jax.lax.conv_general_dilated(  # noqa: E731
        x, w, window_strides=(2, 2), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(stride2_conv3x3(x, w), reference(x, w), rtol=1e-5, atol=1e-5)
    grads = [jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w))), argnums=(0, 1))(x, w)
             for f in (stride2_conv3x3, reference)]
    for mine, ref in zip(*grads):
        np.testing.assert_allclose(mine, ref, rtol=1e-4, atol=1e-4)
