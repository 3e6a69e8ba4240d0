"""LLaVA-Meteor 13B: CLIP ViT-L/14-336 + FGF + VNS + Vicuna-13B v1.5 (the paper's main LLM).

Variants (`configs/meteor_13b.py:keep64`): how many of the 576 visual tokens the LLM sees.
"""
from configs import common
from configs.meteor_7b import VARIANTS


def get_config(arg: str | None = None):
    import ml_collections

    variant = common.parse_arg(arg, VARIANTS, default="keep144")
    config = ml_collections.ConfigDict()
    config.model = common.model_config(
        vision=dict(common.CLIP_L14_336, select_layer=-2),
        fusion=dict(dim=1024, num_layers=2, expand=2, d_state=16, scan_window=4, bidirectional=True),
        selection=dict(keep=variant["keep"], temperature=0.1, aggregate="mean", alpha=0.5),
        llm=dict(common.VICUNA_13B, remat="full"),
        dtype="bfloat16",
    )
    config.weights = ml_collections.ConfigDict(dict(
        vision="openai/clip-vit-large-patch14-336", llm="lmsys/vicuna-13b-v1.5"))
    return config
