"""benchmarks/augment.py: embedding-neighbour word replacement for distillation (TinyBERT's augmentation with the
teacher's input embeddings as the candidate source)."""

import datasets
import numpy as np
import pytest
import torch

from .testing_utils import benchmark_module


@pytest.fixture(scope="module")
def augment():
    with benchmark_module("augment") as module:
        yield module


# A toy WordPiece vocabulary: specials, words, a continuation piece and punctuation.
TOKENS = ["[PAD]", "<s>", "</s>", "cat", "dog", "car", "bus", "share", "##holders", ",", "[unused1]", "wolf"]
SPECIAL = [0, 1, 2]


def _embeddings() -> torch.Tensor:
    """cat ~ dog ~ wolf, car ~ bus; the other rows point elsewhere."""
    e = torch.zeros(len(TOKENS), 4)
    e[3], e[4], e[11] = torch.tensor([1.0, 0.1, 0, 0]), torch.tensor([1.0, 0.2, 0, 0]), torch.tensor([0.9, 0.5, 0, 0])
    e[5], e[6] = torch.tensor([0, 0, 1.0, 0.1]), torch.tensor([0, 0, 1.0, 0.3])
    e[7] = torch.tensor([0.2, 0, 0.1, 1.0])
    e[8], e[9], e[10] = (
        torch.tensor([0, 1.0, 0, 0.5]),
        torch.tensor([0.5, 0.5, 0.5, 0.5]),
        torch.tensor([1.0, 0, 0, 0]),
    )
    for i in SPECIAL:
        e[i] = torch.tensor([1.0, 0.15, 0, 0])  # as close to cat as dog is: must still never be a candidate
    return e


def _table(augment, ids=None, k=1):
    ids = range(len(TOKENS)) if ids is None else ids
    words = augment.word_ids(TOKENS, SPECIAL)
    return augment.neighbour_table(_embeddings(), words, list(ids), k=k, chunk=2)


def test_candidates_are_whole_words_and_the_nearest_ones(augment):
    words = augment.word_ids(TOKENS, SPECIAL)
    assert [t for t, w in zip(TOKENS, words) if w] == ["cat", "dog", "car", "bus", "share", "wolf"]
    table = _table(augment)
    # brute force: the most cosine-similar other word
    normed = torch.nn.functional.normalize(_embeddings(), dim=1)
    for i, token in enumerate(TOKENS):
        if not words[i]:
            assert table[i].tolist() == [-1]  # not a word: never replaced
            continue
        others = [j for j in range(len(TOKENS)) if words[j] and j != i]
        best = max(others, key=lambda j: float(normed[i] @ normed[j]))
        assert table[i].tolist() == [best], token
    assert TOKENS[table[3, 0]] == "dog" and TOKENS[table[5, 0]] == "bus"
    two = _table(augment, ids=[3], k=2)
    assert sorted(TOKENS[j] for j in two[3]) == ["dog", "wolf"] and (two[4] == -1).all()  # only the ids asked for
    with pytest.raises(ValueError, match="`k`=6 needs more than 6 candidate words"):
        _table(augment, k=6)


def test_replacement_keeps_the_length_and_touches_only_whole_words(augment):
    table, continuation = _table(augment), augment.continuation_ids(TOKENS)
    ids = [1, 3, 7, 8, 9, 5, 2]  # <s> cat share ##holders , car </s>
    rng = np.random.default_rng(0)
    assert augment.replace_words(ids, table, continuation, 1e-12, rng) == ids
    every = augment.replace_words(ids, table, continuation, 1.0, rng)
    # "share" continues into "##holders": not a whole word, kept; cat -> dog, car -> bus; the rest unchanged
    assert every == [1, 4, 7, 8, 9, 6, 2]
    draws = [augment.replace_words(ids, table, continuation, 0.5, np.random.default_rng(s)) for s in range(200)]
    changed = np.mean([d[1] != 3 for d in draws])
    assert 0.35 < changed < 0.65  # each word with probability 0.5
    assert draws[7] == augment.replace_words(ids, table, continuation, 0.5, np.random.default_rng(7))


def test_augmented_rows_follow_the_real_ones_unlabelled(augment):
    table, continuation = _table(augment), augment.continuation_ids(TOKENS)
    features = datasets.Features(
        {
            "labels": datasets.ClassLabel(names=["no", "yes"]),
            "input_ids": datasets.List(datasets.Value("int32")),
            "attention_mask": datasets.List(datasets.Value("int8")),
        }
    )
    rows = datasets.Dataset.from_dict(
        {"labels": [1, 0], "input_ids": [[1, 3, 2], [1, 5, 6, 2]], "attention_mask": [[1, 1, 1], [1, 1, 1, 1]]},
        features=features,
    )
    out = augment.augment(rows, table, continuation, copies=2, prob=1.0, seed=0)
    assert len(out) == 6
    assert list(out["labels"]) == [1, 0, -100, -100, -100, -100]
    assert list(out["input_ids"][:2]) == list(rows["input_ids"])  # the real rows first, unchanged
    assert list(out["input_ids"][2:]) == [[1, 4, 2], [1, 6, 5, 2]] * 2
    assert list(out["attention_mask"]) == list(rows["attention_mask"]) * 3
    for bad, match in (
        ({"copies": 0}, "`copies` must be >= 1, got 0"),
        ({"prob": 0.0}, r"`prob` must be in \(0, 1\]"),
    ):
        with pytest.raises(ValueError, match=match):
            augment.augment(rows, table, continuation, **{"copies": 1, "prob": 0.4, "seed": 0, **bad})
