"""The sequential refit (docs/methods.md §1c): its closed form against brute force, the module surgery on a tiny
model, `compress_model(..., sequential=True)` with explicit ranks and under an accuracy budget, and the CLI flag."""

import json

import numpy as np
import pytest
import torch

import drone_hf
from drone_hf import collect_activation_stats, compress_model
from drone_hf.cli import main
from drone_hf.factorize import drone_factorize_affine, drone_refit
from drone_hf.layers import DroneLinear
from drone_hf.sequential import refit_sequential

from .testing_utils import scored_drop, self_labelled_case, tiny_batches, tiny_teacher


def _augmented(rows):
    return torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], dim=1)


def _moments(x, x_tilde):
    """`(cross, stats)` of paired rows (tokens x features), as the refit accumulates them."""
    a, b = _augmented(x.double()), _augmented(x_tilde.double())
    return a.T @ b, b.T @ b


def _objective(weight, bias, x, x_tilde, approx, new_bias):
    target = x.double() @ weight.double().T + bias.double()
    return float(((target - (x_tilde.double() @ approx.double().T + new_bias.double())) ** 2).sum())


@pytest.fixture
def case():
    generator = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(7, 6, generator=generator), torch.randn(7, generator=generator)
    mixing = torch.randn(6, 6, generator=generator)
    x = torch.randn(50, 6, generator=generator) @ mixing + 0.5  # correlated, off-centre inputs
    x_tilde = x + 0.3 * torch.randn(50, 6, generator=generator) @ mixing  # the compressed model's inputs
    return weight.double(), bias.double(), x.double(), x_tilde.double()


def test_with_unchanged_inputs_the_refit_is_bias_corrected_drone(case):
    weight, bias, x, _ = case
    cross, stats = _moments(x, x)
    down, up, new_bias = drone_refit(weight, bias, cross, stats, 3)
    ref_down, ref_up, shift = drone_factorize_affine(weight, stats, 3)
    torch.testing.assert_close(up @ down, ref_up @ ref_down, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(new_bias, bias + shift, rtol=1e-8, atol=1e-9)


def test_the_refit_is_the_optimum_against_brute_force(case):
    weight, bias, x, x_tilde = case
    cross, stats = _moments(x, x_tilde)
    down, up, new_bias = drone_refit(weight, bias, cross, stats, 3)
    best = _objective(weight, bias, x, x_tilde, up @ down, new_bias)
    # DRONE-bc on the compressed inputs alone (what a non-sequential method reproduces) is worse
    ref_down, ref_up, shift = drone_factorize_affine(weight, _augmented(x_tilde).T @ _augmented(x_tilde), 3)
    assert best < _objective(weight, bias, x, x_tilde, ref_up @ ref_down, bias + shift) - 1e-6
    # no random rank-3 perturbation of the factors, with its best bias, does better
    generator = torch.Generator().manual_seed(0)
    for _ in range(300):
        d = down + 0.05 * torch.randn(down.shape, generator=generator, dtype=torch.float64)
        u = up + 0.05 * torch.randn(up.shape, generator=generator, dtype=torch.float64)
        approx = u @ d
        offset = (x.double() @ weight.T + bias - x_tilde @ approx.T).mean(0)  # the best bias for this `approx`
        assert _objective(weight, bias, x, x_tilde, approx, offset) >= best - 1e-9
    # and gradient descent from random factors only approaches it from above
    d = torch.randn(3, 6, generator=generator, dtype=torch.float64).requires_grad_()
    u = torch.randn(7, 3, generator=generator, dtype=torch.float64).requires_grad_()
    b = torch.zeros(7, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([d, u, b], lr=0.02)
    for _ in range(3000):
        optimizer.zero_grad()
        loss = ((x @ weight.T + bias - (x_tilde @ (u @ d).T + b)) ** 2).sum()
        loss.backward()
        optimizer.step()
    final = float(loss.detach())
    assert best <= final + 1e-9 and final < 1.01 * best


def test_the_full_rank_refit_is_least_squares(case):
    weight, bias, x, x_tilde = case
    cross, stats = _moments(x, x_tilde)
    full, up, new_bias = drone_refit(weight, bias, cross, stats, None)
    assert up is None
    solution = torch.linalg.lstsq(_augmented(x_tilde), x @ weight.T + bias).solution  # (in + 1) x out
    torch.testing.assert_close(full, solution[:-1].T, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(new_bias, solution[-1], rtol=1e-7, atol=1e-8)


def test_the_anchored_refit_is_the_weighted_least_squares(case):
    """Adding `gamma` times the dense inputs' moment to both moments fits the compressed inputs and, with weight
    `gamma`, the dense inputs themselves, to the same dense outputs (what `dense_weight` does)."""
    weight, bias, x, x_tilde = case
    gamma = 0.3
    cross, stats = _moments(x, x_tilde)
    dense = _augmented(x).T @ _augmented(x)
    full, _, new_bias = drone_refit(weight, bias, cross + gamma * dense, stats + gamma * dense, None)
    inputs = torch.cat([_augmented(x_tilde), gamma**0.5 * _augmented(x)])
    targets = torch.cat([x @ weight.T + bias, gamma**0.5 * (x @ weight.T + bias)])
    solution = torch.linalg.lstsq(inputs, targets).solution
    torch.testing.assert_close(full, solution[:-1].T, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(new_bias, solution[-1], rtol=1e-7, atol=1e-8)
    # at rank 3 no perturbation of the factors does better on the weighted objective
    down, up, new_bias = drone_refit(weight, bias, cross + gamma * dense, stats + gamma * dense, 3)

    def weighted(approx, offset):
        return _objective(weight, bias, x, x_tilde, approx, offset) + gamma * _objective(
            weight, bias, x, x, approx, offset
        )

    def best_offset(approx):
        target = x @ weight.T + bias
        return ((target - x_tilde @ approx.T).sum(0) + gamma * (target - x @ approx.T).sum(0)) / (len(x) * (1 + gamma))

    best = weighted(up @ down, new_bias)
    plain_down, plain_up, _ = drone_refit(weight, bias, cross, stats, 3)  # the unanchored refit
    assert best < weighted(plain_up @ plain_down, best_offset(plain_up @ plain_down)) - 1e-6
    generator = torch.Generator().manual_seed(1)
    for _ in range(200):
        approx = (up + 0.05 * torch.randn(up.shape, generator=generator, dtype=torch.float64)) @ (
            down + 0.05 * torch.randn(down.shape, generator=generator, dtype=torch.float64)
        )
        assert weighted(approx, best_offset(approx)) >= best - 1e-9
    # a large weight pulls it to DRONE with bias correction on the dense inputs
    down, up, new_bias = drone_refit(weight, bias, cross + 1e7 * dense, stats + 1e7 * dense, 3)
    ref_down, ref_up, shift = drone_factorize_affine(weight, dense, 3)
    torch.testing.assert_close(up @ down, ref_up @ ref_down, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(new_bias, bias + shift, rtol=1e-4, atol=1e-5)


def test_the_refit_refuses_mismatched_statistics(case):
    weight, bias, x, x_tilde = case
    cross, stats = _moments(x, x_tilde)
    with pytest.raises(ValueError, match=r"`cross` must be \(7, 7\)"):
        drone_refit(weight, bias, cross[:-1, :-1], stats, 2)
    with pytest.raises(ValueError, match="the same tokens"):
        drone_refit(weight, bias, cross * 2, stats, 2)
    with pytest.raises(ValueError, match=r"`rank` must be an int in \[1, 6\]"):
        drone_refit(weight, bias, cross, stats, 9)
    poisoned = cross.clone()
    poisoned[0, 0] = float("nan")
    with pytest.raises(ValueError, match="`cross` contains NaN or Inf"):
        drone_refit(weight, bias, poisoned, stats, 2)


def _final_error(model, compressed, batches) -> float:
    total = 0.0
    with torch.no_grad():
        for batch in batches:
            inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            dense = model(**inputs, output_hidden_states=True).hidden_states[-1]
            small = compressed(**inputs, output_hidden_states=True).hidden_states[-1]
            total += float(((dense - small) ** 2)[batch["attention_mask"].bool()].sum())
    return total


@pytest.mark.parametrize("method", ["drone", "drone-bc", "svd"])
def test_refit_sequential_shrinks_the_error_and_leaves_the_dense_model_alone(method):
    model = tiny_teacher(hidden_size=64, intermediate_size=128).train()
    batches = tiny_batches(num_rows=32, seq_len=10, batch_size=8)
    stats = collect_activation_stats(model, batches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressed = compress_model(model, stats, method=method, rank=12, attention=False).train()
    error = _final_error(model.eval(), compressed.eval(), batches)
    model.train()
    compressed.train()
    assert refit_sequential(model, compressed, batches) is compressed
    assert model.training and compressed.training and all(m.training for m in compressed.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    ranks = {n: m.rank for n, m in compressed.named_modules() if isinstance(m, DroneLinear)}
    assert set(ranks.values()) == {12} and len(ranks) == 2 * 6  # two layers, six linears each
    refitted = _final_error(model.eval(), compressed.eval(), batches)
    assert refitted < 0.9 * error


def test_the_first_layers_query_refit_is_drone_bc():
    """Layer 0 sees the dense model's own inputs: its first group's refit is DRONE with bias correction."""
    model = tiny_teacher(hidden_size=64, intermediate_size=128)
    batches = tiny_batches(num_rows=32, seq_len=10, batch_size=8)
    stats = collect_activation_stats(model, batches)
    reference = compress_model(model, stats, method="drone-bc", rank=12, attention=False)
    compressed = refit_sequential(model, compress_model(model, stats, rank=12, attention=False), batches)
    name = "bert.encoder.layer.0.attention.self.query"
    mine, theirs = compressed.get_submodule(name), reference.get_submodule(name)
    torch.testing.assert_close(mine.up.weight @ mine.down.weight, theirs.up.weight @ theirs.down.weight)
    torch.testing.assert_close(mine.up.bias, theirs.up.bias, rtol=1e-4, atol=1e-5)


def test_the_anchored_refit_spans_the_refit_and_drone_bc():
    """`dense_weight` 0 is the plain refit; a large one gives every factored linear DRONE-bc's product; in between
    the final error on the calibration rows lies between the two."""
    model = tiny_teacher(hidden_size=64, intermediate_size=128)
    batches = tiny_batches(num_rows=32, seq_len=10, batch_size=8)
    stats = collect_activation_stats(model, batches)
    reference = compress_model(model, stats, method="drone-bc", rank=12, attention=False)
    plain = refit_sequential(model, compress_model(model, stats, rank=12, attention=False), batches)
    zero = refit_sequential(model, compress_model(model, stats, rank=12, attention=False), batches, dense_weight=0)
    heavy = refit_sequential(model, compress_model(model, stats, rank=12, attention=False), batches, dense_weight=1e8)
    middle = refit_sequential(model, compress_model(model, stats, rank=12, attention=False), batches, dense_weight=1)
    factored = [n for n, m in reference.named_modules() if isinstance(m, DroneLinear)]
    assert len(factored) == 12
    for name in factored:
        ours, theirs = heavy.get_submodule(name), reference.get_submodule(name)
        torch.testing.assert_close(ours.up.weight @ ours.down.weight, theirs.up.weight @ theirs.down.weight)
        torch.testing.assert_close(ours.up.bias, theirs.up.bias, rtol=1e-4, atol=1e-5)
        assert torch.equal(zero.get_submodule(name).down.weight, plain.get_submodule(name).down.weight)
    errors = [_final_error(model, m, batches) for m in (plain, middle, heavy)]
    assert errors[0] < errors[1] < errors[2]
    for bad in (-1.0, float("nan"), float("inf"), "1", True):
        with pytest.raises(ValueError, match="`dense_weight` must be a finite number >= 0"):
            refit_sequential(model, compress_model(model, stats, rank=12, attention=False), batches, dense_weight=bad)


def test_compress_model_sequential_saves_reloads_and_records_it(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_teacher(hidden_size=64, intermediate_size=128)
    batches = tiny_batches(num_rows=32, seq_len=10, batch_size=8)
    stats = collect_activation_stats(model, batches)
    plain = compress_model(model, stats, rank=12, attention_rank=4)
    compressed = compress_model(
        model, stats, rank=12, attention_rank=4, sequential=True, calibration_dataloader=batches
    )
    assert compressed.config.drone_calibration["sequential_refit"] is True
    assert compressed.config.drone_ranks == plain.config.drone_ranks
    assert _final_error(model, compressed, batches) < _final_error(model, plain, batches)
    compressed.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    inputs = {k: batches[0][k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, compressed(**inputs).logits, rtol=0, atol=0)


def test_compress_model_refuses_sequential_without_batches():
    model = tiny_teacher()
    stats = collect_activation_stats(model, tiny_batches())
    with pytest.raises(ValueError, match="`sequential=True` needs `calibration_dataloader`"):
        compress_model(model, stats, rank=4, sequential=True)
    with pytest.raises(TypeError, match="`sequential` must be a bool, got str 'yes'"):
        compress_model(model, stats, rank=4, sequential="yes", calibration_dataloader=tiny_batches())


def test_an_accuracy_budget_with_sequential_judges_the_model_it_returns():
    """The joint checks score refitted assignments, so the held-out drop reported is the returned model's own."""
    model, batches, reference, metric = self_labelled_case()
    calibration = tiny_batches(num_rows=32, seq_len=10, batch_size=8, num_labels=2)
    stats = collect_activation_stats(model, calibration)
    report = {}
    compressed = compress_model(
        model,
        stats,
        max_accuracy_drop=0.05,
        eval_dataloader=batches,
        allocation_options={"metric_fn": metric, "search": "fast", "sequential_checks": 3},
        allocation_report=report,
        sequential=True,
        calibration_dataloader=calibration,
    )
    sequential = report["sequential"]
    assert sequential["checks"] <= 4 and sequential["step"] >= sequential["start_step"]
    drop, error = scored_drop(compressed, batches, metric, reference)
    assert drop == pytest.approx(report["heldout_drop"], abs=1e-9)
    assert drop + error <= 0.05 + 1e-12
    stages = [check["stage"] for check in report["joint_checks"]]
    assert stages.count("sequential") == sequential["checks"]


def test_cli_sequential_flag(tmp_path, capsys):
    from .testing_utils import tiny_classifier_folder, write_sst2_glue

    tiny_classifier_folder(tmp_path / "model")
    write_sst2_glue(tmp_path / "glue")
    common = ["compress", "--model", str(tmp_path / "model"), "--task", "SST-2", "--data-dir", str(tmp_path / "glue")]
    common += ["--calibration-samples", "32", "--heldout-samples", "32", "--latency-repeats", "1"]
    assert main([*common, "--rank", "8", "--sequential", "--output", str(tmp_path / "out")]) == 0
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["drone_calibration"]["sequential_refit"] is True
    extra = ["--max-accuracy-drop", "100", "--allocation-search", "fast", "--screening-samples", "16"]
    assert main([*common, *extra, "--sequential", "--sequential-checks", "1", "--output", str(tmp_path / "b")]) == 0
    allocation = json.loads((tmp_path / "b" / "drone_results.json").read_text())["allocation"]
    assert allocation["sequential"]["checks"] <= 2 and np.isfinite(allocation["heldout_drop"])
    assert drone_hf.refit_sequential is refit_sequential
    anchored = ["--rank", "8", "--sequential", "--sequential-dense-weight", "0.5", "--output", str(tmp_path / "c")]
    assert main([*common, *anchored]) == 0
    config = json.loads((tmp_path / "c" / "config.json").read_text())
    assert config["drone_calibration"]["sequential_dense_weight"] == 0.5
    capsys.readouterr()
    assert main([*common, "--rank", "8", "--sequential-dense-weight", "0.5", "--output", str(tmp_path / "d")]) == 2
    assert "--sequential-dense-weight 0.5 needs --sequential" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_compress_model_anchored_refit_from_keywords_and_settings(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = tiny_teacher(hidden_size=64, intermediate_size=128)
    batches = tiny_batches(num_rows=32, seq_len=10, batch_size=8)
    stats = collect_activation_stats(model, batches)
    anchored = compress_model(
        model,
        stats,
        rank=12,
        attention=False,
        sequential=True,
        calibration_dataloader=batches,
        sequential_dense_weight=1,
    )
    expected = refit_sequential(model, compress_model(model, stats, rank=12, attention=False), batches, dense_weight=1)
    for (name, mine), theirs in zip(anchored.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(mine, theirs), name
    assert anchored.config.drone_calibration["sequential_dense_weight"] == 1.0
    settings = drone_hf.DroneCompressionArguments(rank=12, attention=False, sequential=True, sequential_dense_weight=1)
    from_settings = compress_model(model, stats, settings, calibration_dataloader=batches)
    for (name, mine), theirs in zip(from_settings.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(mine, theirs), name
    anchored.save_pretrained(tmp_path)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    inputs = {k: batches[0][k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, anchored(**inputs).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="`sequential_dense_weight=0.5` weighs the dense inputs .* needs `sequential"):
        compress_model(model, stats, rank=12, sequential_dense_weight=0.5)
    with pytest.raises(ValueError, match="`sequential_dense_weight=0.5` weighs the dense inputs .* needs `sequential"):
        drone_hf.DroneCompressionArguments(rank=12, sequential_dense_weight=0.5)
    with pytest.raises(ValueError, match=r"`sequential_dense_weight` must be a finite number >= 0 .* got -1"):
        compress_model(
            model, stats, rank=12, sequential=True, calibration_dataloader=batches, sequential_dense_weight=-1
        )


def test_the_exhaustive_search_says_its_checks_do_not_refit(caplog):
    import logging

    model, batches, _, metric = self_labelled_case()
    calibration = tiny_batches(num_rows=16, seq_len=10, batch_size=8, num_labels=2)
    stats = collect_activation_stats(model, calibration)
    with caplog.at_level(logging.WARNING, logger="drone_hf"):
        drone_hf.allocate_ranks(
            model,
            stats,
            max_accuracy_drop=100.0,
            eval_dataloader=batches,
            metric_fn=metric,
            search="exhaustive",
            refine_steps=0,
            sequential_dataloader=calibration,
        )
    assert "joint checks do not refit" in caplog.text


def _family_case(model_type):
    from transformers import AutoModelForSequenceClassification

    from .testing_utils import tiny_config, tiny_family_batches

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels=2)).eval()
    batches = [
        {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        for batch in tiny_family_batches(model_type, num_rows=24)
    ]
    return model, batches


@pytest.mark.parametrize(
    "model_type", ["bert", "deberta-v2", "distilbert", "electra", "modernbert", "mpnet", "roberta", "xlm-roberta"]
)
def test_refit_sequential_works_for_every_layerwise_family(model_type):
    model, batches = _family_case(model_type)
    stats = collect_activation_stats(model, batches)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    compressed = compress_model(model, stats, rank=4, attention=False)
    error = _final_error(model, compressed, batches)
    refit_sequential(model, compressed, batches)
    assert _final_error(model, compressed, batches) < 0.85 * error
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_families_that_share_their_layers_are_refused():
    """ALBERT runs one layer module at every depth: a refit on layer 0's inputs made its final error 25 times larger,
    so every entry point refuses it, before any work."""
    model, batches = _family_case("albert")
    stats = collect_activation_stats(model, batches)
    compressed = compress_model(model, stats, rank=4, attention=False)
    for call in (
        lambda: refit_sequential(model, compressed, batches),
        lambda: compress_model(model, stats, rank=4, attention=False, sequential=True, calibration_dataloader=batches),
    ):
        with pytest.raises(ValueError, match="albert shares one layer module across its depth"):
            call()
