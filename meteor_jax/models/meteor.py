"""LLaVA-Meteor: image → vision → Flash Global Fusion(instruction) → Visual-Native Selection →
K image slots spliced into the token embeddings → LLM → logits, masked next-token loss, generation.

`MeteorConfig.projector` swaps the fusion + selection step for a baseline projector (models/projectors.py:
LLaVA-1.5's MLP on all tokens, average pooling, [CLS]-attention pruning, random K) on the same pipeline; the
projector is the top-level module `fusion` either way."""
from __future__ import annotations

import dataclasses
import typing
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from meteor_jax.models.fusion import FlashGlobalFusion, FusionConfig
from meteor_jax.models.layers import GridPositionEmbedding, mesh_of, shard_batch
from meteor_jax.models.llm import LLM, LLMConfig
from meteor_jax.models.projectors import BaselineProjector, check_projector
from meteor_jax.models.selection import Selection, SelectionConfig, gumbel_noise, select
from meteor_jax.models.vision import VisionConfig, VisionTower

VISUAL_POSITIONS = ("none", "grid", "grid_scored")

# What a batch holds (all static shapes; produced by the data pipeline):
#   pixels            (B, H, W, C) float   normalised image (a blank image for text-only samples)
#   tokens            (B, T) int32         token ids; the K image slots hold any id (overwritten)
#   mask              (B, T) bool          real tokens (padding False)
#   image_mask        (B, T) bool          exactly K True per sample with an image, none without
#   instruction       (B, M) int32         first user turn without the image placeholder (for fusion/selection)
#   instruction_mask  (B, M) bool
#   labels            (B, T) int32         target ids aligned with tokens, IGNORE_INDEX where not trained


@dataclasses.dataclass(frozen=True)
class MeteorConfig:
    vision: VisionConfig = VisionConfig()
    fusion: FusionConfig = FusionConfig()  # used by projector "meteor" only
    selection: SelectionConfig = SelectionConfig()  # keep (K) applies to every projector
    llm: LLMConfig = LLMConfig()
    # How the N patch features become K visual tokens: one of models.projectors.PROJECTORS. A baseline computes
    # in fusion.dtype and draws `random` with selection.seed.
    projector: str = "meteor"
    # "grid": add learned row and column embeddings of each kept token's patch-grid cell to the visual tokens
    # (layers.GridPositionEmbedding, parameters fusion.grid_position.*), after selection, so the experts score
    # the fusion's output alone; "grid_scored": the same table added to all N fused tokens before selection, so the
    # native expert compares the question with each token's cell too (a question that names a place, "row 3
    # column 5", needs it: the decoder reads places from this table, so the fusion's output need not carry them);
    # the kept tokens are the same sums either way. "none": LLaVA's projector output as is.
    visual_positions: str = "none"

    def __post_init__(self):
        if self.visual_positions not in VISUAL_POSITIONS:
            raise ValueError(f"model.visual_positions={self.visual_positions!r}; expected one of {VISUAL_POSITIONS}")
        if self.selection.keep > self.vision.num_patches:
            raise ValueError(
                f"selection.keep={self.selection.keep} exceeds the {self.vision.num_patches} visual tokens "
                f"of a {self.vision.image_size}px image with {self.vision.patch_size}px patches"
            )
        check_projector(self.projector, self.selection.keep, self.vision.grid)


def config_from_dict(model: Mapping[str, Mapping[str, Any]]) -> MeteorConfig:
    """A MeteorConfig from plain mappings of its sections' fields (e.g. `config.model` of a run config, which
    `meteor_jax.config.validate` has checked field by field)."""
    hints = typing.get_type_hints(MeteorConfig)
    unknown = set(model) - set(hints)
    if unknown:
        raise ValueError(f"unknown model section(s) {sorted(unknown)}; known: {sorted(hints)}")
    return MeteorConfig(**{name: cls(**dict(model[name])) if dataclasses.is_dataclass(cls) else model[name]
                           for name, cls in hints.items() if name in model})


def splice_image_tokens(embeddings: jax.Array, image_tokens: jax.Array, image_mask: jax.Array) -> jax.Array:
    """Write the K image tokens, in order, into the K slots marked by image_mask (static shapes)."""
    slot = jnp.clip(jnp.cumsum(image_mask, axis=1) - 1, 0, image_tokens.shape[1] - 1)
    gathered = jnp.take_along_axis(image_tokens, slot[..., None], axis=1).astype(embeddings.dtype)
    return jnp.where(image_mask[..., None], gathered, embeddings)


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """RoPE positions counting real tokens only, so left- and right-padding both work."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


class Meteor(nnx.Module):
    def __init__(self, cfg: MeteorConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.vision = VisionTower(cfg.vision, rngs=rngs)
        dims = dict(vision_dim=cfg.vision.width, llm_dim=cfg.llm.dim, grid=cfg.vision.grid)
        if cfg.projector == "meteor":
            self.fusion = FlashGlobalFusion(cfg.fusion, **dims, rngs=rngs)
        else:  # a baseline: the same module slot (and name) so trainable/init/checkpoints treat it alike
            self.fusion = BaselineProjector(cfg.projector, **dims, keep=cfg.selection.keep, seed=cfg.selection.seed,
                                            dtype=cfg.fusion.dtype, rngs=rngs)
        if cfg.visual_positions != "none":  # part of the projector, so `trainable=("fusion",)` trains it
            self.fusion.grid_position = GridPositionEmbedding(cfg.vision.grid, cfg.llm.dim, rngs=rngs)
        self.llm = LLM(cfg.llm, rngs=rngs)

    def visual_tokens(self, pixels: jax.Array, instruction: jax.Array, instruction_mask: jax.Array, *,
                      sample: bool = False) -> Selection:
        """The K selected, fused visual tokens (B, K, d_llm) and the experts' scores. `sample` (training with
        selection.estimator="reinforce"): draw the K tokens from the scores, with the draw's log-probability."""
        return self._selections(pixels, instruction, instruction_mask, (sample,))[0]

    def _selections(self, pixels: jax.Array, instruction: jax.Array, instruction_mask: jax.Array,
                    samples: tuple[bool, ...]) -> list[Selection]:
        """One `visual_tokens` result per entry of `samples` (drawn or top K), from one pass of the vision tower and
        the fusion (reinforce's greedy baseline needs the draw and the top K of the same fused tokens)."""
        # Activations stay split over the batch axes (see layers.shard_batch: otherwise XLA may gather the global
        # batch on every device where they meet fsdp-sharded weights).
        mesh = mesh_of(self.llm.embed.embedding[...])
        features, cls_attention = (shard_batch(x, mesh) for x in self.vision(pixels))
        if self.cfg.projector != "meteor":  # baselines never look at the instruction, nor draw
            selections = [self.fusion(features, cls_attention, pixels)] * len(samples)
        else:
            text = shard_batch(self.llm.embed_tokens(instruction), mesh)
            fused = shard_batch(self.fusion(features, text, instruction_mask), mesh)
            if self.cfg.visual_positions == "grid_scored":
                cells = jnp.broadcast_to(jnp.arange(fused.shape[1]), fused.shape[:2])
                fused = fused + self.fusion.grid_position(cells).astype(fused.dtype)
            selections = []
            for sample in samples:
                noise = None
                if sample:
                    noise = gumbel_noise(pixels, instruction, fused.shape[1], self.cfg.selection.seed)
                selections.append(select(fused, cls_attention, text, instruction_mask, self.cfg.selection, noise))
        if self.cfg.visual_positions == "grid" or (self.cfg.visual_positions == "grid_scored"
                                                   and self.cfg.projector != "meteor"):  # the kept tokens' cells
            selections = [s._replace(tokens=s.tokens + self.fusion.grid_position(s.indices).astype(s.tokens.dtype))
                          for s in selections]
        return selections

    def embed_inputs(self, batch: Mapping[str, jax.Array], selected: Selection | None = None) -> jax.Array:
        embeddings = shard_batch(self.llm.embed_tokens(batch["tokens"]), mesh_of(self.llm.embed.embedding[...]))
        if selected is None:
            selected = self.visual_tokens(batch["pixels"], batch["instruction"], batch["instruction_mask"])
        return splice_image_tokens(embeddings, selected.tokens, batch["image_mask"])

    def __call__(self, batch: Mapping[str, jax.Array], selected: Selection | None = None) -> jax.Array:
        """Logits (B, T, V), float32. `selected`: visual tokens already chosen (default: `visual_tokens`)."""
        logits, _ = self.llm(
            self.embed_inputs(batch, selected), positions=positions_from_mask(batch["mask"]), mask=batch["mask"]
        )
        return logits

    def nll(self, batch: Mapping[str, jax.Array], selected: Selection | None = None) -> tuple[jax.Array, jax.Array]:
        """(B, T) next-token NLL of batch["labels"] and the target count: `next_token_nll(self(batch, selected),
        labels)` without the (B, T, V) logits (`LLM.next_token_nll`)."""
        hidden, _ = self.llm(self.embed_inputs(batch, selected), positions=positions_from_mask(batch["mask"]),
                             mask=batch["mask"], return_hidden=True)
        return self.llm.next_token_nll(hidden, batch["labels"])

    def loss(self, batch: Mapping[str, jax.Array], *, train: bool = False) -> tuple[jax.Array, jax.Array]:
        """(sum of next-token cross-entropy over trained positions, number of trained positions).

        Returned as a sum and a count so micro-batches and data-parallel shards average over all valid
        tokens of the global batch, not per shard.

        `train` with selection.estimator="reinforce" (Meteor only): the K tokens are sampled from the selection
        scores, and the gradient gains the score-function term sum_b (L_b - baseline_b) * grad log p(selection_b),
        L_b the sample's summed NLL and baseline_b the batch's mean L (selection.baseline="batch") or the sample's L
        with the top K kept ("greedy"): the scores learn which draws lowered the loss, dropped tokens included.
        `train` with selection.distill > 0 (Meteor only) adds distill * the native expert's cross-entropy to the
        decoder's saliency (`_saliency_cross_entropy`). The returned value is the plain NLL of the tokens the decoder
        saw (the extra terms are added as t - stop_gradient(t)).
        """
        cfg = self.cfg
        meteor = train and cfg.projector == "meteor"
        sample = meteor and cfg.selection.estimator == "reinforce" and cfg.selection.keep < cfg.vision.num_patches
        distill = meteor and cfg.selection.distill > 0
        if not (sample or distill):  # nothing drawn (keep = N draws nothing) and nothing distilled
            nll, count = self.nll(batch)
            return jnp.sum(nll), count
        greedy = sample and cfg.selection.baseline == "greedy"
        selected, *top_k = self._selections(batch["pixels"], batch["instruction"], batch["instruction_mask"],
                                            (sample, False) if greedy else (sample,))
        nll, count = self.nll(batch, selected)
        extra = jnp.float32(0.0)
        if sample:
            per_sample = jax.lax.stop_gradient(jnp.sum(nll, axis=1))
            if greedy:  # the same sample's NLL with the top K, as evaluation keeps them
                baseline = jax.lax.stop_gradient(jnp.sum(self.nll(batch, top_k[0])[0], axis=1))
            else:
                baseline = jnp.mean(per_sample)
            extra += jnp.sum((per_sample - baseline) * selected.log_prob)
        if distill:
            extra += cfg.selection.distill * jnp.sum(self._saliency_cross_entropy(batch, selected))
        return jnp.sum(nll) + (extra - jax.lax.stop_gradient(extra)), count

    def _saliency_cross_entropy(self, batch: Mapping[str, jax.Array], selected: Selection) -> jax.Array:
        """(B,) cross-entropy from the decoder's saliency over the K tokens it was given, p_k ∝ ‖∂NLL/∂token_k‖²
        (a constant: one more decoder forward and backward, to the tokens only), to the native expert's score
        renormalised over the same K tokens (selection.distill)."""
        tokens = jax.lax.stop_gradient(selected.tokens)

        def total_nll(tokens):
            return jnp.sum(self.nll(batch, selected._replace(tokens=tokens))[0])

        grad = jax.lax.stop_gradient(jax.grad(total_nll)(tokens)).astype(jnp.float32)
        energy = jnp.sum(grad * grad, axis=-1)  # (B, K)
        target = energy / jnp.maximum(jnp.sum(energy, axis=-1, keepdims=True), 1e-30)
        native = jnp.take_along_axis(selected.native_score, selected.indices, axis=1)
        log_q = jnp.log(jnp.maximum(native, 1e-30)) - jnp.log(jnp.maximum(jnp.sum(native, -1, keepdims=True), 1e-30))
        return -jnp.sum(target * log_q, axis=-1)


def sample_token(logits: jax.Array, rng: jax.Array | None, temperature: float = 0.0, top_p: float = 1.0) -> jax.Array:
    """Greedy when temperature == 0; else temperature sampling restricted to the top-p nucleus."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng key")
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least the best token).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(
    model: Meteor,
    batch: Mapping[str, jax.Array],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Batched decoding with a KV cache: prefill the (left-padded) prompts with their images, then one token
    per step until every row produced EOS or max_new_tokens. Returns (tokens (B, max_new_tokens) padded with
    pad_id after EOS, number of generated tokens per row including EOS)."""
    llm = model.llm
    mask = batch["mask"]
    b, t = mask.shape
    if rng is None:
        rng = jax.random.key(0)
    cache = llm.init_cache(b, t + max_new_tokens)
    logits, cache = llm(model.embed_inputs(batch), positions=positions_from_mask(mask), mask=mask, cache=cache)
    rng, step_rng = jax.random.split(rng)
    token = sample_token(logits[:, -1], step_rng, temperature, top_p)
    position = jnp.sum(mask, axis=1).astype(jnp.int32)  # position of the first generated token
    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    done = token == eos_id
    length = jnp.ones((b,), jnp.int32)

    def cond(carry):
        step, _, _, _, done, _, _ = carry
        return (step < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token, position, cache, done, out, length = carry
        logits, cache = llm(
            llm.embed_tokens(token[:, None]), positions=position[:, None], mask=jnp.ones((b, 1), bool), cache=cache
        )
        token = sample_token(logits[:, -1], jax.random.fold_in(rng, step), temperature, top_p)
        token = jnp.where(done, pad_id, token)
        out = out.at[:, step].set(token)
        length = length + (~done).astype(jnp.int32)
        done = done | (token == eos_id)
        return step + 1, token, position + 1, cache, done, out, length

    carry = (jnp.int32(1), token, position, cache, done, out, length)
    *_, out, length = jax.lax.while_loop(cond, body, carry)
    return out, length
