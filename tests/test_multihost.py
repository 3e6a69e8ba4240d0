"""Multi-process (multi-host) training on localhost: 2 processes × 4 CPU devices run the same program as 1 process
× 8 devices, give the same losses, and a checkpoint they save together resumes in a single process."""
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5  # checkpoints at 2, 4 and 5 (the final one)
OVERRIDES = dict(train="easy_vqa:train[:256]", eval="easy_vqa:test", num_examples=16, eval_batch=8)


def _config(data_dir: str, evaluate: bool = True):
    config = tiny.get_config()
    config.data.update(data_dir=data_dir, train=OVERRIDES["train"], eval=OVERRIDES["eval"] if evaluate else "")
    config.eval.update(num_examples=OVERRIDES["num_examples"], batch_size=OVERRIDES["eval_batch"])
    config.train.update(num_steps=STEPS, log_every=1, checkpoint_every=2, keep_checkpoints=3)
    return config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _run_processes(workdir: str, data_dir: str, num_processes: int = 2, timeout: float = 240) -> None:
    """`python -m meteor_jax.main` as `num_processes` processes on localhost, 4 CPU devices each."""
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_DEFAULT_MATMUL_PRECISION="highest",
               # the same compiler settings as this pytest process (conftest), 4 devices per process
               XLA_FLAGS="--xla_force_host_platform_device_count=4 --xla_backend_optimization_level=0")
    cmd = [sys.executable, "-m", "meteor_jax.main", "--config", "configs/tiny.py", f"--workdir={workdir}",
           f"--coordinator_address=localhost:{port}", f"--num_processes={num_processes}",
           f"--config.data.data_dir={data_dir}", f"--config.data.train={OVERRIDES['train']}",
           f"--config.data.eval={OVERRIDES['eval']}", f"--config.eval.num_examples={OVERRIDES['num_examples']}",
           f"--config.eval.batch_size={OVERRIDES['eval_batch']}", f"--config.train.num_steps={STEPS}",
           "--config.train.log_every=1", "--config.train.checkpoint_every=2", "--config.train.keep_checkpoints=3",
           "--config.mesh.data=-1"]
    logs = [open(os.path.join(workdir + f".{i}.log"), "w+") for i in range(num_processes)]
    procs = [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                              text=True) for i, log in enumerate(logs)]
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                time.sleep(5)  # give the others a moment to report too, then stop them
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    outputs = []
    for log in logs:
        log.seek(0)
        outputs.append(log.read())
        log.close()
    if any(p.returncode != 0 for p in procs):
        report = "\n".join(f"---- process {i} (exit {p.returncode}) ----\n{out[-4000:]}"
                           for i, (p, out) in enumerate(zip(procs, outputs)))
        pytest.fail(f"the {num_processes}-process run failed or timed out after {timeout} s:\n{report}")
    assert "process 1 of 2" in outputs[1] and "8 global devices" in outputs[1]


def _metrics(workdir) -> dict:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _answers(workdir) -> list:
    with open(os.path.join(workdir, "answers.jsonl")) as f:
        return [json.loads(line) for line in f]


@contextlib.contextmanager
def _compilation_cache(path: str):
    """A persistent compilation cache for this block only: the second in-process run reuses the first's programs."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    old = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (path, 0.0, 0)):
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        for name, value in old.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def data_dir(easy_vqa_data_dir):
    """easy-vqa as tfds, built before the processes start so they only read it."""
    return easy_vqa_data_dir


def test_two_processes_match_one_and_resume_in_one(tmp_path, data_dir):
    from meteor_jax.train import trainer

    two, one, resumed = str(tmp_path / "two"), str(tmp_path / "one"), str(tmp_path / "resumed")
    _run_processes(two, data_dir)
    with _compilation_cache(str(tmp_path / "jax_cache")):
        trainer.run(_config(data_dir), one)  # this pytest process: 1 process × 8 devices

    # Process 0 alone wrote the outputs; both processes saved the checkpoints.
    assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["2", "4", "5"]
    a, b = _metrics(two), _metrics(one)
    assert sorted(a) == sorted(b) == list(range(2, STEPS + 1))  # step 1 compiles and starts the timer
    for step in a:
        assert a[step]["data/token_sum"] == b[step]["data/token_sum"], f"step {step}: other data than 1 process"
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5), f"step {step}"
        assert a[step]["grad_norm"] == pytest.approx(b[step]["grad_norm"], rel=1e-4), f"step {step}"
    print("losses, 2 processes:", [a[s]["loss"] for s in sorted(a)])
    print("losses, 1 process:  ", [b[s]["loss"] for s in sorted(b)])
    with open(os.path.join(two, "results.json")) as f:
        results_two = json.load(f)
    with open(os.path.join(one, "results.json")) as f:
        results_one = json.load(f)
    assert results_two["test_examples"] == results_one["test_examples"] == OVERRIDES["num_examples"]
    answers_two, answers_one = _answers(two), _answers(one)
    assert len(answers_two) == OVERRIDES["num_examples"]  # written once, with every batch's answers
    assert [x["question_id"] for x in answers_two] == [x["question_id"] for x in answers_one]
    assert [x["text"] for x in answers_two] == [x["text"] for x in answers_one]

    # The 2-process checkpoint of step 2 restores into 1 process, which goes on as the uninterrupted run did.
    shutil.copytree(two, resumed)
    for step in ("4", "5"):
        shutil.rmtree(os.path.join(resumed, "checkpoints", step))
    os.remove(os.path.join(resumed, "metrics.jsonl"))
    with _compilation_cache(str(tmp_path / "jax_cache")):
        results = trainer.run(_config(data_dir, evaluate=False), resumed)
    assert results["resumed_from_step"] == 2
    c = _metrics(resumed)
    assert sorted(c) == list(range(4, STEPS + 1))  # step 3 compiles
    for step in c:
        assert c[step]["data/token_sum"] == b[step]["data/token_sum"], f"step {step}: the data order changed"
        assert c[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5), f"step {step}"


def test_data_state_moves_between_process_layouts():
    from meteor_jax.distributed import process_data_state

    def state(k, kept=0, skipped=None):
        return {"parent": {"next_index": k}, "counts": {"kept": kept, "truncated": 0, "skipped": skipped or {}}}

    saved = {"rows": 8, "slots": [state(16, 16), state(16, 15, {"corrupt image": 1})]}
    assert process_data_state(saved, 1, 2, 8, 16) == saved["slots"][1]  # the same layout: this slot's own state
    assert process_data_state(saved, 0, 1, 16, 16) == state(32, 31, {"corrupt image": 1})  # 2 processes → 1
    assert process_data_state(saved, 3, 4, 4, 16) == state(8)  # → 4 processes: each at its rows of batch 3
    uneven = {"rows": 8, "slots": [state(17), state(16)]}  # a skip: process 0 read one record more
    assert process_data_state(uneven, 0, 1, 16, 16)["parent"] == {"next_index": 48}
    legacy = state(32, 32)  # a single process's iterator state (checkpoints before multi-process support)
    assert [process_data_state(legacy, i, 2, 8, 16)["parent"]["next_index"] for i in range(2)] == [16, 16]
    assert process_data_state(None, 0, 2, 8, 16) is None
    with pytest.raises(ValueError, match="worker_count"):
        process_data_state({"rows": 8, "slots": [{"workers_state": {}}] * 2}, 0, 1, 16, 16)


def test_single_process_needs_no_distributed_runtime():
    from meteor_jax import distributed

    assert distributed.detect_cluster() is None
    assert distributed.initialize() == (0, 1)
    assert distributed.initialize(num_processes=1, process_id=0) == (0, 1)
    with pytest.raises(ValueError, match="process_id"):
        distributed.initialize(coordinator_address="localhost:1", num_processes=2, process_id=2)
