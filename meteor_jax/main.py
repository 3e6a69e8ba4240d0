"""The main job: `python -m meteor_jax.main --config configs/demo.py --workdir DIR [--config.a.b=v ...]`.

Trains (resuming from DIR's latest checkpoint if there is one), evaluates, and writes DIR/results.json.
"""
from absl import app, flags
from ml_collections import config_flags

from meteor_jax import cli

flags.DEFINE_string("workdir", None,
                    "Directory for checkpoints, metrics, plots and results: local or gs://bucket/run (needs "
                    "requirements-cloud.txt; a multi-host run needs a directory every host shares). Required unless "
                    "--compile_only.")
config_flags.DEFINE_config_file("config", None, "A config file, optionally `file.py:variant`.", lock_config=True)
# Multi-process runs (one process per host; every process gets the same command line apart from --process_id).
# Without these, a TPU pod, SLURM or mpirun environment is detected; otherwise the run is a single process.
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for a multi-process run.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
flags.DEFINE_integer("cpu_devices_per_process", None, "CPU only: devices this process provides (local testing).")
# Ahead-of-time check: compile the train step for a target topology and print its per-device memory (meteor_jax/aot.py).
flags.DEFINE_bool("compile_only", False, "Compile the train step for --topology and report its memory; no run.")
flags.DEFINE_string("topology", None, "With --compile_only: v5p-64, v5e-256, v6e-64, v4-64, v5p:2x4x4, cpu:8, ...")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.setup_logging()
    if FLAGS.compile_only:
        if not FLAGS.topology:
            raise app.UsageError("--compile_only needs --topology (e.g. v5p-64 or cpu:8)")
        from meteor_jax import aot

        aot.run(FLAGS.config, FLAGS.topology)
        return
    if not FLAGS.workdir:
        raise app.UsageError("--workdir is required")
    from meteor_jax import distributed

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.cpu_devices_per_process)  # before any other JAX use
    from meteor_jax.train import trainer

    trainer.run(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
    cli.run(main)
