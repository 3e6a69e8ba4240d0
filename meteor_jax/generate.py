"""Answer questions about images with a trained or converted model.

  python -m meteor_jax.generate --checkpoint WORKDIR --image cat.png --prompt "What colour is the cat?"
  python -m meteor_jax.generate --checkpoint WORKDIR --questions q.jsonl --images DIR --answers a.jsonl

--checkpoint is a run's workdir (latest step; its config.json and tokenizer are used when --config is not
given), its checkpoints/ directory or one checkpoints/<step>/; without it, --config's converted weights
(config.weights.*) are used. Decoding: greedy by default, --temperature/--top_p sampling, --max_new_tokens,
EOS and --stop strings. Question files use LLaVA's JSON lines format ({"question_id", "image", "text"}).
"""
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from meteor_jax import cli

config_flags.DEFINE_config_file("config", None, "A config file (`file.py:variant`); default: the run's config.json.",
                                lock_config=True)
flags.DEFINE_string("checkpoint", None, "A run's workdir, its checkpoints/ directory or one checkpoints/<step>/.")
flags.DEFINE_string("image", None, "An image file for --prompt.")
flags.DEFINE_string("prompt", None, "One question (with --image, or text only).")
flags.DEFINE_string("questions", None, "A LLaVA question file (JSON lines) to answer in batches.")
flags.DEFINE_string("images", None, "The folder the question file's images are relative to.")
flags.DEFINE_string("answers", None, "Where to write the answer file (JSON lines); default: standard output.")
flags.DEFINE_integer("batch_size", None, "Questions per batch (default: config.eval.batch_size).")
flags.DEFINE_integer("max_new_tokens", None, "Most tokens per answer (default: config.eval.max_new_tokens).")
flags.DEFINE_float("temperature", 0.0, "0 for greedy decoding, else the sampling temperature.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (with --temperature > 0).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_multi_string("stop", [], "Stop strings: an answer ends before the first one.")
flags.DEFINE_integer("keep", None, "Visual tokens the LLM sees (default: the config's selection.keep).")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (FLAGS.prompt is None) == (FLAGS.questions is None):
        raise app.UsageError("give either --prompt (with --image or without for text only) or --questions")
    if FLAGS.image is not None and FLAGS.prompt is None:
        raise app.UsageError("--image goes with --prompt")
    from meteor_jax import inference
    from meteor_jax.eval import answering

    cli.setup_logging()
    model = inference.load_model(FLAGS.config, FLAGS.checkpoint)
    if FLAGS.keep is not None:
        model = model.with_keep(FLAGS.keep)
    config = model.config
    max_new_tokens = FLAGS.max_new_tokens or config.eval.max_new_tokens
    generator = inference.model_generator(model, max_new_tokens=max_new_tokens, temperature=FLAGS.temperature,
                                          top_p=FLAGS.top_p, seed=FLAGS.seed)
    if FLAGS.prompt is not None:
        records = [dict(id=0, image=FLAGS.image,
                        conversations=answering.prompt_conversation(FLAGS.prompt, FLAGS.image is not None))]
        batch_size = model.round_batch(1)
    else:
        records = answering.read_questions(FLAGS.questions, FLAGS.images)
        batch_size = model.round_batch(FLAGS.batch_size or config.eval.batch_size)
    start = time.perf_counter()
    answers = answering.answer_records(generator, records, model.tokenizer, model.spec, batch_size=batch_size,
                                       stop=FLAGS.stop)
    seconds = time.perf_counter() - start
    if FLAGS.prompt is not None:
        skipped = answers[0]["metadata"].get("skipped")
        if skipped:
            raise SystemExit(f"cannot answer: {skipped}")
        print(answers[0]["text"])
        return
    if FLAGS.answers:
        answering.write_answers(answers, FLAGS.answers)
    else:
        import json

        for a in answers:
            sys.stdout.write(json.dumps(a) + "\n")
    logging.info("answered %d questions in %.1f s (%.1f/s, first batch includes compilation)%s", len(answers),
                 seconds, len(answers) / seconds, f" → {FLAGS.answers}" if FLAGS.answers else "")


if __name__ == "__main__":
    cli.run(main)
