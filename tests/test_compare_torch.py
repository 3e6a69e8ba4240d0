"""meteor_jax.compare_torch end to end on a tiny geometry: the report's structure and the logits parity check
(speed is the bench's business: no timing asserts)."""
import json

import pytest

from meteor_jax import compare_torch

pytest.importorskip("transformers")

TINY_VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                   intermediate_size=64)
TINY_TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)


def test_compare_tiny():
    report = compare_torch.compare(vision=TINY_VISION, text=TINY_TEXT, keeps=(16, 4), text_len=8, answer_len=4,
                                   instruction_len=4, steps=1, warmup=1)
    json.dumps(report)  # JSON-able as returned
    assert report["parity"]["max_abs_logits_diff"] < 1e-4
    assert report["parity"]["logits_scale"] > 1  # the check compares logits that are not all near zero
    assert abs(report["parity"]["loss_ours"] - report["parity"]["loss_transformers"]) < 1e-4
    rows = report["rows"]
    assert list(rows) == ["llava", "mlp", "meteor_16", "meteor_4", "llama", "decoder"]
    assert [rows[n]["tokens"] for n in rows] == [24, 24, 24, 12, 24, 24]  # K + text tokens
    for name, row in rows.items():
        assert row["fwd_bwd"] > 0 and row["forward"] > 0
        assert ("fwd_bwd_ratio" in row) == (name not in ("llava", "llama"))
    assert report["geometry"]["fusion"]["scan_impl"] == "pallas"  # CPU's fastest scan (interpret mode)
    table = compare_torch.format_table(report)
    assert all(name in table for name in rows) and "Meteor scan pallas" in table


def test_compare_refuses_a_wrong_conversion():
    """A tolerance no float32 run meets stands in for a wrong conversion: the bench stops instead of timing."""
    with pytest.raises(AssertionError, match="conversion is wrong"):
        compare_torch.compare(vision=TINY_VISION, text=TINY_TEXT, keeps=(4,), text_len=8, answer_len=4,
                              instruction_len=4, steps=1, warmup=0, decoder=False, parity_tol=0.0)
