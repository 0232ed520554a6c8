"""Every family x every head, parametrised over the registries: a family, head or method joins the matrix by being
registered. Tiny random configs; calibrate -> compress -> save -> stock Auto reload -> identical outputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from transformers import AutoModel

import drone_hf
from drone_hf.architecture import get_architecture, supported_model_types
from drone_hf.methods import method_names
from drone_hf.modeling_drone import DroneModelMixin
from drone_hf.profiling import flop_speedup_bound
from drone_hf.registration import auto_model_classes, family_heads

from .testing_utils import tiny_config, tiny_family_batches


FAMILIES = supported_model_types()
_AUTOS = {auto.__name__: auto for auto in auto_model_classes()}


def _heads(model_type: str) -> list[tuple[str, str]]:
    """(Auto class name, model class name), one per distinct model class of the family."""
    seen, heads = set(), []
    for auto_name, class_name in sorted(family_heads(model_type).items()):
        if class_name not in seen:
            seen.add(class_name)
            heads.append((auto_name, class_name))
    return heads


MATRIX = [(model_type, auto, name) for model_type in FAMILIES for auto, name in _heads(model_type)]
_LABEL_KEYS = ("labels", "token_labels", "start_positions", "end_positions")


def _model(model_type: str, class_name: str):
    torch.manual_seed(0)
    return getattr(transformers, class_name)(tiny_config(model_type, num_labels=2)).eval()


def _inputs(batch) -> dict:
    return {k: v for k, v in batch.items() if k not in _LABEL_KEYS}


def _outputs(model, batch) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**_inputs(batch))
    return [t for t in out.to_tuple() if isinstance(t, torch.Tensor)]


def _budget(model_type: str) -> dict:
    return {"rank": 4, "attention_rank": 4} if get_architecture(model_type).attention else {"rank": 4}


def test_every_registered_family_has_a_tiny_config_and_heads():
    assert {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta-v2", "modernbert"} <= set(
        FAMILIES
    )
    for model_type in FAMILIES:
        heads = dict(_heads(model_type))
        assert {"AutoModel", "AutoModelForSequenceClassification", "AutoModelForTokenClassification"} <= set(heads)
        assert "AutoModelForQuestionAnswering" in heads and "AutoModelForMultipleChoice" in heads


@pytest.mark.parametrize(("model_type", "auto_name", "class_name"), MATRIX, ids=[f"{m}-{c}" for m, _, c in MATRIX])
def test_compress_save_and_stock_auto_reload_give_identical_outputs(model_type, auto_name, class_name, tmp_path):
    model = _model(model_type, class_name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = tiny_family_batches(model_type, multiple_choice="MultipleChoice" in class_name)
    stats = drone_hf.collect_activation_stats(model, [_inputs(b) for b in batches])
    compressed = drone_hf.compress_model(model, stats, **_budget(model_type)).eval()

    assert type(compressed).__name__ == f"Drone{class_name}" and isinstance(compressed, type(model))
    assert compressed.config.model_type == f"drone_{model_type}"
    assert compressed.drone_modules(), "nothing was factored"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the input model changed"
    assert not any(isinstance(m, drone_hf.DroneLinear) for m in model.modules())

    compressed.save_pretrained(tmp_path)
    reloaded, info = _AUTOS[auto_name].from_pretrained(tmp_path, output_loading_info=True)
    assert type(reloaded) is type(compressed)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    for expected, got in zip(_outputs(compressed, batches[0]), _outputs(reloaded.eval(), batches[0]), strict=True):
        assert torch.equal(expected, got)

    if compressed.base_model is not compressed:  # a head folder: AutoModel gives its compressed encoder
        encoder = AutoModel.from_pretrained(tmp_path).eval()
        assert isinstance(encoder, DroneModelMixin) and encoder.drone_modules()
        flat = {k: v.flatten(0, -2) for k, v in _inputs(batches[0]).items()}  # multiple choice: (batch x choices)
        with torch.no_grad():
            assert torch.equal(encoder(**flat)[0], compressed.base_model(**flat)[0])


@pytest.mark.parametrize("method", method_names())
@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_method_meets_a_flop_budget_on_every_family(model_type, method):
    model = _model(model_type, family_heads(model_type)["AutoModelForSequenceClassification"])
    batches = tiny_family_batches(model_type)
    stats = drone_hf.collect_activation_stats(model, [_inputs(b) for b in batches])
    # The multiply-adds at 16 tokens: at 128 the tiny models' score products (which no rank shrinks) dominate.
    compressed = drone_hf.compress_model(
        model, stats, method=method, target_speedup=1.3, rank_multiple=2, allocation_options={"seq_len": 16}
    )
    assert compressed.config.drone_method == method
    assert flop_speedup_bound(model.config, compressed.config, 16) >= 1.3
    for tensor in _outputs(compressed, batches[0]):
        assert torch.isfinite(tensor).all()


@pytest.mark.parametrize("model_type", FAMILIES)
def test_param_ratio_is_one_allocator(model_type):
    """`compress_model(param_ratio=...)` and `compress_model(ranks=allocate_ranks(..., param_ratio=...))` give the
    same structure."""
    model = _model(model_type, family_heads(model_type)["AutoModelForSequenceClassification"])
    stats = drone_hf.collect_activation_stats(model, [_inputs(b) for b in tiny_family_batches(model_type)])
    direct = drone_hf.compress_model(model, stats, param_ratio=0.5, rank_multiple=2)
    ranks = drone_hf.allocate_ranks(model, stats, param_ratio=0.5, rank_multiple=2)
    via = drone_hf.compress_model(model, stats, ranks=ranks)
    assert direct.config.drone_ranks == via.config.drone_ranks
    assert direct.config.drone_attention_ranks == via.config.drone_attention_ranks


_BUDGET_HEADS = [
    ("AutoModelForSequenceClassification", "classification"),
    ("AutoModelForTokenClassification", "token"),
    ("AutoModelForQuestionAnswering", "span"),
]


@pytest.mark.parametrize(("auto_name", "kind"), _BUDGET_HEADS)
@pytest.mark.parametrize("model_type", FAMILIES)
def test_accuracy_budget_on_every_head(model_type, auto_name, kind):
    """`max_accuracy_drop` scores sequence classifiers by accuracy, token classifiers by token accuracy and QA models
    by span F1, on held-out rows, re-running only the layers after the changed one."""
    model = _model(model_type, family_heads(model_type)[auto_name])
    batches = tiny_family_batches(model_type)
    if kind == "token":
        batches = [{**b, "labels": b["token_labels"]} for b in batches]
    stats = drone_hf.collect_activation_stats(model, [_inputs(b) for b in batches])
    report: dict = {}
    compressed = drone_hf.compress_model(
        model,
        stats,
        max_accuracy_drop=60.0,
        eval_dataloader=batches,
        allocation_report=report,
        rank_multiple=2,
        allocation_options={"safety_margin": 0.0, "refine_steps": 2},
    )
    assert report["heldout_kind"] == kind
    assert report["cost_model"].startswith("multiply-adds")
    assert report["heldout_drop"] <= 60.0
    assert compressed.drone_modules()


def test_layerwise_heldout_scores_equal_a_full_forward():
    """The cached-layer evaluation gives exactly the logits of a full forward of the modified model."""
    from drone_hf.heldout import LayerwiseEvaluator

    model = _model("roberta", "RobertaForSequenceClassification")
    batches = tiny_family_batches("roberta")
    evaluator = LayerwiseEvaluator(model, batches)
    evaluator.advance_to(1)
    name = "roberta.encoder.layer.1.intermediate.dense"
    original = model.get_submodule(name)
    model.set_submodule(name, drone_hf.DroneLinear.from_linear(original, 3))
    with torch.no_grad():
        full = torch.cat([model(**_inputs(b)).logits for b in batches]).numpy()
    assert (evaluator.logits() == full).all()
    assert (evaluator.logits(0) == full).all()


@pytest.mark.parametrize("model_type", [m for m in FAMILIES if get_architecture(m).attention is None])
def test_attention_factorisation_is_refused_where_it_does_not_apply(model_type):
    model = _model(model_type, family_heads(model_type)["AutoModelForSequenceClassification"])
    reason = get_architecture(model_type).attention_unsupported.split(" ")[0]
    with pytest.raises(ValueError, match=f"does not apply to {model_type}: {reason}"):
        drone_hf.compress_model(model, None, method="svd", attention_rank=2)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_roles_are_shared_across_families(model_type):
    model = _model(model_type, family_heads(model_type)["AutoModel"])
    spec = get_architecture(model_type)
    role = "intermediate"
    names = drone_hf.resolve_target_modules(model, [role])
    assert names == [f"{layer}.{spec.linears[role]}" for layer in drone_hf.architecture.layer_names(model)]
    with pytest.raises(ValueError, match=r"Unknown target module `feedforward`.*roles of this"):
        drone_hf.resolve_target_modules(model, ["feedforward"])


def test_unsupported_family_is_named_with_the_supported_ones():
    model = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=99))
    with pytest.raises(ValueError, match=r"does not support model_type 'gpt2'.*supported: \[.*'bert'"):
        drone_hf.compress_model(model, None, method="svd", rank=4)


def test_pipeline_runs_on_a_compressed_folder(tmp_path):
    from .testing_utils import tiny_tokenizer

    model = _model("roberta", "RobertaForTokenClassification")
    compressed = drone_hf.compress_model(model, None, method="svd", rank=4)
    compressed.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    tagger = transformers.pipeline("token-classification", model=str(tmp_path))
    assert isinstance(type(tagger.model), type) and isinstance(tagger.model, DroneModelMixin)
    assert tagger("w5 w6 w7")


@pytest.mark.parametrize("model_type", FAMILIES)
def test_projective_clustering_of_every_familys_word_embedding(model_type, tmp_path):
    model = _model(model_type, family_heads(model_type)["AutoModelForSequenceClassification"])
    compressed = drone_hf.compress_model(model, None, method="svd", embedding=(2, 8)).eval()
    name = compressed.config.drone_embedding["module"]
    assert name == drone_hf.targets.word_embedding_name(model)
    assert isinstance(compressed.get_input_embeddings(), drone_hf.DroneEmbedding)
    compressed.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    batch = tiny_family_batches(model_type)[0]
    assert torch.equal(_outputs(reloaded, batch)[0], _outputs(compressed, batch)[0])


@pytest.mark.parametrize("model_type", ["distilbert", "modernbert"])
def test_trainer_callback_compresses_and_distils_another_family(model_type, tmp_path):
    """The Trainer callback (calibration, compression, feature distillation, card, save) on families whose inputs and
    layers differ from BERT's (no token_type_ids; ModernBERT's fused projections and final norm)."""
    import datasets
    from transformers import Trainer, TrainingArguments

    from .testing_utils import tiny_tokenizer

    rows = tiny_family_batches(model_type, num_rows=16)
    table = {
        "input_ids": [r.tolist() for b in rows for r in b["input_ids"]],
        "labels": [int(x) for b in rows for x in b["labels"]],
    }
    train = datasets.Dataset.from_dict(table)
    callback = drone_hf.DroneCompressionCallback(
        drone_hf.DroneCompressionArguments(target_speedup=1.3, num_calibration_samples=8),
        distillation_args=drone_hf.DroneDistillationArguments(max_steps=2, per_device_train_batch_size=4),
        train_dataset=train,
        measure_speed=False,
    )
    model = _model(model_type, family_heads(model_type)["AutoModelForSequenceClassification"])
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=1,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=4,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model, args=args, train_dataset=train, processing_class=tiny_tokenizer(), callbacks=[callback]
    )
    trainer.train()
    path = tmp_path / "run" / "drone"
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    assert reloaded.config.model_type == f"drone_{model_type}" and reloaded.drone_modules()
    batch = {k: v for k, v in rows[0].items() if k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, callback.compressed_model.eval()(**batch).logits)


@pytest.mark.parametrize("model_type", ["bert", "mpnet"])
def test_cosine_budget_on_a_bare_encoder(model_type):
    """A bare encoder has no head: `rows_fn=embedding_rows("mean")` scores its pooled embeddings by cosine similarity
    to the dense ones, and the allocation keeps the joint drop `100 * (1 - mean cosine)` within the budget."""
    from drone_hf.heads import embedding_rows

    model = _model(model_type, "BertModel" if model_type == "bert" else "MPNetModel")
    batches = [_inputs(b) for b in tiny_family_batches(model_type, num_rows=16)]
    stats = drone_hf.collect_activation_stats(model, batches)
    report: dict = {}
    compressed = drone_hf.compress_model(
        model,
        stats,
        max_accuracy_drop=5.0,  # mean cosine >= 0.95 on these rows
        eval_dataloader=batches,
        allocation_report=report,
        rank_multiple=2,
        allocation_options={"rows_fn": embedding_rows("mean"), "safety_margin": 0.0, "refine_steps": 4},
    ).eval()
    assert report["heldout_kind"] == "embedding" and compressed.drone_modules()
    rows = embedding_rows("mean")
    with torch.no_grad():
        dense = np.concatenate([rows(model(**b), b)[0] for b in batches])
        small = np.concatenate([rows(compressed(**b), b)[0] for b in batches])
    cosine = (dense * small).sum(1) / (np.linalg.norm(dense, axis=1) * np.linalg.norm(small, axis=1))
    assert 100 * (1 - cosine.mean()) == pytest.approx(report["heldout_drop"], abs=1e-4)
    assert cosine.mean() >= 0.95
