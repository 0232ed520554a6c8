"""A checkpoint written by drone_hf 0.1.0 (format version 1, `tests/fixtures/drone_bert_v1`, made before the
architecture seam) must keep loading with identical outputs."""

import json
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification

import drone_hf


FIXTURE = Path(__file__).parent / "fixtures" / "drone_bert_v1"


def test_version_1_checkpoint_loads_with_identical_logits():
    expected = json.loads((FIXTURE / "expected_logits.json").read_text())
    model, info = AutoModelForSequenceClassification.from_pretrained(FIXTURE, output_loading_info=True)
    assert isinstance(model, drone_hf.DroneBertForSequenceClassification)
    assert isinstance(AutoConfig.from_pretrained(FIXTURE), drone_hf.DroneConfig)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        logits = model.eval()(
            input_ids=torch.tensor(expected["input_ids"]), attention_mask=torch.tensor(expected["attention_mask"])
        ).logits
    torch.testing.assert_close(logits, torch.tensor(expected["logits"]), rtol=1e-5, atol=1e-5)
