"""A model ready to answer: parameters from a run (its workdir, checkpoints directory or one step) or from
converted Hugging Face weights, with the tokenizer and feature spec that belong to it, and a jitted batch
generator. Shared by `meteor_jax.generate`, `meteor_jax.evaluate` and the trainer's own evaluation."""
from __future__ import annotations

import dataclasses
import functools
import json
from typing import Callable

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx

from meteor_jax import paths
from meteor_jax import sharding
from meteor_jax.data.tokenizer import Tokenizer
from meteor_jax.models.meteor import generate
from meteor_jax.run import Run

Generator = Callable[[dict], tuple[np.ndarray, np.ndarray]]  # batch → (tokens (B, N), lengths (B,))


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    directory: str          # an Orbax checkpoints directory (holds <step>/ subdirectories)
    step: int               # the step to read
    workdir: str | None     # the run directory around it (config.json, tokenizer.json), when there is one


def _steps(directory) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted(int(d.name) for d in directory.iterdir() if d.name.isdigit() and d.is_dir())


def resolve_checkpoint(path: paths.PathLike) -> CheckpointRef:
    """A run's workdir (latest step), its `checkpoints/` directory (latest step) or one `checkpoints/<step>/`;
    local or a URL (gs://bucket/run)."""
    path = paths.workdir_path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if _steps(path / "checkpoints"):
        directory, step = path / "checkpoints", None
    elif _steps(path):
        directory, step = path, None
    elif path.name.isdigit() and (path / "params").is_dir():
        directory, step = path.parent, int(path.name)
    else:
        raise FileNotFoundError(f"{path} is neither a run workdir, a checkpoints directory nor a checkpoint step")
    step = _steps(directory)[-1] if step is None else step
    parent = directory.parent
    workdir = str(parent) if (parent / "config.json").is_file() else None
    return CheckpointRef(str(directory), step, workdir)


def load_run_config(workdir: paths.PathLike) -> ml_collections.ConfigDict:
    """The config a run saved (WORKDIR/config.json)."""
    return ml_collections.ConfigDict(json.loads((paths.workdir_path(workdir) / "config.json").read_text()))


@dataclasses.dataclass
class LoadedModel:
    run: Run  # the config, mesh, rules and feature spec the parameters belong to
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Tokenizer

    config = property(lambda self: self.run.config)
    model_cfg = property(lambda self: self.run.model_cfg)
    spec = property(lambda self: self.run.spec)
    mesh = property(lambda self: self.run.mesh)
    rules = property(lambda self: self.run.rules)

    def round_batch(self, rows: int) -> int:
        """`rows` rounded up to a multiple of the mesh axes the batch is split over (every process holds the whole
        generation batch; a single prompt on an 8-way data-parallel mesh is generated as 8 rows)."""
        spec = sharding.batch_sharding(self.mesh, 2, self.rules).spec[0]
        axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
        shards = int(np.prod([self.mesh.shape[a] for a in axes]))
        return -(-rows // shards) * shards

    def with_keep(self, keep: int) -> "LoadedModel":
        """The same parameters seen with another number of kept visual tokens (selection is parameter-free in K:
        its top-K is static, so only the graph and the number of image slots change; see `Run.with_keep`)."""
        run = self.run.with_keep(keep)
        return dataclasses.replace(self, run=run, graphdef=nnx.graphdef(nnx.eval_shape(run.make_model)))


def load_model(config: ml_collections.ConfigDict | None, checkpoint: str | None) -> LoadedModel:
    """Parameters from `checkpoint` (see resolve_checkpoint), or, without one, from the config's converted weights
    (`config.weights.*`, `config.init.checkpoint`) with the rest random. Without `config` the run's own
    config.json is used."""
    ref = resolve_checkpoint(checkpoint) if checkpoint else None
    if config is None:
        if ref is None or ref.workdir is None:
            raise ValueError("--config is needed unless --checkpoint is inside a run's workdir (with config.json)")
        config = load_run_config(ref.workdir)
    run = Run.from_config(config)
    tokenizer = run.tokenizer(ref.workdir if ref else None)
    if ref is not None:
        # Every module comes from the checkpoint: restore onto abstract sharded parameters, nothing random.
        graphdef, params = run.restored_params(ref.directory, ref.step)
        logging.info("loaded step %d of %s", ref.step, ref.directory)
    else:
        graphdef, params, given = run.initial_params()
        missing = sorted(set(nnx.to_pure_dict(params)) - set(given))
        if missing:
            logging.warning("no weights for %s: they are randomly initialised (pass --checkpoint for a trained "
                            "run)", missing)
    return LoadedModel(run, graphdef, params, tokenizer)


def make_generator(graphdef, params, mesh, rules, *, max_new_tokens: int, eos_id: int, pad_id: int,
                   temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Generator:
    """A jitted batch → (tokens, lengths) generator over the given (sharded) parameters: greedy at temperature 0,
    else temperature/top-p sampling with a fresh key per batch derived from `seed`."""
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")

    # Replicated outputs: with several processes every one gets all the answers (process 0 writes them).
    @functools.partial(jax.jit, out_shardings=jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
    def run(params, batch, rng):
        with sharding.logical_rules(rules):  # activation constraints under the same rules as the parameters
            return generate(nnx.merge(graphdef, params), batch, max_new_tokens=max_new_tokens, eos_id=eos_id,
                            pad_id=pad_id, temperature=temperature, top_p=top_p, rng=rng)

    calls = iter(range(1 << 62))

    def generate_batch(batch):
        rng = jax.random.fold_in(jax.random.key(seed), next(calls))
        # Every process holds the whole batch (global_rows = its rows) and places its devices' share.
        tokens, lengths = run(params, sharding.global_batch(batch, mesh, rules, len(batch['tokens'])), rng)
        return np.asarray(jax.device_get(tokens)), np.asarray(jax.device_get(lengths))

    return generate_batch


def model_generator(model: LoadedModel, **kwargs) -> Generator:
    return make_generator(model.graphdef, model.params, model.mesh, model.rules, eos_id=model.tokenizer.eos_id,
                          pad_id=model.tokenizer.pad_id, **kwargs)
