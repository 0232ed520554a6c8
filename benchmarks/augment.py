"""Word-replacement data augmentation for distillation on small tasks.

After TinyBERT's augmentation (Jiao et al., 2020: each word replaced, with probability 0.4, by one of its K = 15
nearest candidates; MRPC grown twentyfold), with one change: the candidates are the nearest neighbours of the word in
the teacher's own input-embedding table (cosine similarity), so no masked-LM or GloVe download is needed. For
all-mpnet-base-v2, "company" gives companies, firm, corporation, industry, ...; "quickly" gives swiftly, rapidly, ....

The augmented rows carry the label -100 (`drone_hf.distillation.UNLABELLED`): the teacher alone teaches them, since
replacing words can change a pair's label.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from drone_hf.distillation import UNLABELLED  # the label DroneDistillationTrainer gives no task term


def word_ids(tokens: Sequence[str], special_ids: Sequence[int]) -> torch.Tensor:
    """A boolean mask over the vocabulary: the tokens that are whole alphabetic words (no `##` pieces, punctuation,
    digits, `[unusedN]` or special tokens)."""
    mask = torch.tensor([token.isalpha() for token in tokens])
    mask[list(special_ids)] = False
    return mask


def continuation_ids(tokens: Sequence[str]) -> torch.Tensor:
    """A boolean mask over the vocabulary: the WordPiece continuation pieces (`##...`)."""
    return torch.tensor([token.startswith("##") for token in tokens])


def neighbour_table(
    embeddings: torch.Tensor, words: torch.Tensor, ids: Sequence[int], k: int, chunk: int = 2048
) -> torch.Tensor:
    """The `k` nearest words (cosine similarity of the rows of `embeddings`, among the vocabulary entries that `words`
    marks) of each id in `ids`; returns a `vocab x k` long tensor, -1 in the rows of ids not asked for or not words."""
    if k < 1:
        raise ValueError(f"`k` must be >= 1, got {k}.")
    candidates = words.nonzero().squeeze(1)
    if len(candidates) <= k:
        raise ValueError(f"`k`={k} needs more than {k} candidate words; the vocabulary has {len(candidates)}.")
    normed = torch.nn.functional.normalize(embeddings.detach().float(), dim=1)
    table = torch.full((embeddings.shape[0], k), -1, dtype=torch.long)
    asked = torch.tensor(sorted({int(i) for i in ids if words[int(i)]}), dtype=torch.long)
    for start in range(0, len(asked), chunk):
        rows = asked[start : start + chunk]
        similarity = normed[rows] @ normed[candidates].T
        similarity[candidates.unsqueeze(0) == rows.unsqueeze(1)] = -float("inf")  # not the word itself
        table[rows] = candidates[similarity.topk(k, dim=1).indices]
    return table


def replace_words(
    input_ids: Sequence[int],
    table: torch.Tensor,
    continuation: torch.Tensor,
    prob: float,
    rng: np.random.Generator,
) -> list[int]:
    """`input_ids` with each whole word (a token with neighbours in `table` that the next token does not continue)
    replaced, with probability `prob`, by one of its neighbours drawn uniformly; the length is unchanged."""
    ids = list(input_ids)
    k = table.shape[1]
    for i, token in enumerate(ids):
        if table[token, 0] < 0 or (i + 1 < len(ids) and continuation[ids[i + 1]]):
            continue
        if rng.random() < prob:
            ids[i] = int(table[token, rng.integers(k)])
    return ids


def augment(dataset, table: torch.Tensor, continuation: torch.Tensor, copies: int, prob: float, seed: int):
    """`dataset` (a tokenized `datasets.Dataset` with `input_ids` and `labels`) followed by `copies` word-replaced
    copies of each row (`replace_words`), labelled `UNLABELLED`; other columns (attention mask, ...) are copied."""
    import datasets

    if copies < 1:
        raise ValueError(f"`copies` must be >= 1, got {copies}.")
    if not 0.0 < prob <= 1.0:
        raise ValueError(f"`prob` must be in (0, 1], got {prob}.")
    rng = np.random.default_rng(seed)
    rows = dataset.to_dict()
    out = {name: list(values) for name, values in rows.items()}
    for _ in range(copies):
        for index, ids in enumerate(rows["input_ids"]):
            for name, values in rows.items():
                if name == "input_ids":
                    out[name].append(replace_words(ids, table, continuation, prob, rng))
                elif name == "labels":
                    out[name].append(UNLABELLED)
                else:
                    out[name].append(values[index])
    features = dataset.features.copy()
    features["labels"] = datasets.Value("int64")  # a ClassLabel cannot hold -100
    return datasets.Dataset.from_dict(out, features=features)
