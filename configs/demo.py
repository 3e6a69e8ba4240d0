"""The demo (the README's first command): easy-vqa, real images and questions, trained from scratch on CPU.

A small ViT with a conv stem (no CLIP weights exist offline) → Flash Global Fusion with the question →
Visual-Native Selection keeping 16 of the 64 visual tokens → a small LLaMA decoder, with a word-level
tokenizer trained by `tokenizers` on the training questions. Trains, then answers the whole easy-vqa test
split by greedy generation and scores exact match: DIR/results.json.
"""
from configs import common


def get_config(arg: str | None = None):
    del arg
    config = common.base_config(common.model_config(
        vision=dict(image_size=64, patch_size=8, width=64, depth=2, num_heads=4, mlp_dim=128, select_layer=-1,
                    trainable=True, stem="conv"),
        fusion=dict(dim=64, num_layers=1, expand=1, d_state=8, scan_window=4, scan_impl="sequential"),
        selection=dict(keep=16),
        llm=dict(vocab_size=64, dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128, max_seq_len=64,
                 tie_embeddings=True),
    ))
    config.tokenizer = "word:easy_vqa"
    config.data.update(train="easy_vqa:train", eval="easy_vqa:test", template="vicuna_short", max_len=40,
                       instruction_len=12)
    config.mesh = dict(data=1, fsdp=1, tensor=1)  # one CPU device: sharding a 0.2M model only costs time
    # 1200 steps ≈ 8 minutes on 2 CPU cores (0.36–0.40 s/step): the 10-minute budget of the demo.
    config.train.update(trainable=("vision", "fusion", "llm"), batch_size=64, num_steps=1200, lr=3e-3,
                        warmup_ratio=0.03, log_every=100, checkpoint_every=1000)
    config.eval.update(batch_size=512, max_new_tokens=3, num_examples=-1)
    return config
