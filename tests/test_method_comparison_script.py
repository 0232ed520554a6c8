"""benchmarks/method_comparison.py on a tiny classifier and a local GLUE folder: every method at every budget, each
entry's numbers equal to an independent compression and scoring of the same model."""

import json
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import drone_hf
from drone_hf.evaluation import iter_batches, predict
from drone_hf.glue import load_glue

from .testing_utils import benchmark_module, tiny_classifier_folder, write_sst2_glue


def test_methods_side_by_side_match_an_independent_run(tmp_path, monkeypatch):
    dense, glue = tmp_path / "dense", tmp_path / "glue"
    tiny_classifier_folder(dense)
    write_sst2_glue(glue, rows=(60, 40))
    tokenizer = AutoTokenizer.from_pretrained(dense)
    model = AutoModelForSequenceClassification.from_pretrained(dense).eval()
    with torch.no_grad():  # spread the random head's predictions over both classes
        model.classifier.weight *= 100.0
    model.save_pretrained(dense)
    argv = ["--task", "sst2", "--teacher", str(dense), "--data-dir", str(glue), "--heldout-dir", str(glue)]
    argv += ["--methods", "drone", "drone-act", "--speedups", "1.3", "--ranks", "3"]
    argv += ["--calibration-samples", "24", "--heldout-samples", "32", "--max-length", "16", "--name", "methods"]
    with benchmark_module("method_comparison") as script:
        monkeypatch.setattr(sys.modules["common"], "RESULTS", tmp_path / "results")
        script.main(argv)
    saved = json.loads((tmp_path / "results" / "methods.json").read_text())
    assert saved["rows"] == {"heldout": 32, "dev": 40} and saved["calibration_rows"] == 24
    entries = {(e["budget"], e["method"]): e for e in saved["results"]}
    assert set(entries) == {(b, m) for b in ("target_speedup", "rank") for m in ("drone", "drone-act")}
    for (budget, _), entry in entries.items():
        assert entry["flop_bound"] >= (1.3 if budget == "target_speedup" else 1.0)
        assert entry["heldout"]["kl"] >= 0 and entry["dev"]["kl"] >= 0

    # The drone-act rank-3 row, rebuilt: the same calibration rows, the same model, the same scores.
    rows = {"max_length": 16, "seed": 0}
    calibration = load_glue("sst2", tokenizer, split="train", data_dir=str(glue), max_samples=24, **rows)
    heldout = load_glue("sst2", tokenizer, split="train", data_dir=str(glue), max_samples=32, **rows)
    stats = drone_hf.collect_activation_stats(
        model, list(iter_batches(calibration, tokenizer, batch_size=32, sort_by_length=True))
    )
    small = drone_hf.compress_model(model, stats, method="drone-act", rank=3, attention=False)
    base, labels = predict(model, heldout, tokenizer, batch_size=32)
    logits, _ = predict(small, heldout, tokenizer, batch_size=32)
    entry = entries[("rank", "drone-act")]["heldout"]
    right_base, right = base.argmax(-1) == labels, logits.argmax(-1) == labels
    assert entry["change"] == pytest.approx(100 * (right.mean() - right_base.mean()))
    assert entry["changed_predictions"] == int((logits.argmax(-1) != base.argmax(-1)).sum())
    p = torch.from_numpy(base).double().log_softmax(-1)
    q = torch.from_numpy(logits).double().log_softmax(-1)
    assert entry["kl"] == pytest.approx(float((p.exp() * (p - q)).sum(-1).mean()), rel=1e-6)
    assert np.isfinite(entry["standard_error"])
