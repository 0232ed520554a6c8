# ruff: noqa: E501 - one probe per line in PROBES, however long
"""Adversarial probes of the library API: hostile-but-realistic inputs to `collect_activation_stats`, `compress_model`,
`allocate_ranks`, `compress_sentence_transformer`, `DroneCompressionArguments`, `distill` and `predict`.

Adding a probe is ONE line in `PROBES`:

    ("area/what", lambda f: <the call, built from the fixtures `f`>, <expected>, "<phrase the message must contain>"),

`<expected>` is one of:
- an exception class: the call must raise it (or a subclass) and its message must contain the phrase;
- `WARNS`: the call must return and log a warning on a `drone_hf` logger (or emit a Python warning) containing the
  phrase;
- `OK`: the call must return without raising (a probe of a silent failure asserts what "right" means itself, e.g.
  that the modes of every module are unchanged; the phrase is then ignored).

`f` is a [`Fixtures`]: tiny models (fresh objects on every access, so a probe may change them), batches, statistics.
The CLI, saving and loading have their own table in `test_adversarial_cli.py`.

`python -m tests.test_adversarial` runs every probe and classifies its outcome (clear error, clear warning, correct,
unclear error, deep crash, silent), the same rules the test enforces; run it against an older checkout to compare.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertForSequenceClassification

from drone_hf import (
    DroneCompressionArguments,
    allocate_ranks,
    collect_activation_stats,
    compress_model,
    load_activation_stats,
    save_activation_stats,
)

from .testing_utils import (
    tiny_batches,
    tiny_bert_config,
    tiny_config,
    tiny_teacher,
    tiny_tokenizer,
    unsupported_classifier,
)


OK, WARNS = "ok", "warns"
INTER = "bert.encoder.layer.0.intermediate.dense"
QUERY = "bert.encoder.layer.0.attention.self.query"
NAN, INF = float("nan"), float("inf")


# ------------------------------------------------------------------------------------------------------ fixtures


def _ids_batch(rows: int, length: int, *, low: int = 5, high: int = 99, seed: int = 3, **extra) -> dict:
    ids = torch.randint(low, high, (rows, length), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), **extra}


def _heldout(rows: int, *, labels=None, seed: int = 3) -> list[dict]:
    """Held-out batches of `rows` rows of 7 tokens, labels `i % 3` unless given."""
    batch = _ids_batch(rows, 7, seed=seed)
    batch["labels"] = torch.arange(rows) % 3 if labels is None else torch.as_tensor(labels)
    return [{k: v[i : i + 8] for k, v in batch.items()} for i in range(0, rows, 8)]


class Fixtures:
    """Inputs for the probes. Models are built fresh on every access (seeded, so `f.model` always has the same
    weights); statistics, batches and the tiny sentence-transformer are built once and must not be changed."""

    def __init__(self, tmp: Path):
        self.tmp = Path(tmp)
        self._cache: dict = {}

    def _once(self, key, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    # models
    @property
    def model(self):
        return tiny_teacher()

    @property
    def other_model(self):  # same shapes, other weights
        torch.manual_seed(1)
        return BertForSequenceClassification(tiny_bert_config()).eval()

    @property
    def deep_model(self):  # one layer more
        return tiny_teacher(num_hidden_layers=3)

    @property
    def meta_model(self):
        with torch.device("meta"):
            return BertForSequenceClassification(tiny_bert_config()).eval()

    @property
    def mixed_model(self):
        """`f.model` in train mode with some modules in eval mode (embeddings, the second layer's attention)."""
        model = self.model.train()
        model.bert.embeddings.eval()
        model.bert.encoder.layer[1].attention.eval()
        return model

    @property
    def compressed(self):  # the intermediate linears factored at rank 4, the others dense
        return compress_model(self.model, self.stats, target_modules="intermediate", rank=4)

    @property
    def fully_compressed(self):  # every encoder linear factored at rank 4
        return compress_model(self.model, self.stats, rank=4)

    # data
    @property
    def batches(self):
        return tiny_batches()

    def heldout(self, rows: int, labels=None) -> list[dict]:
        return _heldout(rows, labels=labels)

    @property
    def stats(self):
        return self._once("stats", lambda: collect_activation_stats(self.model, self.batches))

    @property
    def other_stats(self):
        return self._once("other", lambda: collect_activation_stats(self.other_model, self.batches))

    @property
    def deep_stats(self):
        return self._once("deep", lambda: collect_activation_stats(self.deep_model, self.batches))

    @property
    def compressed_stats(self):
        return self._once("compressed", lambda: collect_activation_stats(self.compressed, self.batches))

    def edited_stats(self, edit) -> dict:
        """A plain dict of `edit(tensor)` for every module of `f.stats` (shared tensors stay shared)."""
        done = {}
        return {name: done.setdefault(id(t), edit(t.clone())) for name, t in self.stats.items()}

    # sentence-transformers
    @property
    def st(self):
        pytest.importorskip("sentence_transformers")
        return self._once("st", self._build_st)

    @property
    def sentences(self) -> list[str]:
        rng = np.random.default_rng(0)
        return [" ".join(f"w{i}" for i in rng.integers(5, 99, rng.integers(3, 14))) for _ in range(64)]

    def _build_st(self):
        from sentence_transformers import SentenceTransformer
        from sentence_transformers.base.modules import Normalize, Transformer
        from sentence_transformers.sentence_transformer.modules import Pooling
        from transformers import BertModel

        root = self.tmp / "st"
        torch.manual_seed(0)
        BertModel(tiny_config("bert", pad_token_id=0)).save_pretrained(root / "encoder")
        tiny_tokenizer().save_pretrained(root / "encoder")
        transformer = Transformer(str(root / "encoder"), max_seq_length=32)
        SentenceTransformer(modules=[transformer, Pooling(32, "mean"), Normalize()]).save(str(root / "dense"))
        return SentenceTransformer(str(root / "dense"))


# ------------------------------------------------------------------------------------------ multi-step probes


def _modes(model) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _hooks(model) -> dict[str, int]:
    """Hooks per module, without the output-capturing hooks transformers itself installs (once, for good) on the first
    forward pass that asks for hidden states."""

    def ours(hooks):
        return sum("output_capturing_hook" not in getattr(h, "__qualname__", "") for h in hooks.values())

    return {
        name: ours(m._forward_hooks) + ours(m._forward_pre_hooks) + ours(m._backward_hooks)
        for name, m in model.named_modules()
    }


def _assert_left_alone(model, call):
    """Runs `call(model)` on a model with mixed per-module modes and checks that every module's mode, every hook
    and every weight are as before (whatever `call` raised is re-raised after the check)."""
    modes, hooks = _modes(model), _hooks(model)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        return call(model)
    finally:
        changed = {n: (modes[n], m) for n, m in _modes(model).items() if modes.get(n) != m}
        assert not changed, f"module modes changed (name: (before, after)): {dict(list(changed.items())[:4])}"
        assert _hooks(model) == hooks, "hooks were left on the model"
        assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items()), "weights changed"


def _keeps_modes(call):
    """A probe: `call(f, model)` on `f.mixed_model` leaves modes, hooks and weights exactly as they were."""
    return lambda f: _assert_left_alone(f.mixed_model, functools.partial(call, f))


def _raises_mid_collection(f):
    def loader():
        yield f.batches[0]
        raise RuntimeError("the dataloader broke")

    def call(model):
        with pytest.raises(RuntimeError, match="the dataloader broke"):
            collect_activation_stats(model, loader())

    _assert_left_alone(f.mixed_model, call)


def _raises_mid_forward(f):
    model = f.mixed_model
    broken = _ids_batch(2, 7)
    model.bert.encoder.layer[1].output.dense.register_forward_hook(lambda *a: (_ for _ in ()).throw(KeyError("hook")))

    def call(model):
        with pytest.raises(KeyError, match="hook"):
            collect_activation_stats(model, [f.batches[0], broken])

    _assert_left_alone(model, call)


def _two_threads(f):
    """Two threads calibrate one model object on different data at the same time; each must get its own data's
    statistics."""
    model = f.model
    data = {"a": tiny_batches(num_rows=12), "b": [_ids_batch(4, 6, seed=s) for s in (7, 8, 9)]}
    expected = {key: collect_activation_stats(f.model, batches) for key, batches in data.items()}
    results, errors = {}, []

    def slow(batches):
        for batch in batches:
            time.sleep(0.02)
            yield batch

    def run(key):
        try:
            results[key] = collect_activation_stats(model, slow(data[key]))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(key,)) for key in data]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    for key in data:
        for name, tensor in expected[key].items():
            assert torch.allclose(results[key][name], tensor), f"thread {key!r} got statistics mixed with the other's"


def _nested_call(f):
    model = f.model

    def loader():
        collect_activation_stats(model, f.batches)  # e.g. a dataloader that calibrates the same model itself
        yield f.batches[0]

    collect_activation_stats(model, loader())


def _same_stats_in_train_mode(f):
    stats = collect_activation_stats(f.model.train(), f.batches)
    assert all(torch.allclose(stats[n], t) for n, t in f.stats.items()), "dropout was on during calibration"


def _roles_in_ranks(f):
    compressed = compress_model(f.model, f.stats, ranks={"intermediate": 8, INTER: 4})
    ranks = compressed.config.drone_ranks
    assert ranks == {INTER: 4, "bert.encoder.layer.1.intermediate.dense": 8}, ranks


def _roles_in_settings(f):
    settings = DroneCompressionArguments(ranks={"intermediate": np.int64(8)})
    settings.validate_for_model(f.model)
    assert set(compress_model(f.model, f.stats, settings).config.drone_ranks) == {
        INTER,
        "bert.encoder.layer.1.intermediate.dense",
    }


def _numpy_grid(f):
    ranks = allocate_ranks(f.model, f.stats, param_ratio=0.6, rank_grid=np.array([4, 8]), attention=False)
    assert ranks and set(ranks.values()) <= {4, 8}, ranks


def _stats_via_file(f, stats, model):
    path = f.tmp / f"stats-{id(stats)}.safetensors"
    save_activation_stats(stats, path)
    return compress_model(model, load_activation_stats(path), rank=4)


def _trained_after_calibration(f):
    model = f.model
    stats = collect_activation_stats(model, f.batches)
    with torch.no_grad():
        model.bert.encoder.layer[0].attention.self.query.weight.mul_(1.5)  # e.g. one more epoch of fine-tuning
    return compress_model(model, stats, rank=4)


def _indefinite(t):
    # A symmetric matrix with a positive diagonal and a clearly negative eigenvalue: not a sum of x x^T.
    m = t.shape[0] - 1
    bump = torch.zeros_like(t)
    bump[0, 1] = bump[1, 0] = 10 * float(t[:m, :m].diagonal().max())
    return t + bump


def _asymmetric(t):
    t[0, 1] += 10 * float(t.diagonal().max())
    return t


def _set(t, index, value):
    t[index] = value
    return t


def _predict_keeps_modes(f, model):
    import datasets

    from drone_hf.evaluation import predict

    rows = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7], [8, 9]], "labels": [0, 1]})
    predict(model, rows, tiny_tokenizer(), batch_size=1)


def _distill_keeps_teacher_modes(f, teacher):
    import datasets
    from transformers import TrainingArguments

    from drone_hf import DroneDistillationArguments, distill

    student = compress_model(f.model, f.stats, rank=4)
    rows = datasets.Dataset.from_dict({"input_ids": [[5, 6, 7, 8]] * 4, "attention_mask": [[1] * 4] * 4})
    base = TrainingArguments(output_dir=str(f.tmp / "distill"), use_cpu=True, report_to="none", save_strategy="no")
    distill(
        student,
        teacher,
        rows,
        DroneDistillationArguments(max_steps=1, per_device_train_batch_size=2),
        training_args=base,
    )


def _st_keeps_modes(f):
    from drone_hf import compress_sentence_transformer

    model = f.st
    model.train()
    model[0].auto_model.embeddings.eval()
    _assert_left_alone(model, lambda m: compress_sentence_transformer(m, f.sentences, rank=8))
    model.eval()


def _st(**kwargs):
    def probe(f):
        from drone_hf import compress_sentence_transformer

        return compress_sentence_transformer(f.st, f.sentences, **kwargs)

    return probe


def _collect(**kwargs):
    return lambda f: collect_activation_stats(f.model, f.batches, **kwargs)


def _compress(**kwargs):
    return lambda f: compress_model(f.model, f.stats, **kwargs)


def _allocate(**kwargs):
    return lambda f: allocate_ranks(f.model, f.stats, **kwargs)


def _drop(budget=50.0, rows=24, labels=None, **kwargs):
    """An accuracy-budget allocation on `rows` held-out rows."""
    return lambda f: allocate_ranks(
        f.model, f.stats, max_accuracy_drop=budget, eval_dataloader=f.heldout(rows, labels), refine_steps=2, **kwargs
    )


# ---------------------------------------------------------------------------------------------------- the table
# (probe id, call over the fixtures, expected: exception class | WARNS | OK, phrase the message must contain)
# fmt: off
PROBES = [
    # --- calibration data
    ("collect/empty-loader", lambda f: collect_activation_stats(f.model, []), ValueError, "yielded no batch"),
    ("collect/one-batch-not-a-list", lambda f: collect_activation_stats(f.model, f.batches[0]), TypeError, "one batch"),
    ("collect/not-iterable", lambda f: collect_activation_stats(f.model, 3), TypeError, "`dataloader` must be"),
    ("collect/tuple-batches", lambda f: collect_activation_stats(f.model, [tuple(f.batches[0].values())]), ValueError, "dicts with `input_ids`"),
    ("collect/list-ids", lambda f: collect_activation_stats(f.model, [{"input_ids": [[5, 6, 7]]}]), TypeError, "return_tensors='pt'"),
    ("collect/float-ids", lambda f: collect_activation_stats(f.model, [{"input_ids": torch.rand(2, 5) * 50}]), TypeError, "integer token ids"),
    ("collect/ids-beyond-vocab", lambda f: collect_activation_stats(f.model, [_ids_batch(2, 7, low=90, high=150)]), ValueError, "vocabulary"),
    ("collect/negative-ids", lambda f: collect_activation_stats(f.model, [_ids_batch(2, 7, low=-5, high=0)]), ValueError, "vocabulary"),
    ("collect/mask-shape", lambda f: collect_activation_stats(f.model, [{**_ids_batch(2, 7), "attention_mask": torch.ones(2, 5)}]), ValueError, "attention_mask"),
    ("collect/all-padding", lambda f: collect_activation_stats(f.model, [{**_ids_batch(2, 7), "attention_mask": torch.zeros(2, 7)}]), ValueError, "padding"),
    ("collect/extra-keys", lambda f: collect_activation_stats(f.model, [{**_ids_batch(40, 7), "idx": torch.arange(40), "text": ["a"] * 40}]), OK, ""),
    ("collect/3-tokens", lambda f: collect_activation_stats(f.model, [_ids_batch(1, 3)]), WARNS, "3 tokens"),
    ("collect/1-sentence", lambda f: collect_activation_stats(f.model, [_ids_batch(1, 9)]), WARNS, "at least 37"),
    ("collect/enough-tokens", lambda f: collect_activation_stats(f.model, [_ids_batch(8, 7)]), OK, ""),
    ("collect/max-batches-0", _collect(max_batches=0), ValueError, "`max_batches`"),
    ("collect/max-batches-float", _collect(max_batches=1.5), ValueError, "`max_batches`"),
    ("collect/max-batches-numpy", _collect(max_batches=np.int64(3)), OK, ""),
    ("collect/nan-weights", lambda f: collect_activation_stats(f.model.apply(lambda m: m.weight.data.fill_(NAN) if isinstance(m, torch.nn.Embedding) else None), f.batches), ValueError, "NaN or Inf"),
    # --- the model
    ("collect/meta-device", lambda f: collect_activation_stats(f.meta_model, f.batches), ValueError, "meta device"),
    ("collect/not-a-model", lambda f: collect_activation_stats("bert-base-uncased", f.batches), ValueError, "transformers encoder model"),
    ("collect/unsupported-family", lambda f: collect_activation_stats(unsupported_classifier(), f.batches), ValueError, "does not support"),
    ("collect/half-precision", lambda f: collect_activation_stats(f.model.half(), f.batches), OK, ""),
    ("collect/bfloat16", lambda f: collect_activation_stats(f.model.bfloat16(), f.batches), OK, ""),
    ("collect/model-in-train-mode", _same_stats_in_train_mode, OK, ""),
    ("collect/fully-factored-model", lambda f: collect_activation_stats(f.fully_compressed, f.batches), ValueError, "already factored"),
    # --- target_modules
    ("collect/targets-pooler", _collect(target_modules=["bert.pooler.dense"]), ValueError, "not a compression target"),
    ("collect/targets-classifier", _collect(target_modules=["classifier"]), ValueError, "head is kept dense"),
    ("collect/targets-empty", _collect(target_modules=[]), ValueError, "`target_modules` is empty"),
    ("collect/targets-int", _collect(target_modules=[0]), TypeError, "must be strings"),
    ("collect/targets-typo", _collect(target_modules=["querry"]), ValueError, "Close matches: ['query']"),
    ("collect/targets-factored", lambda f: collect_activation_stats(f.compressed, f.batches, target_modules=[INTER]), ValueError, "already factored"),
    ("collect/targets-role-string", _collect(target_modules="intermediate"), OK, ""),
    # --- the input model is left as it was (modes of every module, hooks, weights), also when something raises
    ("collect/keeps-modes", _keeps_modes(lambda f, m: collect_activation_stats(m, f.batches)), OK, ""),
    ("collect/exception-in-loader", _raises_mid_collection, OK, ""),
    ("collect/exception-in-forward", _raises_mid_forward, OK, ""),
    ("collect/two-threads-one-model", _two_threads, OK, ""),
    ("collect/nested-call-same-model", _nested_call, RuntimeError, "already running on this model"),
    # --- statistics handed to compress_model / allocate_ranks
    ("stats/other-model", lambda f: compress_model(f.model, f.other_stats, rank=4), ValueError, "different model"),
    ("stats/other-model-allocate", lambda f: allocate_ranks(f.model, f.other_stats, param_ratio=0.5), ValueError, "different model"),
    ("stats/other-model-via-file", lambda f: _stats_via_file(f, f.other_stats, f.model), ValueError, "different model"),
    ("stats/one-layer-more", lambda f: compress_model(f.model, f.deep_stats, rank=4), ValueError, "different model"),
    ("stats/one-layer-less", lambda f: compress_model(f.deep_model, f.stats, rank=4), ValueError, "different model"),
    ("stats/trained-after-calibration", _trained_after_calibration, ValueError, "different model"),
    ("stats/same-model-via-file", lambda f: _stats_via_file(f, f.stats, f.model), OK, ""),
    ("stats/same-model-other-dtype", lambda f: compress_model(f.model.double(), f.stats, rank=4), OK, ""),
    ("stats/plain-dict", lambda f: compress_model(f.model, dict(f.stats), rank=4), OK, ""),
    ("stats/float32", lambda f: compress_model(f.model, f.edited_stats(torch.Tensor.float), rank=4), OK, ""),
    ("stats/negated", lambda f: compress_model(f.model, f.edited_stats(torch.neg), rank=4), ValueError, "positive semi-definite"),
    ("stats/negated-moment", lambda f: compress_model(f.model, f.edited_stats(lambda t: _set(t, (slice(0, -1), slice(0, -1)), -t[:-1, :-1])), rank=4), ValueError, "positive semi-definite"),
    ("stats/indefinite", lambda f: compress_model(f.model, f.edited_stats(_indefinite), rank=4), ValueError, "positive semi-definite"),
    ("stats/indefinite-attention", lambda f: compress_model(f.model, f.edited_stats(_indefinite), attention_rank=4), ValueError, "positive semi-definite"),
    ("stats/indefinite-allocate", lambda f: allocate_ranks(f.model, f.edited_stats(_indefinite), param_ratio=0.5), ValueError, "positive semi-definite"),
    ("stats/asymmetric", lambda f: compress_model(f.model, f.edited_stats(_asymmetric), rank=4), ValueError, "symmetric"),
    ("stats/nan", lambda f: compress_model(f.model, f.edited_stats(lambda t: _set(t, (0, 0), NAN)), rank=4), ValueError, "NaN"),
    ("stats/inf", lambda f: compress_model(f.model, f.edited_stats(lambda t: _set(t, (1, 1), INF)), rank=4), ValueError, "Inf"),
    ("stats/zero-tokens", lambda f: compress_model(f.model, f.edited_stats(torch.zeros_like), rank=4), ValueError, "0 tokens"),
    ("stats/numpy-arrays", lambda f: compress_model(f.model, {k: v.numpy() for k, v in f.stats.items()}, rank=4), TypeError, "torch.Tensor"),
    ("stats/list", lambda f: compress_model(f.model, list(f.stats.values()), rank=4), TypeError, "dict returned by collect_activation_stats"),
    ("stats/none-for-drone", lambda f: compress_model(f.model, None, rank=4), TypeError, "method='svd'"),
    ("stats/collected-for-other-targets", lambda f: compress_model(f.model, collect_activation_stats(f.model, f.batches, target_modules="query"), rank=4), ValueError, "no statistics for"),
    ("stats/half-model-own-stats", lambda f: compress_model(m := f.model.half(), collect_activation_stats(m, f.batches), rank=4), OK, ""),
    ("stats/negated-drone-bc", lambda f: compress_model(f.model, f.edited_stats(_indefinite), method="drone-bc", rank=4), ValueError, "positive semi-definite"),
    ("stats/few-tokens-file", lambda f: compress_model(f.model, dict(collect_activation_stats(f.model, [_ids_batch(1, 5)])), rank=4), WARNS, "5 tokens"),
    # --- ranks and targets of compress_model
    ("rank/zero", _compress(rank=0), ValueError, "[1, 31]"),
    ("rank/negative", _compress(rank=-4), ValueError, "[1, 31]"),
    ("rank/huge", _compress(rank=10**6), ValueError, "[1, 31]"),
    ("rank/float", _compress(rank=8.0), TypeError, "must be an int"),
    ("rank/string", _compress(rank="8"), TypeError, "must be an int"),
    ("rank/bool", _compress(rank=True), TypeError, "must be an int"),
    ("rank/numpy-int", _compress(rank=np.int64(4)), OK, ""),
    ("rank/above-break-even", _compress(rank=20), ValueError, "break-even"),
    ("ranks/role-keys", _roles_in_ranks, OK, ""),
    ("ranks/unknown-key", _compress(ranks={"bert.encoder.layer.0.mlp": 8}), ValueError, "bert.encoder.layer.0.attention.self.query"),
    ("ranks/pooler", _compress(ranks={"bert.pooler.dense": 8}), ValueError, "not a compression target (the pooler"),
    ("ranks/classifier", _compress(ranks={"classifier": 2}), ValueError, "classifier head is kept dense"),
    ("ranks/already-factored", lambda f: compress_model(f.compressed, f.compressed_stats, ranks={INTER: 2}), ValueError, "already factored"),
    ("ranks/float-value", _compress(ranks={INTER: 8.0}), ValueError, "must be an int"),
    ("ranks/numpy-value", _compress(ranks={INTER: np.int64(4)}), OK, ""),
    ("ranks/zero-value", _compress(ranks={INTER: 0}), ValueError, "[1, 31]"),
    ("ranks/not-a-mapping", _compress(ranks=[8, 8]), TypeError, "`ranks` must be a mapping"),
    ("ranks/int-key", _compress(ranks={0: 8}), TypeError, "keys must be strings"),
    ("ranks/empty", _compress(ranks={}), ValueError, "`ranks` is empty"),
    ("ranks/bad-regex", _compress(ranks={"re:(": 8}), ValueError, "Invalid regex"),
    ("ranks/regex-matches-nothing", _compress(ranks={"re:.*pooler.*": 8}), ValueError, "matches no target"),
    ("targets/pooler", _compress(target_modules=["bert.pooler.dense"], rank=4), ValueError, "not a compression target"),
    ("targets/empty", _compress(target_modules=[], rank=4), ValueError, "`target_modules` is empty"),
    ("targets/already-factored", lambda f: compress_model(f.compressed, f.compressed_stats, target_modules=[INTER], rank=2), ValueError, "already factored"),
    ("compress/fully-factored", lambda f: compress_model(f.fully_compressed, None, method="svd", rank=2), ValueError, "already factored"),
    ("attention_rank/too-large", _compress(attention_rank=8), ValueError, "attention"),
    ("attention_rank/float", _compress(attention_rank=4.0), TypeError, "must be an int"),
    ("compress/meta-device", lambda f: compress_model(f.meta_model, None, method="svd", rank=4), ValueError, "meta device"),
    ("compress/half-precision", lambda f: compress_model(f.model.half(), None, method="svd", rank=4), OK, ""),
    ("compress/unknown-method", _compress(method="lora", rank=4), ValueError, "lora"),
    ("compress/settings-not-dataclass", _compress(settings={"rank": 4}), TypeError, "DroneCompressionArguments"),
    ("compress/two-budgets", _compress(rank=4, param_ratio=0.5), ValueError, "cannot be combined"),
    ("compress/no-budget", _compress(), ValueError, "Pass one of"),
    ("compress/eval-data-with-explicit-rank", _compress(rank=4, eval_dataloader=_heldout(24)), WARNS, "ignored with explicit ranks"),
    ("compress/calibration-info-string", _compress(rank=4, calibration_info="glue/sst2"), TypeError, "`calibration_info` must be a mapping"),
    ("compress/embedding-float-j", _compress(rank=4, embedding=(4, 8.0)), ValueError, "`embedding` must be a (k, j) pair"),
    ("compress/not-a-model", lambda f: compress_model(torch.nn.DataParallel(f.model), None, method="svd", rank=4), ValueError, "transformers encoder model"),
    ("compress/keeps-modes", _keeps_modes(lambda f, m: compress_model(m, f.stats, rank=4)), OK, ""),
    ("compress/keeps-modes-on-error", _keeps_modes(lambda f, m: pytest.raises(ValueError, compress_model, m, f.stats, rank=99)), OK, ""),
    # --- budgets
    ("budget/param-ratio-nan", _compress(param_ratio=NAN), ValueError, "`param_ratio`"),
    ("budget/param-ratio-inf", _compress(param_ratio=INF), ValueError, "`param_ratio`"),
    ("budget/param-ratio-above-1", _compress(param_ratio=1.5), ValueError, "`param_ratio`"),
    ("budget/param-ratio-string", _compress(param_ratio="0.5"), ValueError, "`param_ratio`"),
    ("budget/speedup-nan", _compress(target_speedup=NAN), ValueError, "`target_speedup`"),
    ("budget/speedup-inf", _compress(target_speedup=INF), ValueError, "`target_speedup`"),
    ("budget/speedup-below-1", _compress(target_speedup=0.5), ValueError, "`target_speedup`"),
    ("budget/drop-nan", lambda f: compress_model(f.model, f.stats, max_accuracy_drop=NAN, eval_dataloader=f.heldout(24)), ValueError, "`max_accuracy_drop`"),
    ("budget/drop-inf", _drop(INF), ValueError, "`max_accuracy_drop`"),
    ("budget/drop-zero", _drop(0.0), ValueError, "`max_accuracy_drop`"),
    ("budget/drop-negative", _drop(-1.0), ValueError, "`max_accuracy_drop`"),
    ("budget/drop-numpy-float", _drop(np.float64(50.0)), OK, ""),
    ("budget/drop-1-point-10-rows", _drop(1.0, rows=10), ValueError, "300 held-out rows"),
    ("budget/drop-10-points-10-rows", _drop(10.0, rows=10), ValueError, "30 held-out rows"),
    ("budget/drop-without-heldout", _allocate(max_accuracy_drop=5.0), ValueError, "needs `eval_dataloader`"),
    ("budget/drop-empty-heldout", _allocate(max_accuracy_drop=5.0, eval_dataloader=[]), ValueError, "no batch"),
    ("budget/drop-heldout-without-labels", lambda f: allocate_ranks(f.model, f.stats, max_accuracy_drop=50.0, eval_dataloader=[_ids_batch(24, 7)]), ValueError, "labels"),
    ("budget/labels-above-num-labels", _drop(labels=[5] * 24), ValueError, "num_labels=3"),
    ("budget/labels-negative", _drop(labels=[-1] * 24), ValueError, "num_labels=3"),
    ("budget/metric-nan", _drop(metric_fn=lambda logits, labels: NAN), ValueError, "NaN"),
    ("budget/metric-none", _drop(metric_fn=lambda logits, labels: None), TypeError, "`metric_fn`"),
    ("budget/metric-not-callable", _drop(metric_fn="accuracy"), TypeError, "`metric_fn`"),
    ("budget/safety-margin-inf", _drop(safety_margin=INF), ValueError, "`safety_margin`"),
    ("budget/safety-margin-nan", _drop(safety_margin=NAN), ValueError, "`safety_margin`"),
    ("budget/seq-len-zero", _allocate(target_speedup=1.5, seq_len=0), ValueError, "`seq_len`"),
    ("budget/rank-multiple-zero", _allocate(target_speedup=1.5, rank_multiple=0), ValueError, "`rank_multiple`"),
    ("budget/rank-multiple-float", _allocate(target_speedup=1.5, rank_multiple=8.0), ValueError, "`rank_multiple`"),
    ("budget/report-not-a-dict", _allocate(param_ratio=0.5, report=[]), TypeError, "`report`"),
    ("budget/two-budgets", _allocate(param_ratio=0.5, target_speedup=2.0), ValueError, "Pass exactly one"),
    ("budget/heldout-one-batch", lambda f: allocate_ranks(f.model, f.stats, max_accuracy_drop=50.0, eval_dataloader=f.heldout(8)[0]), TypeError, "one batch"),
    ("budget/heldout-tuples", lambda f: allocate_ranks(f.model, f.stats, max_accuracy_drop=50.0, eval_dataloader=[tuple(b.values()) for b in f.heldout(24)]), ValueError, "dicts with `input_ids`"),
    ("budget/heldout-other-tokenizer", lambda f: allocate_ranks(f.model, f.stats, max_accuracy_drop=50.0, eval_dataloader=[_ids_batch(24, 7, low=50, high=500, labels=torch.arange(24) % 3)]), ValueError, "vocabulary"),
    ("budget/eval-data-with-speedup", _allocate(target_speedup=1.2, eval_dataloader=_heldout(24)), WARNS, "only used by `max_accuracy_drop`"),
    ("budget/param-ratio-float32", _allocate(param_ratio=np.float32(0.6)), OK, ""),
    ("budget/allocate-keeps-modes", _keeps_modes(lambda f, m: allocate_ranks(m, f.stats, max_accuracy_drop=50.0, eval_dataloader=f.heldout(24), refine_steps=1)), OK, ""),
    ("budget/allocate-meta-device", lambda f: allocate_ranks(f.meta_model, None, method="svd", param_ratio=0.5), ValueError, "meta device"),
    ("budget/options-budget-key", _compress(param_ratio=0.5, allocation_options={"param_ratio": 0.4}), ValueError, "allocation_options"),
    ("budget/options-not-a-mapping", _compress(param_ratio=0.5, allocation_options="safety_margin=0"), TypeError, "`allocation_options` must be a mapping"),
    # --- rank grids
    ("grid/floats", _allocate(param_ratio=0.6, rank_grid=[4.0, 8.0]), TypeError, "`rank_grid`"),
    ("grid/numpy-array", _numpy_grid, OK, ""),
    ("grid/numpy-ints", _allocate(param_ratio=0.6, rank_grid=[np.int64(4), np.int32(8)]), OK, ""),
    ("grid/bools", _allocate(param_ratio=0.6, rank_grid=[True, 4]), TypeError, "`rank_grid`"),
    ("grid/non-positive", _allocate(param_ratio=0.6, rank_grid=[0, 4]), ValueError, "`rank_grid`"),
    ("grid/above-break-even", _allocate(param_ratio=0.6, rank_grid=[20, 30]), ValueError, "break-even"),
    ("grid/empty", _allocate(param_ratio=0.6, rank_grid=[]), ValueError, "`rank_grid` is empty"),
    ("grid/string", _allocate(param_ratio=0.6, rank_grid="8"), TypeError, "`rank_grid`"),
    ("grid/int", _allocate(param_ratio=0.6, rank_grid=8), TypeError, "`rank_grid`"),
    ("grid/in-compress", _compress(target_speedup=1.2, rank_grid=[4.0]), TypeError, "`rank_grid`"),
    # --- DroneCompressionArguments
    ("args/rank-numpy", lambda f: DroneCompressionArguments(rank=np.int64(8)), OK, ""),
    ("args/role-ranks", _roles_in_settings, OK, ""),
    ("args/param-ratio-float32", lambda f: DroneCompressionArguments(param_ratio=np.float32(0.5)), OK, ""),
    ("args/param-ratio-nan", lambda f: DroneCompressionArguments(param_ratio=NAN), ValueError, "`param_ratio`"),
    ("args/speedup-inf", lambda f: DroneCompressionArguments(target_speedup=INF), ValueError, "`target_speedup`"),
    ("args/drop-nan", lambda f: DroneCompressionArguments(max_accuracy_drop=NAN), ValueError, "`max_accuracy_drop`"),
    ("args/drop-too-fine-for-heldout", lambda f: DroneCompressionArguments(max_accuracy_drop=0.5, heldout_samples=100), ValueError, "600 held-out rows"),
    ("args/targets-empty", lambda f: DroneCompressionArguments(rank=8, target_modules=[]), ValueError, "`target_modules` is empty"),
    ("args/ranks-bad-json", lambda f: DroneCompressionArguments(ranks="{bad"), ValueError, "JSON"),
    ("args/ranks-float", lambda f: DroneCompressionArguments(ranks={INTER: 8.5}), ValueError, "positive ints"),
    ("args/validate-pooler", lambda f: DroneCompressionArguments(ranks={"bert.pooler.dense": 8}).validate_for_model(f.model), ValueError, "not a compression target"),
    ("args/validate-grid-above-break-even", lambda f: DroneCompressionArguments(rank=20).validate_for_model(f.model), ValueError, "break-even"),
    # --- compress_sentence_transformer
    ("st/options-budget-key", _st(target_speedup=1.5, allocation_options={"target_speedup": 2.0}), ValueError, "allocation_options"),
    ("st/options-method", _st(target_speedup=1.5, allocation_options={"method": "svd"}), ValueError, "allocation_options"),
    ("st/options-unknown", _st(target_speedup=1.5, allocation_options={"margin": 1}), ValueError, "allocation_options"),
    ("st/min-cosine-nan", _st(min_cosine_similarity=NAN), ValueError, "`min_cosine_similarity`"),
    ("st/sentences-string", lambda f: __import__("drone_hf").compress_sentence_transformer(f.st, "one sentence", rank=8), TypeError, "list of strings"),
    ("st/rank-grid-floats", _st(target_speedup=1.5, allocation_options={"rank_grid": [4.0]}), TypeError, "`rank_grid`"),
    ("st/keeps-modes", _st_keeps_modes, OK, ""),
    ("st/rank-numpy", _st(rank=np.int64(8)), OK, ""),
    ("st/options-not-a-mapping", _st(target_speedup=1.5, allocation_options=["safety_margin"]), TypeError, "must be a mapping"),
    # --- other entry points that change modes
    ("predict/keeps-modes", _keeps_modes(_predict_keeps_modes), OK, ""),
    ("distill/keeps-teacher-modes", _keeps_modes(_distill_keeps_teacher_modes), OK, ""),
]
# fmt: on


# ------------------------------------------------------------------------------------------------ running them


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def run_probe(probe, f: Fixtures) -> tuple[str, str]:
    """Runs one probe; returns `(outcome, detail)`. `outcome` is one of: clear error, clear warning, correct, unclear
    error, deep crash, silent."""
    _, build, expected, phrase = probe
    handler = _Records()
    drone_logger = logging.getLogger("drone_hf")
    drone_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            build(f)
    except AssertionError as error:
        return "silent", f"AssertionError: {error}"
    except pytest.skip.Exception:
        raise
    except Exception as error:  # noqa: BLE001 - classified
        message = f"{type(error).__name__}: {error}"
        if isinstance(expected, type) and isinstance(error, expected) and phrase in str(error):
            return "clear error", message
        frames = traceback.extract_tb(error.__traceback__)
        ours = [fr for fr in frames if "drone_hf" in fr.filename and "/tests/" not in fr.filename]
        raised_here = ours and frames[-1] is ours[-1]
        return ("unclear error" if raised_here else "deep crash"), message
    finally:
        drone_logger.removeHandler(handler)
    said = handler.messages + [str(w.message) for w in caught]
    if expected == OK:
        return "correct", "; ".join(said)[:300]
    if expected == WARNS and any(phrase in m for m in said):
        return "clear warning", next(m for m in said if phrase in m)
    return "silent", ("; ".join(said)[:300] or "returned without a word")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return Fixtures(tmp_path_factory.mktemp("adversarial"))


@pytest.mark.parametrize("probe", PROBES, ids=[p[0] for p in PROBES])
def test_probe(probe, fixtures):
    outcome, detail = run_probe(probe, fixtures)
    expected = probe[2]
    wanted = (
        {OK: "correct", WARNS: "clear warning"}.get(expected, "clear error")
        if isinstance(expected, str)
        else "clear error"
    )
    assert outcome == wanted, f"{probe[0]}: expected {expected!r} with {probe[3]!r}, got {outcome}: {detail}"


def test_pickled_stats_keep_their_fingerprint_and_plain_dicts_are_not_checked(fixtures):
    import pickle

    stats = pickle.loads(pickle.dumps(fixtures.other_stats))
    assert stats.fingerprint and stats.fingerprint["digest"] == fixtures.other_stats.fingerprint["digest"]
    with pytest.raises(ValueError, match="different model"):
        compress_model(fixtures.model, stats, rank=4)
    with pytest.raises(ValueError, match="different model"):
        compress_model(fixtures.model, copy.deepcopy(fixtures.other_stats).copy(), rank=4)
    # A plain dict (an older pickle, or rebuilt by a comprehension) has no fingerprint: accepted without a word.
    assert compress_model(fixtures.model, dict(fixtures.other_stats), rank=4).config.drone_ranks
    stats.fingerprint = None  # statistics used on purpose with weights that changed since
    assert compress_model(fixtures.model, stats, rank=4).config.drone_ranks


def test_inference_in_another_thread_does_not_leak_into_calibration(fixtures):
    model, batches = fixtures.model, fixtures.batches
    stop, errors = threading.Event(), []

    def infer():  # batches shaped like the calibration's, so that a leak would not fail on a mask shape
        try:
            with torch.no_grad():
                while not stop.is_set():
                    model(**_ids_batch(4, 7, seed=11))
                    time.sleep(0.001)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    other = threading.Thread(target=infer)
    other.start()
    try:
        stats = collect_activation_stats(model, batches)
    finally:
        stop.set()
        other.join()
    assert not errors, errors
    for name, tensor in fixtures.stats.items():
        assert torch.allclose(stats[name], tensor), name


def test_the_resolution_rule_and_which_metrics_it_applies_to():
    from drone_hf.budget_search import MIN_BUDGET_ROWS, min_heldout_rows
    from drone_hf.glue_metrics import glue_metric_points

    assert MIN_BUDGET_ROWS == 3 and min_heldout_rows(1.0) == 300 and min_heldout_rows(10.0) == 30
    assert min_heldout_rows(1.5) == 200 and min_heldout_rows(100.0) == 3
    assert glue_metric_points("sst2").row_quantised and glue_metric_points("mrpc").row_quantised
    assert not glue_metric_points("stsb").row_quantised  # a correlation is continuous


def test_probe_ids_are_unique():
    ids = [p[0] for p in PROBES]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})


if __name__ == "__main__":  # python -m tests.test_adversarial [filter]: classify every probe's outcome
    import collections
    import sys
    import tempfile

    torch.set_num_threads(1)
    counts = collections.Counter()
    with tempfile.TemporaryDirectory() as tmp:
        f = Fixtures(Path(tmp))
        for probe in PROBES:
            if len(sys.argv) > 1 and sys.argv[1] not in probe[0]:
                continue
            torch.manual_seed(0)
            try:
                outcome, detail = run_probe(probe, f)
            except pytest.skip.Exception as skip:
                outcome, detail = "skipped", str(skip)
            counts[outcome] += 1
            print(f"{probe[0]:<40} {outcome:<14} {detail[:200]!s}".replace("\n", " "), flush=True)
    print(dict(counts), f"total={sum(counts.values())}")
