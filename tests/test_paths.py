"""Run files at a local path or a gs:// URL (meteor_jax.paths).

There is no GCS here: `fake_gcs` routes gs:// through epath's own fsspec backend to an in-memory fsspec filesystem
standing in for gcsfs (same prefix semantics: no real directories), and tensorboardX's gs:// writer to it. What is
checked is that the URL reaches epath/fsspec/tensorboardX whole and that nothing lands on local disk as "gs:".
"""
import importlib
import json
import os

import fsspec
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from fsspec.implementations.memory import MemoryFileSystem

from meteor_jax import paths
from meteor_jax.data.tokenizer import load_tokenizer, train_word_tokenizer

CORPUS = ["what color is the circle?", "red", "what shape is this?", "triangle", "USER: ASSISTANT:"]


def test_workdir_path_keeps_urls_and_absolutises_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = paths.workdir_path("gs://bucket/run")
    assert isinstance(run, epath.Path) and str(run) == os.fspath(run) == "gs://bucket/run"
    assert str(run / "checkpoints" / "3") == "gs://bucket/run/checkpoints/3"
    assert str(paths.workdir_path(run / "tfds")) == "gs://bucket/run/tfds"  # idempotent
    assert str((run / "tokenizer.json").parent) == "gs://bucket/run"
    assert paths.is_url(run) and not paths.is_url(tmp_path)
    assert str(paths.workdir_path("run/sub")) == str(tmp_path / "run" / "sub")
    assert str(paths.workdir_path(tmp_path)) == str(tmp_path)
    assert str(paths.workdir_path(paths.workdir_path("x"))) == str(tmp_path / "x")
    assert not os.path.exists("gs:") and os.listdir(tmp_path) == []


def test_local_files(tmp_path):
    from meteor_jax.train.metrics import MetricsWriter

    tok_file = tmp_path / "tok" / "tokenizer.json"
    tok_file.parent.mkdir()
    tok = train_word_tokenizer(CORPUS, tok_file)
    assert json.loads(tok_file.read_text())["model"]["type"] == "WordLevel"
    assert not (tmp_path / "tok" / "tokenizer.json.tmp").exists()
    assert tok.save(tmp_path / "tok") == str(tok_file)  # a directory: tokenizer.json inside
    assert load_tokenizer(f"word:{tok_file}").encode("what color is it") == tok.encode("what color is it")

    writer = MetricsWriter(tmp_path / "run", total_steps=4, batch_size=2, tokens_per_sample=8)
    writer.write(2, {"loss": 2.0, "lr": 1e-3})
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1  # flushed at each write
    writer.write(4, {"loss": 1.0, "lr": 1e-3})
    assert writer.plot_loss() == str(tmp_path / "run" / "loss.png")
    writer.close()
    assert (tmp_path / "run" / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert os.listdir(tmp_path / "run" / "tensorboard")
    resumed = MetricsWriter(str(tmp_path / "run"), total_steps=6, batch_size=2, tokens_per_sample=8)
    resumed.write(6, {"loss": 0.5})
    resumed.close()
    steps = [json.loads(line)["step"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]


class _FakeGCS(MemoryFileSystem):
    """gs:// in memory, in place of gcsfs."""

    protocol = ("gs", "gcs")
    store: dict = {}
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(os.fspath(path).removeprefix("gs://"))


class _TensorBoardUpload:
    """Stands in for tensorboardX's GCSRecordWriter: the whole event file uploaded at each flush."""

    def __init__(self, path):
        self.path, self.data = path, b""

    def write(self, data):
        self.data += data

    def flush(self):
        with fsspec.open(self.path, "wb") as f:
            f.write(self.data)

    def close(self):
        self.flush()


class _TensorBoardFactory:
    def open(self, path):
        return _TensorBoardUpload(path)

    def directory_check(self, path):
        pass


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
    from tensorboardX import record_writer

    monkeypatch.setenv("EPATH_USE_TF", "false")  # with TensorFlow installed, epath would use tf.io.gfile for gs://
    monkeypatch.setattr(_FakeGCS, "store", {})
    monkeypatch.setattr(_FakeGCS, "pseudo_dirs", [""])
    registry = importlib.import_module("fsspec.registry")._registry  # (fsspec.registry is a read-only view of it)
    for name in ("gs", "gcs"):
        monkeypatch.setitem(registry, name, _FakeGCS)  # removed again after the test
    monkeypatch.setitem(record_writer.REGISTERED_FACTORIES, "gs", _TensorBoardFactory())
    cache = epath_backend._FileSystemSpecBackend._get_filesystem
    cache.cache_clear()
    _FakeGCS.clear_instance_cache()
    monkeypatch.chdir(tmp_path)
    yield fsspec.filesystem("gs")
    cache.cache_clear()
    _FakeGCS.clear_instance_cache()
    assert not os.path.exists("gs:"), "a gs:// path was written as a local directory"
    assert os.listdir(tmp_path) == []


def test_metrics_on_gcs(fake_gcs):
    from meteor_jax.train.metrics import MetricsWriter

    writer = MetricsWriter("gs://bucket/run", total_steps=4, batch_size=2, tokens_per_sample=8)
    writer.write(2, {"loss": 2.0, "lr": 1e-3})
    # Visible after each write (a run may be preempted): object stores cannot append, the object is rewritten.
    assert len(fake_gcs.cat("gs://bucket/run/metrics.jsonl").splitlines()) == 1
    writer.write(4, {"loss": 1.0, "lr": 1e-3})
    assert writer.plot_loss() == "gs://bucket/run/loss.png"
    writer.close()
    assert fake_gcs.cat("gs://bucket/run/loss.png")[:4] == b"\x89PNG"
    events = fake_gcs.ls("gs://bucket/run/tensorboard", detail=False)
    assert len(events) == 1 and "tfevents" in events[0] and fake_gcs.size(events[0]) > 0
    resumed = MetricsWriter("gs://bucket/run", total_steps=6, batch_size=2, tokens_per_sample=8)
    resumed.write(6, {"loss": 0.5})
    resumed.close()
    lines = fake_gcs.cat("gs://bucket/run/metrics.jsonl").decode().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [2, 4, 6]


def test_tokenizer_on_gcs(fake_gcs):
    from configs import tiny
    from meteor_jax import inference
    from meteor_jax.run import Run

    tok = train_word_tokenizer(CORPUS, "gs://bucket/tok/tokenizer.json")
    assert fake_gcs.exists("gs://bucket/tok/tokenizer.json") and not fake_gcs.exists("gs://bucket/tok/tokenizer.json.tmp")
    loaded = load_tokenizer("word:gs://bucket/tok/tokenizer.json")
    assert loaded.encode("what shape is this?") == tok.encode("what shape is this?")
    assert loaded.vocab_size == tok.vocab_size

    # A run's own word tokenizer: trained and saved in a gs:// workdir, then read back by a resumed run and by
    # inference (load_run_config / Run.tokenizer / resolve_checkpoint).
    config = tiny.get_config()
    config.data.template = "vicuna_v1"
    run = Run.from_config(config)
    source = [{"conversations": [{"value": q}, {"value": a}]} for q, a in zip(CORPUS[0::2], CORPUS[1::2])]
    built = run.tokenizer("gs://bucket/run", source)
    assert fake_gcs.exists("gs://bucket/run/tokenizer.json")
    again = run.tokenizer("gs://bucket/run", [])  # read back, not retrained on nothing
    assert again.vocab_size == built.vocab_size and again.encode("red triangle") == built.encode("red triangle")

    fake_gcs.pipe("gs://bucket/run/config.json", config.to_json().encode())
    for step in (5, 10):
        fake_gcs.pipe(f"gs://bucket/run/checkpoints/{step}/params/_METADATA", b"{}")
    ref = inference.resolve_checkpoint("gs://bucket/run")
    assert ref == inference.CheckpointRef("gs://bucket/run/checkpoints", 10, "gs://bucket/run")
    assert inference.resolve_checkpoint("gs://bucket/run/checkpoints/5") == inference.CheckpointRef(
        "gs://bucket/run/checkpoints", 5, "gs://bucket/run")
    assert inference.load_run_config(ref.workdir).tokenizer == "word:easy_vqa"
    assert run.tokenizer(ref.workdir).encode("red triangle") == built.encode("red triangle")


def test_answers_and_results_on_gcs(fake_gcs):
    from meteor_jax.eval import answering, report

    answers = [{"question_id": 1, "text": "red"}, {"question_id": 2, "text": "circle"}]
    answering.write_answers(answers, "gs://bucket/run/answers.jsonl")
    lines = fake_gcs.cat("gs://bucket/run/answers.jsonl").decode().splitlines()
    assert [json.loads(line) for line in lines] == answers

    rows = [dict(benchmark="easy_vqa", visual_tokens_kept=k, visual_tokens_total=16, main_metric="accuracy",
                 score=s, metrics={"accuracy": s}) for k, s in ((4, 0.5), (16, 0.75))]
    written = report.write_results(rows, "gs://bucket/run/results")
    assert written == ["gs://bucket/run/results.json", "gs://bucket/run/results.md", "gs://bucket/run/results_keep.png"]
    assert json.loads(fake_gcs.cat(written[0])) == rows
    assert fake_gcs.cat(written[2])[:4] == b"\x89PNG"
