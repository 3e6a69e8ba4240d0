"""Inference and evaluation end to end: a tiny model trained here answers an easy-vqa question file in LLaVA's
format through the real CLIs; batched answers equal one-at-a-time answers; checkpoint and question-file handling."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import tiny
from meteor_jax import inference
from meteor_jax.data.tfds import easy_vqa_source
from meteor_jax.eval import answering, report
from meteor_jax.eval.export import export_benchmark
from meteor_jax.run import Run
from meteor_jax.train import trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_QUESTIONS = 24


@pytest.fixture(scope="module")
def data_dir(easy_vqa_data_dir):
    return easy_vqa_data_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    """A tiny model trained for a few steps by the real trainer (its workdir: checkpoints, config, tokenizer)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny.get_config()
    config.data.update(data_dir=data_dir, train="easy_vqa:train[:512]", eval="")
    config.train.update(num_steps=30, log_every=10, checkpoint_every=15, lr=1e-2)
    trainer.run(config, workdir)
    return workdir


@pytest.fixture(scope="module")
def bench(tmp_path_factory, data_dir):
    source = easy_vqa_source("test", data_dir)
    return export_benchmark((source[i] for i in range(NUM_QUESTIONS)), str(tmp_path_factory.mktemp("bench")))


def _cli(module, *args):
    env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")  # one CPU device, as a user's laptop
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_evaluate_cli_end_to_end(run_dir, bench, tmp_path):
    out = tmp_path / "answers.jsonl"
    proc = _cli("meteor_jax.evaluate", "--checkpoint", run_dir, "--benchmark", "easy_vqa", "--questions",
                bench["questions"], "--images", bench["images"], "--answers", str(out), "--ground_truth",
                bench["ground_truth"], "--keep", "2,4", "--batch_size", "16")
    gold = {r["question_id"]: r["answer"] for r in _read_jsonl(bench["ground_truth"])}
    rows = json.loads((tmp_path / "answers_results.json").read_text())
    assert [r["visual_tokens_kept"] for r in rows] == [2, 4]
    for keep, row in zip((2, 4), rows):
        answers = _read_jsonl(tmp_path / f"answers-keep{keep}.jsonl")
        assert [a["question_id"] for a in answers] == list(gold)  # every question, in file order
        for a in answers:
            assert set(a) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
            assert a["model_id"] == os.path.basename(run_dir) and a["metadata"] == {}
        independent = sum(a["text"].strip().lower() == gold[a["question_id"]].lower() for a in answers)
        assert row["score"] == pytest.approx(independent / NUM_QUESTIONS)
        assert row["metrics"]["num_questions"] == NUM_QUESTIONS
    assert "| easy_vqa | 2 | 16 |" in proc.stdout and (tmp_path / "answers_results.md").exists()
    assert (tmp_path / "answers_results_keep.png").stat().st_size > 1000


def test_batched_answers_equal_one_at_a_time(run_dir, bench):
    model = inference.load_model(None, run_dir)
    generator = inference.model_generator(model, max_new_tokens=4)
    records = answering.read_questions(bench["questions"], bench["images"])[:8]
    lengths = {int(answering.prompt_features(r, model.tokenizer, model.spec)["mask"].sum()) for r in records}
    assert len(lengths) > 1, "the batch should mix prompt lengths"
    batched = answering.answer_records(generator, records, model.tokenizer, model.spec, batch_size=8)
    alone = [answering.answer_records(generator, [r], model.tokenizer, model.spec, batch_size=8)[0]
             for r in records]  # each question alone, its batch filled with copies of itself
    assert [a["text"] for a in batched] == [a["text"] for a in alone]
    assert all(a["text"] for a in batched), batched


def test_generate_cli_single_prompt_and_question_file(run_dir, bench, tmp_path):
    first = _read_jsonl(bench["questions"])[0]
    image = os.path.join(bench["images"], first["image"])
    proc = _cli("meteor_jax.generate", "--checkpoint", run_dir, "--image", image, "--prompt", first["text"])
    single = proc.stdout.strip().splitlines()[-1]
    out = tmp_path / "a.jsonl"
    _cli("meteor_jax.generate", "--checkpoint", os.path.join(run_dir, "checkpoints"), "--questions",
         bench["questions"], "--images", bench["images"], "--answers", str(out), "--batch_size", "8")
    answers = _read_jsonl(out)
    assert len(answers) == NUM_QUESTIONS and answers[0]["text"] == single


def test_missing_image_is_answered_empty_and_flagged(run_dir, bench, tmp_path):
    questions = tmp_path / "q.jsonl"
    lines = _read_jsonl(bench["questions"])[:3]
    lines[1]["image"] = "no_such_file.png"
    questions.write_text("".join(json.dumps(q) + "\n" for q in lines))
    model = inference.load_model(None, run_dir)
    answers = answering.answer_records(inference.model_generator(model, max_new_tokens=3),
                                       answering.read_questions(str(questions), bench["images"]),
                                       model.tokenizer, model.spec, batch_size=8)
    assert [a["question_id"] for a in answers] == [q["question_id"] for q in lines]
    assert answers[1]["text"] == "" and answers[1]["metadata"] == {"skipped": "missing image"}
    assert answers[0]["text"] and answers[2]["text"]


def test_resolve_checkpoint_forms(run_dir, tmp_path):
    latest = inference.resolve_checkpoint(run_dir)
    assert (latest.step, latest.workdir) == (30, run_dir)
    assert inference.resolve_checkpoint(os.path.join(run_dir, "checkpoints")) == latest
    step4 = inference.resolve_checkpoint(os.path.join(run_dir, "checkpoints", "15"))
    assert (step4.directory, step4.step) == (latest.directory, 15)
    with pytest.raises(FileNotFoundError, match="neither"):
        inference.resolve_checkpoint(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        inference.resolve_checkpoint(str(tmp_path / "nope"))


def test_word_tokenizer_needs_the_run_workdir():
    config = tiny.get_config()
    with pytest.raises(FileNotFoundError, match="WORKDIR/tokenizer.json"):
        Run.from_config(config).tokenizer(None)


def test_read_questions_suffix_and_errors(tmp_path):
    suffix = "Answer the question using a single word or phrase."
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(dict(question_id=1, image="a.png", text="What shape?")) + "\n"
                    + json.dumps(dict(question_id="b", text=f"Is it red?\n{suffix}")) + "\n")
    first, second = answering.read_questions(str(path), "/imgs", suffix)
    assert first["image"] == "/imgs/a.png"
    assert first["conversations"][0]["value"] == f"<image>\nWhat shape?\n{suffix}"
    assert second["image"] is None and second["conversations"][0]["value"] == f"Is it red?\n{suffix}"  # not twice
    path.write_text(json.dumps(dict(question_id=1, text="a")) + "\n" + json.dumps(dict(question_id=1, text="b")))
    with pytest.raises(ValueError, match=":2: duplicate question_id 1"):
        answering.read_questions(str(path), None)
    path.write_text(json.dumps(dict(question_id=1)) + "\n")
    with pytest.raises(ValueError, match=r":1: question without \['text'\]"):
        answering.read_questions(str(path), None)
    path.write_text(json.dumps(dict(question_id=1, image="x.png", text="a")) + "\n")
    with pytest.raises(ValueError, match="pass an image folder"):
        answering.read_questions(str(path), None)


def test_cut_at_stop():
    assert answering.cut_at_stop("red</s>blue###x", ["###", "</s>"]) == "red"
    assert answering.cut_at_stop("red", ["###"]) == "red"
    assert answering.cut_at_stop("red", []) == "red"


def test_results_table_and_plot(tmp_path):
    rows = [dict(benchmark="gqa", visual_tokens_kept=k, visual_tokens_total=576, main_metric="accuracy", score=s,
                 metrics=dict(accuracy=s, num_questions=10, by_type={"a": 1.0}))
            for k, s in ((64, 0.5), (144, 0.625))]
    table = report.results_table(rows)
    assert table.splitlines()[0] == ("| benchmark | visual_tokens_kept | visual_tokens_total | main_metric | score | "
                                     "accuracy | num_questions |")
    assert table.splitlines()[3] == "| gqa | 144 | 576 | accuracy | 0.6250 | 0.6250 | 10 |"
    written = report.write_results(rows, str(tmp_path / "r"))
    assert written == [str(tmp_path / f) for f in ("r.json", "r.md", "r_keep.png")]
    assert json.loads((tmp_path / "r.json").read_text())[0]["metrics"]["by_type"] == {"a": 1.0}
    assert report.write_results(rows[:1], str(tmp_path / "one")) == [str(tmp_path / "one.json"),
                                                                      str(tmp_path / "one.md")]


def test_round_batch_to_the_data_parallel_mesh(run_dir):
    model = inference.load_model(None, run_dir)  # tiny: mesh data=-1 over the 8 test devices
    assert [model.round_batch(n) for n in (1, 8, 9, 16)] == [8, 8, 16, 16]
    assert np.prod(list(model.mesh.shape.values())) == 8


def test_convert_exports_the_trained_decoder_as_hf_llama(run_dir, tmp_path):
    from flax import nnx

    from meteor_jax.convert.llama import load_llama
    from meteor_jax.data.tokenizer import load_tokenizer

    out = tmp_path / "hf"
    _cli("meteor_jax.convert", "--checkpoint", run_dir, "--out", str(out))
    model = inference.load_model(None, run_dir)
    trained = nnx.to_pure_dict(model.params)["llm"]
    reloaded = nnx.to_pure_dict(nnx.state(load_llama(str(out)), nnx.Param))
    flat = lambda tree: {k: np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}  # noqa: E731
    assert flat(reloaded).keys() == flat(trained).keys()
    for key, value in flat(trained).items():
        np.testing.assert_array_equal(flat(reloaded)[key], value)
    tokenizer = load_tokenizer(str(out))
    assert (tokenizer.eos_id, tokenizer.pad_id, tokenizer.vocab_size) == (
        model.tokenizer.eos_id, model.tokenizer.pad_id, model.tokenizer.vocab_size)
