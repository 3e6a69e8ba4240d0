"""A tiny random model for tests and smoke runs (every part real, widths 32–64, 2 layers)."""
from configs import common


def get_config(arg: str | None = None):
    import ml_collections

    del arg
    config = ml_collections.ConfigDict()
    config.model = common.model_config(
        vision=dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, select_layer=-1,
                    trainable=True),
        fusion=dict(dim=32, num_layers=2, expand=2, d_state=8, scan_window=2, scan_chunk=8),
        selection=dict(keep=4),
        llm=dict(vocab_size=128, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=128,
                 tie_embeddings=False),
    )
    config.weights = ml_collections.ConfigDict(dict(vision="", llm=""))
    return config
