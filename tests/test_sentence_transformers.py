"""`compress_sentence_transformer` on tiny random sentence-transformers models (BERT + mean pooling + Normalize,
MPNet + CLS pooling + Dense + Normalize): reload with `SentenceTransformer(folder)`, `AutoModel` on the folder, the
input left alone, every budget kind, embedding distillation, deployment dtypes and int8, bad input, the Hub upload
(mocked) and the CLI; plus one slow test on all-MiniLM-L6-v2 with SST-2 sentences."""

from __future__ import annotations

import copy
import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModel, BertModel, MPNetModel

import drone_hf
from drone_hf import sentence_embeddings as st_module
from drone_hf.cli import main
from drone_hf.hub import BEGIN_MARKER, REMOTE_CODE_FILES
from drone_hf.int8 import DroneInt8Linear
from drone_hf.profiling import flop_speedup_bound

from .test_hub import _FakeHub
from .testing_utils import (
    SHARED_GLUE,
    minilm_path,
    one_torch_thread,
    requires_shared_glue,
    tiny_config,
    tiny_tokenizer,
)


sentence_transformers = pytest.importorskip("sentence_transformers")
from sentence_transformers import SentenceTransformer  # noqa: E402
from sentence_transformers.base.modules import Dense, Normalize, Transformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling  # noqa: E402

from drone_hf.sentence_embeddings import (  # noqa: E402
    MIN_HELDOUT_SENTENCES,
    cosine_fidelity,
    pair_auc,
    roc_auc,
    sentence_batches,
    sentence_embedding_rows,
    split_heldout,
)


FAMILIES = {"bert": BertModel, "mpnet": MPNetModel}


_one_thread = one_torch_thread()


def _sentences(count: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(5, 99, rng.integers(3, 14))) for _ in range(count)]


SENTENCES = _sentences(128)
HELDOUT = _sentences(48, seed=1)


def _build(root, model_type: str, **config) -> SentenceTransformer:
    """A tiny random SentenceTransformer saved to and reloaded from `root / "dense"`: BERT with mean pooling and
    Normalize, MPNet with CLS pooling, a Dense layer and Normalize."""
    torch.manual_seed(0)
    FAMILIES[model_type](tiny_config(model_type, pad_token_id=0, **config)).save_pretrained(root / "encoder")
    tiny_tokenizer().save_pretrained(root / "encoder")
    transformer = Transformer(str(root / "encoder"), max_seq_length=32)
    if model_type == "bert":
        modules = [transformer, Pooling(32, "mean"), Normalize()]
    else:
        modules = [transformer, Pooling(32, "cls"), Dense(32, 16), Normalize()]
    SentenceTransformer(modules=modules).save(str(root / "dense"))
    return SentenceTransformer(str(root / "dense"))


@pytest.fixture(scope="module", params=list(FAMILIES))
def dense(request, tmp_path_factory):
    return _build(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def bert_dense(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("bert"), "bert")


@pytest.fixture(scope="module")
def bert_small(bert_dense):
    return drone_hf.compress_sentence_transformer(bert_dense, SENTENCES, rank=8)


def _encode(model, sentences=SENTENCES) -> np.ndarray:
    return model.encode(sentences, batch_size=16, show_progress_bar=False)


# ----------------------------------------------------------------------------------------------- save and reload


def test_save_reloads_identically_with_sentence_transformer(dense, tmp_path):
    small = drone_hf.compress_sentence_transformer(dense, SENTENCES, rank=8)
    assert isinstance(small, SentenceTransformer) and small is not dense
    family = dense[0].auto_model.config.model_type
    assert small[0].auto_model.config.model_type == f"drone_{family}" and small[0].auto_model.drone_modules()
    small.save(str(tmp_path / "small"))
    files = {p.relative_to(tmp_path / "small").as_posix() for p in (tmp_path / "small").rglob("*") if p.is_file()}
    assert {"modules.json", "config.json", "model.safetensors", "README.md", "1_Pooling/config.json"} <= files
    assert {"sentence_bert_config.json", "config_sentence_transformers.json", "tokenizer_config.json"} <= files
    reloaded = SentenceTransformer(str(tmp_path / "small"))
    assert type(reloaded[0].auto_model) is type(small[0].auto_model)
    assert [type(m).__name__ for m in reloaded] == [type(m).__name__ for m in dense]
    assert np.array_equal(_encode(reloaded), _encode(small))
    assert not np.allclose(_encode(reloaded), _encode(dense), atol=1e-6)  # the compression did something
    small.save_pretrained(str(tmp_path / "again"))  # sentence-transformers' alias
    assert np.array_equal(_encode(SentenceTransformer(str(tmp_path / "again"))), _encode(small))


@pytest.mark.parametrize("step", ["written", "config-aside", "aside:modules.json", "in:2_Dense"])
def test_a_save_that_fails_half_way_leaves_the_old_model_whole(bert_small, tmp_path_factory, tmp_path, step):
    """Saving a compressed MPNet model (CLS pooling, Dense, Normalize) over a compressed BERT model (mean pooling,
    Normalize): an error at any step leaves the BERT model loadable with its embeddings; a full save replaces it,
    module folders included (no stale `2_Normalize` of the old model is left behind)."""
    from drone_hf import saving

    mpnet_small = drone_hf.compress_sentence_transformer(
        _build(tmp_path_factory.mktemp("mpnet-over"), "mpnet"), SENTENCES, rank=8
    )
    target = tmp_path / "model"
    bert_small.save(str(target))
    before = _encode(SentenceTransformer(str(target)))

    def fail(name):
        if name == step:
            raise OSError(f"injected at {name}")

    saving._STEP_HOOK = fail
    try:
        with pytest.raises(OSError, match=f"injected at {step}"):
            mpnet_small.save(str(target))
    finally:
        saving._STEP_HOOK = None
    reloaded = SentenceTransformer(str(target))
    assert type(reloaded[0].auto_model).__name__ == "DroneBertModel"
    assert np.array_equal(_encode(reloaded), before)
    assert not [p for p in target.iterdir() if p.name.startswith(saving.STAGING_PREFIX)]

    mpnet_small.save(str(target))
    reloaded = SentenceTransformer(str(target))
    assert [type(m).__name__ for m in reloaded] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert np.array_equal(_encode(reloaded), _encode(mpnet_small))
    assert {p.name for p in target.iterdir() if p.is_dir()} == {"1_Pooling", "2_Dense", "3_Normalize"}


def test_auto_model_on_the_folder_is_the_compressed_encoder(bert_small, tmp_path):
    bert_small.save(str(tmp_path / "small"))
    encoder = AutoModel.from_pretrained(tmp_path / "small")
    expected = bert_small[0].auto_model
    assert type(encoder) is type(expected) and type(encoder).__name__ == "DroneBertModel"
    assert encoder.config.drone_ranks == expected.config.drone_ranks
    batch = {k: v for k, v in sentence_batches(bert_small, SENTENCES[:8])[0].items() if isinstance(v, torch.Tensor)}
    with torch.no_grad():
        assert torch.equal(encoder(**batch).last_hidden_state, expected.eval()(**batch).last_hidden_state)


def test_model_card_is_a_sentence_transformers_card_with_the_drone_section(bert_small, tmp_path):
    bert_small.save(str(tmp_path / "small"))
    card = ModelCard.load(tmp_path / "small" / "README.md")
    assert card.data.library_name == "sentence-transformers" and card.data.pipeline_tag == "sentence-similarity"
    assert {"sentence-transformers", "drone_hf", "low-rank"} <= set(card.data.tags)
    assert card.text.count(BEGIN_MARKER) == 1 and "## Ranks per module" in card.text
    usage = card.text.split(BEGIN_MARKER)[0]
    assert "import drone_hf" in usage and "from sentence_transformers import SentenceTransformer" in usage
    assert "compressed with drone_hf (drone)" in card.text  # the title says what the model is
    bert_small.save(str(tmp_path / "small"))  # saving again keeps one DRONE section
    assert (tmp_path / "small" / "README.md").read_text().count(BEGIN_MARKER) == 1


def test_embedding_rows_match_encode(dense):
    """The allocation scores exactly what `encode()` returns (pooling of any mode, Dense, Normalize)."""
    rows = sentence_embedding_rows(dense)
    encoder = dense[0].auto_model.eval()
    got, order = [], sorted(range(len(SENTENCES)), key=lambda i: len(SENTENCES[i]))
    for batch in sentence_batches(dense, SENTENCES, batch_size=16):
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            got.append(rows(encoder(**inputs), batch)[0])
    np.testing.assert_allclose(np.concatenate(got), _encode(dense, [SENTENCES[i] for i in order]), atol=1e-5)


def test_input_is_untouched(bert_dense):
    was_training = bert_dense.training
    model = bert_dense.train()
    model[0].auto_model.encoder.layer[1].eval()  # mixed modes are kept too
    handle = model[0].auto_model.encoder.layer[0].register_forward_hook(lambda *args: None)
    try:
        encoder = model[0].auto_model
        state = {k: v.clone() for k, v in model.state_dict().items()}
        modes = {name: m.training for name, m in model.named_modules()}
        hooks = {name: list(m._forward_hooks) for name, m in model.named_modules()}
        small = drone_hf.compress_sentence_transformer(model, SENTENCES, target_speedup=1.5)
        assert model[0].auto_model is encoder and type(encoder) is BertModel
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()) and state.keys() == (
            model.state_dict().keys()
        )
        assert {name: m.training for name, m in model.named_modules()} == modes
        assert {name: list(m._forward_hooks) for name, m in model.named_modules()} == hooks
        copied = {name: m.training for name, m in small.named_modules() if name in modes}
        assert copied == {name: modes[name] for name in copied} and len(copied) > 10  # the copy keeps the modes
        assert small[0].auto_model.training and small[0].auto_model.drone_modules()
        assert not any(m.training for m in small[0].auto_model.encoder.layer[1].modules())  # factors included
    finally:
        handle.remove()
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------- budgets


def test_target_speedup_meets_the_flop_target(bert_dense):
    small = drone_hf.compress_sentence_transformer(bert_dense, SENTENCES, target_speedup=1.5)
    # Counted at the length the model embeds: its max_seq_length (32) when below 128 tokens.
    assert flop_speedup_bound(bert_dense[0].auto_model.config, small[0].auto_model.config, 32) >= 1.5


def test_param_ratio_keeps_that_share_of_encoder_linear_weights(bert_dense):
    small = drone_hf.compress_sentence_transformer(bert_dense, SENTENCES, param_ratio=0.5, method="svd")
    dense_params = sum(p.numel() for p in bert_dense[0].auto_model.encoder.parameters())
    small_params = sum(p.numel() for p in small[0].auto_model.encoder.parameters())
    assert small_params < 0.75 * dense_params and small[0].auto_model.config.drone_method == "svd"


def test_ranks_by_pattern(bert_dense):
    small = drone_hf.compress_sentence_transformer(
        bert_dense, SENTENCES, ranks={"re:.*intermediate.dense": 8}, method="drone-bc"
    )
    assert small[0].auto_model.config.drone_ranks == {f"encoder.layer.{i}.intermediate.dense": 8 for i in range(2)}


@pytest.mark.parametrize("floor", [0.999, 0.99999])
def test_min_cosine_similarity_holds_on_the_heldout_sentences(dense, floor):
    report: dict = {}
    small = drone_hf.compress_sentence_transformer(
        dense, SENTENCES, min_cosine_similarity=floor, heldout_sentences=HELDOUT, allocation_report=report
    )
    assert report["budget"] == "max_accuracy_drop" and report["heldout_kind"] == "embedding"
    assert report["value"] == pytest.approx(100 * (1 - floor))
    assert report["heldout_drop"] + report["heldout_standard_error"] <= 100 * (1 - floor) + 1e-9  # the joint check
    assert report["heldout_cosine"] == pytest.approx(1 - report["heldout_drop"] / 100, abs=1e-6)
    assert cosine_fidelity(dense, small, HELDOUT) >= floor  # what encode() gives
    assert small[0].auto_model.drone_modules()


def test_min_cosine_similarity_carves_heldout_sentences_from_the_input(bert_dense):
    report: dict = {}
    small = drone_hf.compress_sentence_transformer(
        bert_dense, SENTENCES, min_cosine_similarity=0.999, allocation_report=report
    )
    calibration, heldout = split_heldout(SENTENCES)
    assert len(heldout) == len(SENTENCES) // 4 >= MIN_HELDOUT_SENTENCES and not set(heldout) & set(calibration)
    assert report["heldout_sentences"] == len(heldout) and report["calibration_sentences"] == len(calibration)
    assert report["heldout_examples"] == len(heldout)
    # The statistics saw the tokens of the calibration sentences only, not those of the held-out ones.
    tokens = sum(int(b["attention_mask"].sum()) for b in sentence_batches(bert_dense, calibration))
    assert small[0].auto_model.config.drone_calibration["num_tokens"] == tokens


def test_sequential_refit_brings_the_embeddings_closer_and_the_budget_judges_the_refitted_encoder(dense):
    """`sequential=True` refits the factors on the compressed encoder's own inputs: at the same ranks the embeddings of
    the calibration sentences move closer to the dense ones; under a cosine budget the reported held-out cosine is the
    returned (refitted) model's own, and the config records the refit."""
    plain = drone_hf.compress_sentence_transformer(dense, SENTENCES, rank=4, attention=False)
    refit = drone_hf.compress_sentence_transformer(dense, SENTENCES, rank=4, attention=False, sequential=True)
    assert 1 - cosine_fidelity(dense, refit, SENTENCES) < 0.9 * (1 - cosine_fidelity(dense, plain, SENTENCES))
    assert refit[0].auto_model.config.drone_calibration["sequential_refit"] is True
    assert "sequential_refit" not in plain[0].auto_model.config.drone_calibration
    report: dict = {}
    small = drone_hf.compress_sentence_transformer(
        dense,
        SENTENCES,
        min_cosine_similarity=0.99,
        heldout_sentences=HELDOUT,
        sequential=True,
        allocation_options={"search": "fast", "sequential_checks": 1},
        allocation_report=report,
    )
    assert report["heldout_cosine"] == pytest.approx(cosine_fidelity(dense, small, HELDOUT), abs=1e-5)
    assert report["heldout_cosine"] >= 0.99 - 1e-9 and small[0].auto_model.config.drone_calibration["sequential_refit"]
    with pytest.raises(TypeError, match=r"`sequential` must be a bool, got int 1"):
        drone_hf.compress_sentence_transformer(dense, SENTENCES, rank=4, sequential=1)
    anchored = drone_hf.compress_sentence_transformer(
        dense, SENTENCES, rank=4, attention=False, sequential=True, sequential_dense_weight=1.0
    )
    assert anchored[0].auto_model.config.drone_calibration["sequential_dense_weight"] == 1.0
    assert cosine_fidelity(dense, plain, SENTENCES) < cosine_fidelity(dense, anchored, SENTENCES)
    with pytest.raises(ValueError, match=r"`sequential_dense_weight=1.0` .* needs `sequential=True`"):
        drone_hf.compress_sentence_transformer(dense, SENTENCES, rank=4, sequential_dense_weight=1.0)


def test_a_cosine_budget_no_compression_meets_is_refused(bert_dense):
    with pytest.raises(ValueError, match=r"budget cannot be met.*min_cosine_similarity=1\.0"):
        drone_hf.compress_sentence_transformer(bert_dense, SENTENCES, min_cosine_similarity=1.0)


# ------------------------------------------------------------------------------------------------ distillation


@pytest.fixture(scope="module", params=list(FAMILIES))
def strong_dense(request, tmp_path_factory):
    """A tiny model whose layers change the embeddings a lot (large random weights), so that a low-rank compression
    moves them measurably and distillation has something to recover."""
    return _build(tmp_path_factory.mktemp(f"strong-{request.param}"), request.param, initializer_range=0.1)


def _errors(dense, small, sentences=SENTENCES) -> tuple[float, float]:
    """`(1 - mean cosine of the embeddings, MSE of the last hidden states over real tokens)` of `small` to `dense`."""
    mse, tokens = 0.0, 0
    for batch in sentence_batches(dense, sentences, batch_size=32):
        inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
        with torch.no_grad():
            a = dense[0].auto_model.eval()(**inputs).last_hidden_state
            b = small[0].auto_model.eval()(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        mse += float(((a - b) ** 2 * mask).sum())
        tokens += int(mask.sum()) * a.shape[-1]
    return 1 - cosine_fidelity(dense, small, sentences), mse / tokens


def test_distillation_reduces_the_embedding_error_on_the_calibration_sentences(strong_dense):
    """The same compression, without and with distillation: both the embedding cosine error and the last-hidden-state
    MSE to the dense model fall (on the calibration sentences it trained on, and on held-out ones), and the loss it
    reports fell."""
    kwargs = {"rank": 4, "heldout_sentences": HELDOUT}
    plain = drone_hf.compress_sentence_transformer(strong_dense, SENTENCES, **kwargs)
    report: dict = {}
    distilled = drone_hf.compress_sentence_transformer(
        strong_dense, SENTENCES, distill_steps=40, distill_options={"lr": 1e-3}, allocation_report=report, **kwargs
    )
    assert distilled[0].auto_model.config.drone_ranks == plain[0].auto_model.config.drone_ranks
    cosine_before, mse_before = _errors(strong_dense, plain)
    cosine_after, mse_after = _errors(strong_dense, distilled)
    assert cosine_before > 1e-3  # the compression moved the embeddings
    assert cosine_after < 0.5 * cosine_before and mse_after < 0.7 * mse_before
    held_before, held_after = (
        1 - cosine_fidelity(strong_dense, plain, HELDOUT),
        1 - cosine_fidelity(strong_dense, distilled, HELDOUT),
    )
    assert held_after < held_before
    entry = report["distillation"]
    assert entry["loss_last"] < entry["loss_first"] and entry["steps"] == 40 and entry["lr"] == 1e-3
    assert entry["heldout_cosine_before"] == pytest.approx(1 - held_before, abs=1e-5)
    assert entry["heldout_cosine_after"] == pytest.approx(1 - held_after, abs=1e-5)
    assert report["heldout_cosine"] == pytest.approx(entry["heldout_cosine_after"], abs=1e-6)


def test_distillation_trains_on_the_calibration_sentences_only(bert_dense, monkeypatch):
    """The batches the distillation draws from are the calibration sentences' (split from the held-out quarter), and
    over one pass the loss sees every real token of them exactly once, none of the held-out ones."""
    seen, losses = [], []
    original_distill, original_loss = (
        st_module._distill_encoder,
        drone_hf.distillation_losses.embedding_distillation_loss,
    )

    def spy_distill(student, teacher, head, batches, settings, show_progress):
        seen.extend(batches)
        return original_distill(student, teacher, head, batches, settings, show_progress)

    def spy_loss(*args, attention_mask=None, **kwargs):
        losses.append(int(attention_mask.sum()))
        return original_loss(*args, attention_mask=attention_mask, **kwargs)

    monkeypatch.setattr(st_module, "_distill_encoder", spy_distill)
    monkeypatch.setattr(drone_hf.distillation_losses, "embedding_distillation_loss", spy_loss)
    calibration, heldout = split_heldout(SENTENCES)
    batches = sentence_batches(bert_dense, calibration, batch_size=32)
    report: dict = {}
    drone_hf.compress_sentence_transformer(
        bert_dense, SENTENCES, min_cosine_similarity=0.9, distill_steps=len(batches), allocation_report=report
    )

    def rows(batch_list):
        return {
            tuple(ids[mask.bool()].tolist())
            for batch in batch_list
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"])
        }

    assert rows(seen) == rows(batches) and not rows(seen) & rows(sentence_batches(bert_dense, heldout))
    assert len(losses) == len(batches) and sum(losses) == sum(int(b["attention_mask"].sum()) for b in batches)
    assert report["distillation"]["sentences"] == len(calibration) == 96


def test_distillation_on_distill_sentences_trains_on_those_only(bert_dense, monkeypatch):
    """`distill_sentences` replaces the calibration sentences as the distillation's data (every row of them seen,
    nothing else), is recorded as such, and may not share a sentence with the held-out ones."""
    seen: list = []
    original_distill = st_module._distill_encoder

    def spy_distill(student, teacher, head, batches, settings, show_progress):
        seen.extend(batches)
        return original_distill(student, teacher, head, batches, settings, show_progress)

    monkeypatch.setattr(st_module, "_distill_encoder", spy_distill)
    calibration, heldout = SENTENCES[:64], SENTENCES[64:96]
    extra = _sentences(80, seed=7)
    batches = sentence_batches(bert_dense, extra, batch_size=32)
    report: dict = {}
    small = drone_hf.compress_sentence_transformer(
        bert_dense,
        calibration,
        heldout_sentences=heldout,
        rank=8,
        distill_steps=len(batches),
        distill_sentences=extra,
        allocation_report=report,
    )

    def rows(batch_list):
        return sorted(
            tuple(ids[mask.bool()].tolist())
            for batch in batch_list
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"])
        )

    assert rows(seen) == rows(batches) != rows(sentence_batches(bert_dense, calibration))
    assert report["distillation"]["sentences"] == 80
    provenance = small[0].auto_model.config.drone_calibration["distillation"]
    assert provenance["data"] == "80 sentences given as distill_sentences"
    with pytest.raises(ValueError, match=r"`distill_sentences` shares 1 sentence\(s\) with the held-out"):
        drone_hf.compress_sentence_transformer(
            bert_dense, calibration, heldout_sentences=heldout, rank=8, distill_steps=1,
            distill_sentences=[*extra, heldout[3]],
        )  # fmt: skip


def test_relation_term_is_the_mean_squared_difference_of_the_cosine_matrices():
    """The relation term, against a loop over every pair; it ignores what the pair scores ignore (a rotation of the
    embedding space, the embeddings' norms), which the per-sentence cosine term does not."""
    from drone_hf.distillation_losses import embedding_distillation_loss

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    hidden = torch.zeros(6, 2, 3)
    _, parts = embedding_distillation_loss(hidden, hidden, student, teacher, hidden_weight=0, relation_weight=1.0)

    def cos(a, b):
        return float(a @ b / (a.norm() * b.norm()))

    expected = np.mean(
        [(cos(student[i], student[j]) - cos(teacher[i], teacher[j])) ** 2 for i in range(6) for j in range(6)]
    )
    assert float(parts["relation"]) == pytest.approx(expected, rel=1e-5) and expected > 1e-3
    rotation = torch.linalg.qr(torch.randn(5, 5, generator=generator))[0]
    scaled = (teacher @ rotation) * torch.arange(1.0, 7.0)[:, None]
    total, parts = embedding_distillation_loss(hidden, hidden, scaled, teacher, hidden_weight=0, relation_weight=1.0)
    assert float(parts["relation"]) < 1e-10 and float(parts["cosine"]) > 0.1
    total, parts = embedding_distillation_loss(hidden, hidden, scaled, teacher, hidden_weight=0, cosine_weight=0,
                                               relation_weight=2.0)  # fmt: skip
    assert set(parts) == {"relation"} and float(total) < 1e-9


def test_input_is_untouched_by_distillation(bert_dense):
    """With distillation the input keeps its weights, modes, hooks and `requires_grad` flags, the distillation draws
    nothing from the caller's random state (it leaves it as the compression alone does), and the returned model is in
    eval mode with no gradients left."""
    was_training = bert_dense.training
    model = bert_dense.train()
    model[0].auto_model.encoder.layer[1].eval()
    model[0].auto_model.embeddings.requires_grad_(False)
    handle = model[0].auto_model.encoder.layer[0].register_forward_hook(lambda *args: None)
    try:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        modes = {name: m.training for name, m in model.named_modules()}
        hooks = {name: list(m._forward_hooks) for name, m in model.named_modules()}
        flags = {name: p.requires_grad for name, p in model.named_parameters()}
        torch.manual_seed(1)
        drone_hf.compress_sentence_transformer(model, SENTENCES, rank=8)
        rng = torch.get_rng_state()
        torch.manual_seed(1)
        small = drone_hf.compress_sentence_transformer(model, SENTENCES, rank=8, distill_steps=3)
        assert torch.equal(torch.get_rng_state(), rng)
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        assert {name: m.training for name, m in model.named_modules()} == modes
        assert {name: list(m._forward_hooks) for name, m in model.named_modules()} == hooks
        assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
        assert type(model[0].auto_model) is BertModel and all(p.grad is None for p in model.parameters())
        assert not any(m.training for m in small.modules()) and all(p.grad is None for p in small.parameters())
        assert small[0].auto_model.drone_modules()
    finally:
        handle.remove()
        model[0].auto_model.embeddings.requires_grad_(True)
        model.train(was_training)


def test_distillation_is_recorded_in_the_config_and_card_and_changes_only_the_encoder(dense, tmp_path):
    report: dict = {}
    small = drone_hf.compress_sentence_transformer(
        dense, SENTENCES, rank=8, distill_steps=2, distill_options={"seed": 3}, allocation_report=report
    )
    assert report["distillation"]["heldout_cosine_before"] is None and "heldout_cosine" not in report
    tail = list(dense)[1:]
    for before, after in zip(tail, list(small)[1:]):  # a Dense layer after the encoder is not trained
        assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), after.state_dict().values()))
    small.save(str(tmp_path / "small"))
    config = json.loads((tmp_path / "small" / "config.json").read_text())
    distillation = config["drone_calibration"]["distillation"]
    assert distillation["steps"] == 2 and distillation["seed"] == 3 and distillation["lr"] == 1e-4
    assert distillation["data"] == "the calibration sentences" and "MSE" in distillation["loss"]
    assert "- distillation:" in (tmp_path / "small" / "README.md").read_text()
    assert np.array_equal(_encode(SentenceTransformer(str(tmp_path / "small"))), _encode(small))


@pytest.mark.parametrize("schedule, factors", [("constant", [1, 1, 1, 1]), ("linear", [1, 0.75, 0.5, 0.25])])
def test_distillation_steps_at_the_scheduled_learning_rate(bert_dense, monkeypatch, schedule, factors):
    rates = []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    small = drone_hf.compress_sentence_transformer(
        bert_dense, SENTENCES, rank=8, distill_steps=4, distill_options={"lr": 2e-3, "lr_schedule": schedule}
    )
    assert rates == pytest.approx([2e-3 * factor for factor in factors])
    assert small[0].auto_model.config.drone_calibration["distillation"]["lr_schedule"] == schedule


@pytest.mark.parametrize("balance", [True, False])
def test_distillation_balances_the_factor_pairs_first_unless_told_not_to(bert_dense, balance):
    # A learning rate too small to move the weights: whatever differs from the plain compression is the balancing.
    options = {"lr": 1e-30} if balance else {"lr": 1e-30, "balance_factors": False}
    plain = drone_hf.compress_sentence_transformer(bert_dense, SENTENCES, rank=8)
    small = drone_hf.compress_sentence_transformer(
        bert_dense, SENTENCES, rank=8, distill_steps=1, distill_options=options
    )
    pairs = [
        (a, b)
        for a, b in zip(plain[0].auto_model.modules(), small[0].auto_model.modules())
        if isinstance(a, drone_hf.DroneLinear)
    ]
    assert pairs
    for before, after in pairs:
        down, up = after.down.weight.double(), after.up.weight.double()
        balanced = torch.allclose(down.norm(dim=1), up.norm(dim=0), rtol=1e-4)
        assert balanced == balance
        assert not balance or not torch.allclose(before.down.weight, after.down.weight)  # DRONE's are unbalanced
        torch.testing.assert_close(up @ down, before.up.weight.double() @ before.down.weight.double())
    np.testing.assert_allclose(_encode(small), _encode(plain), atol=1e-5)
    assert small[0].auto_model.config.drone_calibration["distillation"]["balance_factors"] is balance


def test_zero_distill_steps_is_the_plain_compression(bert_dense):
    plain = drone_hf.compress_sentence_transformer(bert_dense, SENTENCES, rank=8)
    again = drone_hf.compress_sentence_transformer(bert_dense, SENTENCES, rank=8, distill_steps=0)
    assert np.array_equal(_encode(plain), _encode(again))
    assert "distillation" not in (again[0].auto_model.config.drone_calibration or {})


# ------------------------------------------------------------------------------------------ deployment form


@pytest.mark.parametrize(
    "form",
    [{"dtype": torch.bfloat16}, {"dtype": "float16", "distill_steps": 2}, {"quantize": "int8"}],
    ids=["bfloat16", "float16+distill", "int8"],
)
def test_deployment_form_saves_and_reloads_identically(dense, form, tmp_path):
    report: dict = {}
    small = drone_hf.compress_sentence_transformer(
        dense, SENTENCES, rank=8, heldout_sentences=HELDOUT, allocation_report=report, **form
    )
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(form.get("dtype")).removeprefix("torch."))
    expected = dtype or torch.float32
    assert {p.dtype for p in small.parameters()} == {expected}  # the encoder and a Dense layer after it
    assert dense[0].auto_model.dtype == torch.float32  # the input is not cast
    int8 = {name for name, m in small[0].auto_model.named_modules() if isinstance(m, DroneInt8Linear)}
    assert bool(int8) is ("quantize" in form)
    assert report["heldout_cosine"] == pytest.approx(cosine_fidelity(dense, small, HELDOUT), abs=2e-3)
    small.save(str(tmp_path / "small"))
    reloaded = SentenceTransformer(str(tmp_path / "small"))
    assert type(reloaded[0].auto_model) is type(small[0].auto_model)
    assert {p.dtype for p in reloaded.parameters()} == {expected}
    assert {n for n, m in reloaded[0].auto_model.named_modules() if isinstance(m, DroneInt8Linear)} == int8
    assert np.array_equal(_encode(reloaded), _encode(small))
    if "distill_steps" in form:
        assert reloaded[0].auto_model.config.drone_calibration["distillation"]["steps"] == 2


# -------------------------------------------------------------------------------------------------- bad input


def _static_embedding_model():
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast(vocab=tiny_tokenizer().get_vocab())
    return SentenceTransformer(modules=[StaticEmbedding(tokenizer.backend_tokenizer, embedding_dim=8)])


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"sentences": []}, ValueError, r"`sentences` is empty"),
        ({"sentences": "w5 w6 w7"}, TypeError, r"`sentences` must be a list of strings.*got str 'w5 w6 w7'"),
        ({"sentences": ["w5 w6", 3]}, TypeError, r"`sentences\[1\]` must be a str, got int 3"),
        ({"sentences": ["w5 w6", " "]}, ValueError, r"`sentences\[1\]` is an empty string ' '"),
        ({"heldout_sentences": ["w5", None], "min_cosine_similarity": 0.9}, TypeError, r"heldout_sentences\[1\]"),
        ({"target_speedup": 0.9}, ValueError, r"`target_speedup` must be a number > 1.*got 0\.9"),
        ({"target_speedup": "2"}, ValueError, r"`target_speedup` must be a number > 1.*got '2'"),
        ({"param_ratio": 1.5}, ValueError, r"`param_ratio` must be a number in \(0, 1\).*got 1\.5"),
        ({"rank": 0}, ValueError, r"`rank` must be a positive int.*got 0"),
        (
            {"rank": 40},
            ValueError,
            r"Rank for `encoder.layer.0.attention.self.query` \(32x32\) must be an int in \[1, 31\], got 40",
        ),
        ({"ranks": [8]}, TypeError, r"`ranks` must be a dict"),
        ({"min_cosine_similarity": 0}, ValueError, r"`min_cosine_similarity` must be a number in \(0, 1\].*got 0"),
        ({"min_cosine_similarity": 1.2}, ValueError, r"`min_cosine_similarity` must be a number in \(0, 1\].*1\.2"),
        ({"min_cosine_similarity": 98}, ValueError, r"`min_cosine_similarity` must be a number in \(0, 1\].*got 98"),
        ({"min_cosine_similarity": True}, ValueError, r"`min_cosine_similarity` must be a number.*got True"),
        ({"min_cosine_similarity": float("nan")}, ValueError, r"`min_cosine_similarity` must be a number.*nan"),
        ({}, ValueError, r"Pass exactly one budget of \['rank', .*'min_cosine_similarity'\], got none"),
        (
            {"rank": 8, "min_cosine_similarity": 0.98},
            ValueError,
            r"exactly one budget.*got \['rank', 'min_cosine_similarity'\] \(rank=8, min_cosine_similarity=0\.98\)",
        ),
        ({"target_speedup": 1.5, "param_ratio": 0.5}, ValueError, r"got \['target_speedup', 'param_ratio'\]"),
        (
            {"sentences": SENTENCES[:100], "min_cosine_similarity": 0.98},
            ValueError,
            r"needs at least 32 held-out sentences.*`sentences` has 100, of which a quarter, 25\. Pass at least 128",
        ),
        (
            {"heldout_sentences": HELDOUT[:10], "min_cosine_similarity": 0.98},
            ValueError,
            r"needs at least 32 held-out sentences.*`heldout_sentences` has 10",
        ),
        ({"rank": 8, "method": "pca"}, ValueError, r"`method` must be one of \[.*'drone'.*\], got 'pca'"),
        ({"rank": 8, "batch_size": 0}, ValueError, r"`batch_size` must be a positive int, got 0"),
        ({"rank": 8, "distill_steps": -1}, ValueError, r"`distill_steps` must be an int >= 0.*got -1"),
        ({"rank": 8, "distill_steps": 2.5}, ValueError, r"`distill_steps` must be an int >= 0.*got 2\.5"),
        ({"rank": 8, "distill_steps": True}, ValueError, r"`distill_steps` must be an int >= 0.*got True"),
        ({"rank": 8, "distill_steps": "3"}, ValueError, r"`distill_steps` must be an int >= 0.*got '3'"),
        (
            {"rank": 8, "distill_steps": 2, "distill_options": {"lr": 0}},
            ValueError,
            r"`distill_options\['lr'\]` must be a number > 0.*got 0",
        ),
        (
            {"rank": 8, "distill_steps": 2, "distill_options": {"lr": float("nan")}},
            ValueError,
            r"`distill_options\['lr'\]` must be a number > 0.*got nan",
        ),
        (
            {"rank": 8, "distill_steps": 2, "distill_options": {"learning_rate": 1e-4}},
            ValueError,
            r"Unknown `distill_options` \['learning_rate'\]; allowed: \['lr', 'hidden_weight', 'cosine_weight'",
        ),
        (
            {"rank": 8, "distill_steps": 2, "distill_options": {"cosine_weight": -1}},
            ValueError,
            r"`distill_options\['cosine_weight'\]` must be a number >= 0.*got -1",
        ),
        (
            {"rank": 8, "distill_steps": 2, "distill_options": {"hidden_weight": 0, "cosine_weight": 0}},
            ValueError,
            r"sets all of \['hidden_weight', 'cosine_weight', 'relation_weight'\] to 0",
        ),
        (
            {"rank": 8, "distill_steps": 2, "distill_options": {"relation_weight": "big"}},
            ValueError,
            r"`distill_options\['relation_weight'\]` must be a number >= 0.*got 'big'",
        ),
        (
            {"rank": 8, "distill_sentences": ["a sentence"]},
            ValueError,
            r"`distill_sentences` \(1 sentences\) is given but `distill_steps` is 0",
        ),
        (
            {"rank": 8, "distill_steps": 2, "distill_sentences": ["a sentence", 3]},
            TypeError,
            r"`distill_sentences\[1\]` must be a str, got int 3",
        ),
        ({"rank": 8, "distill_steps": 2, "distill_sentences": []}, ValueError, r"`distill_sentences` is empty"),
        (
            {"rank": 8, "distill_steps": 2, "distill_options": {"seed": -1}},
            ValueError,
            r"`distill_options\['seed'\]` must be an int >= 0, got -1",
        ),
        (
            {"rank": 8, "distill_steps": 2, "distill_options": {"lr_schedule": "cosine"}},
            ValueError,
            r"`distill_options\['lr_schedule'\]` must be one of \['constant', 'linear'\], got 'cosine'",
        ),
        (
            {"rank": 8, "distill_steps": 2, "distill_options": {"dropout": "yes"}},
            ValueError,
            r"`distill_options\['dropout'\]` must be True or False, got 'yes'",
        ),
        (
            {"rank": 8, "distill_steps": 2, "distill_options": {"balance_factors": 1}},
            ValueError,
            r"`distill_options\['balance_factors'\]` must be True or False, got 1",
        ),
        (
            {"rank": 8, "distill_steps": 2, "distill_options": [1e-4]},
            TypeError,
            r"`distill_options` must be a mapping",
        ),
        ({"rank": 8, "dtype": "float64"}, ValueError, r"`dtype` must be one of \['float32', 'bfloat16', 'float16'\]"),
        ({"rank": 8, "quantize": "int4"}, ValueError, r"`quantize` must be one of \['int8'\].*got 'int4'"),
        (
            {"rank": 8, "quantize": "int8", "dtype": "bfloat16"},
            ValueError,
            r"`quantize='int8'` cannot be combined with `dtype=torch.bfloat16`",
        ),
    ],
)
def test_bad_arguments_are_refused_clearly(bert_dense, kwargs, error, match, monkeypatch):
    def expensive(*args, **kwargs):
        raise AssertionError("calibration started before the arguments were checked")

    checked_first = {"distill_steps", "distill_options", "distill_sentences", "dtype", "quantize"}
    if checked_first & set(kwargs):  # checked before any calibration
        monkeypatch.setattr(st_module, "sentence_batches", expensive)
    with pytest.raises(error, match=match):
        drone_hf.compress_sentence_transformer(bert_dense, **{"sentences": SENTENCES, **kwargs})


def test_a_transformer_that_outputs_another_tensor_is_refused(bert_dense):
    odd = copy.deepcopy(bert_dense)
    odd[0].modality_config = {"text": {"method": "forward", "method_output_name": "pooler_output"}}
    with pytest.raises(ValueError, match=r"must embed text with the encoder's `forward` and its `last_hidden_state`"):
        drone_hf.compress_sentence_transformer(odd, SENTENCES, rank=8)


def test_a_model_without_a_transformer_first_module_is_refused():
    match = r"`model\[0\]` must be a sentence-transformers `Transformer`.*got StaticEmbedding"
    with pytest.raises(TypeError, match=match):
        drone_hf.compress_sentence_transformer(_static_embedding_model(), SENTENCES, rank=8)


def test_a_model_that_is_not_a_sentence_transformer_is_refused(bert_dense):
    with pytest.raises(TypeError, match=r"`model` must be a sentence_transformers\.SentenceTransformer.*BertModel"):
        drone_hf.compress_sentence_transformer(bert_dense[0].auto_model, SENTENCES, rank=8)


def test_missing_sentence_transformers_names_the_extra(bert_dense, monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[sentence-transformers\]'"):
        drone_hf.compress_sentence_transformer(bert_dense, SENTENCES, rank=8)


def test_importing_drone_hf_does_not_import_sentence_transformers():
    code = (
        "import sys, drone_hf\ndrone_hf.compress_sentence_transformer\nprint('sentence_transformers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------ Hub (mocked)


@pytest.mark.parametrize("export", [False, True])
def test_push_uploads_the_sentence_transformers_folder(bert_small, export):
    with _FakeHub() as hub:
        url = drone_hf.push_compressed_to_hub(bert_small, "me/tiny-st-drone", trust_remote_code_export=export)
    assert url == "https://huggingface.co/me/tiny-st-drone/commit/abc123"
    assert hub.created == [("me/tiny-st-drone", {"private": True, "token": None, "exist_ok": True})]
    (upload,) = hub.uploads
    files = set(upload["files"])
    assert {"modules.json", "1_Pooling/config.json", "2_Normalize/config.json"} <= files
    assert {"config.json", "model.safetensors", "README.md", "tokenizer_config.json"} <= files
    assert (set(REMOTE_CODE_FILES) <= files) is export
    assert ('"auto_map"' in upload["files"]["config.json"].decode()) is export
    assert {"model*.safetensors", "onnx/*", "openvino/*"} <= set(upload["delete_patterns"])
    card = ModelCard(upload["files"]["README.md"].decode())
    assert card.data.library_name == "sentence-transformers" and "drone_hf" in card.data.tags
    assert 'SentenceTransformer("me/tiny-st-drone")' in card.text and "import drone_hf" in card.text
    assert 'from_pretrained("me/tiny-st-drone")' in card.text
    assert "auto_map" not in bert_small[0].auto_model.config.to_dict()  # the export was for one save only


def test_model_push_to_hub_uses_the_same_path(bert_small):
    with _FakeHub() as hub:
        url = bert_small.push_to_hub("tiny-st-drone", commit_message="first upload")
    assert url.endswith("/commit/abc123")
    assert hub.created == [("tiny-st-drone", {"private": None, "token": None, "exist_ok": True})]
    (upload,) = hub.uploads
    assert upload["repo_id"] == "me/tiny-st-drone" and upload["commit_message"] == "first upload"
    assert "modules.json" in upload["files"]
    assert "drone_hf" in ModelCard(upload["files"]["README.md"].decode()).data.tags


def test_push_of_a_reloaded_model_merges_the_remote_readme(bert_small, tmp_path):
    bert_small.save(str(tmp_path / "small"))
    reloaded = SentenceTransformer(str(tmp_path / "small"))  # a plain SentenceTransformer now
    remote = tmp_path / "remote_README.md"
    remote.write_text("---\nlicense: mit\n---\n\n# My embedder\n\nWritten on the Hub.\n")
    with _FakeHub(remote_readme=str(remote)) as hub:
        drone_hf.push_compressed_to_hub(reloaded, "me/tiny-st-drone")
    card = ModelCard(hub.uploads[0]["files"]["README.md"].decode())
    assert card.data.license == "mit" and card.data.library_name == "sentence-transformers"
    assert "Written on the Hub." in card.text and card.text.count(BEGIN_MARKER) == 1


def test_push_refuses_a_dense_sentence_transformer(bert_dense):
    with pytest.raises(TypeError, match=r"must be a compressed SentenceTransformer.*BertModel"):
        drone_hf.push_compressed_to_hub(bert_dense, "me/x")


# ------------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def sentences_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "sentences.txt"
    path.write_text("\n".join(SENTENCES[:64] + ["", "   "] + SENTENCES[64:]) + "\n")  # blank lines are skipped
    return path


@pytest.mark.parametrize(
    "budget",
    [["--rank", "8"], ["--rank", "8", "--sequential"], ["--min-cosine-similarity", "0.999", "--refine-steps", "4"]],
)
def test_cli_compress_embeddings(bert_dense, sentences_file, tmp_path, capsys, budget):
    bert_dense.save(str(tmp_path / "dense"))
    argv = ["compress-embeddings", "--model", str(tmp_path / "dense"), "--sentences", str(sentences_file)]
    assert main([*argv, *budget, "--latency-repeats", "1", "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "| model | cosine to dense (held-out) |" in printed and "| dense | 1.0000 |" in printed
    assert "| drone | " in printed and "Cosine: mean over 32 held-out sentences" in printed
    results = json.loads((tmp_path / "out" / "drone_results.json").read_text())
    assert results["calibration_sentences"] == 96 and results["heldout_sentences"] == 32
    if budget[0] == "--min-cosine-similarity":
        assert results["results"]["drone"]["heldout_cosine"] >= 0.999 and "Allocation:" in printed
    reloaded = SentenceTransformer(str(tmp_path / "out"))
    assert type(reloaded[0].auto_model).__name__ == "DroneBertModel"
    calibration = reloaded[0].auto_model.config.drone_calibration
    assert calibration.get("sequential_refit", False) is ("--sequential" in budget)
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data["drone_hf"]["speed"]["setting"].startswith("encode() of 128 sentences, batch 32, float32,")


def test_cli_compress_embeddings_scores_labelled_pairs(bert_dense, sentences_file, tmp_path, capsys):
    """`--eval-pairs` with a GLUE MRPC-layout file: ROC-AUC of the cosine similarity, dense and compressed, equal to
    what `pair_auc` gives on the saved model."""
    pairs = tmp_path / "dev.tsv"
    lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
    lines += [f"{i % 2}\t{i}\t{i + 100}\t{SENTENCES[i]}\t{SENTENCES[i + 1 if i % 2 else i + 40]}" for i in range(40)]
    pairs.write_text("\n".join(lines) + "\n")
    bert_dense.save(str(tmp_path / "dense"))
    argv = ["compress-embeddings", "--model", str(tmp_path / "dense"), "--sentences", str(sentences_file)]
    argv += ["--rank", "4", "--eval-pairs", str(pairs), "--latency-repeats", "1", "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "drone_results.json").read_text())["results"]
    first = [SENTENCES[i] for i in range(40)]
    second = [SENTENCES[i + 1 if i % 2 else i + 40] for i in range(40)]
    labels = [i % 2 for i in range(40)]
    expected = 100 * pair_auc(SentenceTransformer(str(tmp_path / "out")), first, second, labels)
    assert results["drone"]["pair_auc"] == pytest.approx(expected, abs=1e-9)
    assert results["dense"]["pair_auc"] == pytest.approx(100 * pair_auc(bert_dense, first, second, labels))
    assert "| model | cosine to dense (held-out) | pair ROC-AUC |" in printed and "Pair ROC-AUC: 40 pairs" in printed


def test_cli_target_speedup_prints_a_flop_bound_at_the_target(bert_dense, sentences_file, tmp_path, capsys):
    """The allocation and the printed FLOP bound count multiply-adds at the same length (the model's 32 tokens)."""
    bert_dense.save(str(tmp_path / "dense"))
    argv = ["compress-embeddings", "--model", str(tmp_path / "dense"), "--sentences", str(sentences_file)]
    argv += ["--target-speedup", "1.5", "--latency-repeats", "1", "--output", str(tmp_path / "out")]
    assert main(argv) == 0
    results = json.loads((tmp_path / "out" / "drone_results.json").read_text())["results"]
    assert results["drone"]["flop_bound"] >= 1.5
    assert "FLOP bound: multiply-adds of one 32-token sequence" in capsys.readouterr().out


@pytest.mark.parametrize("form", [["--dtype", "bfloat16"], ["--quantize", "int8"]], ids=["bfloat16", "int8"])
def test_cli_compress_embeddings_distills_and_deploys(bert_dense, sentences_file, tmp_path, capsys, form):
    bert_dense.save(str(tmp_path / "dense"))
    argv = ["compress-embeddings", "--model", str(tmp_path / "dense"), "--sentences", str(sentences_file)]
    argv += ["--rank", "8", "--distill-steps", "3", "--distill-lr", "2e-4", "--distill-lr-schedule", "linear", *form]
    assert main([*argv, "--latency-repeats", "1", "--output", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "drone_results.json").read_text())
    distillation = results["distillation"]
    assert distillation["steps"] == 3 and distillation["lr"] == 2e-4 and distillation["sentences"] == 96
    assert distillation["lr_schedule"] == "linear"
    assert distillation["heldout_cosine_after"] is not None
    assert (
        "Distillation: 3 steps (lr 0.0002, decayed linearly to 0, batch 32) on the 96 calibration sentences" in printed
    )
    name = form[1]
    assert results["dtype"] == ("float32" if name == "int8" else name) and results["quantize"] == (
        "int8" if name == "int8" else None
    )
    assert set(results["results"]) == {"dense", f"dense-{name}", "drone"} and f"| dense-{name} |" in printed
    form = "int8 dynamic (float32 activations)" if name == "int8" else name
    setting = ModelCard.load(tmp_path / "out" / "README.md").data["drone_hf"]["speed"]["setting"]
    assert setting.startswith(f"encode() of 128 sentences, batch 32, compressed in {form}, dense in float32,")
    reloaded = SentenceTransformer(str(tmp_path / "out"))
    encoder = reloaded[0].auto_model
    assert encoder.config.drone_calibration["distillation"]["steps"] == 3
    if name == "int8":
        assert any(isinstance(m, DroneInt8Linear) for m in encoder.modules()) and encoder.dtype == torch.float32
    else:
        assert encoder.dtype == torch.bfloat16
    heldout = split_heldout(SENTENCES)[1]  # what the CLI holds out of the file
    assert results["results"]["drone"]["heldout_cosine"] == pytest.approx(
        cosine_fidelity(bert_dense, reloaded, heldout), abs=1e-6
    )


def test_roc_auc_matches_the_pairwise_definition():
    rng = np.random.default_rng(0)
    for _ in range(50):
        scores, labels = rng.integers(0, 4, 30).astype(float), rng.integers(0, 2, 30)
        labels[:2] = [0, 1]
        pos, neg = scores[labels == 1], scores[labels == 0]
        expected = ((pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()) / (
            len(pos) * len(neg)
        )
        assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="need both classes"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="must be 0 or 1"):
        roc_auc([0.1, 0.2], [0, 2])


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--min-cosine-similarity", "1.5"],
            r"argument --min-cosine-similarity: must be a finite number in \(0, 1\], got 1\.5",
        ),
        (["--rank", "8", "--sentences", "/nonexistent.txt"], r"`--sentences` '/nonexistent.txt' is not a file"),
        (["--rank", "8", "--eval-pairs", "/nonexistent.tsv"], r"`--eval-pairs` '/nonexistent.tsv' is not a file"),
        (
            ["--min-cosine-similarity", "0.99", "--heldout-sentences", "SHORT"],
            r"`--heldout-sentences` has 10 lines; at least 32 are needed for `--min-cosine-similarity`",
        ),
        (["--rank", "8", "--latency-repeats", "0"], r"argument --latency-repeats: must be an integer >= 1, got 0"),
        (["--rank", "8", "--eval-pairs", "BAD_PAIRS"], r"`--eval-pairs` .* line 2: the label must be 0 or 1, got '3'"),
        (["--rank", "8", "--distill-steps", "-1"], r"argument --distill-steps: must be an integer >= 0, got -1"),
        (["--rank", "8", "--distill-steps", "3", "--distill-lr", "0"], r"argument --distill-lr: must be a finite"),
        (["--rank", "8", "--distill-lr", "1e-4"], r"`--distill-lr 0.0001` needs `--distill-steps N`"),
        (
            ["--rank", "8", "--distill-lr-schedule", "linear"],
            r"`--distill-lr-schedule linear` needs `--distill-steps N`",
        ),
        (
            ["--rank", "8", "--distill-steps", "2", "--distill-lr-schedule", "cosine"],
            r"argument --distill-lr-schedule: invalid choice: 'cosine'",
        ),
        (["--rank", "8", "--distill-sentences", "SHORT"], r"`--distill-sentences .*short.txt` needs `--distill-steps"),
        (
            ["--rank", "8", "--distill-steps", "2", "--distill-sentences", "/nonexistent.txt"],
            r"`--distill-sentences` '/nonexistent.txt' is not a file",
        ),
        (["--rank", "8", "--quantize", "int4"], r"argument --quantize: invalid choice: 'int4'"),
        (["--rank", "8", "--dtype", "float64"], r"argument --dtype: invalid choice: 'float64'"),
        (["--rank", "8", "--quantize", "int8", "--dtype", "float16"], r"`quantize='int8'` cannot be combined"),
    ],
)
def test_cli_compress_embeddings_errors(bert_dense, sentences_file, tmp_path, capsys, args, message):
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence1\tsentence2\tlabel\na\tb\t3\n")
    short = tmp_path / "short.txt"
    short.write_text("\n".join(SENTENCES[:10]) + "\n")
    args = [{"BAD_PAIRS": str(bad), "SHORT": str(short)}.get(a, a) for a in args]
    bert_dense.save(str(tmp_path / "dense"))
    argv = ["compress-embeddings", "--model", str(tmp_path / "dense"), "--sentences", str(sentences_file)]
    try:
        code = main([*argv, *args, "--output", str(tmp_path / "out")])
    except SystemExit as error:  # argparse refuses a bad value before anything runs
        code = error.code
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- real all-MiniLM-L6-v2


@pytest.mark.slow
@requires_shared_glue("SST-2")
def test_minilm_cosine_budget_holds_and_reloads(tmp_path):
    with open(SHARED_GLUE / "SST-2" / "train.tsv", encoding="utf-8") as handle:
        rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    picked = np.random.default_rng(0).permutation(len(rows))[:256]
    sentences = [rows[i][0].strip() for i in picked]
    model = SentenceTransformer(minilm_path())
    report: dict = {}
    small = drone_hf.compress_sentence_transformer(
        model, sentences, min_cosine_similarity=0.98, allocation_report=report
    )
    _, heldout = split_heldout(sentences)
    assert len(heldout) == 64 and report["heldout_sentences"] == 64
    assert cosine_fidelity(model, small, heldout) >= 0.98
    assert flop_speedup_bound(model[0].auto_model.config, small[0].auto_model.config, 128) > 1.0
    small.save(str(tmp_path / "minilm-drone"))
    reloaded = SentenceTransformer(str(tmp_path / "minilm-drone"))
    assert [type(m).__name__ for m in reloaded] == ["Transformer", "Pooling", "Normalize"]
    assert np.array_equal(_encode(reloaded, sentences), _encode(small, sentences))
