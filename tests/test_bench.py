"""`python -m meteor_jax.bench` on the tiny config, through the real CLI: the report's fields and their arithmetic."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_cli_reports_step_times_memory_and_generation(tmp_path, easy_vqa_data_dir):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "meteor_jax.bench", "--config", "configs/tiny.py", "--steps", "3", "--warmup", "1",
           "--generate_batches", "1", f"--out={out}", f"--workdir={tmp_path}",
           f"--config.data.data_dir={easy_vqa_data_dir}", "--config.data.train=easy_vqa:train[:512]"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)  # the suite's 8 CPU devices
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["devices"] == "8 x cpu" and report["mesh"]["data"] == 8
    assert (report["batch_size"], report["seq_len"]) == (16, 32)
    assert report["config_model"]["keep"] == 4 and report["config_model"]["of"] == 16
    assert 0 < report["step_seconds_min"] <= report["step_seconds_median"] <= report["step_seconds_max"]
    assert report["step_seconds_min"] <= report["step_seconds_mean"] <= report["step_seconds_max"]
    assert report["step_seconds_back_to_back"] > 0
    assert report["samples_per_s"] == pytest.approx(16 / report["step_seconds_median"], rel=1e-3, abs=0.1)
    assert report["tokens_per_s"] == pytest.approx(16 * 32 / report["step_seconds_median"], rel=1e-3, abs=0.1)
    assert report["flops_per_device_step"] > 0 and report["mfu"] is None  # no peak FLOP/s known for a CPU
    memory = report["memory_per_device_bytes"]  # everything trained: Adam's two moments are twice the params
    assert 2 * memory["params"] <= memory["opt_state"] <= 2 * memory["params"] + 64
    assert memory["total"] >= memory["params"] + memory["opt_state"] + memory["batch"] + memory[
        "activations_and_temporaries"] and memory["batch"] > 0
    assert report["memory_fits"] is None  # a CPU reports no memory limit
    assert report["generate_batch"] == 32 and report["generate_questions_per_s"] > 0
    for key, value in report.items():  # the printed table holds the same report
        assert any(line.split()[:1] == [key] for line in proc.stdout.splitlines()), key
