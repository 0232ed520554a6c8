"""DRONE compression of a [sentence-transformers](https://sbert.net) model, calibrated on raw unlabeled sentences.

[`compress_sentence_transformer`] copies a `SentenceTransformer`, compresses the Hugging Face encoder inside its
`Transformer` module with [`compress_model`] and puts the compressed encoder back, so pooling, normalisation, dense
layers, prompts and the tokenizer carry over. The budget can be task-free: `min_cosine_similarity` keeps the mean
cosine similarity between the dense and the compressed embeddings of held-out sentences at or above a floor, checked
jointly (with a paired-bootstrap margin) like `max_accuracy_drop` for classifiers. `distill_steps` then trains the
compressed encoder to match the dense one on the calibration sentences (last hidden states and final embeddings), and
`dtype` / `quantize` cast or int8-quantise the result once at the end, as [`compress_model`] does.

`model.save(folder)` writes an ordinary sentence-transformers folder whose root is a DRONE checkpoint
(`config.json` with `"model_type": "drone_bert"`, ...); after `import drone_hf`, `SentenceTransformer(folder)` reloads
it and `AutoModel.from_pretrained(folder)` gives the compressed encoder.

sentence-transformers is an optional dependency (the `sentence-transformers` extra:
`pip install -e '.[sentence-transformers]'`); this module imports it only inside its functions, and `import drone_hf`
does not import this module.
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers.utils import logging

from .defaults import DISTILL_LR_SCHEDULES


logger = logging.get_logger(__name__)

INSTALL_HINT = "pip install -e '.[sentence-transformers]' in your drone_hf clone"
MIN_HELDOUT_SENTENCES = 32
"""The fewest held-out sentences a `min_cosine_similarity` check runs on: below it the bootstrap standard error of
the mean cosine is itself too noisy to trust."""
HELDOUT_FRACTION = 0.25
"""The share of `sentences` held out for the `min_cosine_similarity` check when `heldout_sentences` is not given."""
HELDOUT_SEED = 0
_BUDGETS = ("rank", "ranks", "target_speedup", "param_ratio", "min_cosine_similarity")
_ST_TAGS = ("sentence-transformers", "sentence-similarity", "feature-extraction")


def _require_sentence_transformers():
    try:
        import sentence_transformers
    except ImportError as error:
        raise ImportError(
            f"Compressing a SentenceTransformer needs the sentence-transformers package: {INSTALL_HINT}"
        ) from error
    return sentence_transformers


def is_sentence_transformer(model: Any) -> bool:
    """Whether `model` is a `SentenceTransformer` (checked without importing sentence-transformers)."""
    return any(
        cls.__name__ == "SentenceTransformer" and cls.__module__.startswith("sentence_transformers")
        for cls in type(model).__mro__
    )


# ------------------------------------------------------------------------------------------------ argument checks


def _check_sentences(name: str, sentences: Any) -> list[str]:
    if isinstance(sentences, (str, bytes)) or not isinstance(sentences, Sequence):
        raise TypeError(
            f"`{name}` must be a list of strings (one sentence each), got {type(sentences).__name__}"
            + (f" {sentences[:40]!r}" if isinstance(sentences, (str, bytes)) else "")
            + "."
        )
    if len(sentences) == 0:
        raise ValueError(f"`{name}` is empty; pass a non-empty list of sentences (raw, unlabeled text).")
    for index, sentence in enumerate(sentences):
        if not isinstance(sentence, str):
            raise TypeError(f"`{name}[{index}]` must be a str, got {type(sentence).__name__} {sentence!r}.")
        if not sentence.strip():
            raise ValueError(f"`{name}[{index}]` is an empty string {sentence!r}; every sentence must have text.")
    return list(sentences)


def _check_number(name: str, value: Any, allowed: str, ok: Callable[[float], bool]) -> None:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _check_budget(budgets: Mapping[str, Any]) -> str:
    given = [name for name, value in budgets.items() if value is not None]
    if len(given) != 1:
        raise ValueError(
            f"Pass exactly one budget of {list(budgets)}, got {given or 'none'}"
            + (f" ({', '.join(f'{k}={budgets[k]!r}' for k in given)})" if given else "")
            + "."
        )
    name, value = given[0], budgets[given[0]]
    if name == "rank" and (isinstance(value, bool) or not isinstance(value, Integral) or value < 1):
        raise ValueError(f"`rank` must be a positive int (below each layer's min(in, out)), got {value!r}.")
    if name == "ranks" and not isinstance(value, Mapping):
        raise TypeError(f"`ranks` must be a dict of module name or 're:<regex>' -> rank, got {type(value).__name__}.")
    if name == "target_speedup":
        _check_number(name, value, "a number > 1 (multiply-add reduction, e.g. 1.5)", lambda v: v > 1)
    if name == "param_ratio":
        _check_number(name, value, "a number in (0, 1) (fraction of encoder-linear weights kept)", lambda v: 0 < v < 1)
    if name == "min_cosine_similarity":
        _check_number(
            name,
            value,
            "a number in (0, 1] (mean cosine similarity of compressed to dense embeddings, e.g. 0.98)",
            lambda v: 0 < v <= 1,
        )
    return name


def _transformer_module(model):
    """`model[0]`, checked to be a sentence-transformers `Transformer` around a supported transformers encoder."""
    from .targets import check_supported_model

    if not is_sentence_transformer(model):
        raise TypeError(
            f"`model` must be a sentence_transformers.SentenceTransformer (e.g. SentenceTransformer('all-MiniLM-L6-v2'"
            f")), got {type(model).__name__}."
        )
    modules = list(model._modules.values())
    first = modules[0] if modules else None
    if first is None or not any(
        cls.__name__ == "Transformer" and cls.__module__.startswith("sentence_transformers")
        for cls in type(first).__mro__
    ):
        raise TypeError(
            "`model[0]` must be a sentence-transformers `Transformer` module wrapping a Hugging Face encoder "
            f"(BERT, MiniLM, MPNet, RoBERTa, ...), got {type(first).__name__}; models without one (e.g. "
            "StaticEmbedding) have no encoder linears to compress."
        )
    if getattr(first, "backend", "torch") != "torch":
        raise ValueError(f"`model` must use the 'torch' backend to be compressed, got backend={first.backend!r}.")
    text = (getattr(first, "modality_config", None) or {}).get("text") or {}
    if text and (text.get("method"), text.get("method_output_name")) != ("forward", "last_hidden_state"):
        # The held-out scoring feeds the encoder's last hidden state to the modules after it, as `encode()` does here.
        raise ValueError(
            "`model[0]` must embed text with the encoder's `forward` and its `last_hidden_state` (the usual "
            f"sentence-transformers layout), got modality_config['text']={text!r}."
        )
    check_supported_model(first.auto_model)
    return first


def _set_encoder(transformer, encoder) -> None:
    """Puts `encoder` where `transformer.auto_model` lives (`.model` in recent sentence-transformers, `.auto_model`
    in older ones)."""
    for name, child in transformer.named_children():
        if child is transformer.auto_model:
            setattr(transformer, name, encoder)
            return
    transformer.auto_model = encoder


def with_encoder(model, encoder):
    """A copy of the `SentenceTransformer` `model` whose `Transformer` module wraps `encoder` instead (e.g. the dense
    encoder int8-quantised by [`quantize_model`]); `model` is not modified and its encoder is not copied."""
    original = _transformer_module(model).auto_model
    return copy.deepcopy(model, memo={id(original): encoder})


# -------------------------------------------------------------------------------------------------- data


def split_heldout(sentences: Sequence[str], fraction: float = HELDOUT_FRACTION, seed: int = HELDOUT_SEED):
    """`(calibration, heldout)`: a seeded random `fraction` of `sentences` held out (both keep the input order).

    This is the split [`compress_sentence_transformer`] uses when `min_cosine_similarity` is given without
    `heldout_sentences`, and the one `drone-hf compress-embeddings` uses for its fidelity report.
    """
    count = int(len(sentences) * fraction)
    held = set(np.random.default_rng(seed).permutation(len(sentences))[:count].tolist())
    calibration = [s for i, s in enumerate(sentences) if i not in held]
    return calibration, [s for i, s in enumerate(sentences) if i in held]


def _preprocess(model, sentences: list[str]) -> dict:
    prompt = None
    if getattr(model, "default_prompt_name", None):
        prompt = (getattr(model, "prompts", None) or {}).get(model.default_prompt_name)
    if hasattr(model, "preprocess"):
        return dict(model.preprocess(sentences, prompt=prompt) if prompt else model.preprocess(sentences))
    return dict(model.tokenize([prompt + s for s in sentences] if prompt else sentences))


def sentence_batches(model, sentences: Sequence[str], batch_size: int = 32) -> list[dict]:
    """Tokenizer batches of `sentences` exactly as `model.encode` builds them (the model's tokenizer, max length and
    default prompt), ordered by length so that batches carry little padding."""
    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    batches = []
    for start in range(0, len(order), batch_size):
        batches.append(_preprocess(model, [sentences[i] for i in order[start : start + batch_size]]))
    return batches


def _tensor_inputs(batch: Mapping) -> dict:
    return {key: value for key, value in batch.items() if isinstance(value, torch.Tensor)}


def sentence_embedding_head(model) -> Callable:
    r"""
    `head(hidden, batch) -> embeddings`: the sentence embeddings the whole `SentenceTransformer` `model` makes from the
    last hidden state `hidden` of its encoder (`batch x seq x hidden`) for the tokenizer `batch`, as `encode()` does:
    through the modules after `model[0]` (pooling of any mode, `Dense`, `Normalize`, ...), truncated to
    `model.truncate_dim`; a float32 tensor `batch x dim` that gradients flow through (the distillation's cosine term).
    """
    transformer, *tail = list(model._modules.values())
    output_name = getattr(transformer, "module_output_name", None) or "token_embeddings"
    truncate_dim = getattr(model, "truncate_dim", None)

    def head(hidden: torch.Tensor, batch: Mapping) -> torch.Tensor:
        features = {k: (v.to(hidden.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        features[output_name] = hidden
        for module in tail:
            features = module(features)
        embeddings = features["sentence_embedding"].float()
        return embeddings[..., :truncate_dim] if truncate_dim else embeddings

    return head


def sentence_embedding_rows(model) -> Callable:
    r"""
    A `rows_fn` (see `drone_hf.heads`) that scores the bare encoder of `model[0]` by the sentence embeddings the whole
    `SentenceTransformer` produces: the encoder's last hidden state goes through the modules after `model[0]`
    (pooling of any mode, `Dense`, `Normalize`, ...) and is truncated to `model.truncate_dim`, as in `encode()`
    ([`sentence_embedding_head`]).

    Rows are of kind `"embedding"`, so [`allocate_ranks`] compares them with the dense embeddings by cosine similarity
    (`max_accuracy_drop = 100 * (1 - min_cosine_similarity)`).
    """
    head = sentence_embedding_head(model)

    @torch.no_grad()
    def rows(outputs, batch):
        embeddings = head(outputs[0], batch).cpu().numpy()
        return embeddings, embeddings, "embedding"

    return rows


# ------------------------------------------------------------------------------------------------ compression

_ST_ALLOCATION_OPTIONS = (
    "screening_samples",
    "screening_dtype",
    "safety_margin",
    "refine_steps",
    "sequential_checks",
    "search",
    "seq_len",
    "show_progress",
    "rank_grid",
    "rank_multiple",
    "target_modules",
)
_ST_OWN_ARGUMENTS = ("method", "rank", "ranks", "attention", "report", *_BUDGETS)


def _st_allocation_options(options: Mapping | None) -> dict:
    """`allocation_options` checked against what [`allocate_ranks`] may be given besides what
    `compress_sentence_transformer` sets itself (the budget, method, attention, held-out data and report)."""
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(
            f"`allocation_options` must be a mapping of option name -> value (allowed: {list(_ST_ALLOCATION_OPTIONS)}"
            f"), got {type(options).__name__} {options!r}."
        )
    options = dict(options or {})
    own = sorted(key for key in options if key in _ST_OWN_ARGUMENTS)
    if own:
        raise ValueError(
            f"`allocation_options` may not set {own}: compress_sentence_transformer sets them from its own arguments "
            f"(pass them there). Allowed options: {list(_ST_ALLOCATION_OPTIONS)}."
        )
    unknown = sorted(set(options) - set(_ST_ALLOCATION_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown `allocation_options` {unknown}; allowed: {list(_ST_ALLOCATION_OPTIONS)}.")
    return options


DISTILL_DEFAULTS = {
    "lr": 1e-4,
    "hidden_weight": 1.0,
    "cosine_weight": 10.0,
    "relation_weight": 0.0,
    "dropout": False,
    "seed": 0,
    "lr_schedule": "constant",
    "balance_factors": True,
}
"""`distill_options` of [`compress_sentence_transformer`] and their defaults: AdamW learning rate (no weight decay) and
its schedule over the steps (`"constant"`, or `"linear"`: decayed linearly to 0 at the last step, as `Trainer`'s
default), the weights of the last-hidden-state MSE, of the embedding cosine distance and of the in-batch cosine-matrix
MSE ([`~drone_hf.distillation_losses.embedding_distillation_loss`]), whether the student trains with dropout (off: it
matches a deterministic teacher; on MiniLM with QNLI text, FLOP 2x, 300 steps, dropout cost 0.9 MRR points), the
seed of the batch order (and dropout), and whether each factored linear's pair is balanced before the first step
([`DroneLinear.balance_`], as `DroneDistillationArguments(balance_factors=True)` does for `Trainer` distillation: the
same function, factors that Adam moves evenly)."""


def _check_distillation(steps: Any, options: Mapping | None) -> dict | None:
    """`distill_steps` / `distill_options` checked; the settings (`DISTILL_DEFAULTS` updated, plus `steps`), or None
    for `distill_steps=0`."""
    if isinstance(steps, bool) or not isinstance(steps, Integral) or steps < 0:
        raise ValueError(
            f"`distill_steps` must be an int >= 0 (AdamW steps of embedding distillation on the calibration "
            f"sentences; 0 trains nothing), got {steps!r}."
        )
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(
            f"`distill_options` must be a mapping of option name -> value (allowed: {list(DISTILL_DEFAULTS)}), got "
            f"{type(options).__name__} {options!r}."
        )
    options = dict(options or {})
    unknown = sorted(set(options) - set(DISTILL_DEFAULTS), key=str)
    if unknown:
        raise ValueError(f"Unknown `distill_options` {unknown}; allowed: {list(DISTILL_DEFAULTS)}.")
    settings = {**DISTILL_DEFAULTS, **options}
    _check_number(
        "distill_options['lr']", settings["lr"], "a number > 0 (AdamW learning rate, e.g. 1e-4)", lambda v: v > 0
    )
    weights = ("hidden_weight", "cosine_weight", "relation_weight")
    for name in weights:
        _check_number(f"distill_options[{name!r}]", settings[name], "a number >= 0 (a loss weight)", lambda v: v >= 0)
    if all(settings[name] == 0 for name in weights):
        raise ValueError(f"`distill_options` sets all of {list(weights)} to 0: the loss would be 0; keep one > 0.")
    if settings["lr_schedule"] not in DISTILL_LR_SCHEDULES:
        raise ValueError(
            f"`distill_options['lr_schedule']` must be one of {list(DISTILL_LR_SCHEDULES)}, got "
            f"{settings['lr_schedule']!r}."
        )
    for name in ("dropout", "balance_factors"):
        if not isinstance(settings[name], bool):
            raise ValueError(f"`distill_options[{name!r}]` must be True or False, got {settings[name]!r}.")
    seed = settings["seed"]
    if isinstance(seed, bool) or not isinstance(seed, Integral) or seed < 0:
        raise ValueError(f"`distill_options['seed']` must be an int >= 0, got {seed!r}.")
    if steps == 0:
        if options:
            logger.warning(f"`distill_options` {sorted(options)} ignored: `distill_steps` is 0 (no distillation).")
        return None
    return {"steps": int(steps), **settings}


TEACHER_CACHE_BYTES = 2**30
"""The most bytes of teacher outputs (last hidden states and embeddings of the calibration batches) the distillation
keeps instead of recomputing them at every pass."""


@contextlib.contextmanager
def _frozen(modules: Sequence[torch.nn.Module]):
    """`requires_grad=False` on the parameters of `modules` for the block (their flags restored afterwards)."""
    parameters = [p for module in modules for p in module.parameters()]
    flags = [p.requires_grad for p in parameters]
    for parameter in parameters:
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in zip(parameters, flags):
            parameter.requires_grad_(flag)


def _distill_encoder(student, teacher, head: Callable, batches: Sequence[Mapping], settings: Mapping, show_progress):
    """Trains `student` (a compressed encoder, all its parameters) for `settings["steps"]` AdamW steps to match the
    dense `teacher` (eval mode, `no_grad`) on `batches` (tokenizer batches of the distillation text, taken in a
    seeded random order, each once per pass), at `settings["lr"]` under `settings["lr_schedule"]`:
    [`embedding_distillation_loss`] of the last hidden states and of the sentence embeddings `head` makes of them.
    The student trains in eval mode (no dropout: it matches a deterministic teacher; `settings["dropout"]` turns
    dropout on) and returns in eval mode. With `settings["balance_factors"]` every [`DroneLinear`] of `student` is
    balanced in place first (the same function). The teacher's outputs of a batch are
    computed once and kept (up to `TEACHER_CACHE_BYTES`), as the teacher does not change. Returns the losses:
    `loss_first` / `loss_last`, the mean total loss of the first and last `min(10, steps)` steps, and the unweighted
    parts of the last ones."""
    from transformers.utils.logging import tqdm

    from .calibration import model_inputs
    from .distillation_losses import embedding_distillation_loss
    from .layers import balance_factor_pairs_

    device = next(student.parameters()).device
    if settings["balance_factors"]:  # before the optimiser's state exists
        balance_factor_pairs_(student)
    optimizer = torch.optim.AdamW(
        [p for p in student.parameters() if p.requires_grad], lr=settings["lr"], weight_decay=0.0
    )
    total_steps = settings["steps"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        (lambda step: 1.0 - step / total_steps) if settings["lr_schedule"] == "linear" else (lambda step: 1.0),
    )
    generator = torch.Generator().manual_seed(settings["seed"])
    weights = {name: settings[name] for name in ("hidden_weight", "cosine_weight", "relation_weight")}
    totals, parts_seen, order = [], [], []
    cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    cached_bytes = 0
    teacher.eval()
    student.train(settings["dropout"])
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # seeded dropout without touching the caller's random state
        torch.manual_seed(settings["seed"])
        for _ in tqdm(range(settings["steps"]), desc="Distilling", disable=not show_progress):
            if not order:
                order = torch.randperm(len(batches), generator=generator).tolist()
            index = order.pop()
            batch = batches[index]
            inputs = model_inputs(student, batch, device)
            if index in cache:
                target_hidden, target = cache[index]
            else:
                with torch.no_grad():
                    target_hidden = teacher(**inputs)[0]
                    target = head(target_hidden, batch)
                size = target_hidden.numel() * target_hidden.element_size() + target.numel() * target.element_size()
                if cached_bytes + size <= TEACHER_CACHE_BYTES:
                    cache[index], cached_bytes = (target_hidden, target), cached_bytes + size
            hidden = student(**inputs)[0]
            loss, parts = embedding_distillation_loss(
                hidden,
                target_hidden,
                head(hidden, batch),
                target,
                attention_mask=inputs.get("attention_mask"),
                **weights,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            totals.append(float(loss.detach()))
            parts_seen.append({name: float(value.detach()) for name, value in parts.items()})
    student.zero_grad(set_to_none=True)
    student.eval()
    window = min(10, len(totals))
    last = {f"loss_{name}_last": float(np.mean([p[name] for p in parts_seen[-window:]])) for name in parts_seen[-1]}
    return {"loss_first": float(np.mean(totals[:window])), "loss_last": float(np.mean(totals[-window:])), **last}


@torch.no_grad()
def _heldout_embeddings(encoder, batches: Sequence[Mapping], head: Callable) -> np.ndarray:
    """The sentence embeddings (float32, `sentences x dim`, in the order of `batches`) of `encoder` + `head`."""
    from .calibration import model_inputs

    encoder.eval()  # the caller sets the modes it wants afterwards
    device = next(encoder.parameters()).device
    return np.concatenate([head(encoder(**model_inputs(encoder, b, device))[0], b).cpu().numpy() for b in batches])


def _mean_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Mean row-wise cosine similarity, by the allocation's own cosine (`drone_hf.heads._cosines`)."""
    from .heads import _cosines

    return float(_cosines(a, b).mean())


def compress_sentence_transformer(
    model,
    sentences: Sequence[str],
    *,
    method: str = "drone",
    rank: int | None = None,
    ranks: Mapping[str, int] | None = None,
    target_speedup: float | None = None,
    param_ratio: float | None = None,
    min_cosine_similarity: float | None = None,
    heldout_sentences: Sequence[str] | None = None,
    batch_size: int = 32,
    attention: bool = True,
    sequential: bool = False,
    sequential_dense_weight: float = 0.0,
    allocation_options: Mapping | None = None,
    allocation_report: dict | None = None,
    distill_steps: int = 0,
    distill_options: Mapping | None = None,
    distill_sentences: Sequence[str] | None = None,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    show_progress: bool = False,
):
    r"""
    Compresses the encoder of a `SentenceTransformer` with DRONE (or plain SVD), optionally recovers it by embedding
    distillation on the same calibration sentences, and returns a **new** `SentenceTransformer` (optionally cast to a
    deployment dtype or int8-quantised); `model` is not modified (weights, train/eval mode and hooks are left as they
    are).

    Calibration runs on raw unlabeled `sentences`, tokenized by the model's own tokenizer at its `max_seq_length` (with
    its default prompt, if any), exactly as `model.encode` would. Give exactly one budget:

    - `rank` / `ranks`: explicit ranks, as in [`compress_model`].
    - `target_speedup` / `param_ratio`: no evaluations; ranks from the closed form's residual energy (multiply-adds
      counted at `min(128, model.max_seq_length)` tokens, the length the model embeds).
    - `min_cosine_similarity`: a task-free quality budget. The ranks keep the mean cosine similarity between the dense
      and the compressed embeddings of held-out sentences at or above this value, checked jointly on all held-out
      sentences with the same statistical margin as `max_accuracy_drop` (`safety_margin` paired-bootstrap standard
      errors, default 1). It is `max_accuracy_drop = 100 * (1 - min_cosine_similarity)` on the embeddings the whole
      model outputs (pooling, dense and normalisation modules included). The held-out sentences are
      `heldout_sentences`, or a seeded random quarter of `sentences` (the rest calibrates).

    With `distill_steps > 0` the compressed encoder is then trained against the dense one (the teacher, in eval mode
    and without gradients) on the calibration sentences, or on `distill_sentences` when given (never on the held-out
    ones): `distill_steps` AdamW steps on `hidden_weight * MSE(last hidden states) + cosine_weight * (1 - cosine)` of
    the final sentence embeddings the whole model outputs (pooling, dense and normalisation modules included, as
    `encode()`) `+ relation_weight * MSE` of their in-batch cosine matrices, one batch of `batch_size` sentences per
    step. A `min_cosine_similarity` budget is checked **before** the distillation (it
    chooses the ranks); the held-out cosine is measured again after it, on the same held-out sentences, which the
    distillation never saw (but which chose the ranks, so it is not an independent estimate either). Only the encoder
    is trained (`Dense` modules after it are not), and the returned model is in eval mode. Distillation adapts the
    encoder to the calibration text: calibrate on text like the text the model will embed (more steps or a higher
    `lr` overfit it).

    Args:
        model (`SentenceTransformer`): Its first module must be a `Transformer` around an encoder of a supported
            family (BERT/MiniLM, MPNet, RoBERTa, XLM-R, DistilBERT, ELECTRA, DeBERTa-v2, ModernBERT, ALBERT).
        sentences (`Sequence[str]`): Raw calibration text, one sentence (or passage) per item.
        method (`str`, *optional*, defaults to `"drone"`): `"drone"`, `"drone-bc"`, `"drone-act"` or `"svd"`.
        rank, ranks, target_speedup, param_ratio: Budgets, as in [`compress_model`].
        min_cosine_similarity (`float`, *optional*): The cosine budget, in `(0, 1]` (e.g. `0.98`).
        heldout_sentences (`Sequence[str]`, *optional*): Held-out text for `min_cosine_similarity` (at least
            `MIN_HELDOUT_SENTENCES` = 32). With any budget, the final mean cosine on them goes into
            `allocation_report`.
        batch_size (`int`, *optional*, defaults to 32): Sentences per calibration / held-out batch.
        attention (`bool`, *optional*, defaults to `True`): Let budgets also factor the attention score product
            (DRONE attention) where the family allows it.
        sequential (`bool`, *optional*, defaults to `False`): Refit the factored linears layer after layer on the
            calibration sentences as the compressed encoder itself feeds them ([`compress_model`]'s `sequential`,
            docs/methods.md §1c): same ranks, smaller error. With `min_cosine_similarity` the joint checks score
            refitted encoders (`allocation_options={"sequential_checks": 4}` more past the search's result). Before
            any distillation. Not for families that share layers (ALBERT).
        sequential_dense_weight (`float`, *optional*, defaults to 0): With `sequential`, the anchored refit
            ([`compress_model`]'s `sequential_dense_weight`).
        allocation_options (`Mapping`, *optional*): Further options of [`allocate_ranks`] (`safety_margin`,
            `refine_steps`, `search`, `screening_samples`, `screening_dtype`, `seq_len`, `sequential_checks`, ...).
        allocation_report (`dict`, *optional*): Filled with what was done: the allocation's report, `heldout_cosine`
            (mean cosine of the returned model's embeddings to the dense ones on the held-out sentences, when there
            are any: after distillation and in the deployment dtype / int8), the number of calibration and held-out
            sentences and, with `distill_steps`, `distillation`: `{"steps", "seconds", "lr", "lr_schedule",
            "hidden_weight", "cosine_weight", "relation_weight", "seed", "balance_factors", "batch_size", "sentences",
            "loss_first", "loss_last", "loss_hidden_last", "loss_cosine_last", "heldout_cosine_before",
            "heldout_cosine_after"}` (and `"loss_relation_last"` with a relation term) (the two cosines in float32,
            `None` without held-out sentences).
        distill_steps (`int`, *optional*, defaults to 0): AdamW steps of embedding distillation after compression
            (see above); 0 trains nothing.
        distill_options (`Mapping`, *optional*): `lr` (default `1e-4`), `lr_schedule` (`"constant"`, or
            `"linear"`: decayed to 0 at the last step), `hidden_weight` (1.0),
            `cosine_weight` (10.0), `relation_weight` (0.0), `dropout` (`False`: the student trains in eval mode),
            `seed` (0: batch order) and `balance_factors` (`True`: each factor pair rescaled to equal norms before
            the first step, the same function) of the distillation ([`DISTILL_DEFAULTS`]). Recorded with the steps in
            `config.drone_calibration["distillation"]`, hence on the model card.
        distill_sentences (`Sequence[str]`, *optional*): Unlabeled text to distil on instead of the calibration
            sentences (more text of the kind the model will embed lets more steps run without overfitting). It may
            not share a sentence with the held-out ones. Needs `distill_steps > 0`.
        dtype (`torch.dtype` or `str`, *optional*): Deployment dtype, `float32`, `bfloat16` or `float16`, as in
            [`compress_model`]: statistics, factors and the distillation run in the model's dtype, then the encoder
            and the modules after it (e.g. `Dense`) are cast once; `save` writes them in that dtype and
            `SentenceTransformer(folder)` (after `import drone_hf`) reloads them in it. A budget keeps only ranks
            measured faster than the dense layer in this dtype on this machine.
        quantize (`str`, *optional*): `"int8"`: dynamic int8 of the encoder linears, once at the end, as in
            [`compress_model`] ([`quantize_model`]; CPU, float32 model). Reloads as int8 modules.
        show_progress (`bool`, *optional*): Progress bars for calibration, allocation and distillation.

    Returns:
        `SentenceTransformer`: the compressed copy (a `DroneSentenceTransformer`, whose `save`/`save_pretrained` add
        the DRONE section to the model card and whose `push_to_hub` uses [`push_compressed_to_hub`]). Its
        `model[0].auto_model` is a DRONE encoder (`DroneBertModel`, `DroneMPNetModel`, ...). Its modules keep the
        train/eval modes of `model`'s, except after distillation (eval mode).

    Raises:
        `ImportError`: without sentence-transformers (`pip install -e '.[sentence-transformers]'` in the clone).
        `TypeError` / `ValueError`: naming the argument, the value and what is allowed: `model` not a
            `SentenceTransformer` or without a `Transformer` first module, an unsupported family, empty or non-string
            sentences, zero or several budgets, a budget out of range, too few held-out sentences, a budget that no
            compression meets, bad `distill_steps` / `distill_options` or `dtype` / `quantize` values (all checked
            before any calibration).

    Example:

    ```py
    >>> import drone_hf
    >>> from sentence_transformers import SentenceTransformer
    >>> model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")  # doctest: +SKIP
    >>> small = drone_hf.compress_sentence_transformer(model, sentences, min_cosine_similarity=0.98)  # doctest: +SKIP
    >>> small.save("all-MiniLM-L6-v2-drone")  # doctest: +SKIP
    >>> SentenceTransformer("all-MiniLM-L6-v2-drone").encode(["A sentence."])  # doctest: +SKIP
    ```
    """
    from . import collect_activation_stats, compress_model
    from .allocation import allocate_ranks
    from .deployment import check_deployment, prepare_for_deployment
    from .methods import method_names
    from .sequential import check_dense_weight, check_sequential, check_sequential_flag

    _require_sentence_transformers()
    _transformer_module(model)
    sentences = _check_sentences("sentences", sentences)
    budgets = {
        "rank": rank,
        "ranks": ranks,
        "target_speedup": target_speedup,
        "param_ratio": param_ratio,
        "min_cosine_similarity": min_cosine_similarity,
    }
    budget = _check_budget(budgets)
    allocation_options = _st_allocation_options(allocation_options)  # before any expensive work
    if method not in method_names():
        raise ValueError(f"`method` must be one of {method_names()}, got {method!r}.")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}.")
    distillation = _check_distillation(distill_steps, distill_options)
    if distill_sentences is not None:
        distill_sentences = _check_sentences("distill_sentences", distill_sentences)
        if distillation is None:
            raise ValueError(
                f"`distill_sentences` ({len(distill_sentences)} sentences) is given but `distill_steps` is 0; pass "
                "`distill_steps > 0` to distil on them, or leave `distill_sentences` out."
            )
    dtype, quantize = check_deployment(_transformer_module(model).auto_model, dtype, quantize)
    if heldout_sentences is not None:
        heldout = _check_sentences("heldout_sentences", heldout_sentences)
        calibration = sentences
    elif budget == "min_cosine_similarity":
        calibration, heldout = split_heldout(sentences)
    else:
        calibration, heldout = sentences, []
    if min_cosine_similarity == 1:
        raise ValueError(
            "The budget cannot be met: min_cosine_similarity=1.0 allows no change to the embeddings, and every "
            "compression changes them; pass a value below 1 (e.g. 0.99)."
        )
    if distill_sentences is not None:
        shared = set(distill_sentences) & set(heldout)
        if shared:
            raise ValueError(
                f"`distill_sentences` shares {len(shared)} sentence(s) with the held-out sentences (e.g. "
                f"{next(iter(shared))!r}); the held-out cosine would then measure text the student was trained on. "
                "Remove them from one of the two."
            )
    if budget == "min_cosine_similarity" and len(heldout) < MIN_HELDOUT_SENTENCES:
        source = (
            "`heldout_sentences` has"
            if heldout_sentences is not None
            else f"`sentences` has {len(sentences)}, of which a quarter,"
        )
        raise ValueError(
            f"`min_cosine_similarity` needs at least {MIN_HELDOUT_SENTENCES} held-out sentences for a meaningful "
            f"check; {source} {len(heldout)}. Pass at least {math.ceil(MIN_HELDOUT_SENTENCES / HELDOUT_FRACTION)} "
            f"`sentences` or `heldout_sentences` with {MIN_HELDOUT_SENTENCES} or more."
        )

    new = copy.deepcopy(model)
    new.__class__ = _drone_sentence_transformer_class(type(model))
    new_transformer = list(new._modules.values())[0]
    encoder = new_transformer.auto_model
    if check_sequential_flag(sequential):  # before calibrating (compress_model checks again)
        check_sequential(encoder)
    check_dense_weight(sequential_dense_weight, sequential=sequential, name="sequential_dense_weight")
    modes = {name: module.training for name, module in new.named_modules()}  # the input's, module by module
    new.eval()
    report = allocation_report if allocation_report is not None else {}
    calibration_batches = sentence_batches(new, calibration, batch_size)
    heldout_batches = sentence_batches(new, heldout, batch_size) if heldout else []
    tensors = [_tensor_inputs(b) for b in calibration_batches]
    stats = None
    if method != "svd":
        stats = collect_activation_stats(encoder, tensors, show_progress=show_progress)
    calibration_info = {"data": "unlabeled sentences", "num_samples": len(calibration)}
    refit = (
        {"sequential": True, "calibration_dataloader": tensors, "sequential_dense_weight": sequential_dense_weight}
        if sequential
        else {}
    )
    if budget in ("rank", "ranks"):
        compressed = compress_model(
            encoder, stats, method=method, rank=rank, ranks=ranks, calibration_info=calibration_info, **refit
        )
    else:
        options = dict(allocation_options)
        options.setdefault("show_progress", show_progress)
        # FLOP shares at the length the model embeds (its max_seq_length when shorter than 128 tokens).
        options.setdefault("seq_len", min(128, int(getattr(new, "max_seq_length", None) or 128)))
        if budget == "min_cosine_similarity":
            options["rows_fn"] = sentence_embedding_rows(new)
        chosen = allocate_ranks(
            encoder,
            stats,
            method=method,
            attention=attention,
            target_speedup=target_speedup,
            param_ratio=param_ratio,
            max_accuracy_drop=None if min_cosine_similarity is None else 100.0 * (1.0 - min_cosine_similarity),
            eval_dataloader=heldout_batches if budget == "min_cosine_similarity" else None,
            sequential_dataloader=tensors if sequential and budget == "min_cosine_similarity" else None,
            sequential_dense_weight=sequential_dense_weight,  # refused above without `sequential`
            report=report,
            dtype=dtype,
            quantize=quantize,
            **options,
        )
        if not chosen:
            hint = " (a lower cosine similarity) or add sentences" if budget == "min_cosine_similarity" else ""
            raise ValueError(
                f"The budget cannot be met: no module can be compressed within {budget}={budgets[budget]!r}; "
                f"loosen it{hint}."
            )
        compressed = compress_model(
            encoder, stats, method=method, ranks=chosen, calibration_info=calibration_info, **refit
        )
    head = sentence_embedding_head(new)
    dense_heldout = _heldout_embeddings(encoder, heldout_batches, head) if heldout_batches else None
    if distillation is not None:
        distill_text = calibration if distill_sentences is None else distill_sentences
        report["distillation"] = _distill(
            compressed,
            encoder,
            new,
            calibration_batches if distill_sentences is None else sentence_batches(new, distill_text, batch_size),
            heldout_batches,
            dense_heldout,
            {
                **distillation,
                "batch_size": batch_size,
                "sentences": len(distill_text),
                "data": "the calibration sentences"
                if distill_sentences is None
                else f"{len(distill_text)} sentences given as distill_sentences",
            },
            show_progress,
        )
        if (
            min_cosine_similarity is not None
            and report["distillation"]["heldout_cosine_after"] < min_cosine_similarity
        ):
            logger.warning(
                f"After distillation the held-out mean cosine is {report['distillation']['heldout_cosine_after']:.4f}"
                f", below min_cosine_similarity={min_cosine_similarity} (it was "
                f"{report['distillation']['heldout_cosine_before']:.4f} before); fewer `distill_steps` or a lower "
                "`lr` keep it closer to the dense model."
            )
    prepare_for_deployment(compressed, dtype, quantize)
    if dtype is not None:
        for module in list(new._modules.values())[1:]:  # e.g. a Dense layer, fed the encoder's output
            module.to(dtype)
    if heldout_batches:
        report["heldout_cosine"] = _mean_cosine(dense_heldout, _heldout_embeddings(compressed, heldout_batches, head))
    report.update(calibration_sentences=len(calibration), heldout_sentences=len(heldout))
    _set_encoder(new_transformer, compressed)
    new._model_card_text = None  # the dense model's card describes another model: a new one is generated on save
    new._drone_base_model = _base_model_name(model)
    data = getattr(new, "model_card_data", None)
    if data is not None and hasattr(data, "model_name"):
        base = getattr(data, "base_model", None)
        name = data.model_name or (f"SentenceTransformer based on {base}" if base else "SentenceTransformer")
        data.model_name = f"{name}, compressed with drone_hf ({method})"
    if distillation is not None:
        return new.eval()
    for name, module in new.named_modules():  # a new module (a factor) takes the mode of its closest known parent
        parent = name
        while parent and parent not in modes:
            parent = parent.rpartition(".")[0]
        module.training = modes[parent]
    return new


def _distill(student, teacher, model, batches, heldout_batches, dense_heldout, settings: dict, show_progress) -> dict:
    """Distils `student` from `teacher` (encoders; `model` the `SentenceTransformer` whose modules after the encoder
    make the embeddings, not trained) on `batches` (of the calibration sentences, or of `distill_sentences`); records
    the settings in `student.config.drone_calibration["distillation"]` and returns the report's `distillation`
    entry."""
    head = sentence_embedding_head(model)

    def heldout_cosine():
        if dense_heldout is None:
            return None
        return _mean_cosine(dense_heldout, _heldout_embeddings(student, heldout_batches, head))

    before = heldout_cosine()
    started = time.perf_counter()
    with _frozen(list(model._modules.values())[1:]):
        losses = _distill_encoder(student, teacher, head, batches, settings, show_progress)
    entry = {
        **settings,
        "seconds": time.perf_counter() - started,
        **losses,
        "heldout_cosine_before": before,
        "heldout_cosine_after": heldout_cosine(),
    }
    provenance = {
        "steps": settings["steps"],
        "data": settings["data"],
        "loss": f"{settings['hidden_weight']:g} x last-hidden-state MSE + {settings['cosine_weight']:g} x "
        "(1 - cosine) of the sentence embeddings"
        + (
            f" + {settings['relation_weight']:g} x MSE of their in-batch cosine matrices"
            if settings["relation_weight"]
            else ""
        )
        + ", teacher: the dense model",
        **{key: settings[key] for key in ("lr", "lr_schedule", "batch_size", "dropout", "seed", "balance_factors")},
    }
    student.config.drone_calibration = {**(student.config.drone_calibration or {}), "distillation": provenance}
    return entry


def _base_model_name(model) -> str | None:
    data = getattr(model, "model_card_data", None)
    for name in (getattr(data, "base_model", None), getattr(data, "model_id", None)):
        if name:
            return str(name)
    name = getattr(getattr(list(model._modules.values())[0].auto_model, "config", None), "_name_or_path", None)
    return str(name) if name else None


# --------------------------------------------------------------------------------------------- measurement


def cosine_fidelity(reference, model, sentences: Sequence[str], *, batch_size: int = 32) -> float:
    """Mean cosine similarity between `model.encode(sentences)` and `reference.encode(sentences)` (e.g. compressed
    vs dense), in `[-1, 1]`."""
    sentences = _check_sentences("sentences", sentences)
    a = reference.encode(sentences, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False).float()
    b = model.encode(sentences, batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False).float()
    return float(torch.nn.functional.cosine_similarity(a.cpu(), b.cpu(), dim=-1).mean())


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (1 = positive), ties counted half: the probability that
    a random positive scores above a random negative (the Mann-Whitney statistic), in `[0, 1]`."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    if scores.shape != labels.shape or scores.ndim != 1:
        raise ValueError(f"`scores` and `labels` must be 1-D of one length, got {scores.shape} and {labels.shape}.")
    if not set(np.unique(labels).tolist()) <= {0, 1}:
        raise ValueError(f"`labels` must be 0 or 1, got values {sorted(set(labels.tolist()))[:5]}.")
    positives, negatives = int((labels == 1).sum()), int((labels == 0).sum())
    if positives == 0 or negatives == 0:
        raise ValueError(
            f"`labels` need both classes for a ROC-AUC, got {positives} positives and {negatives} negatives."
        )
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks over ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return float((ranks[labels == 1].sum() - positives * (positives + 1) / 2) / (positives * negatives))


def pair_auc(model, first: Sequence[str], second: Sequence[str], labels: Sequence[int], *, batch_size: int = 32):
    """ROC-AUC (in `[0, 1]`) of the cosine similarity of `model`'s embeddings of `first[i]` and `second[i]` for the
    binary `labels` (1 = similar, e.g. MRPC paraphrase pairs)."""
    a = model.encode(list(first), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False).float()
    b = model.encode(list(second), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False).float()
    cosine = torch.nn.functional.cosine_similarity(a.cpu(), b.cpu(), dim=-1).numpy()
    return roc_auc(cosine, labels)


def measure_encode_latency(
    models: Mapping[str, Any],
    sentences: Sequence[str],
    *,
    batch_size: int = 32,
    repeats: int = 5,
    warmup: int = 1,
    record: dict | None = None,
) -> dict[str, float]:
    """Median seconds of `model.encode(sentences, batch_size=batch_size)` per model, timed round-robin in this process
    (one call of each model per round, in a shuffled order) so that drift in machine load affects all models alike;
    quote the ratio against the dense model timed in the same call. `record` receives every round's wall and CPU
    time (`drone_hf.profiling.time_round_robin`), for `drone_hf.speed.compare_recorded`."""
    from .profiling import time_round_robin

    sentences = _check_sentences("sentences", sentences)

    def encode(model):  # encode() returns host arrays: it has finished when it returns
        return lambda: model.encode(sentences, batch_size=batch_size, show_progress_bar=False)

    calls = {name: encode(model) for name, model in models.items()}
    return time_round_robin(calls, repeats=repeats, warmup=warmup, record=record, show_progress=True)


# ------------------------------------------------------------------------------------------ model card and Hub


def _fix_card(folder: Path, *, base_model: str | None = None, model_id: str | None = None, **card_kwargs) -> None:
    """Adds (or refreshes) the DRONE section of `folder/README.md` and restores the sentence-transformers metadata
    (`library_name`, `pipeline_tag`, tags) and the `import drone_hf` line in its usage snippet."""
    from huggingface_hub import ModelCard

    from .model_card import _atomic_write, create_or_update_model_card

    tags = list(dict.fromkeys([*_ST_TAGS, *card_kwargs.pop("tags", ())]))
    card = create_or_update_model_card(folder, base_model=base_model, model_id=model_id, tags=tags, **card_kwargs)
    card = ModelCard(str(card))
    card.data.library_name = "sentence-transformers"
    card.data.pipeline_tag = "sentence-similarity"
    if "import drone_hf" not in card.text.split("<!-- drone_hf:begin")[0]:
        card.text = re.sub(
            r"^from sentence_transformers import SentenceTransformer$",
            "import drone_hf  # registers the compressed model type (drone_hf: pip install -e . in a clone)\n"
            "from sentence_transformers import SentenceTransformer",
            card.text,
            count=1,
            flags=re.MULTILINE,
        )
    _atomic_write(folder / "README.md", str(card))


def _save_with_card(model, folder: Path, *, model_id: str | None, card_kwargs: Mapping | None, st_card: bool):
    """Saves `model` into `folder` and writes its card: the sentence-transformers card plus the DRONE section, or,
    with `st_card=False` (an existing README.md in `folder` to keep), only the DRONE section merged into it."""
    card_kwargs = dict(card_kwargs or {})
    base_model = card_kwargs.pop("base_model", None) or getattr(model, "_drone_base_model", None)
    model.save(str(folder), model_name=model_id, create_model_card=st_card)
    try:
        _fix_card(folder, base_model=base_model, model_id=model_id, **card_kwargs)
    except (ImportError, OSError, ValueError, TypeError) as error:
        logger.warning(f"Saved {folder} without the DRONE section of its model card: {error}")


def push_sentence_transformer_to_hub(
    model,
    repo_id: str,
    *,
    private: bool | None = True,
    commit_message: str | None = None,
    token: str | bool | None = None,
    trust_remote_code_export: bool = False,
    card_kwargs: Mapping[str, Any] | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_description: str | None = None,
    tags: Sequence[str] | str | None = None,
    replace_model_card: bool = False,
) -> str:
    r"""
    Uploads a compressed `SentenceTransformer` in one commit: the whole sentence-transformers folder (`modules.json`,
    pooling, tokenizer, the DRONE checkpoint in its root) and its model card. [`push_compressed_to_hub`] calls this
    for a `SentenceTransformer`, and so does the compressed model's `push_to_hub`.

    An existing `README.md` in the repo is kept and the DRONE section merged into it (unless `replace_model_card`);
    otherwise the card is the sentence-transformers card plus the DRONE section. Stale weight shards (and, without
    `trust_remote_code_export`, modelling files) in the repo are deleted in the same commit.

    Args:
        model (`SentenceTransformer`): From [`compress_sentence_transformer`], or reloaded from its folder.
        repo_id, private, commit_message, token, trust_remote_code_export, card_kwargs, revision, create_pr,
        commit_description, tags: As in [`push_compressed_to_hub`].
        replace_model_card (`bool`, *optional*, defaults to `False`): Write a new card even if the repo has one.

    Returns:
        `str`: the URL of the commit (of the pull request with `create_pr=True`).
    """
    from .hub import _api, _download_readme, _remote_code_export, _upload, reaching_the_hub

    transformer = _transformer_module(model)
    encoder = transformer.auto_model
    if not str(getattr(encoder.config, "model_type", "")).startswith("drone_"):
        raise TypeError(
            "`model` must be a compressed SentenceTransformer (from compress_sentence_transformer), got one whose "
            f"encoder is {type(encoder).__name__} (model_type {encoder.config.model_type!r})."
        )
    api = _api()
    with reaching_the_hub(repo_id):
        repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    card_kwargs = dict(card_kwargs or {})
    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    card_kwargs["tags"] = list(dict.fromkeys([*card_kwargs.get("tags", ()), *(encoder.model_tags or ()), *extra_tags]))
    with tempfile.TemporaryDirectory() as tmp, reaching_the_hub(repo_id):
        folder = Path(tmp) / repo_id.split("/")[-1]
        folder.mkdir()
        remote_readme = None if replace_model_card else _download_readme(api, repo_id, token, revision)
        if remote_readme is not None:
            shutil.copyfile(remote_readme, folder / "README.md")
        with _remote_code_export(encoder, trust_remote_code_export):
            _save_with_card(model, folder, model_id=repo_id, card_kwargs=card_kwargs, st_card=remote_readme is None)
        return _upload(
            api,
            folder,
            repo_id,
            token=token,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or "Upload DRONE-compressed SentenceTransformer",
            commit_description=commit_description,
            trust_remote_code_export=trust_remote_code_export,
            stale=("onnx/*", "openvino/*"),  # exports of the dense model would load instead of the compressed one
        )


_ST_FILES = (
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def _owned_sentence_transformer_files(folder: Path) -> list[str]:
    """The files and module folders of the sentence-transformers model saved in `folder` (from its `modules.json`), and
    its tokenizer's: a new save removes those it does not write again (e.g. the `2_Dense` folder or the `vocab.txt` of
    an earlier model)."""
    import json

    from .cli_checks import TOKENIZER_FILES

    owned = [*_ST_FILES, *TOKENIZER_FILES]  # the Transformer module saves its tokenizer in the root folder
    try:
        modules = json.loads((folder / "modules.json").read_text())
        owned += [entry["path"].split("/")[0] for entry in modules if entry.get("path")]
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        pass
    return [name for name in owned if name and name not in (".", "..")]


_CLASSES: dict[type, type] = {}


def _drone_sentence_transformer_class(base: type) -> type:
    """`DroneSentenceTransformer`: `base` (a `SentenceTransformer` class) whose saved model card also has the DRONE
    section and whose `push_to_hub` goes through [`push_compressed_to_hub`]. Made on first use, so that this module
    does not import sentence-transformers."""
    if getattr(base, "_is_drone_sentence_transformer", False):
        return base
    if base in _CLASSES:
        return _CLASSES[base]

    def _create_model_card(self, path, model_name=None, train_datasets="deprecated"):
        base._create_model_card(self, path, model_name, train_datasets)
        if (Path(path) / "README.md").is_file():
            try:
                _fix_card(Path(path), base_model=getattr(self, "_drone_base_model", None))
            except (ImportError, OSError, ValueError, TypeError) as error:
                logger.warning(f"Saved {path} without the DRONE section of its model card: {error}")

    def save(
        self,
        path: str,
        model_name: str | None = None,
        create_model_card: bool = True,
        train_datasets: list[str] | None = None,
        safe_serialization: bool = True,
    ) -> None:
        """`SentenceTransformer.save`, made crash-safe: the whole folder (encoder, tokenizer, `modules.json`, pooling
        and other module folders, card) is written aside and moved into `path` at once, `config.json` last, so a save
        killed half way over an existing model leaves the old model or the new one, never a mix
        (`drone_hf.saving.atomic_save`)."""
        from .saving import atomic_save

        with atomic_save(path, owned_files=_owned_sentence_transformer_files, name=Path(path).name) as staging:
            base.save(
                self,
                str(staging),
                model_name=model_name,
                create_model_card=create_model_card,
                train_datasets=train_datasets,
                safe_serialization=safe_serialization,
            )

    def push_to_hub(
        self,
        repo_id: str,
        token: str | None = None,
        private: bool | None = None,
        safe_serialization: bool = True,
        commit_message: str | None = None,
        local_model_path: str | None = None,
        exist_ok: bool = False,
        replace_model_card: bool = False,
        train_datasets: list[str] | None = None,
        revision: str | None = None,
        create_pr: bool = False,
        **kwargs,
    ) -> str:
        """Uploads the compressed model with [`drone_hf.push_compressed_to_hub`] (same card as `save`); returns the
        commit URL. `local_model_path` uploads that folder as it is (sentence-transformers' own path);
        `safe_serialization`, `exist_ok` and `train_datasets` are accepted for compatibility (the weights are always
        safetensors and an existing repo is updated)."""
        if local_model_path:
            return base.push_to_hub(
                self,
                repo_id,
                token=token,
                private=private,
                commit_message=commit_message,
                local_model_path=local_model_path,
                exist_ok=True,
                revision=revision,
                create_pr=create_pr,
            )
        return push_sentence_transformer_to_hub(
            self,
            repo_id,
            token=token,
            private=private,
            commit_message=commit_message,
            revision=revision,
            create_pr=create_pr,
            replace_model_card=replace_model_card,
            **kwargs,
        )

    cls = type(
        "DroneSentenceTransformer",
        (base,),
        {
            "__module__": __name__,
            "__doc__": "A `SentenceTransformer` whose encoder was compressed by "
            "`drone_hf.compress_sentence_transformer` (saved cards carry the DRONE section; `push_to_hub` uses "
            "`drone_hf.push_compressed_to_hub`).",
            "_is_drone_sentence_transformer": True,
            "_create_model_card": _create_model_card,
            "push_to_hub": push_to_hub,
            "save": save,  # `save_pretrained` calls it
        },
    )
    _CLASSES[base] = cls
    return cls


def __getattr__(name: str):
    if name == "DroneSentenceTransformer":  # pickling and `from ... import` of the class made on demand
        return _drone_sentence_transformer_class(_require_sentence_transformers().SentenceTransformer)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "MIN_HELDOUT_SENTENCES",
    "compress_sentence_transformer",
    "cosine_fidelity",
    "is_sentence_transformer",
    "measure_encode_latency",
    "pair_auc",
    "push_sentence_transformer_to_hub",
    "roc_auc",
    "sentence_batches",
    "sentence_embedding_rows",
    "split_heldout",
]
