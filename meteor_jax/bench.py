"""Speed and memory of a config on this machine's devices: the train step (s/step, samples/s, tokens/s, FLOP/s and,
on a known accelerator, MFU), the compiled step's per-device memory, the input pipeline and batched generation.
Step times are per step, each waited for (median, min, max, mean), and the same steps dispatched back to back
with one wait at the end, as the train loop runs them (`step_seconds_back_to_back`).

  python -m meteor_jax.bench --config configs/demo.py [--steps 20] [--min_samples_per_s 150] [--out bench.json]
  python -m meteor_jax.bench --compare torch [--steps 3]   # transformers' LLaVA vs ours, same weights (compare_torch.py)
  python -m meteor_jax.bench --scan 2,640,256,16            # the selective-scan impls, fwd+bwd (scan_bench.py)

Random weights, real data (the config's training source and tokenizer): speed does not depend on the values.
`--min_samples_per_s` is a target: the command exits non-zero below it (speed targets live here, not in tests).
"""
import json
import os
import statistics
import tempfile
import time

from absl import app, flags, logging
from ml_collections import config_flags

from meteor_jax import cli

config_flags.DEFINE_config_file("config", None, "A config file (`file.py:variant`).", lock_config=True)
flags.DEFINE_string("workdir", None, "Where the data and tokenizer are built (default: a temporary directory).")
flags.DEFINE_integer("steps", 20, "Timed train steps (after the warm-up).")
flags.DEFINE_integer("warmup", 3, "Untimed train steps first (the first one compiles).")
flags.DEFINE_integer("generate_batches", 3, "Timed generation batches (0: skip generation).")
flags.DEFINE_float("min_samples_per_s", None, "Target: fail when training is slower than this.")
flags.DEFINE_string("out", None, "Also write the report as JSON here.")
flags.DEFINE_enum("compare", None, ["torch"], "Instead of a config: time transformers' LLaVA against ours.")
flags.DEFINE_list("scan", None, "Instead of a config: time the scan impls at batch,length,inner,state.")
FLAGS = flags.FLAGS

# Dense bf16 peak FLOP/s per device, from the vendors' data sheets (for MFU).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "H100": 989e12, "H200": 989e12, "A100": 312e12}


def peak_flops(device_kind: str) -> float | None:
    matches = [k for k in PEAK_FLOPS if k in device_kind]
    return PEAK_FLOPS[max(matches, key=len)] if matches else None


def bench(config, workdir: str, *, steps: int, warmup: int, generate_batches: int) -> dict:
    import jax

    from meteor_jax import aot, inference, sharding
    from meteor_jax.data import pipeline
    from meteor_jax.eval import answering
    from meteor_jax.run import Run

    run = Run.from_config(config)
    config, mesh, rules, spec = run.config, run.mesh, run.rules, run.spec
    source = run.source(config.data.train, workdir)
    tokenizer = run.tokenizer(workdir, source)
    batch_size = config.train.batch_size

    dataset = iter(pipeline.make_dataset(source, tokenizer, spec, batch_size=batch_size, seed=config.seed,
                                         worker_count=config.data.worker_count, prefetch=config.data.prefetch,
                                         image_cache=config.data.image_cache, feature_cache=config.data.feature_cache,
                                         read_threads=config.data.read_threads))
    t0 = time.perf_counter()
    batches = [next(dataset) for _ in range(warmup + steps)]
    pipeline_seconds = time.perf_counter() - t0

    # The run's own optimizer (labels, schedule, weight decay, clipping) over a schedule of the timed steps.
    graphdef, params = run.random_params()
    training = run.training(graphdef, params, warmup + steps)
    state, train_step, labels = training.state, training.step, training.optimizer.labels
    device_batches = [sharding.global_batch(b, mesh, rules) for b in batches]
    t0 = time.perf_counter()
    compiled = train_step.lower(state, device_batches[0]).compile()
    compile_seconds = time.perf_counter() - t0
    device = mesh.devices.flat[0]
    hbm = (device.memory_stats() or {}).get("bytes_limit") if hasattr(device, "memory_stats") else None
    target = aot.Target(name="local", platform=device.platform, generation=device.device_kind,
                        num_devices=int(mesh.size), hbm_bytes=hbm)
    memory = aot.memory_report(aot.Compiled(compiled, state, device_batches[0], labels, mesh, target,
                                            compile_seconds))
    flops = (compiled.cost_analysis() or {}).get("flops")  # per device, one step

    for b in device_batches[:warmup]:
        state, metrics = train_step(state, b)
    jax.block_until_ready(state)
    times = []
    for b in device_batches[warmup:]:
        t0 = time.perf_counter()
        state, metrics = train_step(state, b)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    # The train loop dispatches step after step and waits only to log: the same steps timed that way.
    t0 = time.perf_counter()
    for b in device_batches[warmup:]:
        state, metrics = train_step(state, b)
    jax.block_until_ready(state)
    back_to_back_s = (time.perf_counter() - t0) / steps
    peak = peak_flops(device.device_kind)
    report = dict(
        config_model=dict(vision=run.model_cfg.vision.width, fusion=run.model_cfg.fusion.dim,
                          llm=run.model_cfg.llm.dim, keep=run.model_cfg.selection.keep,
                          of=run.model_cfg.vision.num_patches),
        devices=f"{mesh.size} x {device.device_kind}", mesh={k: int(v) for k, v in mesh.shape.items()},
        batch_size=batch_size, seq_len=spec.max_len, compile_seconds=round(compile_seconds, 2),
        step_seconds_median=round(step_s, 4), step_seconds_min=round(min(times), 4),
        step_seconds_max=round(max(times), 4), step_seconds_mean=round(statistics.mean(times), 4),
        step_seconds_back_to_back=round(back_to_back_s, 4), samples_per_s=round(batch_size / step_s, 1),
        tokens_per_s=round(batch_size * spec.max_len / step_s, 1),
        input_pipeline_samples_per_s=round(len(batches) * batch_size / pipeline_seconds, 1),
        flops_per_device_step=flops, flops_per_s_per_device=round(flops / step_s) if flops else None,
        mfu=round(flops / step_s / peak, 4) if flops and peak else None,
        memory_per_device_bytes=memory["per_device"], memory_fits=memory["fits"],
    )
    if generate_batches:
        generator = inference.make_generator(graphdef, state.params, mesh, rules,
                                             max_new_tokens=config.eval.max_new_tokens, eos_id=-1,
                                             pad_id=tokenizer.pad_id)  # eos -1: every row decodes all tokens
        eval_batch = config.eval.batch_size
        batch = answering.prompt_batch(source, tokenizer, spec, eval_batch)
        generator(batch)  # compile
        gen = statistics.median(cli.timed(lambda: generator(batch), generate_batches))
        report.update(generate_batch=eval_batch, generate_new_tokens=config.eval.max_new_tokens,
                      generate_seconds_per_batch=round(gen, 4), generate_questions_per_s=round(eval_batch / gen, 1))
    return report


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cli.setup_logging(logging.WARNING)
    if FLAGS.compare or FLAGS.scan:
        return _side_bench()
    if FLAGS.config is None:
        raise app.UsageError("--config (or --compare torch, or --scan B,L,E,N) is required")
    with tempfile.TemporaryDirectory() as tmp:
        report = bench(FLAGS.config, FLAGS.workdir or tmp, steps=FLAGS.steps, warmup=FLAGS.warmup,
                       generate_batches=FLAGS.generate_batches)
    width = max(map(len, report))
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    _write_out(report)
    if FLAGS.min_samples_per_s is not None and report["samples_per_s"] < FLAGS.min_samples_per_s:
        raise SystemExit(f"below target: {report['samples_per_s']} samples/s < {FLAGS.min_samples_per_s}")


def _side_bench():
    if FLAGS.compare:
        cli.reexec_with_retained_memory()  # torch and XLA in one process (cli.RETAINED_MEMORY_TUNABLES)
        from meteor_jax import compare_torch

        # torch takes seconds per step on a CPU: 3 timed steps per row unless --steps says otherwise
        report = compare_torch.compare(steps=FLAGS.steps if FLAGS["steps"].present else 3)
        print(compare_torch.format_table(report))
    else:
        from meteor_jax import scan_bench

        try:
            batch, length, inner, state = (int(v) for v in FLAGS.scan)
        except ValueError:
            raise app.UsageError(f"--scan wants batch,length,inner,state, got {FLAGS.scan}") from None
        report = scan_bench.bench_scans(batch, length, inner, state, steps=FLAGS.steps, warmup=FLAGS.warmup)
        for row in report:
            print(row)
    _write_out(report)


def _write_out(report) -> None:
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    cli.run(main)
