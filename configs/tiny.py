"""A tiny random model for tests and smoke runs (every part real, widths 32–64, 2 layers), on easy-vqa."""
from configs import common


def get_config(arg: str | None = None):
    del arg
    config = common.base_config(common.model_config(
        vision=dict(image_size=32, patch_size=8, width=32, depth=2, num_heads=2, mlp_dim=64, select_layer=-1,
                    trainable=True),
        fusion=dict(dim=32, num_layers=2, expand=2, d_state=8, scan_window=2, scan_chunk=8),
        selection=dict(keep=4),
        llm=dict(vocab_size=128, dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64, max_seq_len=128,
                 tie_embeddings=False),
    ))
    config.tokenizer = "word:easy_vqa"
    config.data.update(template="vicuna_short", max_len=32, instruction_len=12)
    config.train.update(trainable=("vision", "fusion", "llm"), batch_size=16, num_steps=4, lr=1e-3, log_every=2,
                        checkpoint_every=2)
    config.eval.update(batch_size=32, max_new_tokens=3, num_examples=64)
    config.mesh = dict(data=-1, fsdp=1, tensor=1)
    return config
