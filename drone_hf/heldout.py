"""Cheap, cached evaluation of one-module-at-a-time compressions on a small held-out set (for rank allocation)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .calibration import MODEL_INPUT_KEYS


MetricFn = Callable[[np.ndarray, np.ndarray], float]


def default_metric_fn(problem_type: str | None) -> MetricFn:
    """Accuracy in points for classification, Pearson correlation in points for regression."""
    if problem_type == "regression":
        return lambda logits, labels: 100.0 * float(np.corrcoef(logits.reshape(-1), labels.reshape(-1))[0, 1])
    return lambda logits, labels: 100.0 * float((logits.argmax(-1) == labels).mean())


def _true_label_probability(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(-1, keepdims=True)
    probs = np.exp(shifted) / np.exp(shifted).sum(-1, keepdims=True)
    return probs[np.arange(len(labels)), labels.astype(int)]


def soft_change(base_logits: np.ndarray, logits: np.ndarray, labels: np.ndarray, problem_type: str | None) -> float:
    """How much a compression moves the model, in points, used for per-module drops that are far below one held-out
    example: the mean absolute change of the true label's probability (classification) or of the prediction, over
    the labels' standard deviation (regression).

    Unlike a drop in the mean true-label probability, it is never negative: a module whose compression happens to
    raise that score on these rows is still charged for changing the model, so noise cannot make a harsh rank look
    free.
    """
    if problem_type == "regression":
        moved = np.abs(logits.reshape(-1) - base_logits.reshape(-1)).mean()
        return 100.0 * float(moved / max(float(labels.std()), 1e-12))
    moved = np.abs(_true_label_probability(logits, labels) - _true_label_probability(base_logits, labels))
    return 100.0 * float(moved.mean())


class LayerwiseEvaluator:
    r"""
    Evaluates a BERT classifier on fixed held-out batches, re-running only the layers at and after the one that
    changed. The inputs of the current layer are cached for every batch, so scoring a change in layer `i` costs
    `L - i` layers instead of `L`.

    Args:
        model (`BertForSequenceClassification`): Evaluated in eval mode; modules may be swapped between calls.
        batches (`Iterable[Mapping[str, Tensor]]`): Held-out tokenizer batches **with** `labels`.
    """

    def __init__(self, model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]]):
        self.model = model.eval()
        self.layers = getattr(model, model.base_model_prefix).encoder.layer
        self.device = next(model.parameters()).device
        self.labels, self._inputs, self._layer_args = [], [], []
        captured = []
        handle = self.layers[0].register_forward_pre_hook(
            lambda module, args, kwargs: captured.append((args, kwargs)), with_kwargs=True
        )
        try:
            with torch.no_grad():
                for batch in batches:
                    if "labels" not in batch:
                        raise ValueError(
                            "Held-out batches must have `labels`: an eval set without labels cannot be scored."
                        )
                    self.labels.append(batch["labels"].cpu().numpy())
                    model(**{k: v.to(self.device) for k, v in batch.items() if k in MODEL_INPUT_KEYS})
        finally:
            handle.remove()
        if not captured:
            raise ValueError("`eval_dataloader` yielded no batch; rank allocation needs held-out data.")
        self._inputs = [args[0] for args, _ in captured]
        self._first_inputs = self._inputs
        self._layer_args = [(args[1:], kwargs) for args, kwargs in captured]
        self.layer_index = 0
        self.evaluations = 0
        self.seconds = 0.0
        self.labels = np.concatenate(self.labels)

    @torch.no_grad()
    def logits(self, start: int | None = None) -> np.ndarray:
        """Logits of the current model, recomputed from layer `start` (default: the cached layer; `0`: all)."""
        begin = time.perf_counter()
        start = self.layer_index if start is None else start
        # Before the cached layer, start again from the embeddings' output.
        inputs, cached = (self._inputs, self.layer_index) if start >= self.layer_index else (self._first_inputs, 0)
        base = getattr(self.model, self.model.base_model_prefix)
        outputs = []
        for hidden, (args, kwargs) in zip(inputs, self._layer_args):
            hidden = self._advance(hidden, args, kwargs, cached, start)
            for layer in self.layers[start:]:
                hidden = layer(hidden, *args, **kwargs)
            pooled = base.pooler(hidden) if base.pooler is not None else hidden[:, 0]
            outputs.append(self.model.classifier(self.model.dropout(pooled)).float().cpu())
        self.evaluations += 1
        self.seconds += time.perf_counter() - begin
        return torch.cat(outputs).numpy()

    def _advance(self, hidden, args, kwargs, begin: int, end: int):
        for layer in self.layers[begin:end]:
            hidden = layer(hidden, *args, **kwargs)
        return hidden

    @torch.no_grad()
    def advance_to(self, layer_index: int) -> None:
        """Moves the cache forward to the inputs of `layer_index` (layers before it must be final by then)."""
        self._inputs = [
            self._advance(hidden, args, kwargs, self.layer_index, layer_index)
            for hidden, (args, kwargs) in zip(self._inputs, self._layer_args)
        ]
        self.layer_index = layer_index


@torch.no_grad()
def module_time_shares(
    model: nn.Module, names: Mapping[str, list[str]], inputs: Mapping[str, torch.Tensor], *, repeats: int = 3
) -> dict[str, float]:
    """Measured share of inference time of each candidate.

    Args:
        names: Candidate -> list of `(module name, sign)` encoded as `"+name"` / `"-name"`: a candidate's time is the
            sum of its `+` modules minus its `-` modules (an attention block's score product = the block minus its
            value projection).
        inputs: One batch of model inputs.

    Returns:
        `dict[str, float]`: candidate -> fraction of the candidates' total time (sums to 1).
    """
    modules = {m[1:] for entries in names.values() for m in entries}
    elapsed = dict.fromkeys(modules, 0.0)
    starts: dict[str, float] = {}
    handles = []
    for name in modules:
        module = model.get_submodule(name)
        handles.append(
            module.register_forward_pre_hook(lambda m, a, n=name: starts.__setitem__(n, time.perf_counter()))
        )
        handles.append(
            module.register_forward_hook(
                lambda m, a, o, n=name: elapsed.__setitem__(n, elapsed[n] + time.perf_counter() - starts[n])
            )
        )
    try:
        model.eval()
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in inputs.items() if k in MODEL_INPUT_KEYS}
        model(**batch)  # warm-up
        for value in elapsed:
            elapsed[value] = 0.0
        for _ in range(repeats):
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    times = {
        candidate: max(sum(elapsed[e[1:]] * (1 if e[0] == "+" else -1) for e in entries), 0.0)
        for candidate, entries in names.items()
    }
    total = sum(times.values()) or 1.0
    return {candidate: t / total for candidate, t in times.items()}


def spread_subset(batches: list, num_rows: int | None) -> list:
    """Whole batches, evenly spread over `batches` (which may be sorted by length), holding about `num_rows` rows;
    all of them when `num_rows` is None or not smaller than their total."""
    sizes = [len(batch["input_ids"]) for batch in batches]
    if num_rows is None or num_rows >= sum(sizes):
        return batches
    wanted = max(1, round(len(batches) * num_rows / sum(sizes)))
    picks = sorted({int(round(i)) for i in np.linspace(0, len(batches) - 1, wanted)})
    return [batches[i] for i in picks]


def paired_standard_error(
    metric_fn: MetricFn,
    base_logits: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray,
    *,
    samples: int = 200,
    seed: int = 0,
) -> float:
    """Standard error of `metric(base) - metric(compressed)` on these rows, by a paired bootstrap (the same resampled
    rows score both models, so their shared difficulty cancels)."""
    rng = np.random.default_rng(seed)
    drops = []
    for _ in range(samples):
        rows = rng.integers(0, len(labels), len(labels))
        drops.append(metric_fn(base_logits[rows], labels[rows]) - metric_fn(logits[rows], labels[rows]))
    drops = np.asarray(drops, dtype=float)
    drops = drops[np.isfinite(drops)]
    return float(drops.std(ddof=1)) if len(drops) > 1 else 0.0


__all__ = [
    "LayerwiseEvaluator",
    "default_metric_fn",
    "module_time_shares",
    "paired_standard_error",
    "soft_change",
    "spread_subset",
]
