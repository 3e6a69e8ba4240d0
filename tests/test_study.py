"""The projector study: variant configs, the target checks, and a whole study end to end on a tiny budget."""
import json

import numpy as np
import pytest

from configs import tiny
from meteor_jax import study
from meteor_jax.data import balance
from meteor_jax.data.tfds import easy_vqa_source


def test_variant_config_moves_the_prompt_with_the_image_slots():
    config = tiny.get_config()  # 32px images, 8px patches: N = 16, keep 4, max_len 32
    meteor = study.variant_config(config, "meteor", 9)
    assert (meteor.model.selection.keep, meteor.data.max_len, meteor.model.projector) == (9, 37, "meteor")
    mlp = study.variant_config(config, "mlp", 2)  # LLaVA-1.5's projector always sees all N tokens
    assert (mlp.model.selection.keep, mlp.data.max_len, mlp.model.projector) == (16, 44, "mlp")
    ablation = study.variant_config(config, "meteor-nolocal", 4)
    assert ablation.model.fusion.local_kernel == 0 and ablation.model.fusion.bidirectional
    assert study.variant_config(config, "meteor-unidir", 4).model.fusion.bidirectional is False
    assert study.variant_config(config, "meteor-native", 4).model.selection.aggregate == "native"
    assert config.model.selection.keep == 4 and config.model.projector == "meteor"  # the base config is untouched
    with pytest.raises(ValueError, match="unknown variant 'fgf'"):
        study.variant_config(config, "fgf", 4)
    with pytest.raises(ValueError, match=r"keep=2 must be one of \[1, 4, 16\]"):
        study.variant_config(config, "pool", 2)
    names = [(r["name"], "skipped" in r) for r in study.plan(config, ["mlp", "pool"], [2, 4])]
    assert names == [("mlp-k16", False), ("pool-k2", True), ("pool-k4", False)]  # mlp once
    # A variant with its own K values; the other variants take the study's.
    names = [r["name"] for r in study.plan(config, ["meteor:2:8", "pool"], [4])]
    assert names == ["meteor-k2", "meteor-k8", "pool-k4"]
    for bad, message in (("fgf:4", "unknown variant 'fgf'"), ("pool:four", "must be integers"),
                         ("pool:0", "positive")):
        with pytest.raises(ValueError, match=message):
            study.plan(config, [bad], [4])


def test_meteor_variants_train_meteor_from_a_baseline_config():
    config = tiny.get_config()
    config.model.projector = "mlp"  # as configs/shapes.py: the recipe's own projector is LLaVA-1.5's MLP
    for variant in ("meteor", "meteor-visual", "meteor-noinstr", "meteor-unidir"):
        cfg = study.variant_config(config, variant, 4)
        assert (cfg.model.projector, cfg.model.selection.keep) == ("meteor", 4), variant
    assert study.variant_config(config, "pool", 4).model.projector == "pool"


def _row(variant, keep, exact_match, total=64):
    return dict(variant=variant, keep=keep, tokens_total=total, token_fraction=keep / total, exact_match=exact_match)


def test_targets_compare_meteor_with_the_baselines():
    rows = [_row("mlp", 64, 0.900), _row("meteor", 16, 0.896), _row("meteor", 4, 0.80), _row("random", 4, 0.81),
            _row("pool", 4, 0.70), _row("cls_prune", 8, 0.5)]
    checks = {c["target"]: (c["value"], c["met"]) for c in study.targets(rows)}
    assert checks == {
        "meteor at 16/64 tokens within 0.5 points of mlp on all tokens": ("0.8960 vs 0.9000", True),
        "meteor beats random at 4/64 tokens": ("0.8000 vs 0.8100", False),
        "meteor beats pool at 4/64 tokens": ("0.8000 vs 0.7000", True),
    }  # cls_prune ran at another K: not compared
    rows[1] = _row("meteor", 16, 0.894)
    assert not study.targets(rows)[0]["met"]


def test_box_patches_by_hand():
    # 64×64 image, 8px patches on an 8×8 grid: columns 34//8=4 .. ceil(51/8)-1=6, rows 0 .. ceil(20/8)-1=2.
    assert study.box_patches([34, 3, 51, 20], 64, 64, 64, 8) == [4, 5, 6, 12, 13, 14, 20, 21, 22]
    assert study.box_patches([0, 0, 8, 8], 64, 64, 64, 8) == [0]  # the end is exclusive
    # 32 wide × 64 high, padded to 64×64 (16 px left and right), resized to 16: the left half [0, 32) of the
    # original lands on x [16, 48) → [4, 12) after the resize → columns 0..1 of the 2×2 grid; y [0, 32) → row 0.
    assert study.box_patches([0, 0, 32, 32], 32, 64, 16, 8) == [0, 1]
    assert study.box_patches([0, 32, 32, 64], 32, 64, 16, 8) == [2, 3]
    with pytest.raises(ValueError, match="empty box"):
        study.box_patches([5, 5, 5, 9], 64, 64, 64, 8)


def test_study_end_to_end(tmp_path, easy_vqa_data_dir):
    config = tiny.get_config()
    config.data.update(data_dir=easy_vqa_data_dir, train="easy_vqa:train[:256]", eval="easy_vqa:test[:32]")
    config.train.update(num_steps=2, log_every=1, checkpoint_every=2)
    config.eval.update(num_examples=32, batch_size=32)
    workdir = tmp_path / "study"
    # The baselines without the fusion compile fastest; Meteor's own runs are the main job's tests.
    rows = study.run_study(config, workdir, ["mlp", "pool"], [2, 4], prefill_repeats=1)
    assert [(r["name"], "skipped" in r) for r in rows] == [("mlp-k16", False), ("pool-k2", True), ("pool-k4", False)]
    test = easy_vqa_source("test", easy_vqa_data_dir)
    gold = {test[i]["id"]: test[i]["conversations"][1]["value"].lower() for i in range(32)}
    for row in (rows[0], rows[2]):
        run_dir = workdir / row["name"]
        results = json.loads((run_dir / "results.json").read_text())
        assert results["visual_tokens_kept"] == row["keep"] and results["train_steps"] == 2
        answers = [json.loads(line) for line in (run_dir / "answers.jsonl").read_text().splitlines()]
        assert sorted(a["question_id"] for a in answers) == sorted(gold)
        independent = np.mean([a["text"].strip().lower() == gold[a["question_id"]] for a in answers])
        assert row["exact_match"] == pytest.approx(independent)
        assert row["step_seconds"] > 0 and row["prefill_seconds"] > 0 and row["prefill_batch"] == 32
    assert rows[0]["projector_params"] == rows[2]["projector_params"]  # both LLaVA-1.5's MLP
    table = (workdir / "study.md").read_text()
    assert "| pool | 4/16 (25%) |" in table and "| mlp | 16/16 (100%) |" in table and "| pool | 2 | skipped: " in table
    assert [r["name"] for r in json.loads((workdir / "study.json").read_text())["rows"]] == [r["name"] for r in rows]
    assert (workdir / "study.png").stat().st_size > 1000

    # A second study over the same directory reuses the finished runs: nothing is trained again. With ground truth
    # that has question types (and a question outside the 32-question eval split), each row gets exact match by type.
    written = (workdir / "pool-k4" / "results.json").stat().st_mtime_ns  # trainer.run would rewrite it
    kinds = {test[i]["id"]: balance.question_type(test[i]) for i in range(33)}
    ground_truth = {str(q): dict(question_id=q, answer=test[i]["conversations"][1]["value"], question_type=kinds[q])
                    for i, q in enumerate(kinds)}
    again = study.run_study(config, workdir, ["pool", "mlp"], [4], prefill_repeats=1, ground_truth=ground_truth)
    assert [{k: v for k, v in r.items() if k != "by_type"} for r in again] == [rows[2], rows[0]]
    assert "kept token on the asked object" not in (workdir / "study.md").read_text()  # no boxes, no column
    assert (workdir / "pool-k4" / "results.json").stat().st_mtime_ns == written
    for row in again:
        answers = [json.loads(line) for line in (workdir / row["name"] / "answers.jsonl").read_text().splitlines()]
        hits = {}
        for a in answers:
            hits.setdefault(kinds[a["question_id"]], []).append(a["text"].strip().lower() == gold[a["question_id"]])
        assert row["by_type"] == pytest.approx({kind: np.mean(h) for kind, h in hits.items()})
    header = "| exact match | " + "".join(f"{kind} | " for kind in sorted({kinds[q] for q in gold})) + "train step"
    assert header in (workdir / "study.md").read_text()
    with pytest.raises(ValueError, match="no question_type field"):
        study.run_study(config, workdir, ["pool"], [4], ground_truth={"x": dict(question_id="x", answer="red")})
    with pytest.raises(ValueError, match="question ids not in the ground truth"):
        study.run_study(config, workdir, ["pool"], [4], ground_truth=dict(list(ground_truth.items())[1:]))
    config.train.lr = 3e-3  # another budget or recipe over the same directory is refused, not mixed in
    with pytest.raises(ValueError, match="pool-k4 was trained with another config"):
        study.run_study(config, workdir, ["pool"], [4])


def test_question_dependence_by_hand():
    # image A: three questions, two keep {1, 2} (in either order), one {3, 4} → 2 of 3 pairs differ;
    # image B: two questions, the same set → 0 of 1; image C: one question, no pair.
    kept = [[(1, 2), (2, 1), (3, 4)], [(5, 6), (5, 6)], [(7, 8)]]
    assert study.question_dependence(kept) == pytest.approx(2 / 4)
    assert study.question_dependence([[(1, 2)]]) is None


def test_selection_coverage_end_to_end(tmp_path, easy_vqa_data_dir):
    """A trained `random` run (tiny config: 16 patches, K = 4) against boxes whose answers are known: the whole
    image (every kept token on it), one corner patch (at most one kept token on it, chance exactly K/N)."""
    config = tiny.get_config()
    # easy-vqa asks about ten questions per image: 200 questions hold about 20 images, each with its own draw.
    config.data.update(data_dir=easy_vqa_data_dir, train="easy_vqa:train[:64]", eval="easy_vqa:test[:200]")
    config.train.update(num_steps=2, log_every=1, checkpoint_every=2)
    config.eval.update(num_examples=24, batch_size=48)  # coverage reads all 200 in 5 batches, the last padded
    test = easy_vqa_source("test", easy_vqa_data_dir)
    ids = [test[i]["id"] for i in range(200)]

    def truth(bbox):
        return {q: dict(question_id=q, answer="x", question_type="t", bbox=bbox) for q in ids}

    workdir = tmp_path / "study"
    rows = study.run_study(config, workdir, ["random", "mlp"], [4], prefill_repeats=1,
                           ground_truth=dict(truth([0, 0, 64, 64]), extra=dict(question_id="extra", answer="x")))
    random_row, mlp_row = rows
    # by_question 0: the random draw hashes the image only, so every question about an image keeps the same set.
    coverage = dict(random_row["coverage"])
    entropies = {k: coverage.pop(k) for k in ("visual_entropy", "native_entropy", "uniform_entropy")}
    assert coverage == dict(questions=200, hit=1.0, on_target=1.0, chance_hit=1.0, by_question=0.0)
    # random has no native expert (its score is uniform: log 16 nats); the [CLS] attention is a distribution
    assert entropies["uniform_entropy"] == pytest.approx(np.log(16))
    assert entropies["native_entropy"] == pytest.approx(np.log(16), rel=1e-5)
    assert 0 < entropies["visual_entropy"] <= np.log(16) + 1e-5
    assert "coverage" not in mlp_row  # all tokens kept: nothing to measure
    table = (workdir / "study.md").read_text()
    assert "| kept token on the asked object (chance) | kept set changes with the question |" in table
    assert "| 1.000 (1.000) | 0.000 |" in table
    corner = study.selection_coverage(workdir / "random-k4", truth([0, 0, 1, 1]), batch_size=48)
    assert corner["questions"] == 200 and corner["chance_hit"] == pytest.approx(4 / 16)
    assert corner["on_target"] == pytest.approx(corner["hit"] / 4)
    assert 0 < corner["hit"] < 1  # random patches per image: some images keep the corner, some do not
    assert study.selection_coverage(workdir / "mlp-k16", truth([0, 0, 1, 1]), batch_size=48) is None
