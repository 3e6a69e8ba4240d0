"""LLaVA-Meteor 13B: CLIP ViT-L/14-336 + FGF + VNS + Vicuna-13B v1.5 (the paper's main LLM).

Variants as configs/meteor_7b.py (`stage1-keep144` default, `stage2-keep64`, ...).
"""
from configs import common, meteor_7b


def get_config(arg: str | None = None):
    config = meteor_7b.get_config(arg)
    config.model.llm.update(common.VICUNA_13B)
    return config
