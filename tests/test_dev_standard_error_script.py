"""benchmarks/dev_standard_error.py on a tiny classifier and a local GLUE folder: a model scored against itself
changes nothing with a zero error, and a compressed model's change and paired error agree with the per-row formulas
(an unpaired error would be about sqrt(2) times larger)."""

import json
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from drone_hf import compress_model
from drone_hf.evaluation import predict
from drone_hf.glue import load_glue

from .testing_utils import benchmark_module, tiny_classifier_folder, write_sst2_glue


def test_dev_changes_and_paired_errors(tmp_path, monkeypatch):
    dense, small, glue = tmp_path / "dense", tmp_path / "small", tmp_path / "glue"
    tiny_classifier_folder(dense)
    write_sst2_glue(glue, rows=(8, 400))
    tokenizer = AutoTokenizer.from_pretrained(dense)
    dev = load_glue("sst2", tokenizer, split="validation", data_dir=str(glue), max_length=32)
    # A random tiny classifier predicts one class everywhere: widen its head and centre it on these rows, so that
    # about half the rows go each way and the compressed model changes some of them.
    model = AutoModelForSequenceClassification.from_pretrained(dense).eval()
    with torch.no_grad():
        model.classifier.weight *= 1000.0
        margins = np.diff(predict(model, dev, tokenizer)[0], axis=-1)[:, 0]
        model.classifier.bias[1] -= float(np.median(margins))
    model.save_pretrained(dense)
    compress_model(model, None, method="svd", rank=2).save_pretrained(small)
    with benchmark_module("dev_standard_error") as script:
        monkeypatch.setattr(sys.modules["common"], "RESULTS", tmp_path / "results")
        argv = ["--task", "sst2", "--teacher", str(dense), str(small), str(dense), "--data-dir", str(glue)]
        script.main([*argv, "--samples", "1000", "--max-length", "32", "--name", "dev_se"])
    saved = json.loads((tmp_path / "results" / "dev_se.json").read_text())
    assert saved["rows"] == 400 and saved["task"] == "sst2"
    itself = saved["models"][str(dense)]
    assert itself["changed_predictions"] == 0
    assert itself["accuracy"]["change"] == 0.0 and itself["accuracy"]["standard_error"] == 0.0

    base, labels = predict(AutoModelForSequenceClassification.from_pretrained(dense).eval(), dev, tokenizer)
    logits, _ = predict(AutoModelForSequenceClassification.from_pretrained(small).eval(), dev, tokenizer)
    right_base, right = base.argmax(-1) == labels, logits.argmax(-1) == labels
    entry = saved["models"][str(small)]
    assert entry["changed_predictions"] == int((logits.argmax(-1) != base.argmax(-1)).sum()) > 10
    assert entry["accuracy"]["change"] == pytest.approx(100 * (right.mean() - right_base.mean()))
    assert saved["dense"]["accuracy"] == pytest.approx(100 * right_base.mean())
    paired = 100 * (right.astype(float) - right_base).std() / np.sqrt(len(labels))
    assert entry["accuracy"]["standard_error"] == pytest.approx(paired, rel=0.15)
