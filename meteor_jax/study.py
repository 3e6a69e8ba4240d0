"""Accuracy against kept visual tokens, projector by projector: every variant trained on the same data for the same
budget by the main job's own loop, then scored on the config's eval split.

  python -m meteor_jax.study --config configs/demo.py --workdir DIR \
      --projectors meteor,mlp,pool,cls_prune,random --keep 4,8,16,64 [--config.train.num_steps=600 ...]
  python -m meteor_jax.study --config configs/shapes.py --workdir DIR \
      --projectors meteor:4:16,pool,cls_prune,random,mlp --keep 4 \
      --ground_truth /tmp/meteor_shapes_v2/test_ground_truth.jsonl   # meteor at 4 and 16 tokens, the others at 4

Each (variant, K) is a whole run in DIR/VARIANT-kK (results.json, metrics, checkpoints, and its table row
study_row.json): a study that stops resumes where it stopped, and finished runs are reused. `mlp` (LLaVA-1.5's
projector) always sees all N tokens, so it runs once whatever --keep says; a variant that cannot keep K tokens (pool
needs a square K dividing the grid) is skipped with the reason in the table. Writes DIR/study.json, DIR/study.md
(the table and the project's targets) and DIR/study.png (exact match, train step time and prefill time against kept
tokens). With --ground_truth (JSON lines keyed by question_id, with a `question_type` field, such as the shapes
generator's test_ground_truth.jsonl), the table also gives each variant's exact match per question type, and where
the ground truth has the asked object's `bbox` (the shapes generator's does), how often the trained selection keeps a
token on that object, against chance (`selection_coverage`; for projectors whose tokens are single patches).

Step time is the median over the run's logged intervals; prefill time is one jitted forward pass over a batch of
eval prompts (what generation does before its first new token), median of repeats after compilation.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import statistics
import time
from typing import Any, Mapping

import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from meteor_jax import cli

# Variant name → overrides of config.model. The baselines share the whole pipeline (vision tower, LLM, data, loop).
# The Meteor variants name the projector too, so a study from a config whose own projector is a baseline (e.g.
# configs/shapes.py, which trains the MLP) still trains Meteor.
VARIANTS: dict[str, dict[str, Any]] = {
    "meteor": dict(projector="meteor"),
    "mlp": dict(projector="mlp"),  # LLaVA-1.5 mlp2x_gelu on all N tokens
    "pool": dict(projector="pool"),  # average pooling to K (M3 / DeCo style)
    "cls_prune": dict(projector="cls_prune"),  # the K patches the [CLS] token attends to most (FasterVLM style)
    "random": dict(projector="random"),  # K random patches per image
    "meteor-visual": dict(projector="meteor", selection=dict(aggregate="visual")),  # the visual expert only
    "meteor-native": dict(projector="meteor", selection=dict(aggregate="native")),  # the instruction expert only
    "meteor-noinstr": dict(projector="meteor", fusion=dict(use_instruction=False)),  # no instruction in the fusion
    "meteor-nolocal": dict(projector="meteor", fusion=dict(local_kernel=0)),  # no local step before the scan
    "meteor-unidir": dict(projector="meteor", fusion=dict(bidirectional=False)),  # one scan direction
}

if __name__ == "__main__":  # flags only for the CLI: tests import run_study next to other entry points' flags
    config_flags.DEFINE_config_file("config", None, "The run config every variant starts from (`file.py:variant`).",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Study directory: one run directory per variant and K, and the tables.",
                        required=True)
    flags.DEFINE_list("projectors", ["meteor", "mlp", "pool", "cls_prune", "random"],
                      f"Variants to train: {', '.join(VARIANTS)}; `name:K:K...` trains that variant at its own "
                      "K values instead of --keep's (e.g. meteor:4:16,pool:4).")
    flags.DEFINE_list("keep", ["4", "8", "16", "64"], "Kept visual token counts (for variants without their own).")
    flags.DEFINE_string("ground_truth", None, "Ground truth of the eval split with a `question_type` per question "
                        "(.json or .jsonl keyed by question_id): adds exact match per question type to the table.")
    flags.DEFINE_integer("prefill_repeats", 5, "Timed prefill passes per variant (after one compiling pass).")
    FLAGS = flags.FLAGS


def _apply(model: dict, overrides: Mapping) -> None:
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            _apply(model[key], value)
        else:
            model[key] = value


def variant_config(config: ml_collections.ConfigDict, variant: str, keep: int) -> ml_collections.ConfigDict:
    """`config` with the variant's model overrides and K kept tokens (all N for `mlp`). The prompt length moves with
    the image slots, so the text keeps the room it had (`config.with_keep`). Raises ValueError (naming the field)
    when the variant cannot keep K tokens."""
    from meteor_jax import config as config_lib
    from meteor_jax.models.vision import VisionConfig

    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
    raw = config.to_dict()
    _apply(raw["model"], VARIANTS[variant])
    if raw["model"]["projector"] == "mlp":
        keep = VisionConfig(**raw["model"]["vision"]).num_patches
    checked, _ = config_lib.validate(config_lib.with_keep(raw, keep))
    return checked


def parse_variant(entry: str, keeps: list[int]) -> tuple[str, list[int]]:
    """`name` → (name, keeps); `name:K:K...` → (name, its own Ks). Raises ValueError on an unknown name or a K that
    is not a positive integer."""
    name, *own = entry.split(":")
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    try:
        ks = [int(k) for k in own] if own else list(keeps)
    except ValueError:
        raise ValueError(f"{entry!r}: the token counts after the variant's name must be integers") from None
    if not ks or min(ks) < 1:
        raise ValueError(f"{entry!r}: needs positive kept-token counts, got {ks}")
    return name, ks


def plan(config: ml_collections.ConfigDict, variants: list[str], keeps: list[int]) -> list[dict]:
    """[{variant, keep, name, config | skipped}] in order, `mlp` once (all tokens). A variant given as
    `name:K:K...` runs at its own K values instead of `keeps` (see `parse_variant`)."""
    rows, seen = [], set()
    for entry in variants:
        variant, variant_keeps = parse_variant(entry, keeps)
        for keep in variant_keeps:
            try:
                cfg = variant_config(config, variant, keep)
            except ValueError as e:  # the variant cannot keep K tokens: a row that says why
                rows.append(dict(variant=variant, keep=keep, name=f"{variant}-k{keep}", skipped=str(e)))
                continue
            kept = cfg.model.selection.keep
            if (variant, kept) in seen:
                continue
            seen.add((variant, kept))
            rows.append(dict(variant=variant, keep=kept, name=f"{variant}-k{kept}", config=cfg))
    return rows


def step_seconds(workdir) -> float | None:
    """Median train step time over the run's logged intervals (metrics.jsonl), None when none was logged."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return None
    times = [m["step_time"] for m in map(json.loads, path.read_text().splitlines()) if "step_time" in m]
    return statistics.median(times) if times else None


def prefill_seconds(config: ml_collections.ConfigDict, workdir, repeats: int) -> float:
    """One jitted forward pass (vision → projector → LLM over the whole prompt) over a batch of eval prompts, median
    of `repeats` after a compiling pass. Random weights: the time does not depend on their values."""
    import jax
    from flax import nnx

    from meteor_jax import sharding
    from meteor_jax.eval import answering
    from meteor_jax.run import Run

    job = Run.from_config(config)
    source = job.source(config.data.eval, workdir)
    tokenizer = job.tokenizer(workdir)  # the run's own (saved in its workdir by training)
    batch = sharding.global_batch(answering.prompt_batch(source, tokenizer, job.spec, config.eval.batch_size),
                                  job.mesh, job.rules)
    graphdef, params = job.random_params()

    @jax.jit
    def forward(params, batch):
        with sharding.logical_rules(job.rules):
            return nnx.merge(graphdef, params)(batch)

    jax.block_until_ready(forward(params, batch))  # compile
    return statistics.median(cli.timed(lambda: jax.block_until_ready(forward(params, batch)), repeats))


def accuracy_by_type(run_dir, ground_truth: Mapping[str, dict]) -> dict[str, float]:
    """Exact match per `question_type` of a run's answers (RUN_DIR/answers.jsonl, written by the trainer's
    evaluation), scored like the run's own exact match against the ground truth of the questions it answered."""
    from meteor_jax.eval import benchmarks

    answers = [json.loads(line) for line in (run_dir / "answers.jsonl").read_text().splitlines() if line.strip()]
    answered = {str(a.get("question_id")) for a in answers}
    # An unanswered ground-truth question is outside the run's eval split (eval.num_examples), not a wrong answer;
    # an answer to a question the ground truth lacks is an error (benchmarks.score names it).
    scores = benchmarks.score("easy_vqa", answers, {q: r for q, r in ground_truth.items() if q in answered})
    return {name: v["accuracy"] for name, v in scores.get("per_question_type", {}).items()}


# Projectors whose kept tokens are single patches, so "is a kept token on the asked object" has an answer (pool's
# tokens average windows; mlp keeps every patch).
PATCH_SELECTING = ("meteor", "cls_prune", "random")


def box_patches(bbox, width: int, height: int, image_size: int, patch_size: int) -> list[int]:
    """Raster indices of the model's patches that the box [x0, y0, x1, y1) (pixels of the original width×height
    image) touches, after the image is padded to a square (centred, as LLaVA's expand2square) and resized."""
    side = max(width, height)
    offset_x, offset_y = (side - width) // 2, (side - height) // 2
    scale = image_size / side / patch_size  # original pixels → patch units
    grid = image_size // patch_size
    x0, y0, x1, y1 = bbox
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"empty box {bbox}: expected [x0, y0, x1, y1) with x0 < x1 and y0 < y1")

    def cells(lo, hi, offset):
        first = max(int(math.floor((lo + offset) * scale)), 0)
        return range(first, min(int(math.ceil((hi + offset) * scale)), grid))

    return [r * grid + c for r in cells(y0, y1, offset_y) for c in cells(x0, x1, offset_x)]


def selection_coverage(run_dir, ground_truth: Mapping[str, dict], batch_size: int) -> dict | None:
    """Where a trained run's selection looks. For every eval question whose ground truth gives the asked object's
    `bbox` ([x0, y0, x1, y1) in the original image's pixels): `hit`, the share of questions with at least one kept
    token on a patch the box touches; `on_target`, the share of kept tokens on such patches; `chance_hit`, the hit
    rate of K patches drawn uniformly without replacement (exact, averaged over the same questions); `by_question`,
    the `question_dependence` of the kept sets; `visual_entropy` / `native_entropy`, the mean entropy (nats) of each
    expert's score over the N tokens, against `uniform_entropy` = log N (an expert at log N ranks nothing). None for
    a projector whose tokens are not single patches (pool, mlp), for a run that keeps every token, or when no
    question has a box."""
    import io

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from PIL import Image

    from meteor_jax import inference, sharding
    from meteor_jax.eval import answering

    model = inference.load_model(None, str(run_dir))
    if model.model_cfg.projector not in PATCH_SELECTING:
        return None
    vision, keep = model.model_cfg.vision, model.model_cfg.selection.keep
    n = vision.num_patches
    if keep == n:  # every token kept: nothing selected
        return None
    source = model.run.source(model.config.data.eval, run_dir)
    records = [source[i] for i in range(len(source))]
    records = [r for r in records if "bbox" in ground_truth.get(str(r["id"]), {}) and r.get("image_bytes")]
    if not records:
        return None

    @jax.jit
    def kept_indices_and_entropies(params, batch):
        with sharding.logical_rules(model.rules):
            selected = nnx.merge(model.graphdef, params).visual_tokens(
                batch["pixels"], batch["instruction"], batch["instruction_mask"])

        def entropy(p):  # nats, of each row's distribution over the N tokens (entr(0) = 0)
            return jnp.sum(jax.scipy.special.entr(p), axis=-1)

        return selected.indices, entropy(selected.visual_score), entropy(selected.native_score)

    rows = model.round_batch(batch_size)
    hits, on_target, chance, entropies = [], [], [], []
    kept_by_image: dict[bytes, list[tuple[int, ...]]] = {}
    for start in range(0, len(records), rows):
        chunk = records[start:start + rows]
        features = [answering.prompt_features(answering.prompt_record(r), model.tokenizer, model.spec) for r in chunk]
        features += features[-1:] * (rows - len(chunk))  # the last batch padded with its last row
        batch = sharding.global_batch({k: np.stack([f[k] for f in features]) for k in ("pixels", "instruction",
                                                                                         "instruction_mask")},
                                      model.mesh, model.rules, rows)
        indices, visual, native = (np.asarray(x)[:len(chunk)]
                                   for x in jax.device_get(kept_indices_and_entropies(model.params, batch)))
        entropies += zip(visual, native)
        for record, kept in zip(chunk, indices):
            width, height = Image.open(io.BytesIO(record["image_bytes"])).size  # the header only
            target = set(box_patches(ground_truth[str(record["id"])]["bbox"], width, height, vision.image_size,
                                     vision.patch_size))
            kept_by_image.setdefault(record["image_bytes"], []).append(tuple(int(i) for i in kept))
            count = sum(int(i) in target for i in kept)
            hits.append(count > 0)
            on_target.append(count / keep)
            chance.append(1 - math.comb(n - len(target), keep) / math.comb(n, keep))
    visual, native = np.mean(entropies, axis=0)
    return dict(questions=len(hits), hit=float(np.mean(hits)), on_target=float(np.mean(on_target)),
                chance_hit=float(np.mean(chance)), by_question=question_dependence(kept_by_image.values()),
                visual_entropy=float(visual), native_entropy=float(native), uniform_entropy=math.log(n))


def question_dependence(kept_sets_per_image) -> float | None:
    """Of all pairs of questions about the same image, the share whose kept token sets differ: 0 when the selection
    ignores the question (as `random` and `cls_prune` do), 1 when every question keeps its own set. None when no
    image has two questions."""
    differ = [a != b for kept in kept_sets_per_image for a, b in itertools.combinations(map(frozenset, kept), 2)]
    return sum(differ) / len(differ) if differ else None


def run_study(config: ml_collections.ConfigDict, workdir, variants: list[str], keeps: list[int], *,
              prefill_repeats: int = 5, ground_truth: Mapping[str, dict] | None = None) -> list[dict]:
    """Train and score every (variant, K) of the plan (reusing finished runs); write the study files; return rows.
    With `ground_truth` ({question_id: record with question_type}), each row also gets `by_type` exact match."""
    from meteor_jax import paths
    from meteor_jax.train import trainer

    if not config.data.eval:
        raise ValueError("config.data.eval is empty: a study scores every variant on an eval split")
    if ground_truth is not None and not any("question_type" in r for r in ground_truth.values()):
        raise ValueError("the ground truth has no question_type field: nothing to break the exact match down by")
    workdir = paths.workdir_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    config = ml_collections.ConfigDict(config.to_dict())
    if not config.data.data_dir:  # one tfds build for all the variants
        config.data.data_dir = str(workdir / "tfds")
    rows = plan(config, variants, keeps)
    todo = [r for r in rows if "config" in r]
    logging.info("study: %d runs (%s)%s", len(todo), ", ".join(r["name"] for r in todo),
                 "".join(f"; skipped {r['name']}: {r['skipped']}" for r in rows if "skipped" in r))
    out = []
    for i, row in enumerate(rows):
        if "skipped" in row:
            out.append({k: row[k] for k in ("variant", "keep", "name", "skipped")})
            continue
        cfg, run_dir = row["config"], workdir / row["name"]
        row_path = run_dir / "study_row.json"
        fingerprint = hashlib.sha256(cfg.to_json_best_effort(sort_keys=True).encode()).hexdigest()[:16]
        if row_path.exists():
            out.append(json.loads(row_path.read_text()))
            if out[-1].get("config_sha256") != fingerprint:
                raise ValueError(f"{run_dir} was trained with another config than this study's {row['name']}: "
                                 "use a new --workdir, or delete that run to retrain it")
            logging.info("study %d/%d %s: reusing %s", i + 1, len(rows), row["name"], row_path)
            continue
        t0 = time.perf_counter()
        logging.info("study %d/%d %s: training %d steps", i + 1, len(rows), row["name"], cfg.train.num_steps)
        results = trainer.run(cfg, run_dir)  # resumes from the run's latest checkpoint if it stopped
        prefill = prefill_seconds(cfg, run_dir, prefill_repeats)
        out.append(dict(variant=row["variant"], keep=row["keep"], name=row["name"],
                        tokens_total=results["visual_tokens_total"],
                        token_fraction=row["keep"] / results["visual_tokens_total"],
                        exact_match=results["test_accuracy"], test_examples=results["test_examples"],
                        train_steps=results["train_steps"], final_train_loss=results["final_train_loss"],
                        step_seconds=step_seconds(run_dir), prefill_seconds=prefill,
                        prefill_batch=cfg.eval.batch_size, projector_params=results["parameters"].get("fusion", 0),
                        config_sha256=fingerprint))
        row_path.write_text(json.dumps(out[-1], indent=2))
        logging.info("study %s: exact match %.4f, %.3f s/step, prefill %.1f ms (%.0f s)", row["name"],
                     out[-1]["exact_match"], out[-1]["step_seconds"] or math.nan, 1e3 * prefill,
                     time.perf_counter() - t0)
    if ground_truth is not None:
        boxes = any("bbox" in r for r in ground_truth.values())
        for row in out:
            if "exact_match" in row:
                row["by_type"] = accuracy_by_type(workdir / row["name"], ground_truth)
                selects = VARIANTS[row["variant"]]["projector"] in PATCH_SELECTING and row["keep"] < row["tokens_total"]
                if boxes and selects:  # no checkpoint read else
                    coverage = selection_coverage(workdir / row["name"], ground_truth, config.eval.batch_size)
                    if coverage is not None:
                        row["coverage"] = coverage
    summary = dict(config=config.to_dict(), rows=out, targets=targets(out))
    (workdir / "study.json").write_text(json.dumps(summary, indent=2, default=str))
    (workdir / "study.md").write_text(markdown(out, summary["targets"], source=config.data.eval))
    plot(out, workdir / "study.png")
    return out


def _best(rows: list[dict], variant: str, fraction: float) -> dict | None:
    """The variant's run whose kept fraction is closest to `fraction` (within a factor 1.5), or None."""
    runs = [r for r in rows if r["variant"] == variant and "exact_match" in r
            and abs(math.log(r["token_fraction"] / fraction)) <= math.log(1.5)]
    return min(runs, key=lambda r: abs(math.log(r["token_fraction"] / fraction)), default=None)


def targets(rows: list[dict]) -> list[dict]:
    """The project's promises, checked where the study has the runs: Meteor at ~25% of the tokens within 0.5 points
    of the all-token LLaVA projector; Meteor above random, pooling and [CLS] pruning at ~6% of the tokens."""
    checks = []
    mlp, meteor_25 = _best(rows, "mlp", 1.0), _best(rows, "meteor", 0.25)
    if mlp and meteor_25:
        gap = mlp["exact_match"] - meteor_25["exact_match"]
        checks.append(dict(target=f"meteor at {meteor_25['keep']}/{meteor_25['tokens_total']} tokens within 0.5 "
                                  "points of mlp on all tokens",
                           value=f"{meteor_25['exact_match']:.4f} vs {mlp['exact_match']:.4f}",
                           met=gap <= 0.005))
    meteor_6 = _best(rows, "meteor", 1 / 16)
    for baseline in ("random", "pool", "cls_prune"):
        other = _best(rows, baseline, 1 / 16)
        if meteor_6 and other and other["keep"] == meteor_6["keep"]:
            checks.append(dict(target=f"meteor beats {baseline} at {meteor_6['keep']}/{meteor_6['tokens_total']} "
                                      "tokens",
                               value=f"{meteor_6['exact_match']:.4f} vs {other['exact_match']:.4f}",
                               met=meteor_6["exact_match"] > other["exact_match"]))
    return checks


def markdown(rows: list[dict], checks: list[dict], source: str) -> str:
    types = sorted({t for r in rows for t in r.get("by_type", {})})  # exact match per question type, if scored
    covered = any("coverage" in r for r in rows)  # where the selection looks, if the ground truth has boxes
    lines = [f"Exact match on `{source}`, each variant trained with the same config and budget.", "",
             "| variant | kept tokens | exact match | " + "".join(f"{t} | " for t in types) +
             ("kept token on the asked object (chance) | kept set changes with the question | " if covered else "") +
             "train step (s) | prefill (ms / batch) | projector params | final train loss |",
             "|---|---|---|" + "---|" * (len(types) + 2 * covered) + "---|---|---|---|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['variant']} | {r['keep']} | skipped: {r['skipped']} | " +
                         "| " * (len(types) + 2 * covered) + "| | | |")
            continue
        coverage = ""
        if covered:
            c = r.get("coverage")
            changes = "–" if not c or c.get("by_question") is None else f"{c['by_question']:.3f}"
            coverage = f"{c['hit']:.3f} ({c['chance_hit']:.3f}) | {changes} | " if c else "– | – | "
        step = f"{r['step_seconds']:.3f}" if r["step_seconds"] is not None else "–"
        loss = f"{r['final_train_loss']:.3f}" if r["final_train_loss"] is not None else "–"
        by_type = "".join(f"{r['by_type'][t]:.4f} | " if t in r.get("by_type", {}) else "– | " for t in types)
        lines.append(f"| {r['variant']} | {r['keep']}/{r['tokens_total']} ({100 * r['token_fraction']:.0f}%) | "
                     f"{r['exact_match']:.4f} | {by_type}{coverage}{step} | {1e3 * r['prefill_seconds']:.1f} / "
                     f"{r['prefill_batch']} | {r['projector_params']:,} | {loss} |")
    if checks:
        lines += ["", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {c['target']} | {c['value']} | {'yes' if c['met'] else 'no'} |" for c in checks]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if "exact_match" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("exact_match", "exact match", 1), ("step_seconds", "train step (s)", 1),
              ("prefill_seconds", "prefill (ms per batch)", 1e3))
    for ax, (key, label, scale) in zip(axes, panels):
        for variant in dict.fromkeys(r["variant"] for r in done):
            points = sorted((r["keep"], r[key] * scale) for r in done if r["variant"] == variant and r[key] is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("visual tokens kept")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with path.open("wb") as f:  # a local path or a gs:// URL (etils epath)
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    try:
        keeps = [int(k) for k in FLAGS.keep]
    except ValueError:
        raise app.UsageError(f"--keep must be integers, got {FLAGS.keep}") from None
    if not keeps or min(keeps) < 1:
        raise app.UsageError(f"--keep needs positive token counts, got {FLAGS.keep}")
    for entry in FLAGS.projectors:
        try:
            parse_variant(entry, keeps)
        except ValueError as e:
            raise app.UsageError(f"--projectors: {e}") from None
    ground_truth = None
    if FLAGS.ground_truth:
        from meteor_jax.eval import benchmarks
        ground_truth = benchmarks.load_ground_truth(FLAGS.ground_truth)
    rows = run_study(FLAGS.config, FLAGS.workdir, FLAGS.projectors, keeps, prefill_repeats=FLAGS.prefill_repeats,
                     ground_truth=ground_truth)
    print(markdown(rows, targets(rows), FLAGS.config.data.eval))


if __name__ == "__main__":
    cli.run(main)
