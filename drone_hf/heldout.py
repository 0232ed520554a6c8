"""Cheap, cached evaluation of one-module-at-a-time compressions on a small held-out set (for rank allocation)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .architecture import get_architecture, layer_names
from .calibration import model_inputs
from .heads import MetricFn, concat_rows, default_metric_fn, head_rows, soft_change
from .model_state import restore_training_modes, training_modes
from .structure import swap_module


class _StopForward(Exception):
    """Raised by a capture hook once the layer whose output is wanted has run."""


class _Replay(nn.Module):
    """Stands in for an encoder layer that has not changed: returns the cached output of the last such layer. Other
    attributes are the layer's own (ModernBERT's encoder reads each layer's `attention_type` to pick its mask)."""

    def __init__(self, evaluator: LayerwiseEvaluator, layer: nn.Module):
        super().__init__()
        self._refs = [evaluator, layer]  # a list, so neither is registered as a submodule

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_refs"][1], name)

    def forward(self, *args, **kwargs):
        return self._refs[0]._current


class LayerReplay:
    """A model's forward on fixed batches in which the layers before `start` are replayed: the output of layer
    `layer_index - 1` is cached per batch ([`advance_to`]) and stands in for those layers (`_Replay`), so that running
    from layer `i` costs `L - i` layers. The held-out evaluator and the sequential refit share it."""

    def __init__(self, model: nn.Module, batches: list, layer_names: list[str]):
        self.model, self._batches, self.layer_names = model, batches, layer_names
        self._cache: list | None = None
        self._current = None
        self.layer_index = 0

    def _forward(self, batch):
        return self.model(**batch)

    def _run(self, start: int, capture: int | None = None) -> list:
        """Runs every batch with layers `< start` replayed from the cache; returns the model outputs, or, with
        `capture`, the outputs of layer `capture` (the forward stops there)."""
        replaced = {name: _Replay(self, self.model.get_submodule(name)) for name in self.layer_names[:start]}
        originals = {name: swap_module(self.model, name, module) for name, module in replaced.items()}
        captured: list = []
        handle = None
        if capture is not None:

            def hook(module, args, output):
                captured.append(output)
                raise _StopForward

            handle = self.model.get_submodule(self.layer_names[capture]).register_forward_hook(hook)
        outputs = []
        try:
            for index, batch in enumerate(self._batches):
                self._current = self._cache[index] if start else None
                try:
                    outputs.append(self._forward(batch))
                except _StopForward:
                    pass
        finally:
            if handle is not None:
                handle.remove()
            for name, module in originals.items():
                swap_module(self.model, name, module)
            self._current = None
        return captured if capture is not None else outputs

    def outputs_of(self, layer_index: int) -> list:
        """The output of layer `layer_index` for every batch, run from the cached layer on (the forward stops after
        that layer). Hooks on modules of the layers run see their inputs: the sequential refit reads them so."""
        return self._run(self.layer_index, capture=layer_index)

    @torch.no_grad()
    def advance_to(self, layer_index: int) -> None:
        """Moves the cache forward to the inputs of `layer_index` (layers before it must be final by then)."""
        if not self.layer_names or layer_index <= self.layer_index:
            return
        self._cache = self.outputs_of(layer_index - 1)
        self._advanced(layer_index - self.layer_index)
        self.layer_index = layer_index

    def _advanced(self, layers: int) -> None:
        """Called with the number of layers each [`advance_to`] ran."""


class LayerwiseEvaluator(LayerReplay):
    r"""
    Evaluates a model with a task head on fixed held-out batches, re-running only the layers at and after the one
    that changed.

    The output of the last unchanged layer is cached for every batch; while scoring, the layers before the changed
    one are swapped for stand-ins that return that output, so the model's own forward (embeddings, masks, position
    biases, final norm, pooler and head) runs unchanged for every family and head, and a change in layer `i` costs
    `L - i` layers instead of `L`. Families whose layers are shared (ALBERT) are always run whole.

    Args:
        model (`PreTrainedModel`): Evaluated in eval mode; modules may be swapped between calls.
        batches (`Iterable[Mapping[str, Tensor]]`): Held-out tokenizer batches **with** labels (`labels`, or
            `start_positions`/`end_positions` for question answering).
        rows_fn (`Callable`, *optional*): `(model outputs, batch) -> (rows, labels, kind)`; defaults to the task head's
            rows ([`~heads.head_rows`]); [`~heads.embedding_rows`] scores a bare encoder by its pooled embeddings.
        autocast_dtype (`torch.dtype`, *optional*): Run every forward (the first, dense one included, so that the
            reference rows share it) under `torch.autocast` in this dtype, e.g. `torch.bfloat16` on a CPU with AMX
            tiles; `None` runs the model in its own dtype.
        initial (`list`, *optional*): Per batch, the `(rows, labels, kind)` of `rows_fn` for the model as it is now,
            in place of the first pass (see [`subset`]).

    Attributes:
        initial_rows (`np.ndarray`): The rows of the model as it was when the evaluator was built (the pass that
            reads the labels); what `logits(0)` returns until a module is swapped, without running the model again.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Mapping[str, torch.Tensor]],
        rows_fn: Callable = head_rows,
        autocast_dtype: torch.dtype | None = None,
        *,
        initial: list | None = None,
    ):
        self.autocast_dtype = autocast_dtype
        batches = list(batches)
        names = layer_names(model) if get_architecture(model).layerwise else []
        super().__init__(model.eval(), [model_inputs(model, batch) for batch in batches], names)
        self.device = next(model.parameters()).device
        self._labelled = batches
        self._rows_fn = rows_fn
        if not self._batches:
            raise ValueError("`eval_dataloader` yielded no batch; rank allocation needs held-out data.")
        rows = initial
        if rows is None:
            with torch.no_grad():
                rows = [rows_fn(self._forward(batch), labelled) for batch, labelled in zip(self._batches, batches)]
        self._initial = rows  # per batch: `(rows, labels, kind)` of the model as it was when built
        self.labels = concat_rows([labels for _, labels, _ in rows])
        self.initial_rows = concat_rows([values for values, _, _ in rows])  # the model as it was when built
        self.kind = rows[0][2]
        self.num_outputs = max(int(logits.shape[-1]) for logits, _, _ in rows)  # classes, or span positions
        self.evaluations = 0
        self.seconds = 0.0
        self.rows = count_rows(batches)
        self.row_passes = 0.0  # rows times the fraction of the encoder's layers run: a cost that no clock blurs

    def subset(self, indices: Iterable[int]) -> LayerwiseEvaluator:
        """An evaluator on the batches at `indices`, whose first rows are this evaluator's for those batches (no pass
        of the model): they are the model's as long as it is as it was when this evaluator was built."""
        indices = list(indices)
        return LayerwiseEvaluator(
            self.model,
            [self._labelled[i] for i in indices],
            self._rows_fn,
            self.autocast_dtype,
            initial=[self._initial[i] for i in indices],
        )

    def _forward(self, batch):
        inputs = {k: v.to(self.device) for k, v in batch.items()}
        if self.autocast_dtype is None:
            return self.model(**inputs)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return self.model(**inputs)

    @torch.no_grad()
    def logits(self, start: int | None = None) -> np.ndarray:
        """Rows of logits of the current model (see `drone_hf.heads`), recomputed from layer `start` (default: the
        cached layer; a layer before it, e.g. `0`, recomputes everything)."""
        begin = time.perf_counter()
        start = self.layer_index if start is None or start >= self.layer_index else 0
        outputs = self._run(start)
        self._count(len(self.layer_names) - start)
        rows = concat_rows([self._rows_fn(out, batch)[0] for out, batch in zip(outputs, self._labelled)])
        self.evaluations += 1
        self.seconds += time.perf_counter() - begin
        return rows

    def _advanced(self, layers: int) -> None:
        self._count(layers)

    def _count(self, layers: int) -> None:
        self.row_passes += self.rows * (layers / len(self.layer_names) if self.layer_names else 1.0)


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
    modes = training_modes(model)
    try:
        model.eval()
        device = next(model.parameters()).device
        batch = model_inputs(model, inputs, device)
        model(**batch)  # warm-up
        for value in elapsed:
            elapsed[value] = 0.0
        for _ in range(repeats):
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
        restore_training_modes(modes)
    times = {
        candidate: max(sum(elapsed[e[1:]] * (1 if e[0] == "+" else -1) for e in entries), 0.0)
        for candidate, entries in names.items()
    }
    total = sum(times.values()) or 1.0
    return {candidate: t / total for candidate, t in times.items()}


def count_rows(batches) -> int:
    """Rows (examples) in tokenizer `batches`."""
    return sum(len(batch["input_ids"]) for batch in batches)


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
    rows score both models, so their shared difficulty cancels).

    A `metric_fn` with a `bootstrap_sample(rng) -> (rows, metric)` method resamples its own units instead (e.g.
    `drone_hf.token_metrics.EntityF1Points`: whole sentences, scored by a metric that knows their boundaries)."""
    rng = np.random.default_rng(seed)
    sampler = getattr(metric_fn, "bootstrap_sample", None)
    drops = []
    for _ in range(samples):
        if sampler is not None:
            rows, metric = sampler(rng)
        else:
            rows, metric = rng.integers(0, len(labels), len(labels)), metric_fn
        drops.append(metric(base_logits[rows], labels[rows]) - metric(logits[rows], labels[rows]))
    drops = np.asarray(drops, dtype=float)
    drops = drops[np.isfinite(drops)]
    return float(drops.std(ddof=1)) if len(drops) > 1 else 0.0


__all__ = [
    "LayerwiseEvaluator",
    "count_rows",
    "default_metric_fn",
    "module_time_shares",
    "paired_standard_error",
    "soft_change",
    "spread_subset",
]
