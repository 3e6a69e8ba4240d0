"""The train loop of a run: resume from the workdir's latest checkpoint, train with metrics and checkpoints, then
evaluate and write results.json. The run itself (mesh, tokenizer, data sources, parameters, optimizer, step) is
assembled by `meteor_jax.run.Run`; `python -m meteor_jax.main` is a thin wrapper around `run`."""
from __future__ import annotations

import json
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from meteor_jax import checkpoint as checkpoint_lib
from meteor_jax import distributed, inference, paths, sharding
from meteor_jax.data import pipeline
from meteor_jax.run import Run
from meteor_jax.train import optim
from meteor_jax.train.metrics import MetricsWriter


# ----------------------------------------------------------------------------------------------- the run


def run(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> dict:
    """Train (resuming from the workdir's latest checkpoint), evaluate, write results.json; returns the results."""
    wall_start = time.perf_counter()
    job = Run.from_config(config)
    config, mesh, rules = job.config, job.mesh, job.rules
    workdir = paths.workdir_path(workdir)  # local (made absolute) or a URL such as gs://bucket/run
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    logging.info("mesh %s on %d devices (%s), %d process(es)", dict(mesh.shape), jax.device_count(),
                 jax.devices()[0].platform, jax.process_count())

    train_source = job.source(config.data.train, workdir)
    tokenizer = job.tokenizer(workdir, train_source)
    batch_size = config.train.batch_size
    if batch_size % jax.process_count():
        raise ValueError(f"config.train.batch_size={batch_size} is not divisible by {jax.process_count()} processes")
    slot, slots, rows = distributed.process_rows(mesh, rules, batch_size)
    total_steps = job.total_steps(len(train_source))
    steps_per_epoch = max(len(train_source) // batch_size, 1)

    graphdef, params, _ = job.initial_params()
    training = job.training(graphdef, params, total_steps)
    state, train_step = training.state, training.step
    counts = _param_counts(state.params, training.optimizer.labels)
    logging.info("parameters: %s", ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))

    skips = pipeline.SkipCounter()
    # The processes read disjoint rows of the same global batches: together, what one process would read.
    dataset = pipeline.make_dataset(train_source, tokenizer, job.spec, batch_size=rows, process_index=slot,
                                    process_count=slots, seed=config.seed, worker_count=config.data.worker_count,
                                    prefetch=config.data.prefetch, skip_counter=skips,
                                    image_cache=config.data.image_cache, feature_cache=config.data.feature_cache,
                                    read_threads=config.data.read_threads, balance=dict(config.data.balance) or None)
    iterator = iter(dataset)
    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                                       save_every=config.train.checkpoint_every)
    start_step = 0
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(None, state)
        data_state = distributed.process_data_state(data_state, slot, slots, rows, batch_size)
        if data_state is not None:
            iterator.set_state(data_state)
        start_step = int(state.step)
        logging.info("resumed from step %d of %s", start_step, ckpt.directory)

    writer = MetricsWriter(workdir, total_steps, batch_size, config.data.max_len)
    train_seconds = 0.0
    last = {}
    if start_step < total_steps:
        logging.info("training %d steps (%d per epoch of %d samples), global batch %d", total_steps - start_step,
                     steps_per_epoch, len(train_source), batch_size)
        t0 = time.perf_counter()
        metrics_acc = []
        # A fingerprint of the global batch's content: resumed runs can be checked for the same data order.
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        token_sum = jax.jit(lambda t: t.sum(), out_shardings=replicated)
        for step in range(start_step, total_steps):
            batch = sharding.global_batch(next(iterator), mesh, rules, batch_size)
            fingerprint = token_sum(batch["tokens"])
            state, metrics = train_step(state, batch)
            metrics_acc.append(dict(metrics, **{"data/token_sum": fingerprint}))
            if step == start_step:
                jax.block_until_ready(metrics)  # the first step includes compilation: time from here on
                logging.info("first step (compilation included) %.1f s", time.perf_counter() - t0)
                writer.start(step + 1)
                metrics_acc = []
            elif (step + 1) % config.train.log_every == 0 or step + 1 == total_steps:
                host = jax.device_get(metrics_acc)
                run_skips = _run_skips(skips, slot)  # every process decides the same in _check_skips
                last = dict(loss=float(np.mean([m["loss"] for m in host])), lr=float(host[-1]["lr"]),
                            grad_norm=float(np.mean([m["grad_norm"] for m in host])),
                            skipped_steps=float(sum(m["skipped_step"] for m in host)),
                            **{"data/token_sum": float(host[-1]["data/token_sum"])}, **run_skips.metrics())
                writer.write(step + 1, last)
                metrics_acc = []
                _check_skips(run_skips, config.data.max_skip_fraction)
            if ckpt.should_save(step + 1, force=step + 1 == total_steps):  # all processes save, together
                ckpt.save(step + 1, state, distributed.run_data_state(iterator.get_state(), slot, slots, rows),
                          force=step + 1 == total_steps)
        train_seconds = time.perf_counter() - t0
    ckpt.close()
    writer.plot_loss()
    writer.close()

    run_skips = _run_skips(skips, slot)
    results = dict(train_steps=total_steps, resumed_from_step=start_step, train_seconds=round(train_seconds, 1),
                   final_train_loss=last.get("loss"), skipped_train_steps=int(state.skipped),
                   skipped_samples=run_skips.skipped, truncated_samples=run_skips.truncated,
                   visual_tokens_total=job.model_cfg.vision.num_patches,
                   visual_tokens_kept=job.model_cfg.selection.keep,
                   parameters=counts)
    if config.data.eval:
        results.update(evaluate(job, workdir, graphdef, state.params, tokenizer))
    results["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    logging.info("results: %s", json.dumps(results))
    return results


def evaluate(job: Run, workdir, graphdef, params, tokenizer) -> dict:
    """Answer config.data.eval by greedy generation and score it with the `easy_vqa` benchmark (exact match): the
    code path of `python -m meteor_jax.evaluate --benchmark easy_vqa`. Writes WORKDIR/answers.jsonl."""
    from meteor_jax.eval import answering, benchmarks

    config = job.config
    source = job.source(config.data.eval, workdir)
    n = len(source) if config.eval.num_examples < 0 else min(config.eval.num_examples, len(source))
    records = [source[i] for i in range(n)]
    ground_truth = {str(r["id"]): dict(question_id=r["id"], answer=answering.gold_answer(r)) for r in records}
    generator = inference.make_generator(graphdef, params, job.mesh, job.rules,
                                         max_new_tokens=config.eval.max_new_tokens,
                                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    t0 = time.perf_counter()
    answers = answering.answer_records(generator, map(answering.prompt_record, records), tokenizer, job.spec,
                                       batch_size=config.eval.batch_size)
    scores = benchmarks.score("easy_vqa", answers, ground_truth)
    accuracy = scores[benchmarks.get_benchmark("easy_vqa").main_metric]
    if jax.process_index() == 0:
        answering.write_answers(answers, paths.workdir_path(workdir) / "answers.jsonl")
    seconds = time.perf_counter() - t0
    logging.info("evaluation on %s: exact match %.4f over %d questions (%.1f s)", config.data.eval, accuracy,
                 len(answers), seconds)
    return dict(test_accuracy=accuracy, test_examples=len(answers), eval_seconds=round(seconds, 1))


def _run_skips(skips: pipeline.SkipCounter, slot: int) -> pipeline.SkipCounter:
    """The whole run's sample counts (every process's slot counted once), the same on every process."""
    total = pipeline.SkipCounter()
    total.set_state(distributed.run_skip_counts(skips.get_state(), slot))
    return total


def _check_skips(skips: pipeline.SkipCounter, max_fraction: float) -> None:
    skipped = sum(skips.skipped.values())
    seen = skipped + skips.kept
    if seen >= 200 and skipped > max_fraction * seen:
        raise RuntimeError(f"{skipped} of {seen} samples were skipped ({skips.skipped}); more than "
                           f"config.data.max_skip_fraction={max_fraction}: check the data paths and template")


def _param_counts(params, labels) -> dict[str, int]:
    counts: dict[str, int] = {}
    for (path, value), label in zip(jax.tree_util.tree_leaves_with_path(params),
                                    jax.tree.leaves(labels)):
        module = str(getattr(path[0], "key", path[0]))
        counts[module] = counts.get(module, 0) + int(np.prod(value.shape))
        if label == optim.TRAINED:
            counts["trained"] = counts.get("trained", 0) + int(np.prod(value.shape))
    return counts
