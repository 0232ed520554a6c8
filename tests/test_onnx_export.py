"""ONNX export for ONNX Runtime (`drone_hf.export_onnx`, `drone-hf export --onnx`): outputs match PyTorch, the
attention stays fused for compressed models, int8 runs, the CLI writes the folder and refuses bad input."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import transformers


pytest.importorskip("onnx", reason="ONNX export needs the `onnx` extra (pip install -e '.[onnx]')")
pytest.importorskip("onnxruntime", reason="ONNX export needs the `onnx` extra (pip install -e '.[onnx]')")

import drone_hf  # noqa: E402
from drone_hf import onnx_export  # noqa: E402
from drone_hf.architecture import get_architecture, supported_model_types  # noqa: E402
from drone_hf.cli import main  # noqa: E402
from drone_hf.onnx_export import export_onnx, fused_op_counts, onnx_session  # noqa: E402

from .testing_utils import (  # noqa: E402
    tiny_batches,
    tiny_classifier_folder,
    tiny_config,
    tiny_family_batches,
    tiny_teacher,
    tiny_tokenizer,
)


def _inputs(batch: dict) -> dict:
    return {key: batch[key] for key in ("input_ids", "attention_mask")}


def _stats(model, batches):
    return drone_hf.collect_activation_stats(model, [_inputs(b) for b in batches])


@pytest.fixture(scope="module")
def models():
    """The tiny BERT classifier dense, with every linear factored (and DRONE attention), and with only the FFN
    factored."""
    teacher = tiny_teacher()
    stats = _stats(teacher, tiny_batches())
    return {
        "dense": teacher,
        "drone": drone_hf.compress_model(teacher, stats, rank=4, attention=False),
        "drone_attention": drone_hf.compress_model(teacher, stats, rank=4, attention_rank=4),
        "ffn_only": drone_hf.compress_model(teacher, stats, rank=4, target_modules=["intermediate", "output"]),
    }


def _padded(batch: int, tokens: int, seed: int, vocab: int = 99) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, tokens), generator=generator)
    mask = torch.ones_like(ids)
    mask[::2, tokens // 2 :] = 0  # padded tails, different lengths from the export's example
    if batch > 2:
        mask[-1, 1:] = 0  # a row with one real token
    return {"input_ids": ids * mask, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def _run(folder, name, inputs) -> np.ndarray:
    session = onnx_session(folder / name)
    wanted = {entry.name for entry in session.get_inputs()}
    feed = {key: value.numpy() for key, value in inputs.items() if key in wanted}
    if "token_type_ids" in wanted and "token_type_ids" not in feed:
        feed["token_type_ids"] = np.zeros_like(feed["input_ids"])  # what the model assumes without them
    return session.run(None, feed)[0]


@pytest.mark.parametrize("kind", ["dense", "drone", "drone_attention", "ffn_only"])
@pytest.mark.parametrize("optimize", [False, True])
def test_onnx_runtime_matches_pytorch_with_padding_at_new_shapes(models, kind, optimize, tmp_path):
    model = models[kind]
    report = export_onnx(model, tmp_path / "onnx", optimize=optimize)
    assert report["files"]["model.onnx"]["max_abs_diff"] < 1e-5
    for batch, tokens, seed in ((1, 5, 0), (4, 11, 1), (3, 40, 2)):
        inputs = _padded(batch, tokens, seed)
        with torch.no_grad():
            expected = model(**inputs).logits.numpy()
        np.testing.assert_allclose(_run(tmp_path / "onnx", "model.onnx", inputs), expected, atol=1e-5, rtol=1e-4)


# Fused kernels in the optimised tiny BERT (2 layers): dense and FFN-only keep ONNX Runtime's own Attention fusion;
# with factored (or narrowed) Q/K/V the export emits MultiHeadAttention; without that route no attention is fused.
# The optimiser's 4 SkipLayerNormalization are split again into Add + LayerNormalization (faster on the CPU).
EXPECTED_FUSED = {
    "dense": {"Attention": 2, "MultiHeadAttention": 0, "SkipLayerNormalization": 0, "BiasGelu": 2},
    "ffn_only": {"Attention": 2, "MultiHeadAttention": 0, "SkipLayerNormalization": 0, "BiasGelu": 2},
    "drone": {"Attention": 0, "MultiHeadAttention": 2, "SkipLayerNormalization": 0, "BiasGelu": 2},
    "drone_attention": {"Attention": 0, "MultiHeadAttention": 2, "SkipLayerNormalization": 0, "BiasGelu": 2},
}


@pytest.mark.parametrize("kind", list(EXPECTED_FUSED))
def test_fused_op_counts_of_the_optimised_graph(models, kind, tmp_path):
    report = export_onnx(models[kind], tmp_path / "onnx", optimize=True)
    counts = fused_op_counts(tmp_path / "onnx" / "model.onnx")
    assert {key: counts[key] for key in EXPECTED_FUSED[kind]} == EXPECTED_FUSED[kind]
    assert report["files"]["model.onnx"]["fused_ops"] == counts
    assert report["attention_blocks_multihead"] == EXPECTED_FUSED[kind]["MultiHeadAttention"]
    assert report["attention_blocks_narrow_scores"] == (2 if kind == "drone_attention" else 0)
    assert report["skip_layer_norms_split"] == 4


@pytest.mark.parametrize("kind", ["drone", "drone_attention"])
def test_multihead_attention_reads_the_projections_without_reshape_round_trips(models, kind, tmp_path):
    import onnx

    export_onnx(models[kind], tmp_path / "onnx", optimize=True)
    graph = onnx.load(tmp_path / "onnx" / "model.onnx").graph
    producer = {output: node.op_type for node in graph.node for output in node.output}
    attention = [node for node in graph.node if node.op_type == "MultiHeadAttention"]
    assert len(attention) == 2
    # query/key/value come straight from the projections (no view to per-head layout and back): the bias Add of a
    # linear; a narrowed query/key too, heads x rank wide, not zero-padded back to the head size (no Pad left)
    source = {output: node for node in graph.node for output in node.output}
    initializers = {tensor.name: tuple(tensor.dims) for tensor in graph.initializer}
    config = models[kind].config
    heads, head = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    for node in attention:
        assert [producer[name] for name in node.input[:3]] == ["Add", "Add", "Add"]
        widths = [next(initializers[i] for i in source[name].input if i in initializers) for name in node.input[:3]]
        assert widths == ([(heads * 4,)] * 2 if kind == "drone_attention" else [(heads * head,)] * 2) + [
            (heads * head,)
        ]
    assert "Pad" not in producer.values()
    # ... and the output goes straight on (to the output projection's MatMul)
    users = {name: [n.op_type for n in graph.node if name in n.input] for name in (a.output[0] for a in attention)}
    assert all(types == ["MatMul"] for types in users.values()), users


@pytest.mark.parametrize("kind", ["dense", "drone_attention"])
def test_skip_layer_norms_are_split_and_onnx_runtime_does_not_fuse_them_back(models, kind, tmp_path):
    """ONNX Runtime's CPU SkipLayerNormalization kernel is scalar: the export leaves residual add and LayerNorm apart,
    in an order the session's own fusion (default options) does not match."""
    import onnx
    import onnxruntime

    export_onnx(models[kind], tmp_path / "onnx", optimize=True)
    graph = onnx.load(tmp_path / "onnx" / "model.onnx").graph
    producer = {output: node for node in graph.node for output in node.output}
    initializers = {tensor.name for tensor in graph.initializer}
    norms = [node for node in graph.node if node.op_type == "LayerNormalization" and "/norm" in node.name]
    assert len(norms) == 4
    for norm in norms:  # LayerNorm(Add(Add(output, skip), bias)): the bias is added last
        bias_add = producer[norm.input[0]]
        assert bias_add.op_type == "Add" and bias_add.input[1] in initializers
        skip_add = producer[bias_add.input[0]]
        assert skip_add.op_type == "Add" and not set(skip_add.input) & initializers
    options = onnxruntime.SessionOptions()  # what a user gets: ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "session.onnx")
    onnxruntime.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), options, providers=["CPUExecutionProvider"])
    assert fused_op_counts(tmp_path / "session.onnx")["SkipLayerNormalization"] == 0


def test_without_the_fused_route_a_factored_attention_is_not_fused(models, tmp_path):
    """What the MultiHeadAttention route is for: ONNX Runtime's optimiser alone fuses no factored attention."""
    report = export_onnx(models["drone"], tmp_path / "onnx", optimize=True, fuse_attention=False)
    counts = report["files"]["model.onnx"]["fused_ops"]
    assert counts["Attention"] == counts["MultiHeadAttention"] == 0
    assert counts["BiasGelu"] == 2 and report["skip_layer_norms_split"] == 4  # the rest still fuses
    assert report["files"]["model.onnx"]["max_abs_diff"] < 1e-5


@pytest.mark.parametrize("kind", ["dense", "drone"])
def test_int8_runs_and_stays_close(models, kind, tmp_path):
    report = export_onnx(models[kind], tmp_path / "onnx", optimize=True, quantize="int8")
    int8 = report["files"]["model_int8.onnx"]
    assert int8["fused_ops"]["QAttention" if kind == "dense" else "MultiHeadAttention"] == 2
    inputs = _padded(4, 11, 3)
    with torch.no_grad():
        expected = models[kind](**inputs).logits.numpy()
    got = _run(tmp_path / "onnx", "model_int8.onnx", inputs)
    assert 0 < np.abs(got - expected).max() < 0.02  # quantised (not the float graph), and close
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_folder_holds_what_onnx_runtime_users_need_and_the_model_is_untouched(models, tmp_path):
    model = models["drone_attention"]
    model.train()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    implementation = model.config._attn_implementation
    try:
        report = export_onnx(model, tmp_path / "onnx", tokenizer=tiny_tokenizer())
    finally:
        training = model.training
        model.eval()
    assert training and model.config._attn_implementation == implementation
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    folder = tmp_path / "onnx"
    assert {"model.onnx", "config.json", "onnx_export.json", "tokenizer_config.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert json.loads((folder / "onnx_export.json").read_text()) == report
    assert report["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert json.loads((folder / "config.json").read_text())["drone_attention_ranks"]


@pytest.mark.parametrize("model_type", supported_model_types())
def test_every_family_exports_dense_and_compressed(model_type, tmp_path):
    torch.manual_seed(0)
    dense = transformers.AutoModelForSequenceClassification.from_config(tiny_config(model_type, num_labels=2)).eval()
    batches = tiny_family_batches(model_type)
    budget = {"rank": 4, "attention_rank": 4} if get_architecture(model_type).attention else {"rank": 4}
    small = drone_hf.compress_model(dense, _stats(dense, batches), **budget)
    report = export_onnx(small, tmp_path / "onnx", optimize=True)
    inputs = _inputs(batches[0])
    with torch.no_grad():
        expected = small(**inputs).logits.numpy()
    np.testing.assert_allclose(_run(tmp_path / "onnx", "model.onnx", inputs), expected, atol=1e-5, rtol=1e-4)
    counts = report["files"]["model.onnx"]["fused_ops"]
    if get_architecture(model_type).attention is not None:  # narrowed query/key fed to the fused op unpadded
        assert counts["MultiHeadAttention"] == 2 and not report["attention_blocks_unfused_route"]
        assert report["attention_blocks_narrow_scores"] == 2
    if model_type == "mpnet":  # scores in its own code (relative position bias): its dense blocks are routed too
        dense_report = export_onnx(dense, tmp_path / "dense", optimize=True)
        assert dense_report["files"]["model.onnx"]["fused_ops"]["MultiHeadAttention"] == 2
        with torch.no_grad():
            expected = dense(**inputs).logits.numpy()
        np.testing.assert_allclose(_run(tmp_path / "dense", "model.onnx", inputs), expected, atol=1e-5, rtol=1e-4)


def test_an_int8_drone_model_is_refused_with_the_way_out(models, tmp_path):
    teacher = models["dense"]
    quantized = drone_hf.compress_model(teacher, _stats(teacher, tiny_batches()), rank=4, quantize="int8")
    with pytest.raises(ValueError, match="quantize='int8'"):
        export_onnx(quantized, tmp_path / "onnx")
    assert not (tmp_path / "onnx" / "model.onnx").exists()


@pytest.mark.parametrize(
    ("option", "value", "message"), [("opset", 13, "`opset`"), ("quantize", "int4", "`quantize`")]
)
def test_bad_options_are_refused(models, tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        export_onnx(models["dense"], tmp_path / "onnx", **{option: value})


def test_a_mismatch_raises_and_leaves_an_earlier_export_as_it_was(models, tmp_path, monkeypatch):
    export_onnx(models["dense"], tmp_path / "onnx")
    before = (tmp_path / "onnx" / "model.onnx").read_bytes()
    monkeypatch.setattr(onnx_export, "ATOL", -1.0)  # every export now "differs"
    with pytest.raises(RuntimeError, match="differs from PyTorch"):
        export_onnx(models["drone"], tmp_path / "onnx")
    assert (tmp_path / "onnx" / "model.onnx").read_bytes() == before
    (tmp_path / "plain").mkdir()  # written in place (the CLI's staging folder): the refused files are removed
    with pytest.raises(RuntimeError, match="not saved"):
        onnx_export.write_onnx(models["drone"], tmp_path / "plain", quantize="int8")
    assert list((tmp_path / "plain").iterdir()) == []


def test_missing_onnxruntime_names_the_extra(models, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ModuleNotFoundError, match=r"\.\[onnx\]"):
        export_onnx(models["dense"], tmp_path / "onnx")


# ------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    return tiny_classifier_folder(tmp_path_factory.mktemp("onnx_cli") / "model")


def test_cli_writes_the_folder_and_it_runs_with_its_tokenizer(classifier, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["export", "--model", str(classifier), "--onnx", "--optimize", "--quantize", "int8", "--output", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| model.onnx | 2 | 0 | 0 (4) |" in printed and "| model_int8.onnx | 2 | 0 | 0 (4) |" in printed
    names = {path.name for path in out.iterdir()}
    assert {"model.onnx", "model_int8.onnx", "config.json", "onnx_export.json", "drone_results.json"} <= names
    results = json.loads((out / "drone_results.json").read_text())
    assert results["onnx"]["optimized"] and "model_int8.onnx" in results["files"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(classifier).eval()
    batch = tokenizer(["good movie", "a bad and boring film"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**batch).logits.numpy()
    np.testing.assert_allclose(_run(out, "model.onnx", dict(batch)), expected, atol=1e-5)
    # An earlier drone-hf output is replaced without --overwrite, and what the new one does not write goes.
    assert main(["export", "--model", str(classifier), "--onnx", "--output", str(out)]) == 0
    assert (out / "model.onnx").is_file() and not (out / "model_int8.onnx").exists()


def test_cli_needs_onnx(classifier, tmp_path, capsys):
    assert main(["export", "--model", str(classifier), "--output", str(tmp_path / "out")]) == 2
    assert "pass `--onnx`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_foreign_folder_without_overwrite(classifier, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    argv = ["export", "--model", str(classifier), "--onnx", "--output", str(out)]
    assert main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err and not (out / "model.onnx").exists()
    assert main([*argv, "--overwrite"]) == 0
    assert (out / "model.onnx").is_file() and (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize(
    ("extra", "message"),
    [(["--opset", "99"], "--opset 99"), (["--model", "/nonexistent/model"], "does not exist")],
)
def test_cli_refuses_bad_input_before_work(classifier, tmp_path, capsys, extra, message):
    argv = ["export", "--model", str(classifier), "--onnx", "--output", str(tmp_path / "out"), *extra]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_base_size_shapes_benchmark_reads_the_budget_rows_it_rebuilds(tmp_path):
    """`benchmarks/onnx_runtime_base_size.py` rebuilds each fp32 budget row of a deployment result at its recorded
    ranks; dense rows, other forms and rows without ranks are not budgets to rebuild. The shipped default file holds
    the two MRPC budgets the README quotes."""
    from .testing_utils import benchmark_module

    rows = [
        {"form": "fp32", "model": "dense", "drone_ranks": None},
        {"form": "fp32", "model": "drone 1-pt budget (fast)", "drone_ranks": {"a": 8}, "drone_attention_ranks": {}},
        {"form": "bf16", "model": "drone 1-pt budget (fast)", "drone_ranks": {"a": 8}, "drone_attention_ranks": {}},
        {"form": "fp32", "model": "drone r192", "drone_ranks": {"a": 192}, "drone_attention_ranks": {}},
    ]
    (tmp_path / "result.json").write_text(json.dumps({"rows": rows}))
    with benchmark_module("onnx_runtime_base_size") as script:
        assert list(script.budget_rows(tmp_path / "result.json")) == ["drone 1-pt budget (fast)"]
        shipped = script.budget_rows(script.DEFAULT_RANKS)
    assert sorted(shipped) == ["drone 1-pt budget (fast)", "drone 1.5-pt budget (fast)"]
    assert all(len(row["drone_ranks"]) > 30 and row["drone_attention_ranks"] for row in shipped.values())


def test_base_size_benchmark_quotes_a_saved_budget_models_recorded_dev_metric(tmp_path):
    """With `--budget-model`, `benchmarks/onnx_runtime_base_size.py` quotes each saved model's main dev metric and
    its change from the dense model as the CLI recorded them in `drone_results.json` (fractions, shown in points)."""
    from .testing_utils import benchmark_module

    results = {"dense": {"metrics": {"f1": 0.9072, "accuracy": 0.8701}}, "drone": {"metrics": {"f1": 0.9002}}}
    (tmp_path / "drone_results.json").write_text(json.dumps({"metric": "f1", "results": results}))
    with benchmark_module("onnx_runtime_base_size") as script:
        assert script.recorded_dev(tmp_path) == "f1 90.02 (-0.70)"


def test_round_robin_calls_run_each_row_in_its_runtime(models, tmp_path):
    """The ONNX Runtime benchmarks time one zero-argument call per row (`benchmarks/onnx_runtime.py`, and
    `onnx_runtime_base_size.py` through it): the PyTorch model under inference mode, or the session fed only the
    inputs it declares, named "<model> | <runtime>"."""
    from .testing_utils import benchmark_module

    export_onnx(models["drone_attention"], tmp_path / "onnx")
    session = onnx_session(tmp_path / "onnx" / "model.onnx")
    rows = [
        {"model": "m", "runtime": "torch fp32", "_torch": models["drone_attention"]},
        {"model": "m", "runtime": "ORT fp32", "_session": session},
    ]
    with benchmark_module("onnx_runtime") as script:
        calls = script.round_robin_calls(rows, _padded(2, 7, 0))
    assert list(calls) == ["m | torch fp32", "m | ORT fp32"]
    for call in calls.values():
        call()
