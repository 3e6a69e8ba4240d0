"""The shapes recipe: an instruction-dependent VQA task (meteor_jax/data/shapes.py) trained from scratch on CPU.

    python -m meteor_jax.main --config configs/shapes.py --workdir /tmp/meteor_shapes_run
    python -m meteor_jax.main --config configs/shapes.py:/data/shapes --workdir ...   # the dataset elsewhere

Each 64×64 test image holds four objects (one per quadrant, four shapes, four of six colours) and each question
names one of them ("What colour is the triangle?", "Where is the red object?"), so which visual tokens matter
depends on the question, unlike easy-vqa's one-shape images. Training images hold 1 to 4 objects and also get one
yes/no existence question each (see meteor_jax/data/shapes.py). The config argument is the dataset directory
(default /tmp/meteor_shapes). If it holds no dataset yet (no dataset.json), loading this config generates one there
first: 10,000 training images (50,000 questions) and 1,000 test images (4,000 questions), seed 0, in about 10 s
(`python -m meteor_jax.data.shapes --out DIR --train 10000 --test 1000 --seed 0` writes the same files). A dataset
made with other arguments in DIR is an error, never silently used.

The model is the demo's (configs/demo.py: conv-stem ViT of width 32, a unidirectional width-32 fusion scan, a
two-layer width-64 decoder, a word-level vocabulary trained on the questions), with all 64 visual tokens kept
(selection.keep=64 = N: no selection), the baseline to compare compression against. Smaller K:
`--config.model.selection.keep=16` (max_len follows: set `--config.data.max_len=` K + 16), or evaluate one
checkpoint at several K with `python -m meteor_jax.evaluate ... --keep 8,16,32,64` (test_questions.jsonl etc.).
"""
from configs import common
from meteor_jax.data import shapes

DEFAULT_DIR = "/tmp/meteor_shapes"
NUM_TRAIN, NUM_TEST, SEED = 10_000, 1_000, 0  # images (4 questions each, + 1 existence question in train)
KEEP = 64  # of 64 patches (64 px images, 8 px patches)
TEXT_LEN = 16  # the longest sample's text: "USER: <image>\nWhat shape is the purple object? ASSISTANT: top left</s>"


def get_config(arg: str | None = None):
    data_dir = arg or DEFAULT_DIR
    shapes.ensure_dataset(data_dir, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=SEED, image_size=64)
    config = common.base_config(common.model_config(
        vision=dict(image_size=64, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, select_layer=-1,
                    trainable=True, stem="conv", scan_layers=False),
        fusion=dict(dim=32, num_layers=1, expand=1, d_state=8, scan_window=4, scan_impl="sequential",
                    bidirectional=False),
        selection=dict(keep=KEEP),
        llm=dict(vocab_size=64, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128, max_seq_len=128,
                 tie_embeddings=True, scan_layers=False),
    ))
    config.tokenizer = "word:shapes"  # trained on the training questions, saved as WORKDIR/tokenizer.json
    config.data.update(train=f"llava_json:{data_dir}/train.json", eval=f"llava_json:{data_dir}/test.json",
                       image_folder=f"{data_dir}/images", template="vicuna_short", max_len=KEEP + TEXT_LEN,
                       instruction_len=8, image_cache=NUM_TRAIN + NUM_TEST, read_threads=2)
    config.mesh = dict(data=1, fsdp=1, tensor=1)
    config.train.update(trainable=("vision", "fusion", "llm"), batch_size=64, num_steps=2400, lr=7.5e-4,
                        warmup_ratio=0.03, log_every=100, checkpoint_every=1000)
    config.eval.update(batch_size=512, max_new_tokens=3, num_examples=-1)
    return config
