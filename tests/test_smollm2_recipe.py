"""configs/smollm2.py: the two-stage recipe with the real SmolLM2-135M decoder, run for a few steps."""
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from configs import smollm2
from meteor_jax.convert.gguf import load_gguf_llama


def _config(stage, data_dir):
    config = smollm2.get_config(stage)
    config.mesh = dict(data=1, fsdp=1, tensor=-1)  # batch 2 on 8 devices: shard the model, not the batch
    config.data.update(data_dir=data_dir, train="easy_vqa:train[:64]", eval="easy_vqa:test[:4]", max_len=64)
    config.train.update(batch_size=2, num_steps=2, log_every=1, checkpoint_every=2)
    config.eval.update(batch_size=4, max_new_tokens=2, num_examples=4)
    return config


def _params(workdir, step):
    with ocp.CheckpointManager(os.path.join(workdir, "checkpoints"),
                               options=ocp.CheckpointManagerOptions(read_only=True)) as manager:
        return manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))["params"]


def test_two_stage_recipe(tmp_path, easy_vqa_data_dir):
    from meteor_jax.train import trainer

    data_dir = easy_vqa_data_dir
    stage1, stage2 = str(tmp_path / "stage1"), str(tmp_path / "stage2")
    config = _config("stage1", data_dir)
    config.data.eval = ""  # stage 2 evaluates; one SmolLM2 generation compile is enough for the suite's time
    r1 = trainer.run(config, stage1)
    assert r1["train_steps"] == 2 and r1["skipped_train_steps"] == 0 and "test_examples" not in r1
    assert r1["parameters"]["llm"] == 134_515_008
    after1 = _params(stage1, 2)
    # Stage 1 froze the LLM: its weights are still exactly SmolLM2's.
    gguf = nnx.to_pure_dict(nnx.state(load_gguf_llama(), nnx.Param))
    for ours, theirs in zip(jax.tree.leaves(after1["llm"]), jax.tree.leaves(gguf)):
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs))

    config = _config("stage2", data_dir)
    config.init.checkpoint = os.path.join(stage1, "checkpoints")
    r2 = trainer.run(config, stage2)
    assert r2["train_steps"] == 2 and r2["skipped_train_steps"] == 0 and r2["test_examples"] == 4
    after2 = _params(stage2, 2)
    # Stage 2 trained the LLM (from SmolLM2) and continued from stage 1's vision + fusion.
    assert any(not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(jax.tree.leaves(after2["llm"]), jax.tree.leaves(gguf)))
    start = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                for a, b in zip(jax.tree.leaves(after2["fusion"]), jax.tree.leaves(after1["fusion"])))
    assert start < 1e-2, "stage 2 did not start from the stage-1 fusion weights"
