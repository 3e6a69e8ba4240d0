"""LLaVA-Meteor 7B: CLIP ViT-L/14-336 + Flash Global Fusion + Visual-Native Selection + Vicuna-7B v1.5.

Variants `configs/meteor_7b.py:STAGE-keepK`, e.g. `stage1-keep144` (default), `stage2-keep64`: the LLaVA-1.5
recipe stage and how many of the 576 visual tokens the LLM sees. Weights are local Hugging Face directories:
`--config.weights.vision=/ckpt/clip-vit-large-patch14-336 --config.weights.llm=/ckpt/vicuna-7b-v1.5`; stage 2
also takes `--config.init.checkpoint=STAGE1_WORKDIR/checkpoints`. Data: LCS-558K / mix665k, see the README.
"""
from configs import common

LLM = common.VICUNA_7B


def get_config(arg: str | None = None):
    stage, _, keep = (arg or "stage1-keep144").partition("-")
    if stage not in ("stage1", "stage2") or keep not in ("keep144", "keep64", "keep32", ""):
        raise ValueError(f"unknown variant {arg!r}: use stage1|stage2 and keep144|keep64|keep32, e.g. stage2-keep64")
    config = common.base_config(common.model_config(
        vision=dict(common.CLIP_L14_336, select_layer=-2),
        fusion=dict(dim=1024, num_layers=2, expand=2, d_state=16, scan_window=4, bidirectional=True),
        selection=dict(keep=int(keep[4:] or 144), temperature=0.1, aggregate="mean", alpha=0.5),
        llm=dict(LLM, remat="full"),
        dtype="bfloat16",
    ))
    config.tokenizer = ""  # the LLM directory's tokenizer.json: set to the same path as weights.llm
    config.mesh = dict(data=1, fsdp=-1, tensor=1)
    config.data.max_len = 2048
    config.data.eval = ""
    config.eval.max_new_tokens = 128
    if stage == "stage1":
        config.data.train = "llava_pretrain:train"
        config.data.template = "plain"
        config.train.update(trainable=("fusion",), batch_size=256, lr=1e-3, checkpoint_every=500)
    else:
        config.data.train = "llava_instruct:train"
        config.data.template = "vicuna_v1"
        config.train.update(trainable=("fusion", "llm"), batch_size=128, lr=2e-5, checkpoint_every=500)
    return config
