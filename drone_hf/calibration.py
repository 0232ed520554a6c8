"""Data-aware statistics: the second moment of the inputs each target linear sees on real data."""

from __future__ import annotations

import contextlib
import inspect
import threading
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from numbers import Integral

import torch
from torch import nn
from transformers.utils import logging
from transformers.utils.logging import tqdm

from .architecture import get_architecture
from .model_state import check_materialized, eval_mode
from .stats import (
    ActivationStats,
    load_activation_stats,
    model_fingerprint,
    save_activation_stats,
    split_stats,
    warn_if_few_tokens,
)
from .targets import (
    check_supported_model,
    factored_modules,
    resolve_target_modules,
    shared_input_sources,
    word_embedding_name,
)


logger = logging.get_logger(__name__)
MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def model_inputs(model: nn.Module, batch: Mapping, device=None) -> dict:
    """The entries of a tokenizer `batch` that `model.forward` takes (DistilBERT and ModernBERT take no
    `token_type_ids`), moved to `device`. A `torch.compile`d model is read through to the model it wraps."""
    accepted = _forward_keys(type(getattr(model, "_orig_mod", model)))
    return {k: (v if device is None else v.to(device)) for k, v in batch.items() if k in accepted and v is not None}


def _forward_keys(cls) -> frozenset:
    if cls not in _FORWARD_KEYS:
        parameters = inspect.signature(cls.forward).parameters
        _FORWARD_KEYS[cls] = frozenset(k for k in MODEL_INPUT_KEYS if k in parameters)
    return _FORWARD_KEYS[cls]


_FORWARD_KEYS: dict[type, frozenset] = {}


class ActivationStatsCollector:
    r"""
    Context manager that accumulates, for each named `nn.Linear`, the float64 second moment of `[x; 1]` over the
    non-padding tokens of every forward pass run inside it.

    Modules that read the same input (Q/K/V of one attention block) are hooked once and share one tensor. Hooks run
    under `no_grad` and are removed on exit, even if the forward raised. Only forward passes run by the thread that
    entered the context count, so another thread using the same model meanwhile does not leak into the statistics.

    Args:
        model (`nn.Module`): A model of a supported family.
        module_names (`Sequence[str]`): Full names of the linears to collect for.
        mask_padding (`bool`, *optional*, defaults to `True`): Drop positions where the attention mask is 0.

    Example:

    ```py
    >>> with ActivationStatsCollector(model, names) as collector:  # doctest: +SKIP
    ...     for batch in loader:
    ...         collector.set_attention_mask(batch["attention_mask"])
    ...         model(**batch)
    >>> stats = collector.stats
    ```
    """

    def __init__(self, model: nn.Module, module_names: Sequence[str], *, mask_padding: bool = True):
        sources = shared_input_sources(model)
        modules = dict(model.named_modules())
        self.model = model
        self.mask_padding = mask_padding
        # DeBERTa's query/key projections also read relative-position embeddings: rows without a token mask.
        self._extra_inputs = get_architecture(model).extra_linear_inputs
        self._sources = {}
        for name in module_names:
            if not isinstance(modules.get(name), nn.Linear):
                raise ValueError(f"`module_names` entry `{name}` is not an nn.Linear of the model.")
            self._sources[name] = sources.get(name, name)
        self._sums: dict[str, torch.Tensor] = {}
        self._handles = []
        self._mask: torch.Tensor | None = None
        self._thread: int | None = None

    def set_attention_mask(self, attention_mask: torch.Tensor | None) -> None:
        """Sets the mask of the batch about to run (`batch x seq`, 1 for real tokens)."""
        self._mask = None if attention_mask is None else attention_mask.bool()

    def _hook(self, source: str):
        @torch.no_grad()
        def hook(module, args):
            if threading.get_ident() != self._thread:
                return  # another thread's forward pass through the same model
            inputs = args[0]
            mask = self._mask
            if mask is not None and mask.shape != inputs.shape[:-1] and mask.numel() == inputs.shape[:-1].numel():
                mask = mask.reshape(inputs.shape[:-1])  # multiple choice: (batch, choices, seq) runs as one batch
            if self.mask_padding and mask is not None and not (self._extra_inputs and mask.shape != inputs.shape[:-1]):
                if inputs.shape[:-1] != mask.shape:
                    raise ValueError(
                        f"`attention_mask` of shape {tuple(self._mask.shape)} does not match the input of `{source}` "
                        f"{tuple(inputs.shape[:-1])}."
                    )
                inputs = inputs[mask.to(inputs.device)]
            inputs = inputs.reshape(-1, inputs.shape[-1])
            if not torch.isfinite(inputs).all():
                raise ValueError(f"NaN or Inf in the inputs of `{source}`; calibration data must give finite values.")
            tilde = torch.cat([inputs.double(), inputs.new_ones(inputs.shape[0], 1, dtype=torch.float64)], dim=1)
            update = tilde.T @ tilde
            if source in self._sums:
                self._sums[source] += update
            else:
                self._sums[source] = update

        return hook

    def __enter__(self) -> ActivationStatsCollector:
        self._thread = threading.get_ident()
        for source in dict.fromkeys(self._sources.values()):
            handle = self.model.get_submodule(source).register_forward_pre_hook(self._hook(source))
            self._handles.append(handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._mask = None
        self._thread = None

    @property
    def stats(self) -> dict[str, torch.Tensor]:
        """The accumulated statistics keyed by module name (modules with a shared input share one tensor)."""
        return {name: self._sums[source] for name, source in self._sources.items() if source in self._sums}


def _all_reduce(stats: dict[str, torch.Tensor]) -> None:
    # Under torch.distributed (accelerate launch, torchrun) every process saw a shard of the data: sum the shards.
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    for tensor in {id(t): t for t in stats.values()}.values():
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


@contextlib.contextmanager
def _exclusive(model: nn.Module) -> Iterator[None]:
    """One calibration of `model` at a time: a second thread waits for the first to finish (their statistics and
    the model's modes would otherwise interleave); a nested call from the same thread is refused."""
    with _LOCKS_GUARD:
        entry = _LOCKS.setdefault(model, {"lock": threading.Lock(), "owner": None})
    if entry["owner"] == threading.get_ident():
        raise RuntimeError(
            "collect_activation_stats is already running on this model in this thread (called from inside its own "
            "dataloader or a hook?); the two calibrations would count each other's forward passes."
        )
    with entry["lock"]:
        entry["owner"] = threading.get_ident()
        try:
            yield
        finally:
            entry["owner"] = None


def check_dataloader(dataloader, argument: str = "dataloader") -> None:
    """Raises a `TypeError` unless `dataloader` is an iterable of batches (one batch given alone is named as such)."""
    if isinstance(dataloader, Mapping):
        raise TypeError(
            f"`{argument}` must be an iterable of batches (a DataLoader or a list of tokenizer batches), but got one "
            f"batch (a {type(dataloader).__name__} with keys {list(dataloader)[:5]}); pass `[batch]`, not one batch."
        )
    if isinstance(dataloader, (str, bytes)) or not isinstance(dataloader, Iterable):
        raise TypeError(
            f"`{argument}` must be an iterable of tokenizer batches (dicts with `input_ids`), e.g. a torch DataLoader "
            f"or a list of dicts; got {type(dataloader).__name__}."
        )


def check_batch(batch, vocab_size: int | None, argument: str = "dataloader") -> None:
    """Raises unless `batch` is a tokenizer batch of this model: a dict whose `input_ids` is an integer tensor of
    ids inside the vocabulary (`vocab_size` rows; not checked when None)."""
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise ValueError(
            f"`{argument}` must yield dicts with `input_ids` (tokenizer batches), got "
            + type(batch).__name__
            + (f" with keys {list(batch)}" if isinstance(batch, Mapping) else "")
            + "."
        )
    ids = batch["input_ids"]
    if not isinstance(ids, torch.Tensor):
        raise TypeError(
            f"`input_ids` must be a torch.Tensor, got {type(ids).__name__}: tokenize with `return_tensors='pt'` (or "
            "pad with a DataCollatorWithPadding) so that batches hold tensors."
        )
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"`input_ids` must hold integer token ids, got a {ids.dtype} tensor.")
    if vocab_size is not None and ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            raise ValueError(
                f"`input_ids` holds token id {high if high >= vocab_size else low}, outside the model's vocabulary "
                f"(ids 0..{vocab_size - 1}): were the batches made by another model's tokenizer? Tokenize with the "
                "tokenizer saved with this model."
            )


def vocab_size(model: nn.Module) -> int | None:
    """Rows of the model's word embedding (None if it cannot be found)."""
    try:
        embedding = model.get_submodule(word_embedding_name(model))
    except (AttributeError, ValueError):
        return None
    size = getattr(embedding, "num_embeddings", None)
    return size if isinstance(size, int) else None


def collect_activation_stats(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    target_modules: Sequence[str] | str | None = None,
    max_batches: int | None = None,
    show_progress: bool = False,
) -> ActivationStats:
    r"""
    Runs `model` over `dataloader` and returns, per target linear, the float64 second moment of its inputs.

    Padding positions (attention mask 0) are excluded; Q/K/V are computed once and share one tensor. Under
    `torch.distributed` the statistics are summed across processes. Save them with [`save_activation_stats`] to
    reuse one calibration for many budgets.

    `model` is left as it was: it runs in eval mode (no dropout) and every module's own train/eval flag is restored
    afterwards, also when something raised; no hook is left behind. Calls from several threads on one model object
    run one at a time, each on its own data.

    Args:
        model (`PreTrainedModel`): The fine-tuned model, any supported family and head (left unchanged).
        dataloader (`Iterable[Mapping[str, Tensor]]`):
            Tokenizer batches: dicts with `input_ids`, `attention_mask` and optionally `token_type_ids`; other keys
            such as `labels` are ignored.
        target_modules (`Sequence[str]` or `str`, *optional*):
            Roles, full names or `re:` regexes (see [`resolve_target_modules`]). Defaults to every encoder linear.
        max_batches (`int`, *optional*): Stop after this many batches.
        show_progress (`bool`, *optional*, defaults to `False`): Show a progress bar.

    Returns:
        [`ActivationStats`]: a dict of module name -> `(in+1) x (in+1)` float64 tensor, the sum over tokens of
        `[x; 1][x; 1]^T` (see [`split_stats`]), which also records a fingerprint of `model` so that
        [`compress_model`] refuses the statistics for another model. A warning is logged when there were fewer
        tokens than a module has inputs (its factorisation is then rank-deficient).

    Raises:
        `TypeError` / `ValueError`: for a dataloader that is not an iterable of tokenizer batches, an empty
            dataloader, non-tensor or non-integer `input_ids`, token ids outside the vocabulary, all-padding data,
            NaN/Inf activations, or a model with weights on the meta device.
    """
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, Integral) or max_batches <= 0
    ):
        raise ValueError(f"`max_batches` must be a positive int or None, got {max_batches!r}.")
    check_supported_model(model)
    check_dataloader(dataloader)
    names = resolve_target_modules(model, target_modules)
    if not names:
        done = factored_modules(model)
        raise ValueError(
            f"No dense encoder linear left to calibrate: every encoder linear is already factored ({len(done)} "
            f"modules, e.g. `{done[0]}`); a factored layer cannot be factored again."
            if done
            else "No dense encoder linear left to calibrate: `target_modules` selects nothing."
        )
    check_materialized(model, "calibrate")
    device = next(model.parameters()).device
    vocab = vocab_size(model)
    num_batches = 0
    with _exclusive(model), eval_mode(model):
        with ActivationStatsCollector(model, names) as collector, torch.no_grad():
            total = max_batches if max_batches is not None else _safe_len(dataloader)
            for batch in tqdm(dataloader, total=total, desc="Calibrating", disable=not show_progress):
                if max_batches is not None and num_batches >= max_batches:
                    break
                check_batch(batch, vocab)
                inputs = model_inputs(model, batch, device)
                collector.set_attention_mask(inputs.get("attention_mask"))
                model(**inputs)
                num_batches += 1
            stats = collector.stats
        fingerprint = model_fingerprint(model)
    if num_batches == 0:
        raise ValueError("`dataloader` yielded no batch; calibration needs data.")
    if not stats or min(split_stats(t)[2] for t in stats.values()) == 0:
        raise ValueError("Every position of the calibration batches is padding (attention_mask all 0).")
    _all_reduce(stats)
    stats = ActivationStats(stats, fingerprint=fingerprint)
    widths = {name: model.get_submodule(name).in_features for name in names}
    warn_if_few_tokens(stats, widths)
    logger.info(f"Collected activation statistics for {len(names)} modules over {num_batches} batches.")
    return stats


def _safe_len(obj) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


__all__ = [
    "ActivationStats",
    "ActivationStatsCollector",
    "collect_activation_stats",
    "load_activation_stats",
    "model_inputs",
    "save_activation_stats",
    "split_stats",
]
