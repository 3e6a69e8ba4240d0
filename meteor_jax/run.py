"""A run assembled from its config, the one way every entry point builds it: the validated config, the mesh and
the logical-axis rules, the feature spec, the data sources, the tokenizer, the parameters (random, converted,
taken from another run, or restored), the optimizer and the train state with its step function.

`trainer` (the loop), `inference` (a model ready to answer), `aot` (compile for a topology) and `bench` (speed on
this machine) all start from `Run.from_config(config)`, so they train, compile and time the same thing.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple, Sequence

import jax
import ml_collections
import optax
from absl import logging
from flax import nnx

from meteor_jax import checkpoint as checkpoint_lib
from meteor_jax import config as config_lib
from meteor_jax import distributed, paths, sharding
from meteor_jax.data.features import FeatureSpec
from meteor_jax.data.tokenizer import Tokenizer, load_tokenizer, train_word_tokenizer
from meteor_jax.models.meteor import Meteor, MeteorConfig
from meteor_jax.train import optim, step as step_lib
from meteor_jax.train.state import TrainState, abstract_train_state, train_state_from_params, with_shardings


class Optimizer(NamedTuple):
    labels: Any  # per parameter: optim.TRAINED or optim.FROZEN
    schedule: optax.Schedule
    tx: optax.GradientTransformation


class Training(NamedTuple):
    """What the train loop runs: the state (concrete, or abstract for an AOT compile) and its jitted step."""
    graphdef: nnx.GraphDef
    optimizer: Optimizer
    state: TrainState
    shardings: TrainState  # of NamedShardings
    step: Callable  # (state, global batch) -> (state, metrics)


@dataclasses.dataclass(frozen=True)
class Run:
    config: ml_collections.ConfigDict  # validated, every field present
    model_cfg: MeteorConfig
    mesh: jax.sharding.Mesh
    rules: dict
    spec: FeatureSpec

    @classmethod
    def from_config(cls, config, devices: Sequence[jax.Device] | None = None) -> "Run":
        """Validate `config` (naming a bad field) and build its mesh over `devices` (default: all)."""
        config, model_cfg = config_lib.validate(config)
        mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices=devices)
        return cls(config, model_cfg, mesh, sharding.rules_with(config.sharding_rules),
                   config_lib.feature_spec(config, model_cfg))

    def with_keep(self, keep: int) -> "Run":
        """The same run seen with another number of kept visual tokens (`config.with_keep`: the prompt length
        follows the image slots)."""
        return Run.from_config(config_lib.with_keep(self.config, keep), devices=list(self.mesh.devices.flat))

    # ------------------------------------------------------------------------------------------- data

    def source(self, spec: str, workdir: paths.PathLike):
        """A random-access source of LLaVA records from `kind:arg` (see config.data.train)."""
        from meteor_jax.data import tfds as tfds_lib
        from meteor_jax.data.llava import LlavaJsonSource

        data = self.config.data
        kind, _, arg = spec.partition(":")
        # tfds takes a gs:// data_dir as it is (its own epath): only keep the URL whole.
        data_dir = data.data_dir or str(paths.workdir_path(workdir) / "tfds")
        # A tfds source is built in data_dir on first use: process 0 builds it, then the others open it (no race).
        if kind == "easy_vqa":
            return distributed.process_0_first(lambda: tfds_lib.easy_vqa_source(arg or "train", data_dir))
        if kind in ("llava_pretrain", "llava_instruct"):
            return distributed.process_0_first(
                lambda: tfds_lib.llava_source(kind, data_dir, data.manual_dir or None, split=arg or "train"))
        if kind == "llava_json":
            if not data.image_folder:
                raise ValueError("config.data.image_folder must be set for a llava_json source")
            return LlavaJsonSource(arg, data.image_folder)
        raise ValueError(f"config.data source {spec!r}: expected easy_vqa:SPLIT, llava_json:FILE, "
                         "llava_pretrain:SPLIT or llava_instruct:SPLIT")

    def tokenizer(self, workdir: paths.PathLike | None, train_source=None) -> Tokenizer:
        """The run's tokenizer. A word-level one ("word:easy_vqa") belongs to the run: it is read from
        WORKDIR/tokenizer.json, or trained on `train_source`'s text (once; process 0 saves it, so a resumed run
        and inference get the same ids)."""
        spec = self.config.tokenizer
        if not spec:
            raise ValueError("config.tokenizer is empty")
        if spec.startswith("word:") and not paths.workdir_path(spec[5:]).is_file():
            tokenizer = self._run_word_tokenizer(spec, workdir, train_source)
        else:
            tokenizer = load_tokenizer(spec)
        if tokenizer.vocab_size > self.model_cfg.llm.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but config.model.llm.vocab_size is "
                             f"{self.model_cfg.llm.vocab_size}: the config does not belong to this tokenizer")
        return tokenizer

    def _run_word_tokenizer(self, spec: str, workdir, train_source) -> Tokenizer:
        path = paths.workdir_path(workdir) / "tokenizer.json" if workdir else None
        exists = path is not None and path.is_file()
        if train_source is None:
            if not exists:
                raise FileNotFoundError(f"config.tokenizer={spec!r} is trained by the run and saved as "
                                        "WORKDIR/tokenizer.json: pass the run's workdir (or a checkpoint inside it)")
            return load_tokenizer(f"word:{path}")
        distributed.sync("tokenizer")  # every process has looked before process 0 may write it
        if exists:
            return load_tokenizer(f"word:{path}")
        # Every process trains the same vocabulary (deterministic); process 0 saves it atomically (Tokenizer.save
        # uses paths.write_atomic: tmp + rename locally, one object write on gs://), so a reader never sees half.
        texts = [turn["value"] for i in range(len(train_source)) for turn in train_source[i]["conversations"]]
        texts.append(_template_words(self.config.data.template))
        tokenizer = train_word_tokenizer(texts)
        if jax.process_index() == 0:
            tokenizer.save(path)
        return tokenizer

    def total_steps(self, num_records: int) -> int:
        """config.train.num_steps, or the steps of config.train.num_epochs over `num_records` records."""
        train = self.config.train
        steps_per_epoch = max(num_records // train.batch_size, 1)
        return train.num_steps or max(int(math.ceil(train.num_epochs * steps_per_epoch)), 1)

    # ------------------------------------------------------------------------------------------- parameters

    def make_model(self) -> Meteor:
        return Meteor(self.model_cfg, rngs=nnx.Rngs(self.config.seed))

    def abstract_params(self) -> tuple[nnx.GraphDef, nnx.State]:
        """(graphdef, the parameters as ShapeDtypeStructs carrying their shardings on the mesh): nothing allocated."""
        graphdef, abstract = nnx.split(nnx.eval_shape(self.make_model))
        abstract = nnx.state(abstract, nnx.Param)
        return graphdef, with_shardings(abstract, sharding.state_shardings(abstract, self.mesh, self.rules))

    def random_params(self, loaded: dict | None = None) -> tuple[nnx.GraphDef, nnx.State]:
        """(graphdef, params): random initialisation of what is not in `loaded` ({module: param State}), directly
        on the parameter shardings. The loaded subtrees go through the same jit and replace the random ones there,
        so XLA drops their random initialisation and no module exists twice in memory."""
        graphdef, abstract = nnx.split(nnx.eval_shape(self.make_model))
        shardings = sharding.state_shardings(abstract, self.mesh, self.rules)

        def init(loaded_pure):
            params = nnx.state(self.make_model(), nnx.Param)
            pure = nnx.to_pure_dict(params)
            pure.update(loaded_pure)
            nnx.replace_by_pure_dict(params, pure)
            return params

        loaded_pure = {k: nnx.to_pure_dict(v) for k, v in (loaded or {}).items()}
        return graphdef, jax.jit(init, out_shardings=shardings, donate_argnums=0)(loaded_pure)

    def converted_weights(self) -> dict[str, nnx.State]:
        """{module name: param State} for the modules with converted weights (config.weights), loaded straight
        onto the mesh one tensor at a time."""
        weights, model_cfg = self.config.weights, self.model_cfg
        loaded = {}
        if weights.llava:  # the vision tower, the LLM and a baseline projector's MLP of one llava-hf directory
            from meteor_jax.convert.llava import load_llava

            loaded.update(load_llava(weights.llava, model_cfg, mesh=self.mesh, rules=self.rules))
        runtime = lambda cfg: {f: getattr(cfg, f) for f in ("dtype", "scan_layers") if hasattr(cfg, f)}  # noqa: E731
        if weights.llm:
            kwargs = dict(mesh=self.mesh, rules=self.rules, remat=model_cfg.llm.remat,
                          max_seq_len=model_cfg.llm.max_seq_len, **runtime(model_cfg.llm))
            if weights.llm.startswith("gguf:"):
                from meteor_jax.convert.gguf import load_gguf_llama

                llm = load_gguf_llama(None if weights.llm == "gguf:smollm2" else weights.llm[5:], **kwargs)
            else:
                from meteor_jax.convert.llama import load_llama

                llm = load_llama(weights.llm, **kwargs)
            _check_loaded("llm", llm.cfg, model_cfg.llm)
            loaded["llm"] = nnx.state(llm, nnx.Param)
        if weights.vision:
            from meteor_jax.convert.clip import load_clip_vision

            vision = load_clip_vision(weights.vision, mesh=self.mesh, rules=self.rules,
                                      select_layer=model_cfg.vision.select_layer,
                                      trainable=model_cfg.vision.trainable, **runtime(model_cfg.vision))
            _check_loaded("vision", vision.cfg, model_cfg.vision)
            loaded["vision"] = nnx.state(vision, nnx.Param)
        return loaded

    def initial_params(self) -> tuple[nnx.GraphDef, nnx.State, list[str]]:
        """(graphdef, params, names of the top-level modules that got weights): random initialisation, the converted
        weights of config.weights, then the modules config.init takes from another run's checkpoint (stage 2)."""
        loaded = self.converted_weights()
        graphdef, params = self.random_params(loaded)
        given = set(loaded)
        init = self.config.init
        if init.checkpoint:
            params = checkpoint_lib.restore_params_subset(init.checkpoint, None, params, tuple(init.modules))
            logging.info("took %s from checkpoint %s", list(init.modules), init.checkpoint)
            given |= set(init.modules)
        return graphdef, params, sorted(given)

    def restored_params(self, directory: paths.PathLike, step: int | None) -> tuple[nnx.GraphDef, nnx.State]:
        """(graphdef, params): every module from a checkpoint (None: its latest step), onto this run's shardings."""
        graphdef, abstract = self.abstract_params()
        return graphdef, checkpoint_lib.restore_params_subset(directory, step, abstract,
                                                              tuple(nnx.to_pure_dict(abstract)))

    # ------------------------------------------------------------------------------------------- training

    def optimizer(self, params, total_steps: int) -> Optimizer:
        """The configured optimizer for `params` (concrete or abstract): AdamW on the modules of
        config.train.trainable, the rest frozen, a warm-up + cosine schedule over `total_steps`."""
        train = self.config.train
        labels = optim.trainable_labels(params, tuple(train.trainable))
        schedule = optim.make_schedule(total_steps, lr=train.lr, warmup_ratio=train.warmup_ratio)
        tx = optim.make_optimizer(labels, schedule, weight_decay=train.weight_decay, clip_norm=train.clip_norm)
        return Optimizer(labels, schedule, tx)

    def _train_step(self, graphdef, opt: Optimizer, shardings: TrainState) -> Callable:
        return step_lib.make_train_step(graphdef, opt.tx, opt.labels, shardings, self.mesh, rules=self.rules,
                                        schedule=opt.schedule, micro_batches=self.config.train.micro_batches)

    def training(self, graphdef: nnx.GraphDef, params: nnx.State, total_steps: int) -> Training:
        """A fresh train state at step 0 over `params` (consumed: donated to the state) and its step function."""
        opt = self.optimizer(params, total_steps)
        state, shardings = train_state_from_params(params, opt.tx, self.mesh, self.rules)
        return Training(graphdef, opt, state, shardings, self._train_step(graphdef, opt, shardings))

    def abstract_training(self, total_steps: int) -> Training:
        """The same as `training`, with a state of sharded ShapeDtypeStructs: for an ahead-of-time compile."""
        _, abstract = self.abstract_params()
        opt = self.optimizer(abstract, total_steps)
        graphdef, state, shardings = abstract_train_state(self.make_model, opt.tx, self.mesh, self.rules)
        return Training(graphdef, opt, state, shardings, self._train_step(graphdef, opt, shardings))


@functools.cache
def _template_words(template: str) -> str:
    """The fixed text of a template (USER:, ASSISTANT:, the system prompt), so a word-level vocabulary has it."""
    from meteor_jax.data.templates import TEMPLATES

    t = TEMPLATES[template]
    text = " ".join([t.system, t.user, t.assistant, t.answer, t.after_answer])
    return text.replace("{content}", " ").replace("{eos}", " ")


def _check_loaded(name: str, loaded_cfg, wanted_cfg) -> None:
    from meteor_jax.convert.keymap import architecture_mismatches

    diffs = architecture_mismatches("", loaded_cfg, wanted_cfg)
    if diffs:
        raise ValueError(f"config.weights.{name} does not match config.model.{name}: " + "; ".join(diffs))
