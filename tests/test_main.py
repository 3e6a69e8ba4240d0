"""The main job end to end: the demo config through the real CLI, resume after a kill, config validation."""
import json
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from configs import demo, tiny
from meteor_jax import config as config_lib
from meteor_jax.data.tfds import easy_vqa_source
from meteor_jax.eval import vqa

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(easy_vqa_data_dir):
    return easy_vqa_data_dir


def test_demo_config_runs_end_to_end(tmp_path, data_dir):
    workdir = tmp_path / "demo"
    cmd = [sys.executable, "-m", "meteor_jax.main", "--config", "configs/demo.py", f"--workdir={workdir}",
           "--config.train.num_steps=6", "--config.train.log_every=2", "--config.train.checkpoint_every=3",
           "--config.eval.num_examples=96", "--config.eval.batch_size=32", f"--config.data.data_dir={data_dir}",
           "--config.data.train=easy_vqa:train[:4096]"]  # the question-type balance then counts 4096 records, not 38575
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 6/6" in proc.stderr and "ETA" in proc.stderr  # the per-interval progress line
    results = json.loads((workdir / "results.json").read_text())
    for key in ("test_accuracy", "visual_tokens_total", "visual_tokens_kept", "train_steps", "wall_seconds"):
        assert key in results
    assert (results["visual_tokens_total"], results["visual_tokens_kept"], results["train_steps"]) == (64, 16, 6)
    answers = [json.loads(line) for line in (workdir / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 96 == results["test_examples"]
    test = easy_vqa_source("test", data_dir)
    gold = {test[i]["id"]: test[i]["conversations"][1]["value"] for i in range(96)}
    assert sorted(a["question_id"] for a in answers) == sorted(gold)
    independent = np.mean([a["text"].strip().lower() == gold[a["question_id"]].lower() for a in answers])
    assert results["test_accuracy"] == pytest.approx(independent)
    steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    assert (workdir / "loss.png").stat().st_size > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]


def _tiny(workdir_data, steps=6):
    config = tiny.get_config()
    config.data.data_dir = workdir_data
    config.data.train = "easy_vqa:train[:256]"
    config.data.eval = ""
    config.train.update(num_steps=steps, log_every=1, checkpoint_every=3, keep_checkpoints=3)
    return config


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_kill_and_resume_gives_the_same_run(tmp_path, data_dir):
    from meteor_jax.train import trainer

    full, resumed = str(tmp_path / "full"), str(tmp_path / "resumed")
    trainer.run(_tiny(data_dir), full)
    # A run killed after its step-3 checkpoint: the step-6 checkpoint and later metrics never happened.
    shutil.copytree(full, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))
    os.remove(os.path.join(resumed, "metrics.jsonl"))
    results = trainer.run(_tiny(data_dir), resumed)
    assert results["resumed_from_step"] == 3
    a, b = _metrics(full), _metrics(resumed)
    assert sorted(b) == [5, 6]  # step 4 is the first step after the restart: it compiles and starts the timer
    for step in (5, 6):
        assert b[step]["data/token_sum"] == a[step]["data/token_sum"], "the data order changed after resume"
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=1e-6)

    from meteor_jax.checkpoint import restore_params_subset  # noqa: F401  (same API the stage-2 init uses)
    import orbax.checkpoint as ocp

    def final_params(workdir):
        with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                   options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
            return manager.restore(6, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]

    import jax

    for x, y in zip(jax.tree.leaves(final_params(full)), jax.tree.leaves(final_params(resumed))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6, atol=1e-7)


def test_config_validation_names_the_field():
    config = demo.get_config()
    config_lib.validate(config)
    bad = demo.get_config()
    bad.train.lrr = 0.1
    with pytest.raises(ValueError, match=r"config\.train: unknown field\(s\) \['lrr'\]"):
        config_lib.validate(bad)
    raw = demo.get_config().to_dict()  # a config file can hold any value; overrides are type-checked by ml_collections
    raw["data"]["max_len"] = "long"
    with pytest.raises(TypeError, match=r"config\.data\.max_len='long'"):
        config_lib.validate(ml_collections.ConfigDict(raw))
    bad = demo.get_config()
    bad.model.fusion.scan_windw = 4
    with pytest.raises(ValueError, match=r"config\.model\.fusion: unknown field\(s\) \['scan_windw'\]"):
        config_lib.validate(bad)
    bad = demo.get_config()
    bad.train.batch_size = 30
    bad.train.micro_batches = 4
    with pytest.raises(ValueError, match="micro_batches"):
        config_lib.validate(bad)


def test_cli_rejects_unknown_override(tmp_path):
    cmd = [sys.executable, "-m", "meteor_jax.main", "--config", "configs/demo.py", f"--workdir={tmp_path}",
           "--config.train.lrr=0.1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "lrr" in proc.stderr


def test_exact_match_normalisation():
    assert vqa.exact_match(["Red.", " circle", "blue", ""], ["red", "circle", "red", "no"]) == 0.5
