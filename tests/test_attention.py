"""DRONE attention (per-head W_Q W_K^T factorisation) through compress_model, save and reload."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from drone_hf import DroneQKLinear, collect_activation_stats, compress_model
from drone_hf.profiling import encoder_macs, model_macs

from .testing_utils import tiny_batches, tiny_teacher


BLOCK = "bert.encoder.layer.0.attention.self"


def _attentions(model, batch):
    model.config._attn_implementation = "eager"  # attention probabilities are only returned by the eager path
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_attentions=True)
    return out.attentions, out.logits


def test_exact_on_the_calibration_span():
    # One sequence of 5 tokens: [x;1] spans at most 5 dimensions, so per-head rank 5 < d_h = 8 is exact there.
    model = tiny_teacher()
    ids = torch.randint(1, 99, (1, 5))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    compressed = compress_model(model, collect_activation_stats(model, [batch]), attention_rank=5)
    assert isinstance(compressed.get_submodule(BLOCK).query, DroneQKLinear)
    assert isinstance(compressed.get_submodule(BLOCK).key, DroneQKLinear)
    assert compressed.get_submodule(BLOCK).query.weight.shape == (4 * 5, 32)
    (probs_dense, logits_dense), (probs_drone, logits_drone) = (
        _attentions(model, batch),
        _attentions(compressed, batch),
    )
    for a, b in zip(probs_dense, probs_drone):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits_dense, logits_drone, rtol=1e-4, atol=1e-5)


def test_drone_attention_beats_svd_on_real_attention_probabilities():
    model, batches = tiny_teacher(), tiny_batches(num_rows=24, seq_len=12)
    stats = collect_activation_stats(model, batches)
    drone = compress_model(model, stats, attention_rank=3)
    svd = compress_model(model, None, method="svd", attention_rank=3)
    assert drone.config.drone_attention_ranks == {BLOCK: 3, "bert.encoder.layer.1.attention.self": 3}
    dense_probs, _ = _attentions(model, batches[0])
    drone_probs, _ = _attentions(drone, batches[0])
    svd_probs, _ = _attentions(svd, batches[0])
    # First layer: identical inputs, so the comparison isolates the attention factorisation.
    drone_err = (drone_probs[0] - dense_probs[0]).abs().sum()
    svd_err = (svd_probs[0] - dense_probs[0]).abs().sum()
    assert drone_err < svd_err


def test_scaling_uses_original_head_size():
    model = tiny_teacher()
    compressed = compress_model(model, None, method="svd", attention_rank=2)
    block = compressed.get_submodule(BLOCK)
    # The family's own attention module runs around the narrowed projections, with its original 1/sqrt(d_h).
    assert type(block) is type(model.get_submodule(BLOCK))
    assert block.scaling == pytest.approx(8**-0.5) and block.query.rank == block.key.rank == 2


def test_save_reload_identical_and_linear_ranks_combine(tmp_path):
    model, batches = tiny_teacher(), tiny_batches()
    stats = collect_activation_stats(model, batches)
    compressed = compress_model(model, stats, rank=6, attention_ranks={"re:.*layer\\.1.*": 4}).eval()
    ranks = compressed.config.drone_ranks
    assert (
        "bert.encoder.layer.1.attention.self.query" not in ranks
        and "bert.encoder.layer.0.attention.self.query" in ranks
    )
    compressed.save_pretrained(tmp_path)
    loaded, info = AutoModelForSequenceClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert loaded.config.drone_attention_ranks == {"bert.encoder.layer.1.attention.self": 4}
    with torch.no_grad():
        a = compressed(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]).logits
        b = loaded.eval()(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]).logits
    assert torch.equal(a, b)


def test_ranks_mapping_accepts_attention_blocks_and_flops_drop():
    model = tiny_teacher()
    compressed = compress_model(model, None, method="svd", ranks={BLOCK: 2, "bert.encoder.layer.0.output.dense": 4})
    assert compressed.config.drone_attention_ranks == {BLOCK: 2}
    assert compressed.config.drone_ranks == {"bert.encoder.layer.0.output.dense": 4}
    assert encoder_macs(compressed.config, 16) < encoder_macs(model.config, 16)


def test_macs_count_the_narrowed_projections_and_the_scores_at_the_width_that_runs():
    # DroneQKLinear pads each head back to d_h = 8, so only the two projections get cheaper: per token,
    # 2 x (hidden 32) x (4 heads) x (8 - 2) multiply-adds in the one narrowed block; the scores run (and count) at 8.
    model = tiny_teacher()
    compressed = compress_model(model, None, method="svd", ranks={BLOCK: 2})
    seq_len = 16
    saved = 2 * seq_len * 32 * 4 * (8 - 2)
    assert encoder_macs(model.config, seq_len) - encoder_macs(compressed.config, seq_len) == saved
    assert model_macs(model, seq_len) - model_macs(compressed, seq_len) == saved


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"attention_rank": 8},
            ValueError,
            r"Attention rank for `bert.encoder.layer.0.attention.self` \(head size 8\) .*\[1, 7\], got 8",
        ),
        ({"attention_rank": 0}, ValueError, r"\[1, 7\], got 0"),
        ({"attention_rank": 2.0}, TypeError, "`attention_rank` must be an int"),
        (
            {"attention_ranks": {"bert.encoder.layer.0.attention": 2}},
            ValueError,
            "Unknown module in `attention_ranks`",
        ),
        (
            {"attention_rank": 2, "ranks": {"bert.encoder.layer.0.attention.self.query": 4}},
            ValueError,
            "have a linear rank but their attention block gets an attention rank",
        ),
    ],
)
def test_bad_attention_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        compress_model(tiny_teacher(), None, method="svd", **kwargs)


def test_drone_attention_needs_query_stats():
    model = tiny_teacher()
    stats = collect_activation_stats(model, tiny_batches(), target_modules="output")
    with pytest.raises(ValueError, match="no statistics for 2 target modules.*attention.self.query"):
        compress_model(model, stats, attention_rank=2)


@pytest.mark.parametrize("training", [False, True])
def test_sdpa_path_equals_the_eager_path_with_padding(training):
    # The SDPA path zero-pads the narrowed query/key to d_h for the fused kernel; eager runs the narrow product.
    model, batches = tiny_teacher(), tiny_batches(num_rows=8, seq_len=9)
    compressed = compress_model(model, collect_activation_stats(model, batches), attention_rank=3)
    for module in compressed.modules():  # train mode without randomness: the code path, not the noise, is compared
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    compressed.train(training)
    outputs = {}
    for implementation in ("sdpa", "eager"):
        compressed.config._attn_implementation = implementation
        with torch.no_grad():
            outputs[implementation] = torch.cat(
                [compressed(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits for b in batches]
            )
    torch.testing.assert_close(outputs["sdpa"], outputs["eager"], rtol=1e-5, atol=1e-6)
    # ...and the padded rows' outputs do not depend on what sits under their padding.
    batch = batches[0]
    noisy = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 7)
    compressed.config._attn_implementation = "sdpa"
    compressed.eval()
    with torch.no_grad():
        clean = compressed(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        dirty = compressed(input_ids=noisy, attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(clean, dirty, rtol=1e-5, atol=1e-6)
