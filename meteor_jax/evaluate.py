"""Run a benchmark the way LLaVA does: its question file, its prompt suffix, an answer file in LLaVA's format, then
the benchmark's official score when the ground truth is given.

  python -m meteor_jax.evaluate --checkpoint WORKDIR --benchmark gqa --questions q.jsonl --images DIR \
      --answers out/gqa.jsonl --ground_truth gt.jsonl [--keep 16,32,64]

Writes the answer file(s), and with --ground_truth RESULTS.json / RESULTS.md (one row per benchmark and kept-token
count; default prefix: the answer file's name + "_results") plus RESULTS_keep.png when several --keep values are
evaluated. MM-Vet answers are also written in its submission format (ANSWERS_mmvet.json) for its external grader.
"""
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

from meteor_jax import cli

config_flags.DEFINE_config_file("config", None, "A config file (`file.py:variant`); default: the run's config.json.",
                                lock_config=True)
flags.DEFINE_string("checkpoint", None, "A run's workdir, its checkpoints/ directory or one checkpoints/<step>/.")
flags.DEFINE_string("benchmark", None, "Benchmark name (see meteor_jax/eval/benchmarks.py).", required=True)
flags.DEFINE_string("questions", None, "LLaVA question file (JSON lines: question_id, image, text).", required=True)
flags.DEFINE_string("images", None, "The folder the question file's images are relative to.")
flags.DEFINE_string("answers", None, "Answer file to write (JSON lines, LLaVA format).", required=True)
flags.DEFINE_string("ground_truth", None, "Ground truth (JSON or JSON lines keyed by question_id): score the answers.")
flags.DEFINE_string("results", None, "Prefix of the results table/plot (default: ANSWERS without .jsonl + _results).")
flags.DEFINE_list("keep", [], "Kept visual token counts to evaluate (default: the config's selection.keep).")
flags.DEFINE_string("model_id", None, "model_id in the answer file (default: the checkpoint's run name).")
flags.DEFINE_integer("batch_size", None, "Questions per batch (default: config.eval.batch_size).")
flags.DEFINE_integer("max_new_tokens", None, "Most tokens per answer (default: config.eval.max_new_tokens).")
flags.DEFINE_multi_string("stop", [], "Stop strings: an answer ends before the first one.")
FLAGS = flags.FLAGS


def _answers_path(path: str, keep: int, several: bool) -> str:
    if not several:
        return path
    root, ext = os.path.splitext(path)
    return f"{root}-keep{keep}{ext or '.jsonl'}"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from meteor_jax import inference
    from meteor_jax.eval import answering, benchmarks, report

    cli.setup_logging()
    benchmark = benchmarks.get_benchmark(FLAGS.benchmark)
    ground_truth = benchmarks.load_ground_truth(FLAGS.ground_truth) if FLAGS.ground_truth else None
    records = answering.read_questions(FLAGS.questions, FLAGS.images,
                                       lambda q: benchmarks.prompt_suffix_for(benchmark.name, q))
    model = inference.load_model(FLAGS.config, FLAGS.checkpoint)
    try:
        keeps = [int(k) for k in FLAGS.keep] or [model.model_cfg.selection.keep]
    except ValueError:
        raise app.UsageError(f"--keep takes integers, got {FLAGS.keep}") from None
    model_id = FLAGS.model_id or os.path.basename(os.path.normpath(FLAGS.checkpoint or "meteor-jax"))
    rows = []
    for keep in keeps:
        variant = model if keep == model.model_cfg.selection.keep else model.with_keep(keep)
        generator = inference.model_generator(variant, max_new_tokens=FLAGS.max_new_tokens or
                                              variant.config.eval.max_new_tokens)
        start = time.perf_counter()
        answers = answering.answer_records(generator, records, variant.tokenizer, variant.spec, stop=FLAGS.stop,
                                           batch_size=variant.round_batch(FLAGS.batch_size or variant.config.eval.batch_size),
                                           model_id=model_id)
        seconds = time.perf_counter() - start
        path = _answers_path(FLAGS.answers, keep, len(keeps) > 1)
        answering.write_answers(answers, path)
        if benchmark.name == "mmvet":
            benchmarks.write_mmvet_submission(answers, os.path.splitext(path)[0] + "_mmvet.json")
        logging.info("%s, %d of %d visual tokens: %d answers in %.1f s → %s", benchmark.name, keep,
                     variant.model_cfg.vision.num_patches, len(answers), seconds, path)
        if ground_truth is not None:
            metrics = benchmarks.score(benchmark.name, answers, ground_truth)
            rows.append(dict(benchmark=benchmark.name, visual_tokens_kept=keep,
                             visual_tokens_total=variant.model_cfg.vision.num_patches,
                             main_metric=benchmark.main_metric, score=metrics.get(benchmark.main_metric),
                             answers=path, seconds=round(seconds, 1), metrics=metrics))
            logging.info("%s %s = %s", benchmark.name, benchmark.main_metric, metrics.get(benchmark.main_metric))
    if rows:
        prefix = FLAGS.results or os.path.splitext(FLAGS.answers)[0] + "_results"
        written = report.write_results(rows, prefix)
        print(report.results_table(rows), end="")
        logging.info("wrote %s", ", ".join(written))


if __name__ == "__main__":
    cli.run(main)
