"""The main job: `python -m meteor_jax.main --config configs/demo.py --workdir DIR [--config.a.b=v ...]`.

Trains (resuming from DIR's latest checkpoint if there is one), evaluates, and writes DIR/results.json.
"""
import logging as std_logging

from absl import app, flags, logging
from ml_collections import config_flags

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, plots and results.", required=True)
config_flags.DEFINE_config_file("config", None, "A config file, optionally `file.py:variant`.", lock_config=True)
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from meteor_jax.train import trainer

    logging.set_verbosity(logging.INFO)
    # Orbax logs every checkpoint phase at INFO; keep its warnings, drop the chatter.
    logging.get_absl_handler().addFilter(
        lambda record: record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname)
    trainer.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
