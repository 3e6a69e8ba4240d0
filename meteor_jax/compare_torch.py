"""The same geometry through transformers (PyTorch, CPU) and through our models, timed in one process.

`compare()` builds a seeded random `LlavaForConditionalGeneration`, saves it and converts it through the real
loader (convert/llava.py), so both sides hold identical weights; it checks the logits agree (a wrong conversion
would make the timings meaningless), then times with as many torch threads as this process may use (XLA's CPU
backend runs on all of them):

  llava       transformers' LLaVA on all N visual tokens: fwd+bwd (loss on the answer tokens) and forward
  mlp         ours, LLaVA's mlp2x_gelu projector on all N tokens (equal work)
  meteor_K    ours, Meteor (fusion + selection, random-initialised there) keeping K tokens, per K in `keeps`
  llama       transformers' LlamaForCausalLM alone at LLaVA's sequence length (N + text), same weights
  decoder     our LLM alone at that length (its ratio is against llama)

Each row: median seconds of `steps` timed calls after `warmup` untimed ones, every row's calls taken in turn
(round-robin, so load from other processes that comes and goes weighs on both sides alike), for fwd+bwd
(gradients of every trained parameter; transformers zeroes its gradients each step) and forward only (prefill:
logits of every position); ratio = reference seconds / ours (> 1: ours faster). Each side's fwd+bwd is its own
training loss: transformers' computes the logits of every position, ours (`Meteor.loss`, `LLM.next_token_nll`)
runs the output head only over blocks of `llm.loss_block` positions holding a trained target
(models/cross_entropy.py); the loss and gradients are the same (the parity check compares the losses).

  python -c "from meteor_jax import compare_torch as c; print(c.format_table(c.compare()))"

Random weights: speed does not depend on the values. Requires torch and transformers (requirements-test.txt).
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
import time
from typing import Callable

import numpy as np

# The issue's geometry: CLIP 336px/14 (576 patches) at width 256 x 4 layers; SmolLM2-135M's decoder with 8 layers.
VISION = dict(image_size=336, patch_size=14, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
              intermediate_size=1024)
TEXT = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=100000.0,
            tie_word_embeddings=True)


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _interleaved_medians(calls: dict[str, dict[str, Callable[[], object]]], steps: int, warmup: int) -> dict:
    """{row: {metric: median seconds}}. The calls are timed round-robin (step 1 of every call, then step 2, ...)
    so that load from other processes, which comes and goes, weighs on every row alike and the ratios hold."""
    for metrics in calls.values():
        for fn in metrics.values():
            for _ in range(warmup):
                fn()
    times = {row: {m: [] for m in metrics} for row, metrics in calls.items()}
    for _ in range(steps):
        for row, metrics in calls.items():
            for m, fn in metrics.items():
                t0 = time.perf_counter()
                fn()
                times[row][m].append(time.perf_counter() - t0)
    return {row: {m: statistics.median(t) for m, t in metrics.items()} for row, metrics in times.items()}


def random_llava(vision: dict, text: dict, seed: int):
    """A seeded random LlavaForConditionalGeneration (eval mode) whose every parameter matters to its logits."""
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text),
                         image_token_index=text["vocab_size"] - 1, projector_hidden_act="gelu",
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         tie_word_embeddings=text.get("tie_word_embeddings", False))
    model = LlavaForConditionalGeneration(config).float()
    with torch.no_grad():  # HF's init (std 0.02, norms 1, biases 0) would hide conversion mistakes from the check
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.2)
            elif name.endswith("bias") or "embedding" in name:
                p.normal_(0.0, 0.3)
            elif p.ndim == 2:  # linear layers and the token embedding: unit-scale activations
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model.eval()  # dropout off; gradients still flow where torch.no_grad is not used


def _hf_decoder(llava, text: dict):
    """transformers' LlamaForCausalLM holding the LLaVA's language model weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(**text)).float().eval()
    state = {"model." + k: v for k, v in llava.model.language_model.state_dict().items()}
    state["lm_head.weight"] = llava.lm_head.weight
    model.load_state_dict(state, strict=not text.get("tie_word_embeddings", False))
    return model


def _batch(rng, *, batch: int, keep: int, text_len: int, answer_len: int, instruction_len: int, image_size: int,
           vocab: int, image_token: int) -> dict[str, np.ndarray]:
    """[BOS, K image slots, text_len - 1 text tokens], every row full; the last `answer_len` tokens are trained."""
    text = rng.integers(3, vocab - 1, size=(batch, text_len))
    text[:, 0] = 1
    tokens = np.concatenate([text[:, :1], np.full((batch, keep), image_token), text[:, 1:]], axis=1).astype(np.int32)
    labels = np.full(tokens.shape, -100, np.int32)
    labels[:, -answer_len:] = tokens[:, -answer_len:]
    return dict(pixels=rng.normal(size=(batch, image_size, image_size, 3)).astype(np.float32), tokens=tokens,
                mask=np.ones(tokens.shape, bool), image_mask=tokens == image_token, labels=labels,
                instruction=text[:, 1:1 + instruction_len].astype(np.int32),
                instruction_mask=np.ones((batch, instruction_len), bool))


def _torch_calls(model, inputs: dict) -> dict[str, Callable[[], object]]:
    import torch

    def train_step():
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    def forward():
        with torch.inference_mode():
            model(**{k: v for k, v in inputs.items() if k != "labels"}).logits

    return dict(fwd_bwd=train_step, forward=forward)


def _jax_calls(loss_fn, forward_fn, params, batch) -> dict[str, Callable[[], object]]:
    import jax

    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    fwd = jax.jit(forward_fn)
    return dict(fwd_bwd=lambda: jax.block_until_ready(grad_fn(params, batch)),
                forward=lambda: jax.block_until_ready(fwd(params, batch)))


def compare(*, vision: dict | None = None, text: dict | None = None, fusion: dict | None = None, batch: int = 2,
            text_len: int = 64, answer_len: int = 32, instruction_len: int = 32, keeps: tuple[int, ...] = (576, 64),
            steps: int = 3, warmup: int = 1, seed: int = 0, train_vision: bool = True, parity_tol: float = 1e-3,
            decoder: bool = True) -> dict:
    """Time transformers' LLaVA against ours on one geometry (module docstring); returns a JSON-able report.

    `vision` / `text`: CLIPVisionConfig / LlamaConfig fields (default: the issue's VISION, TEXT); `fusion`:
    FusionConfig overrides for the Meteor rows (default: dim = the vision width, the backend's fastest scan).
    `train_vision`: the vision tower is trained on both sides (False: frozen on both). Raises if our logits differ
    from transformers' by more than `parity_tol` (max |Δ|)."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx

    from meteor_jax.convert.llava import load_llava, meteor_config_from_llava
    from meteor_jax.models.fusion import FusionConfig
    from meteor_jax.models.meteor import Meteor
    from meteor_jax.models.selection import SelectionConfig

    vision, text = dict(VISION, **(vision or {})), dict(TEXT, **(text or {}))
    threads = _threads()
    torch.set_num_threads(threads)
    num_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    image_token = text["vocab_size"] - 1
    rng = np.random.default_rng(seed)
    shape = dict(batch=batch, text_len=text_len, answer_len=answer_len, instruction_len=instruction_len,
                 image_size=vision["image_size"], vocab=text["vocab_size"], image_token=image_token)
    full = _batch(rng, keep=num_patches, **shape)

    hf = random_llava(vision, text, seed)
    hf.model.vision_tower.requires_grad_(train_vision)
    hf_inputs = dict(input_ids=torch.as_tensor(full["tokens"], dtype=torch.long),
                     pixel_values=torch.as_tensor(full["pixels"].transpose(0, 3, 1, 2).copy()),
                     attention_mask=torch.ones(full["tokens"].shape, dtype=torch.long),
                     labels=torch.as_tensor(full["labels"], dtype=torch.long))

    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        base = meteor_config_from_llava(tmp, projector="mlp")
        base = dataclasses.replace(base, vision=dataclasses.replace(base.vision, trainable=train_vision))
        # The fastest scan of each backend: on CPU the Pallas kernel in interpret mode (plain XLA loops, 0.63x the
        # sequential scan's fwd+bwd time at this geometry; `bench --scan 2,608,512,16`); elsewhere the chunked
        # scan, since the kernel has not been compiled for a GPU or TPU yet.
        scan_impl = "pallas" if jax.default_backend() == "cpu" else "chunked"
        fusion_cfg = FusionConfig(**{"dim": vision["hidden_size"], "scan_impl": scan_impl, **(fusion or {})})
        variants = {"mlp": (base, num_patches)}
        for k in keeps:
            variants[f"meteor_{k}"] = (dataclasses.replace(base, projector="meteor", fusion=fusion_cfg,
                                                           selection=SelectionConfig(keep=k)), k)
        models = {}
        for name, (cfg, _) in variants.items():
            model = Meteor(cfg, rngs=nnx.Rngs(seed))  # what the checkpoint lacks (Meteor's fusion) stays random
            for module, state in load_llava(tmp, cfg).items():
                nnx.update(getattr(model, module), state)
            models[name] = model
    # What is differentiated: every parameter, or all but a frozen tower's (stop_gradient would make those zero).
    trained = nnx.Param if train_vision else nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision")))

    def meteor_fns(model):
        graphdef, params, rest = nnx.split(model, trained, ...)

        def forward(p, b):
            return nnx.merge(graphdef, p, rest)(b)

        def loss(p, b):  # the train step's loss (the head only over blocks of positions with a target)
            total, count = nnx.merge(graphdef, p, rest).loss(b)
            return total / count  # the mean, as transformers' loss

        return params, loss, forward

    # Parity: transformers' logits against ours (mlp projector, all tokens) on the same batch and weights.
    params, loss, forward = meteor_fns(models["mlp"])
    jbatch = {k: jnp.asarray(v) for k, v in full.items()}
    ours_logits = np.asarray(jax.jit(forward)(params, jbatch))
    with torch.inference_mode():
        hf_logits = hf(**{k: v for k, v in hf_inputs.items() if k != "labels"}).logits.numpy()
        hf_loss = float(hf(**hf_inputs).loss)
    ours_loss = float(jax.jit(loss)(params, jbatch))  # also checks the blockwise loss against transformers' loss
    max_diff = float(np.abs(ours_logits - hf_logits).max())
    if not (max_diff <= parity_tol and abs(hf_loss - ours_loss) <= parity_tol):
        raise AssertionError(f"logits of ours and transformers' LLaVA differ by max |Δ| {max_diff:.3e} (loss "
                             f"{ours_loss:.6f} vs {hf_loss:.6f}), above {parity_tol:g}: the conversion is wrong")

    tokens = {"llava": int(full["tokens"].shape[1])}
    calls = {"llava": _torch_calls(hf, hf_inputs)}
    for name, (_, k) in variants.items():
        b = full if k == num_patches else _batch(np.random.default_rng(seed), keep=k, **shape)
        params, loss, forward = meteor_fns(models[name])
        tokens[name] = int(b["tokens"].shape[1])
        calls[name] = _jax_calls(loss, forward, params, {key: jnp.asarray(v) for key, v in b.items()})

    if decoder:  # the language models alone, same weights, at LLaVA's sequence length
        seq = full["tokens"].shape[1]
        ids = np.random.default_rng(seed + 1).integers(3, text["vocab_size"], size=(batch, seq))
        labels = np.full(ids.shape, -100)
        labels[:, -answer_len:] = ids[:, -answer_len:]
        tokens["llama"] = tokens["decoder"] = seq
        calls["llama"] = _torch_calls(
            _hf_decoder(hf, text), dict(input_ids=torch.as_tensor(ids), labels=torch.as_tensor(labels),
                                        attention_mask=torch.ones(ids.shape, dtype=torch.long)))
        graphdef, params, rest = nnx.split(models["mlp"].llm, nnx.Param, ...)

        def llm_logits(p, b):
            llm = nnx.merge(graphdef, p, rest)
            return llm(llm.embed_tokens(b["tokens"]))[0]

        def llm_loss(p, b):
            llm = nnx.merge(graphdef, p, rest)
            nll, count = llm.next_token_nll(llm(llm.embed_tokens(b["tokens"]), return_hidden=True)[0], b["labels"])
            return jnp.sum(nll) / count

        db = dict(tokens=jnp.asarray(ids, jnp.int32), labels=jnp.asarray(labels, jnp.int32))
        calls["decoder"] = _jax_calls(llm_loss, llm_logits, params, db)

    rows = {name: dict(tokens=tokens[name], **t) for name, t in _interleaved_medians(calls, steps, warmup).items()}

    for name, row in rows.items():  # reference / ours: the LLaVA rows against llava, our decoder against llama
        ref = rows["llama"] if name == "decoder" else rows["llava"]
        if name not in ("llava", "llama"):
            row.update({f"{m}_ratio": round(ref[m] / row[m], 3) for m in ("fwd_bwd", "forward")})
    for row in rows.values():
        row.update({m: round(row[m], 4) for m in ("fwd_bwd", "forward")})
    return dict(geometry=dict(vision=vision, text=text, fusion=dataclasses.asdict(fusion_cfg), batch=batch,
                              text_len=text_len, answer_len=answer_len, visual_tokens=num_patches,
                              train_vision=train_vision, dtype="float32"),
                threads=threads, steps=steps, warmup=warmup, jax_backend=jax.default_backend(),
                glibc_tunables=os.environ.get("GLIBC_TUNABLES", ""),  # huge pages or not (meteor_jax/cli.py)
                torch_attention=hf.config._attn_implementation,
                parity=dict(max_abs_logits_diff=max_diff, logits_scale=float(np.abs(hf_logits).max()),
                            loss_ours=ours_loss, loss_transformers=hf_loss),
                rows=rows)


def format_table(report: dict) -> str:
    """The report's rows as an aligned text table (seconds, and reference / ours: > 1 means ours is faster)."""
    g = report["geometry"]
    head = (f"float32, {report['threads']} threads (torch = XLA), batch {g['batch']}, {g['visual_tokens']} visual + "
            f"{g['text_len']} text tokens, median of {report['steps']} steps; torch attention "
            f"{report['torch_attention']}; Meteor scan {g['fusion']['scan_impl']}; logits max |Δ| "
            f"{report['parity']['max_abs_logits_diff']:.2e} (scale {report['parity']['logits_scale']:.1f}); "
            f"GLIBC_TUNABLES={report['glibc_tunables'] or '(unset)'}")
    lines = [head, f"{'':<12}{'tokens':>7}{'fwd+bwd s':>11}{'ratio':>8}{'forward s':>11}{'ratio':>8}"]
    for name, r in report["rows"].items():
        ratio = lambda m: f"{r[m]:>8.2f}" if m in r else f"{'ref':>8}"  # noqa: E731
        lines.append(f"{name:<12}{r['tokens']:>7}{r['fwd_bwd']:>11.3f}{ratio('fwd_bwd_ratio')}"
                     f"{r['forward']:>11.3f}{ratio('forward_ratio')}")
    return "\n".join(lines)
