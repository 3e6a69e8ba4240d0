"""A whole run from one config: mesh, tokenizer, data, model (random or converted weights), the train loop with
checkpoint/resume and metrics, then evaluation. `python -m meteor_jax.main` is a thin wrapper around `run`."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from meteor_jax import checkpoint as checkpoint_lib
from meteor_jax import config as config_lib
from meteor_jax import inference
from meteor_jax import paths
from meteor_jax import sharding
from meteor_jax.data import pipeline
from meteor_jax.data.tokenizer import Tokenizer, load_tokenizer, train_word_tokenizer
from meteor_jax.models.meteor import Meteor, MeteorConfig
from meteor_jax.train import optim, step as step_lib
from meteor_jax.train.metrics import MetricsWriter
from meteor_jax.train.state import train_state_from_params


# ----------------------------------------------------------------------------------------------- set-up


def make_source(spec: str, config, workdir: paths.PathLike):
    """A random-access source of LLaVA records from `kind:arg` (see config.data.train)."""
    from meteor_jax.data import tfds as tfds_lib
    from meteor_jax.data.llava import LlavaJsonSource

    kind, _, arg = spec.partition(":")
    # tfds takes a gs:// data_dir as it is (its own epath): only keep the URL whole.
    data_dir = config.data.data_dir or str(paths.workdir_path(workdir) / "tfds")
    # A tfds source is built in data_dir on first use: process 0 builds it, then the others open it (no race).
    if kind == "easy_vqa":
        return _process_0_first(lambda: tfds_lib.easy_vqa_source(arg or "train", data_dir))
    if kind in ("llava_pretrain", "llava_instruct"):
        return _process_0_first(
            lambda: tfds_lib.llava_source(kind, data_dir, config.data.manual_dir or None, split=arg or "train"))
    if kind == "llava_json":
        if not config.data.image_folder:
            raise ValueError("config.data.image_folder must be set for a llava_json source")
        return LlavaJsonSource(arg, config.data.image_folder)
    raise ValueError(f"config.data source {spec!r}: expected easy_vqa:SPLIT, llava_json:FILE, "
                     "llava_pretrain:SPLIT or llava_instruct:SPLIT")


def build_tokenizer(config, workdir: paths.PathLike, train_source) -> Tokenizer:
    """The configured tokenizer; "word:easy_vqa" trains a word-level one on the training records (once, saved
    in the workdir so a resumed run gets the same ids)."""
    spec = config.tokenizer
    if spec.startswith("word:") and not paths.workdir_path(spec[5:]).is_file():
        path = paths.workdir_path(workdir) / "tokenizer.json"
        exists = path.is_file()
        _sync("tokenizer")  # every process has looked before process 0 may write it
        if exists:
            return load_tokenizer(f"word:{path}")
        # Every process trains the same vocabulary (deterministic); process 0 saves it, atomically (Tokenizer.save
        # uses paths.write_atomic: tmp + rename locally, one object write on gs://), so a reader never sees half.
        texts = [turn["value"] for i in range(len(train_source)) for turn in train_source[i]["conversations"]]
        texts.append(_template_words(config.data.template))
        tokenizer = train_word_tokenizer(texts)
        if jax.process_index() == 0:
            tokenizer.save(path)
        return tokenizer
    if not spec:
        raise ValueError("config.tokenizer is empty")
    return load_tokenizer(spec)


def _template_words(template: str) -> str:
    """The fixed text of a template (USER:, ASSISTANT:, the system prompt), so a word-level vocabulary has it."""
    from meteor_jax.data.templates import TEMPLATES

    t = TEMPLATES[template]
    text = " ".join([t.system, t.user, t.assistant, t.answer, t.after_answer])
    return text.replace("{content}", " ").replace("{eos}", " ")


_RUNTIME_FIELDS = {"dtype", "scan_layers", "remat", "max_seq_len", "trainable", "select_layer"}


def _check_loaded(name: str, loaded_cfg, wanted_cfg) -> None:
    diffs = [f"{f.name}: checkpoint {getattr(loaded_cfg, f.name)!r} vs config {getattr(wanted_cfg, f.name)!r}"
             for f in dataclasses.fields(wanted_cfg)
             if f.name not in _RUNTIME_FIELDS and getattr(loaded_cfg, f.name) != getattr(wanted_cfg, f.name)]
    if diffs:
        raise ValueError(f"config.weights.{name} does not match config.model.{name}: " + "; ".join(diffs))


def load_pretrained(config, model_cfg: MeteorConfig, mesh, rules) -> dict[str, Any]:
    """{module name: nnx param State} for the modules with configured weights, loaded straight onto the mesh."""
    loaded = {}
    if config.weights.get("llava"):  # .get: run configs saved before the field existed lack it
        if config.weights.vision or config.weights.llm:
            raise ValueError("config.weights.llava holds the vision tower and the LLM: leave config.weights.vision "
                             "and config.weights.llm empty")
        from meteor_jax.convert.llava import load_llava

        loaded.update(load_llava(config.weights.llava, model_cfg, mesh=mesh, rules=rules))
    runtime = lambda cfg: {f: getattr(cfg, f) for f in ("dtype", "scan_layers") if hasattr(cfg, f)}  # noqa: E731
    if config.weights.llm:
        spec = config.weights.llm
        if spec.startswith("gguf:"):
            from meteor_jax.convert.gguf import load_gguf_llama

            path = None if spec == "gguf:smollm2" else spec[5:]
            llm = load_gguf_llama(path, mesh=mesh, rules=rules, remat=model_cfg.llm.remat,
                                  max_seq_len=model_cfg.llm.max_seq_len, **runtime(model_cfg.llm))
        else:
            from meteor_jax.convert.llama import load_llama

            llm = load_llama(spec, mesh=mesh, rules=rules, remat=model_cfg.llm.remat,
                             max_seq_len=model_cfg.llm.max_seq_len, **runtime(model_cfg.llm))
        _check_loaded("llm", llm.cfg, model_cfg.llm)
        loaded["llm"] = nnx.state(llm, nnx.Param)
    if config.weights.vision:
        from meteor_jax.convert.clip import load_clip_vision

        vision = load_clip_vision(config.weights.vision, mesh=mesh, rules=rules,
                                  select_layer=model_cfg.vision.select_layer, trainable=model_cfg.vision.trainable,
                                  **runtime(model_cfg.vision))
        _check_loaded("vision", vision.cfg, model_cfg.vision)
        loaded["vision"] = nnx.state(vision, nnx.Param)
    return loaded


def init_params(model_cfg: MeteorConfig, seed: int, mesh, rules, loaded: dict):
    """(graphdef, params): random initialisation of what is not `loaded`, directly on the parameter shardings.

    The loaded subtrees go through the same jit and replace the random ones there, so XLA drops their random
    initialisation and no module exists twice in memory."""
    make = lambda: Meteor(model_cfg, rngs=nnx.Rngs(seed))  # noqa: E731
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = sharding.state_shardings(abstract, mesh, rules)

    def init(loaded_pure):
        params = nnx.state(make(), nnx.Param)
        pure = nnx.to_pure_dict(params)
        pure.update(loaded_pure)
        nnx.replace_by_pure_dict(params, pure)
        return params

    loaded_pure = {k: nnx.to_pure_dict(v) for k, v in loaded.items()}
    return graphdef, jax.jit(init, out_shardings=shardings, donate_argnums=0)(loaded_pure)


def initial_params(config, model_cfg: MeteorConfig, mesh, rules):
    """(graphdef, params, names of the top-level modules that got weights): random initialisation, the converted
    weights of config.weights, then the modules config.init takes from another run's checkpoint (stage 2)."""
    loaded = load_pretrained(config, model_cfg, mesh, rules)
    graphdef, params = init_params(model_cfg, config.seed, mesh, rules, loaded)
    given = set(loaded)
    if config.init.checkpoint:
        params = checkpoint_lib.restore_params_subset(config.init.checkpoint, None, params, tuple(config.init.modules))
        logging.info("took %s from checkpoint %s", list(config.init.modules), config.init.checkpoint)
        given |= set(config.init.modules)
    return graphdef, params, sorted(given)


def process_rows(mesh, rules, batch_size: int) -> tuple[int, int, int]:
    """(slot, slots, rows): this process feeds `rows` rows of every global batch of slots·rows = batch_size, the
    slot-th block of them in the data order. When every process's devices hold one block of consecutive rows (the
    usual mesh), slot·rows is that block's first row, so the global batches are exactly those of one process with
    the whole batch; otherwise they hold the same samples in another order. Processes whose devices hold the same
    rows (batch axes that do not span the processes) share a slot and feed the same data. A collective."""
    shard = sharding.batch_sharding(mesh, 1, rules)
    starts = sorted({i[0].start or 0 for i in shard.addressable_devices_indices_map((batch_size,)).values()})
    rows = len(starts) * shard.shard_shape((batch_size,))[0]
    groups = sorted({tuple(g) for g in _allgather_json(starts)})
    if rows * len(groups) != batch_size:
        raise ValueError(f"the processes hold rows starting at {groups} of the global batch {batch_size}: not "
                         f"{len(groups)} disjoint sets of {rows} rows")
    return groups.index(tuple(starts)), len(groups), rows


def _sync(name: str) -> None:
    """A barrier over all processes (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _process_0_first(fn):
    """fn() on process 0, then on the others: e.g. a dataset built on first use, built once without racing."""
    if jax.process_index() == 0:
        out = fn()
    _sync("process 0 first")
    if jax.process_index() != 0:
        out = fn()
    return out


def _allgather_json(obj) -> list:
    """[obj of process 0, obj of process 1, ...] for a JSON-able obj (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([data.size], np.int32))).reshape(-1)
    padded = np.zeros(max(256, 1 << int(sizes.max() - 1).bit_length()), np.uint8)  # few shapes: few compiles
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(bytes(row[:int(n)])) for row, n in zip(rows, sizes)]


def _sum_counts(states) -> dict:
    total = {"kept": 0, "truncated": 0, "skipped": {}}
    for s in states:
        total["kept"] += int(s["kept"])
        total["truncated"] += int(s["truncated"])
        for reason, n in s["skipped"].items():
            total["skipped"][reason] = total["skipped"].get(reason, 0) + int(n)
    return total


def _run_skip_counts(skips: pipeline.SkipCounter, slot: int) -> pipeline.SkipCounter:
    """The samples kept/skipped/truncated by the whole run (each slot counted once), the same on every process."""
    if jax.process_count() == 1:
        return skips
    by_slot = {g["slot"]: g["counts"] for g in _allgather_json({"slot": slot, "counts": skips.get_state()})}
    total = pipeline.SkipCounter()
    total.set_state(_sum_counts(by_slot.values()))
    return total


def _run_data_state(local_state, slot: int, slots: int, rows: int) -> dict:
    """The data state of the whole run, for a checkpoint: every slot's iterator state, gathered from the
    processes (a collective)."""
    by_slot = {g["slot"]: g["state"] for g in _allgather_json({"slot": slot, "state": local_state})}
    return {"rows": rows, "slots": [by_slot[i] for i in range(slots)]}


def _process_data_state(saved, slot: int, slots: int, rows: int, batch_size: int):
    """This process's iterator state from a checkpoint's run data state. When the number of processes or the rows
    per process changed, every process goes on from where the saved run's furthest slot had got to in the shared
    record order: the same records as an uninterrupted run when no sample was skipped."""
    if saved is None:
        return None
    if not (isinstance(saved, dict) and "slots" in saved):  # a single iterator's state (older checkpoints)
        saved = {"rows": batch_size, "slots": [saved]}
    old_rows, states = int(saved["rows"]), saved["slots"]
    if len(states) == slots and old_rows == rows:
        return states[slot]
    try:
        positions = [int(s["parent"]["next_index"]) for s in states]
        counts = [s["counts"] for s in states]
    except (KeyError, TypeError) as e:
        raise ValueError(f"the data iterator state was saved by {len(states)} process(es) × {old_rows} rows; it "
                         f"cannot be moved to {slots} × {rows} rows (only config.data.worker_count=0 states can): "
                         "resume with the same processes and batch size") from e
    consumed = max(-(-k // old_rows) for k in positions) * old_rows * len(states)
    if len(set(positions)) > 1 or positions[0] % old_rows:
        logging.warning("data state of %d × %d rows at positions %s moved to %d × %d rows: records up to %d of the "
                        "shared order count as read", len(states), old_rows, positions, slots, rows, consumed)
    full, rest = divmod(consumed, rows * slots)
    empty = {"kept": 0, "truncated": 0, "skipped": {}}
    return {"parent": {"next_index": full * rows + min(max(rest - slot * rows, 0), rows)},
            "counts": _sum_counts(counts) if slot == 0 else empty}


# ----------------------------------------------------------------------------------------------- the run


def run(config: ml_collections.ConfigDict, workdir: paths.PathLike) -> dict:
    """Train (resuming from the workdir's latest checkpoint), evaluate, write results.json; returns the results."""
    wall_start = time.perf_counter()
    model_cfg = config_lib.validate(config)
    workdir = paths.workdir_path(workdir)  # local (made absolute) or a URL such as gs://bucket/run
    workdir.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = config_lib.sharding_rules(config)
    logging.info("mesh %s on %d devices (%s), %d process(es)", dict(mesh.shape), jax.device_count(),
                 jax.devices()[0].platform, jax.process_count())

    train_source = make_source(config.data.train, config, workdir)
    tokenizer = build_tokenizer(config, workdir, train_source)
    if tokenizer.vocab_size > model_cfg.llm.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but config.model.llm.vocab_size is "
                         f"{model_cfg.llm.vocab_size}")
    spec = config_lib.feature_spec(config, model_cfg)
    batch_size = config.train.batch_size
    if batch_size % jax.process_count():
        raise ValueError(f"config.train.batch_size={batch_size} is not divisible by {jax.process_count()} processes")
    slot, slots, rows = process_rows(mesh, rules, batch_size)
    steps_per_epoch = max(len(train_source) // batch_size, 1)
    total_steps = config.train.num_steps or max(int(math.ceil(config.train.num_epochs * steps_per_epoch)), 1)

    schedule = optim.make_schedule(total_steps, lr=config.train.lr, warmup_ratio=config.train.warmup_ratio)
    graphdef, params, _ = initial_params(config, model_cfg, mesh, rules)
    labels = optim.trainable_labels(params, tuple(config.train.trainable))
    tx = optim.make_optimizer(labels, schedule, weight_decay=config.train.weight_decay,
                              clip_norm=config.train.clip_norm)
    counts = _param_counts(params, labels)
    logging.info("parameters: %s", ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in counts.items()))
    state, shardings = train_state_from_params(params, tx, mesh, rules)
    train_step = step_lib.make_train_step(graphdef, tx, labels, shardings, mesh, rules=rules, schedule=schedule,
                                          micro_batches=config.train.micro_batches)

    skips = pipeline.SkipCounter()
    # The processes read disjoint rows of the same global batches: together, what one process would read.
    dataset = pipeline.make_dataset(train_source, tokenizer, spec, batch_size=rows, process_index=slot,
                                    process_count=slots, seed=config.seed, worker_count=config.data.worker_count,
                                    prefetch=config.data.prefetch, skip_counter=skips,
                                    image_cache=config.data.image_cache, read_threads=config.data.read_threads,
                                    balance=dict(config.data.balance) or None)
    iterator = iter(dataset)
    ckpt = checkpoint_lib.Checkpointer(workdir / "checkpoints", keep=config.train.keep_checkpoints,
                                       save_every=config.train.checkpoint_every)
    start_step = 0
    if ckpt.latest_step() is not None:
        state, data_state = ckpt.restore(None, state)
        data_state = _process_data_state(data_state, slot, slots, rows, batch_size)
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
                run_skips = _run_skip_counts(skips, slot)  # every process decides the same in _check_skips
                last = dict(loss=float(np.mean([m["loss"] for m in host])), lr=float(host[-1]["lr"]),
                            grad_norm=float(np.mean([m["grad_norm"] for m in host])),
                            skipped_steps=float(sum(m["skipped_step"] for m in host)),
                            **{"data/token_sum": float(host[-1]["data/token_sum"])}, **run_skips.metrics())
                writer.write(step + 1, last)
                metrics_acc = []
                _check_skips(run_skips, config.data.max_skip_fraction)
            if ckpt.should_save(step + 1, force=step + 1 == total_steps):  # all processes save, together
                ckpt.save(step + 1, state, _run_data_state(iterator.get_state(), slot, slots, rows),
                          force=step + 1 == total_steps)
        train_seconds = time.perf_counter() - t0
    ckpt.close()
    writer.plot_loss()
    writer.close()

    run_skips = _run_skip_counts(skips, slot)
    results = dict(train_steps=total_steps, resumed_from_step=start_step, train_seconds=round(train_seconds, 1),
                   final_train_loss=last.get("loss"), skipped_train_steps=int(state.skipped),
                   skipped_samples=run_skips.skipped, truncated_samples=run_skips.truncated,
                   visual_tokens_total=model_cfg.vision.num_patches, visual_tokens_kept=model_cfg.selection.keep,
                   parameters=counts)
    if config.data.eval:
        results.update(evaluate(config, workdir, graphdef, state.params, tokenizer, spec, mesh, rules))
    results["wall_seconds"] = round(time.perf_counter() - wall_start, 1)
    if jax.process_index() == 0:
        (workdir / "results.json").write_text(json.dumps(results, indent=2))
    logging.info("results: %s", json.dumps(results))
    return results


def evaluate(config, workdir, graphdef, params, tokenizer, spec, mesh, rules) -> dict:
    """Answer config.data.eval by greedy generation and score it with the `easy_vqa` benchmark (exact match): the
    code path of `python -m meteor_jax.evaluate --benchmark easy_vqa`. Writes WORKDIR/answers.jsonl."""
    from meteor_jax.eval import answering, benchmarks

    source = make_source(config.data.eval, config, workdir)
    n = len(source) if config.eval.num_examples < 0 else min(config.eval.num_examples, len(source))
    records = [source[i] for i in range(n)]
    ground_truth = {str(r["id"]): dict(question_id=r["id"], answer=answering.gold_answer(r)) for r in records}
    generator = inference.make_generator(graphdef, params, mesh, rules, max_new_tokens=config.eval.max_new_tokens,
                                         eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)
    t0 = time.perf_counter()
    answers = answering.answer_records(generator, map(answering.prompt_record, records), tokenizer, spec,
                                       batch_size=config.eval.batch_size)
    scores = benchmarks.score("easy_vqa", answers, ground_truth)
    accuracy = scores[benchmarks.get_benchmark("easy_vqa").main_metric]
    if jax.process_index() == 0:
        answering.write_answers(answers, paths.workdir_path(workdir) / "answers.jsonl")
    seconds = time.perf_counter() - t0
    logging.info("evaluation on %s: exact match %.4f over %d questions (%.1f s)", config.data.eval, accuracy,
                 len(answers), seconds)
    return dict(test_accuracy=accuracy, test_examples=len(answers), eval_seconds=round(seconds, 1))


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
