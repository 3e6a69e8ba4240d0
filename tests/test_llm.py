"""Decoder LLM: parity with HF LlamaForCausalLM (load and save), padding, KV cache, scan/remat, 7B/13B shapes,
sharded forward."""
import dataclasses
import functools
import json
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec as P

from meteor_jax.convert.llama import (
    abstract_llm,
    llama_config_from_hf,
    llama_rules,
    llm_config_to_hf,
    load_llama,
    save_llama,
)
from meteor_jax.models.layers import count_params
from meteor_jax.models.llm import LLM, KVCache, LLMConfig
from meteor_jax.sharding import batch_sharding, make_mesh, state_shardings

TINY_HF = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, max_position_embeddings=64, rms_norm_eps=1e-5)
# LLaMA-3.1 RoPE scaling with a small original context: head_dim 16 then has wavelengths in all three bands.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
VARIANTS = {
    "tied": dict(tie_word_embeddings=True),
    "untied": dict(tie_word_embeddings=False),
    "llama3_rope": dict(tie_word_embeddings=False, rope_parameters=LLAMA3_ROPE),
}
TINY = LLMConfig(vocab_size=128, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=96, max_seq_len=64)


def _randomize_hf(model: torch.nn.Module, seed: int) -> None:
    """Weights with O(1) activations and peaked attention (HF's 0.02 init gives near-uniform attention, which
    would hide masking errors), and norms away from 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[1]))


@pytest.fixture(scope="module", params=list(VARIANTS))
def hf_llama(request, tmp_path_factory):
    """(variant, HF model, directory it was saved to)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_HF, **VARIANTS[request.param])
    model = transformers.LlamaForCausalLM(config).float().eval()
    _randomize_hf(model, seed=1)
    path = tmp_path_factory.mktemp(f"hf_llama_{request.param}")
    model.save_pretrained(path)
    return request.param, model, path


def _hf_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens), attention_mask=None if mask is None else torch.as_tensor(mask))
    return out.logits.float().numpy()


@functools.partial(jax.jit, static_argnums=(0, 5))
def _run(graphdef, state, tokens, mask, positions, return_hidden=False):
    m = nnx.merge(graphdef, state)
    return m(m.embed_tokens(tokens), positions=positions, mask=mask, return_hidden=return_hidden)[0]


def _forward(model: LLM, tokens, *, mask=None, positions=None, return_hidden=False) -> np.ndarray:
    """Jitted forward; compiled once per (config, shapes) across the whole file."""
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray(tokens)
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask, bool)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return np.asarray(_run(graphdef, state, tokens, mask, jnp.asarray(positions, jnp.int32), return_hidden))


def _tokens(shape, seed=0, vocab=128):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def test_load_matches_hf(hf_llama):
    variant, hf_model, path = hf_llama
    llm = load_llama(path)
    assert llm.cfg.tie_embeddings == (variant == "tied")
    assert ("lm_head" in nnx.state(llm)) == (variant != "tied")
    assert (llm.cfg.rope_scaling is not None) == (variant == "llama3_rope")
    tokens = _tokens((2, 24))
    ours = _forward(llm, tokens)
    ref = _hf_logits(hf_model, tokens)
    assert np.abs(ours - ref).max() <= 1e-4

    # Right-padded second row: valid positions match HF with the same attention_mask.
    mask = np.ones(tokens.shape, bool)
    mask[1, 15:] = False
    ours = _forward(llm, tokens, mask=mask)
    ref = _hf_logits(hf_model, tokens, mask.astype(np.int64))
    assert np.abs(ours[mask] - ref[mask]).max() <= 1e-4


def test_left_padding_matches_single_rows():
    llm = LLM(TINY, rngs=nnx.Rngs(1))
    lengths = [9, 14]
    rows = [_tokens((1, n), seed=10 + i) for i, n in enumerate(lengths)]
    width = max(lengths)
    tokens = np.zeros((2, width), np.int32)
    mask = np.zeros((2, width), bool)
    for i, row in enumerate(rows):
        tokens[i, width - row.shape[1]:] = row[0]
        mask[i, width - row.shape[1]:] = True
    positions = np.cumsum(mask, axis=1) - 1
    batched = _forward(llm, tokens, mask=mask, positions=positions)
    assert np.isfinite(batched).all()  # padding queries must not produce NaN either
    for i, row in enumerate(rows):
        alone = _forward(llm, row)[0]
        assert np.abs(batched[i, mask[i]] - alone).max() <= 1e-5


def test_kv_cache_decoding_matches_full_forward():
    llm = LLM(TINY, rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(llm)
    # Row 0 left-padded by 3, so the cache's validity mask matters.
    tokens = _tokens((2, 16), seed=5)
    mask = np.ones(tokens.shape, bool)
    mask[0, :3] = False
    positions = np.cumsum(mask, axis=1) - 1
    full = _forward(llm, tokens, mask=mask, positions=positions)

    @jax.jit
    def step(state, tokens, positions, mask, cache: KVCache):
        m = nnx.merge(graphdef, state)
        return m(m.embed_tokens(tokens), positions=positions, mask=mask, cache=cache)

    cache = llm.init_cache(batch=2, max_len=20)
    chunks = [(0, 6)] + [(t, t + 1) for t in range(6, 16)]  # prefill, then token by token
    outputs = []
    for a, b in chunks:
        logits, cache = step(state, tokens[:, a:b], positions[:, a:b], mask[:, a:b], cache)
        outputs.append(np.asarray(logits))
        assert int(cache.index) == b
    decoded = np.concatenate(outputs, axis=1)
    assert np.abs(decoded[mask] - full[mask]).max() <= 1e-5
    np.testing.assert_array_equal(np.asarray(cache.valid)[:, :16], mask)
    assert not np.asarray(cache.valid)[:, 16:].any()
    assert cache.k.shape == (TINY.num_layers, 2, 20, TINY.num_kv_heads, TINY.head_size)


def test_scan_loop_and_remat_agree():
    """Same parameters through scan/loop and every remat policy: identical logits; remat keeps the gradient."""
    tokens = _tokens((2, 10), seed=7)
    mask = np.ones(tokens.shape, bool)
    mask[1, 7:] = False
    state = nnx.state(LLM(TINY, rngs=nnx.Rngs(0)))
    variants = [dataclasses.replace(TINY, scan_layers=scan, remat=remat)
                for scan in (True, False) for remat in ("none", "full", "dots", "dots_no_batch")]
    models = {(c.scan_layers, c.remat): nnx.merge(nnx.graphdef(abstract_llm(c)), state) for c in variants}
    reference = _forward(models[True, "none"], tokens, mask=mask)
    # Remat does not change the forward computation, so the loop is checked without it (compile time).
    for key in [(False, "none"), (True, "full"), (True, "dots"), (True, "dots_no_batch")]:
        np.testing.assert_allclose(_forward(models[key], tokens, mask=mask), reference, atol=1e-6, rtol=0,
                                   err_msg=str(key))

    # The policy is really applied: one checkpoint region per layer body (one inside the scan), right policy.
    policies = {"full": "None", "dots": "DotsSaveable(only_if_no_batch_dims=False)",
                "dots_no_batch": "DotsSaveable(only_if_no_batch_dims=True)"}
    for (scan, remat), model in models.items():
        jaxpr = str(jax.make_jaxpr(lambda x: model(x)[0])(jnp.zeros((1, 4, TINY.dim))))
        found = re.findall(r"policy=(\S+)", jaxpr)
        assert found == ([] if remat == "none" else [policies[remat]] * (1 if scan else TINY.num_layers)), (scan, remat)

    # Gradient into the input embeddings through a frozen LLM (stage 1: the LLM's Variables come from the outer
    # jit trace, not from jax.grad's): remat must not change it.
    @functools.partial(jax.jit, static_argnums=0)
    def input_grad(graphdef, state, x):
        def loss(x):
            hidden, _ = nnx.merge(graphdef, state)(x, positions=positions, mask=jnp.asarray(mask), return_hidden=True)
            return jnp.sum(jnp.where(mask[..., None], hidden * readout, 0.0))
        return jax.grad(loss)(x)

    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    rng = np.random.default_rng(8)
    x = jnp.asarray(rng.normal(size=(2, 10, TINY.dim)), jnp.float32)
    readout = jnp.asarray(rng.normal(size=(2, 10, TINY.dim)), jnp.float32)
    expected = np.asarray(input_grad(nnx.graphdef(models[True, "none"]), state, x))
    assert np.abs(expected).max() > 0.1
    got = np.asarray(input_grad(nnx.graphdef(models[True, "full"]), state, x))  # production path: scan + remat
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_save_loads_in_transformers(tmp_path, tied):
    cfg = dataclasses.replace(TINY, tie_embeddings=tied, rope_theta=50000.0)
    llm = LLM(cfg, rngs=nnx.Rngs(11))
    # Norm weights away from their init of 1, so a swapped/missed norm would show.
    rng = np.random.default_rng(0)
    for norm in (llm.norm, llm.layers.attn_norm, llm.layers.mlp_norm):
        norm.weight[...] = jnp.asarray(rng.uniform(0.5, 1.5, norm.weight.shape), jnp.float32)
    save_llama(llm, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] == tied
    hf_model, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    hf_model.eval()
    tokens = _tokens((2, 12), seed=2)
    assert np.abs(_forward(llm, tokens) - _hf_logits(hf_model, tokens)).max() <= 1e-4
    # And back: load_llama reproduces the config and the parameters exactly.
    again = load_llama(tmp_path)
    assert again.cfg == cfg
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(llm, nnx.Param)),
                              nnx.to_flat_state(nnx.state(again, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p))


@pytest.mark.parametrize("hf_kwargs, expected", [
    (dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008), 6.74e9),
    (dict(hidden_size=5120, num_hidden_layers=40, num_attention_heads=40, intermediate_size=13824), 13.0e9),
], ids=["vicuna7b", "vicuna13b"])
def test_vicuna_parameter_counts(hf_kwargs, expected):
    hf_config = transformers.LlamaConfig(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                                         tie_word_embeddings=False, **hf_kwargs)
    with torch.device("meta"):
        hf_model = transformers.LlamaForCausalLM(hf_config)
    hf_count = sum(p.numel() for p in hf_model.parameters())
    cfg = llama_config_from_hf(hf_config.to_dict())
    abstract = abstract_llm(cfg)
    leaves = jax.tree.leaves(nnx.state(abstract, nnx.Param))
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # shapes only, no memory
    ours = count_params(nnx.state(abstract, nnx.Param))
    assert ours == hf_count
    assert abs(ours - expected) / expected < 0.005
    # Every parameter has one rule, and the HF keys the rules name are exactly HF's parameter names.
    theirs = {r.theirs.format(i=i) for r in llama_rules(cfg) for i in (range(cfg.num_layers) if r.stacked else [0])}
    assert theirs == {n for n, _ in hf_model.named_parameters()}


def test_sharded_forward_matches_unsharded(tmp_path):
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    reference = LLM(TINY, rngs=nnx.Rngs(4))
    save_llama(reference, tmp_path)
    sharded = load_llama(tmp_path, mesh=mesh)  # each tensor read straight onto its sharding
    assert sharded.layers.attn.q_proj.kernel.get_value().sharding.spec == P(None, "fsdp", "tensor")
    assert sharded.lm_head.kernel.get_value().sharding.spec == P("fsdp", "tensor")
    # The generic path too: shardings derived from an existing model's state, then device_put.
    graphdef, state = nnx.split(reference)
    placed = jax.device_put(state, state_shardings(state, mesh))

    tokens = _tokens((4, 16), seed=4)
    mask = np.ones(tokens.shape, bool)
    mask[2, 10:] = False
    positions = np.broadcast_to(np.arange(16, dtype=np.int32), tokens.shape)
    expected = _forward(reference, tokens, mask=mask)
    batch = batch_sharding(mesh, 2)
    args = [jax.device_put(jnp.asarray(a), batch) for a in (tokens, mask, positions)]
    for st in (placed, nnx.state(sharded)):
        out = _run(graphdef, st, *args)
        assert len(out.sharding.device_set) == 8
        assert np.abs(np.asarray(out) - expected).max() <= 1e-5


def test_bfloat16_compute():
    """bf16 compute (params stay float32): float32 logits close to the float32 model, bf16 cache."""
    state = nnx.state(LLM(TINY, rngs=nnx.Rngs(5)))
    cfg = dataclasses.replace(TINY, dtype="bfloat16")
    model = nnx.merge(nnx.graphdef(abstract_llm(cfg)), state)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tokens = _tokens((2, 12), seed=6)
    ours = _forward(model, tokens)
    assert ours.dtype == np.float32
    reference = _forward(nnx.merge(nnx.graphdef(abstract_llm(TINY)), state), tokens)
    assert np.abs(ours - reference).max() <= 0.05 * np.abs(reference).max()
    assert model.init_cache(2, 8).k.dtype == jnp.bfloat16


def test_config_translation_and_errors():
    base = {**TINY_HF, "model_type": "llama", "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "default", "rope_theta": 12345.0}}
    cfg = llama_config_from_hf(base, dtype="bfloat16", scan_layers=False)
    assert (cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.rope_theta) == (64, 4, 2, 16, 12345.0)
    assert cfg.tie_embeddings and cfg.dtype == "bfloat16" and not cfg.scan_layers
    # transformers-4 style keys (top-level rope_theta, rope_scaling) are read too.
    old_scaling = {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}
    old = {**TINY_HF, "rope_theta": 500000.0, "rope_scaling": {**old_scaling, "type": "llama3"}}
    assert llama_config_from_hf(old).rope_scaling == (8.0, 1.0, 4.0, 64)
    assert llama_config_from_hf(old).rope_theta == 500000.0
    # Round trip through the HF dict.
    assert llama_config_from_hf(llm_config_to_hf(cfg), dtype="bfloat16", scan_layers=False) == cfg
    # Vicuna-7B v1.5's config.json (transformers 4.31 format) is exactly our default config.
    vicuna = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
              "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
              "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
              "num_hidden_layers": 32, "num_key_value_heads": 32, "pad_token_id": 0, "pretraining_tp": 1,
              "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False, "torch_dtype": "float16",
              "transformers_version": "4.31.0", "use_cache": True, "vocab_size": 32000}
    assert llama_config_from_hf(vicuna) == LLMConfig()
    mistral = {**TINY_HF, "model_type": "mistral", "sliding_window": 32}
    assert llama_config_from_hf(mistral).max_seq_len == 32
    bad = [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"model_type": "gpt2"}, "gpt2"),
        ({"hidden_act": "gelu"}, "gelu"),
    ]
    for change, message in bad:
        with pytest.raises(ValueError, match=message):
            llama_config_from_hf({**TINY_HF, **change})
    with pytest.raises(ValueError, match="unknown LLMConfig override"):
        llama_config_from_hf(TINY_HF, not_a_field=1)
    with pytest.raises(ValueError, match="remat"):
        LLMConfig(remat="sometimes")
