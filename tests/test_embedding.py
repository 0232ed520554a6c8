"""Projective clustering of the word embedding (docs/methods.md §3): `DroneEmbedding`, its config field, save/reload,
`compress_model(..., embedding=...)` and `token_frequencies`."""

from __future__ import annotations

import json

import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import drone_hf
from drone_hf import (
    DroneBertForSequenceClassification,
    DroneConfig,
    DroneEmbedding,
    DroneLinear,
    collect_activation_stats,
    compress_model,
    replace_embedding_with_drone,
    token_frequencies,
)
from drone_hf.projective import embedding_parameter_count, projective_clustering

from .testing_utils import copy_checkpoint, minilm_path, tiny_batches, tiny_teacher


EMB = "bert.embeddings.word_embeddings"
N, D = 99, 32  # tiny_teacher's vocabulary and width


def _inputs(batch=None) -> dict[str, torch.Tensor]:
    batch = batch or tiny_batches()[0]
    return {k: batch[k] for k in ("input_ids", "attention_mask")}


def _truncated_svd(weight: torch.Tensor, j: int) -> torch.Tensor:
    u, s, vt = torch.linalg.svd(weight.double(), full_matrices=False)
    return (u[:, :j] * s[:j]) @ vt[:j]


@pytest.fixture(scope="module")
def teacher():
    return tiny_teacher()


@pytest.fixture(scope="module")
def combined(teacher, tmp_path_factory):
    """DRONE on the intermediate linears + DRONE attention + a (4, 10) clustered embedding, saved."""
    stats = collect_activation_stats(teacher, tiny_batches())
    model = compress_model(
        teacher, stats, ranks={"re:.*intermediate.dense": 6}, attention_rank=4, embedding=(4, 10)
    ).eval()
    folder = tmp_path_factory.mktemp("combined")
    model.save_pretrained(folder)
    return model, folder


# --- the module ----------------------------------------------------------------------------------------------------


def test_forward_equals_per_token_recombination_and_trains():
    torch.manual_seed(0)
    layer = DroneEmbedding(50, 8, k=3, j=2, padding_idx=0)
    layer.assignments = torch.randint(0, 3, (50,))
    ids = torch.randint(0, 50, (4, 7))
    ids[0, :3] = 0
    out = layer(ids)
    reference = torch.einsum("btj,btjd->btd", layer.coefficients[ids], layer.bases[layer.assignments[ids]])
    assert out.shape == (4, 7, 8)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    out.square().sum().backward()
    assert layer.coefficients.grad[0].abs().sum() == 0  # padding row: no gradient, as nn.Embedding
    used = layer.assignments[ids[ids != 0]].unique()
    assert all(layer.bases.grad[c].abs().sum() > 0 for c in used.tolist())
    assert layer(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5, 8)


def test_module_surface_like_nn_embedding():
    layer = DroneEmbedding(50, 8, k=3, j=2, padding_idx=-1)
    assert (layer.num_embeddings, layer.embedding_dim, layer.padding_idx) == (50, 8, 49)
    assert repr(layer) == "DroneEmbedding(50, 8, k=3, j=2, padding_idx=49)"
    assert sum(p.numel() for p in layer.parameters()) == 50 * 2 + 3 * 2 * 8
    assert "assignments" in layer.state_dict() and layer.assignments.dtype == torch.long
    dense = layer.to_dense()
    assert isinstance(dense, torch.nn.Embedding) and dense.padding_idx == 49
    ids = torch.arange(50)
    torch.testing.assert_close(dense(ids), layer(ids))
    with torch.device("meta"):
        meta = DroneEmbedding(50, 8, k=3, j=2)
    assert meta.coefficients.is_meta and meta.bases.shape == (3, 2, 8)


def test_k1_module_output_is_the_truncated_svd(teacher):
    weight = teacher.bert.embeddings.word_embeddings.weight.detach()
    layer = DroneEmbedding.from_embedding(weight, projective_clustering(weight, 1, 5))
    torch.testing.assert_close(layer(torch.arange(N)).double(), _truncated_svd(weight, 5), rtol=0, atol=1e-5)
    # Through compress_model as well (the (k, j) tuple path):
    model = compress_model(teacher, None, method="svd", embedding=(1, 5))
    out = model.get_submodule(EMB)(torch.arange(N)).double()
    torch.testing.assert_close(out, _truncated_svd(weight, 5), rtol=0, atol=1e-5)
    report = model.config.drone_calibration["embedding"]
    assert report["svd_j"] == embedding_parameter_count(N, D, 1, 5) // (N + D) == 5
    assert report["cost"] == pytest.approx(report["svd_cost"], rel=1e-6)


def test_from_embedding_reconstructs_each_row_in_its_own_subspace(teacher):
    weight = teacher.bert.embeddings.word_embeddings.weight.detach()
    result = projective_clustering(weight, 4, 6, n_init=2, seed=1)
    layer = DroneEmbedding.from_embedding(weight, result, padding_idx=0)
    assert torch.equal(layer.assignments, result.assignments) and torch.equal(layer.bases, result.bases)
    torch.testing.assert_close(layer(torch.arange(N)), result.reconstruct(weight), rtol=0, atol=1e-5)
    error = float((layer.to_dense().weight.detach().double() - weight.double()).square().sum())
    assert error == pytest.approx(result.cost, rel=1e-4)


# --- the model class, config and checkpoint --------------------------------------------------------------------------


def test_parameter_count_formula(teacher):
    model = compress_model(teacher, None, method="svd", embedding=(4, 10))
    layer = model.get_submodule(EMB)
    assert isinstance(layer, DroneEmbedding) and (layer.k, layer.j) == (4, 10)
    expected = N * 10 + 4 * 10 * D
    assert expected == embedding_parameter_count(N, D, 4, 10)
    assert sum(p.numel() for p in layer.parameters()) == expected
    dense_total = sum(p.numel() for p in teacher.parameters())
    assert sum(p.numel() for p in model.parameters()) == dense_total - N * D + expected
    report = model.config.drone_calibration["embedding"]
    assert report["parameters"] == expected and report["param_ratio"] == pytest.approx(expected / (N * D))
    assert 0 < report["cost"] and report["svd_j"] == expected // (N + D)


def test_ratio_picks_the_cheapest_k_within_the_budget(teacher):
    model = compress_model(teacher, None, method="svd", embedding=0.6, embedding_options={"k_grid": (1, 2, 4)})
    spec, report = model.config.drone_embedding, model.config.drone_calibration["embedding"]
    assert spec == {"module": EMB, "k": report["k"], "j": report["j"]}
    assert embedding_parameter_count(N, D, spec["k"], spec["j"]) <= 0.6 * N * D
    # Every k of the grid was fitted at its largest j; the chosen one has the lowest cost.
    for k in (1, 2, 4):
        j = int(0.6 * N * D // (N + k * D))
        cost = projective_clustering(teacher.get_submodule(EMB).weight.detach(), k, j, n_init=2, max_iter=15).cost
        assert report["cost"] <= cost * (1 + 1e-6)
    assert report["cost"] <= report["svd_cost"] and report["k_grid"] == [1, 2, 4]


def test_reload_is_exact_with_linear_attention_and_embedding(combined):
    model, folder = combined
    loaded, info = AutoModelForSequenceClassification.from_pretrained(folder, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    assert type(loaded) is DroneBertForSequenceClassification
    assert loaded.config.drone_embedding == {"module": EMB, "k": 4, "j": 10}
    assert len(loaded.config.drone_ranks) == 2 and len(loaded.config.drone_attention_ranks) == 2
    assert isinstance(loaded.get_submodule(EMB), DroneEmbedding)
    assert isinstance(loaded.get_submodule("bert.encoder.layer.1.intermediate.dense"), DroneLinear)
    assert torch.equal(loaded.get_submodule(EMB).assignments, model.get_submodule(EMB).assignments)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(**_inputs()).logits, model(**_inputs()).logits)
    config = json.loads((folder / "config.json").read_text())
    assert config["drone_embedding"] == {"module": EMB, "k": 4, "j": 10}
    tensors = load_file(folder / "model.safetensors")
    assert tensors[f"{EMB}.coefficients"].shape == (N, 10) and tensors[f"{EMB}.bases"].shape == (4, 10, D)
    assert tensors[f"{EMB}.assignments"].dtype == torch.int64 and f"{EMB}.weight" not in tensors
    assert set(model.drone_modules()) >= {EMB, "bert.encoder.layer.0.intermediate.dense"}


def test_embedding_only_with_drone_method_needs_no_statistics_and_recompression_keeps_it(teacher, tmp_path):
    first = compress_model(teacher, None, embedding=(2, 8))  # method="drone", but nothing needs statistics
    assert first.config.drone_ranks is None and first.config.drone_embedding["k"] == 2
    second = compress_model(first, None, method="svd", rank=8)
    assert second.config.drone_embedding == first.config.drone_embedding and second.config.drone_ranks
    assert second.config.drone_calibration["embedding"] == first.config.drone_calibration["embedding"]
    assert torch.equal(second.get_submodule(EMB).coefficients, first.get_submodule(EMB).coefficients)
    with pytest.raises(ValueError, match=r"already a DroneEmbedding \(k=2, j=8\)"):
        compress_model(first, None, embedding=(4, 8))


def test_model_built_from_config_on_meta_and_resize_refused():
    config = DroneConfig(**tiny_teacher().config.to_dict() | {"drone_embedding": {"module": EMB, "k": 3, "j": 7}})
    with torch.device("meta"):
        model = DroneBertForSequenceClassification(config)
    layer = model.get_input_embeddings()
    assert isinstance(layer, DroneEmbedding) and layer.coefficients.is_meta
    assert (layer.num_embeddings, layer.embedding_dim, layer.k, layer.j, layer.padding_idx) == (N, D, 3, 7, 0)
    with pytest.raises(NotImplementedError, match="resize the dense model before compressing"):
        DroneBertForSequenceClassification(config).resize_token_embeddings(120)


def _shrink_to_k2(tensors):
    """Tensors of a k=2 clustering under a config that says k=4."""
    tensors[f"{EMB}.bases"] = tensors[f"{EMB}.bases"][:2].contiguous()
    tensors[f"{EMB}.assignments"] = tensors[f"{EMB}.assignments"] % 2


@pytest.mark.parametrize(
    "edit_config, edit_tensors, match",
    [
        (None, _shrink_to_k2, "do not match the shapes its `drone_ranks`/`drone_embedding`"),
        (lambda c: c["drone_embedding"].update({"j": 9}), None, "do not match the shapes"),
        (None, lambda t: t.pop(f"{EMB}.coefficients"), r"does not match its config.*word_embeddings.coefficients"),
        (lambda c: c.pop("drone_embedding"), None, r"does not match its config.*word_embeddings\.(bases|assign)"),
        (None, lambda t: t[f"{EMB}.assignments"].__setitem__(3, 7), r"assignments` must lie in \[0, 4\).*\[0, 7\]"),
    ],
)
def test_checkpoint_that_disagrees_with_its_config_raises(combined, tmp_path, edit_config, edit_tensors, match):
    bad = copy_checkpoint(combined[1], tmp_path / "bad", edit_config, edit_tensors)
    with pytest.raises(ValueError, match=match):
        AutoModelForSequenceClassification.from_pretrained(bad)


# --- errors ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "embedding, options, match",
    [
        ((0, 5), None, r"`embedding` k must be in \[1, 99\] .*got k=0"),
        ((100, 5), None, r"`embedding` k must be in \[1, 99\] \(at most the vocabulary size\), got k=100"),
        ((4, 0), None, r"`embedding` j must be in \[1, 31\] .*got j=0"),
        ((4, 32), None, r"`embedding` j must be in \[1, 31\] \(below the embedding width 32\), got j=32"),
        ((4, 5, 6), None, r"`embedding` must be a \(k, j\) pair of ints or a float ratio in \(0, 1\), got \(4, 5, "),
        ((4.0, 5), None, r"`embedding` must be a \(k, j\) pair of ints"),
        (1.5, None, r"`embedding` must be .* ratio in \(0, 1\), got 1.5"),
        (0.0, None, r"ratio in \(0, 1\), got 0.0"),
        (True, None, r"got True"),
        ("0.6", None, r"got '0.6'"),
        (0.001, None, r"`embedding`=0.001 is too small for a 99x32 embedding.*>= 0.0414"),
        (0.6, {"kgrid": (1, 2)}, r"Unknown `embedding_options` keys \['kgrid'\]; allowed: \['k_grid', "),
        (0.6, {"module": "bert.pooler"}, r"`embedding_options\['module'\]` must name an nn.Embedding"),
        (None, {"k_grid": (1,)}, r"`embedding_options` was given without `embedding`"),
    ],
)
def test_bad_embedding_arguments_raise_before_any_work(teacher, embedding, options, match):
    with pytest.raises(ValueError, match=match):
        compress_model(teacher, None, method="svd", embedding=embedding, embedding_options=options)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k": 0}, r"`k` must be an int in \[1, 50\] \(at most num_embeddings=50\), got 0"),
        ({"k": 51}, r"`k` must be an int in \[1, 50\]"),
        ({"j": 0}, r"`j` must be an int in \[1, 7\] \(below embedding_dim=8\), got 0"),
        ({"j": 8}, r"`j` must be an int in \[1, 7\].*got 8"),
        ({"padding_idx": 50}, r"`padding_idx` must be an int in \[-50, 49\]"),
    ],
)
def test_bad_module_sizes_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DroneEmbedding(50, 8, **{"k": 2, "j": 3, **kwargs})


@pytest.mark.parametrize(
    "spec, match",
    [
        ({"module": EMB, "k": 0, "j": 5}, r"`drone_embedding\['k'\]` must be an int in \[1, 99\] \(vocab_size\), got"),
        ({"module": EMB, "k": 100, "j": 5}, r"\['k'\]` must be an int in \[1, 99\].*got 100"),
        ({"module": EMB, "k": 2, "j": 32}, r"`drone_embedding\['j'\]` must be an int in \[1, 31\] \(hidden_size - 1"),
        ({"module": EMB, "k": 2, "j": True}, r"\['j'\]` must be an int in \[1, 31\].*got True"),
        ({"module": "re:.*", "k": 2, "j": 5}, r"full module name \(no regex\)"),
        ({"module": EMB, "k": 2}, r"exactly the keys \['module', 'k', 'j'\], got \['k', 'module'\]"),
    ],
)
def test_bad_config_field_raises(spec, match):
    with pytest.raises(StrictDataclassError, match=match):
        DroneConfig(**tiny_teacher().config.to_dict() | {"drone_embedding": spec})


def test_replace_helper_checks_module_and_factor_shapes(teacher):
    import copy

    model = copy.deepcopy(teacher)
    with pytest.raises(ValueError, match=r"'bert.pooler.dense' is a Linear; expected an nn.Embedding, one of \["):
        replace_embedding_with_drone(model, {"module": "bert.pooler.dense", "k": 2, "j": 3})
    bad = (torch.zeros(N, 3), torch.zeros(2, 4, D), torch.zeros(N, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must have shapes \[\(99, 3\), \(2, 3, 32\), \(99,\)\]"):
        replace_embedding_with_drone(model, {"module": EMB, "k": 2, "j": 3}, factors=bad)
    assert isinstance(model.get_submodule(EMB), torch.nn.Embedding)  # untouched after the errors
    assert replace_embedding_with_drone(model, None) is None


# --- token frequencies and weighting ---------------------------------------------------------------------------------


def test_token_frequencies_count_non_padding_ids():
    batches = tiny_batches()
    counts = token_frequencies(batches, N)
    expected = torch.zeros(N, dtype=torch.float64)
    for batch in batches:
        for i, m in zip(batch["input_ids"].flatten().tolist(), batch["attention_mask"].flatten().tolist()):
            expected[i] += m
    assert torch.equal(counts, expected) and counts[0] == 0  # masked padding positions are skipped
    assert counts.sum() == sum(int(b["attention_mask"].sum()) for b in batches)
    with pytest.raises(ValueError, match=r"`input_ids` must lie in \[0, 50\) \(`vocab_size`\), got \[\d+, 98\]"):
        token_frequencies(batches, 50)


def test_frequency_weights_change_the_clustering_and_are_recorded(teacher):
    counts = token_frequencies(tiny_batches(), N)
    weights = 1 + 100 * counts  # strong weights, so the fit must differ from the unweighted one
    plain = compress_model(teacher, None, method="svd", embedding=(2, 6))
    weighted = compress_model(teacher, None, method="svd", embedding=(2, 6), embedding_options={"weights": weights})
    plain_report, report = plain.config.drone_calibration["embedding"], weighted.config.drone_calibration["embedding"]
    assert report["weighted"] and not plain_report["weighted"] and "weighted_cost" in report
    frequent = counts > 0
    # Weighting trades rare-token error for frequent-token error.
    assert _row_error(weighted, teacher, frequent) < _row_error(plain, teacher, frequent)
    assert _row_error(weighted, teacher, ~frequent) > _row_error(plain, teacher, ~frequent)


def _row_error(model, teacher, rows: torch.Tensor) -> float:
    out = model.get_submodule(EMB)(torch.arange(N))[rows].detach().double()
    return float((out - teacher.get_submodule(EMB).weight[rows].detach().double()).square().sum())


# --- remote code -----------------------------------------------------------------------------------------------------


def test_trust_remote_code_export_loads_the_embedding_without_drone_hf(combined, tmp_path):
    from .test_hub import _FakeHub
    from .test_remote_code import _run_without_drone_hf

    model = combined[0]
    with _FakeHub() as hub:
        drone_hf.push_compressed_to_hub(model, "me/tiny-emb", trust_remote_code_export=True)
    folder = tmp_path / "remote"
    folder.mkdir()
    for name, content in hub.uploads[0]["files"].items():
        (folder / name).write_bytes(content)
    assert (folder / "embedding.py").is_file()
    torch.save(_inputs(), tmp_path / "inputs.pt")
    result = _run_without_drone_hf(
        f"""
        import torch
        from transformers import AutoModelForSequenceClassification
        model = AutoModelForSequenceClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)
        print("embedding:", type(model.get_input_embeddings()).__name__)
        torch.save(model(**torch.load("inputs.pt")).logits, "logits.pt")
        """,
        tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "embedding: DroneEmbedding" in result.stdout
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "logits.pt"), model(**_inputs()).logits)


# --- the real MiniLM embedding ---------------------------------------------------------------------------------------


def test_minilm_embedding_clustering_beats_svd_at_equal_parameters():
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
    weight = model.get_submodule(EMB).weight.detach()
    n, d = weight.shape
    small = compress_model(
        model, None, method="svd", embedding=0.6, embedding_options={"k_grid": (1, 4), "n_init": 1, "max_iter": 2}
    )
    report = small.config.drone_calibration["embedding"]
    assert (report["k"], report["j"]) == (4, 219) and report["svd_j"] == 227
    assert embedding_parameter_count(n, d, 4, 219) <= 0.6 * n * d
    assert report["cost"] < 0.97 * report["svd_cost"]
    layer = small.get_submodule(EMB)
    assert sum(p.numel() for p in layer.parameters()) == n * 219 + 4 * 219 * d
    # The module computes what the report says: its reconstruction error is the clustering cost.
    error = float((layer.to_dense().weight.detach().double() - weight.double()).square().sum())
    assert error == pytest.approx(report["cost"], rel=1e-3)
