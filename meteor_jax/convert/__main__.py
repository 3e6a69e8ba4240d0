"""Export decoder weights as a Hugging Face LLaMA directory (config.json + safetensors [+ tokenizer.json]).

  python -m meteor_jax.convert --checkpoint WORKDIR --out DIR     # a run's trained decoder (e.g. after stage 2)
  python -m meteor_jax.convert --gguf smollm2 --out DIR           # a llama.cpp GGUF (here: SmolLM2-135M)

The result loads in `transformers` (`LlamaForCausalLM.from_pretrained(DIR)`) and back into this project with
`--config.weights.llm=DIR`. Importing Hugging Face weights needs no separate step: configs name the directories
and the loaders convert on the fly, straight onto the mesh.
"""
import json
import os

from absl import app, flags, logging

from meteor_jax import cli

flags.DEFINE_string("checkpoint", None, "A run's workdir, its checkpoints/ directory or one checkpoints/<step>/.")
flags.DEFINE_string("gguf", None, "A GGUF file to convert instead ('smollm2' for the packaged SmolLM2-135M).")
flags.DEFINE_string("out", None, "Output directory.", required=True)
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if (FLAGS.checkpoint is None) == (FLAGS.gguf is None):
        raise app.UsageError("give exactly one of --checkpoint and --gguf")
    from flax import nnx

    from meteor_jax.convert.llama import save_llama

    cli.setup_logging()
    if FLAGS.gguf is not None:
        from meteor_jax.convert.gguf import load_gguf_llama
        from meteor_jax.data.tokenizer import load_gguf_tokenizer

        path = None if FLAGS.gguf == "smollm2" else FLAGS.gguf
        llm, tokenizer = load_gguf_llama(path), load_gguf_tokenizer(path)
    else:
        from meteor_jax import inference

        model = inference.load_model(None, FLAGS.checkpoint)
        llm, tokenizer = nnx.merge(model.graphdef, model.params).llm, model.tokenizer
    save_llama(llm, FLAGS.out)
    tokenizer.save(os.path.join(FLAGS.out, "tokenizer.json"))
    pad = None if tokenizer.pad_id is None else tokenizer.token(tokenizer.pad_id)
    special = dict(bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, pad_token=pad,
                   add_bos_token=tokenizer.add_bos, chat_template=tokenizer.chat_template)
    with open(os.path.join(FLAGS.out, "tokenizer_config.json"), "w") as f:
        json.dump({k: v for k, v in special.items() if v is not None}, f, indent=2)
    logging.info("wrote %s (%s)", FLAGS.out, ", ".join(sorted(os.listdir(FLAGS.out))))


if __name__ == "__main__":
    cli.run(main)
