"""`compress_model`: from a fine-tuned encoder (any supported family and head) and its statistics to a new, factored
model. Orchestration only: the method registry factors, `structure` rewrites, `allocation` chooses ranks."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from numbers import Real

import torch
from torch import nn
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import logging
from transformers.utils.logging import tqdm

from .allocation import breakeven_rank
from .architecture import base_model_type
from .candidates import decompose_linear
from .configuration_drone import drone_config_class
from .deployment import check_deployment, prepare_for_deployment
from .embedding import DroneEmbedding
from .methods import DEFAULT_METHOD, get_method, resolve_method
from .model_state import check_materialized, copy_training_modes
from .modeling_drone import drone_model_class
from .projective import choose_kj, embedding_parameter_count, projective_clustering, projective_clustering_cost
from .sequential import (
    check_dense_weight,
    check_sequential,
    check_sequential_flag,
    check_sequential_method,
    refit_sequential,
)
from .stats import check_stats, split_stats
from .structure import attention_geometry, qk_linear_names, validate_attention_ranks, validate_drone_ranks
from .targets import (
    as_int,
    attention_block_names,
    check_supported_model,
    factored_modules,
    resolve_ranks,
    resolve_target_modules,
    word_embedding_name,
)


logger = logging.get_logger(__name__)
_CONFIG_KEYS_NOT_COPIED = ("model_type", "architectures", "transformers_version", "auto_map", "drone_method")


def _explicit_ranks(model, targets, shapes, *, rank, ranks) -> dict[str, int]:
    if rank is None and ranks is None:
        raise ValueError(
            "Pass one of `rank` (all targets), `ranks` (per module), or a budget: `param_ratio`, `target_speedup` or "
            "`max_accuracy_drop`."
        )
    rank = as_int(rank)
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
        raise TypeError(f"`rank` must be an int, got {rank!r} ({type(rank).__name__}).")
    chosen = resolve_ranks(targets, rank=rank, ranks=ranks, model=model)
    validate_drone_ranks(model, chosen)
    slower = [name for name, k in chosen.items() if k > breakeven_rank(*shapes[name])]
    if slower and len(slower) == len(chosen):
        name = max(chosen, key=lambda n: breakeven_rank(*shapes[n]))
        out_f, in_f = shapes[name]
        raise ValueError(
            f"Every selected module would stay dense: each rank is above its module's break-even rank, where a "
            f"factored pair stops being cheaper (k*(in+out) >= in*out). The largest break-even rank here is "
            f"{breakeven_rank(out_f, in_f)} (`{name}`, {out_f}x{in_f}); pass ranks at or below each module's "
            "break-even rank."
        )
    if slower:
        warnings.warn(
            f"Leaving {len(slower)} modules dense because their rank would not reduce their cost "
            f"(k*(in+out) >= in*out, above the break-even rank): {slower}.",
            UserWarning,
            stacklevel=3,
        )
    return {name: k for name, k in chosen.items() if name not in slower}


def _resolve_attention(model, ranks, attention_rank, attention_ranks) -> tuple[dict | None, dict[str, int]]:
    """Moves attention-block keys of `ranks` to the attention ranks and resolves `attention_rank(s)`."""
    blocks = attention_block_names(model)
    if not blocks and (attention_rank is not None or attention_ranks):
        validate_attention_ranks(model, {"attention_rank": attention_rank})  # raises the family's reason
    linear_ranks = None if ranks is None else {k: v for k, v in ranks.items() if k not in blocks}
    from_ranks = {k: v for k, v in (ranks or {}).items() if k in blocks}
    attention_rank = as_int(attention_rank)
    if attention_rank is not None and (isinstance(attention_rank, bool) or not isinstance(attention_rank, int)):
        raise TypeError(f"`attention_rank` must be an int, got {attention_rank!r} ({type(attention_rank).__name__}).")
    resolved = resolve_ranks(blocks, rank=attention_rank, ranks=attention_ranks, argument="attention_ranks")
    resolved.update(from_ranks)
    validate_attention_ranks(model, resolved)
    return (linear_ranks or None) if ranks is not None else None, resolved


_COMPRESS_ARGUMENTS = (
    "method",
    "rank",
    "ranks",
    "param_ratio",
    "attention_rank",
    "attention_ranks",
    "target_modules",
    "max_accuracy_drop",
    "target_speedup",
    "eval_dataloader",
    "rank_grid",
    "attention",
    "allocation_report",
    "report",
    "bias_correction",
    "rank_multiple",
)
_ALLOCATION_OPTIONS = (
    "metric_fn",
    "screening_samples",
    "screening_dtype",
    "safety_margin",
    "refine_steps",
    "search",
    "seq_len",
    "show_progress",
    "rows_fn",
    "kernel_costs",
    "sequential_checks",
)


def _allocation_options(options: Mapping | None) -> dict:
    if options is not None and not isinstance(options, Mapping):
        raise TypeError(
            f"`allocation_options` must be a mapping of option name -> value (allowed: {list(_ALLOCATION_OPTIONS)}), "
            f"got {type(options).__name__} {options!r}."
        )
    options = dict(options or {})
    unknown = sorted(set(options) - set(_ALLOCATION_OPTIONS))
    if unknown:
        own = [key for key in unknown if key in _COMPRESS_ARGUMENTS]
        hint = f" {own}: arguments of compress_model itself, pass them there." if own else ""
        raise ValueError(f"Unknown `allocation_options` {unknown}; allowed: {list(_ALLOCATION_OPTIONS)}.{hint}")
    return options


def _check_ranks_mapping(name: str, value) -> None:
    if value is None:
        return
    if not isinstance(value, Mapping):
        raise TypeError(
            f"`{name}` must be a mapping of module name, role or 're:<regex>' -> rank, got {type(value).__name__} "
            f"{value!r}."
        )
    if not value:
        raise ValueError(f"`{name}` is empty: name at least one module (or pass None and another budget).")


def compress_model(
    model: nn.Module,
    stats: Mapping[str, torch.Tensor] | None,
    settings=None,
    *,
    method: str | None = None,
    rank: int | None = None,
    ranks: Mapping[str, int] | None = None,
    param_ratio: float | None = None,
    attention_rank: int | None = None,
    attention_ranks: Mapping[str, int] | None = None,
    target_modules: Sequence[str] | str | None = None,
    max_accuracy_drop: float | None = None,
    target_speedup: float | None = None,
    eval_dataloader: Iterable[Mapping[str, torch.Tensor]] | None = None,
    rank_grid: Sequence[int] | None = None,
    attention: bool = True,
    allocation_report: dict | None = None,
    allocation_options: Mapping | None = None,
    bias_correction: bool | None = None,
    rank_multiple: int = 8,
    calibration_info: Mapping | None = None,
    embedding: tuple[int, int] | float | None = None,
    embedding_options: Mapping | None = None,
    dtype: torch.dtype | str | None = None,
    quantize: str | None = None,
    sequential: bool = False,
    calibration_dataloader: Iterable[Mapping[str, torch.Tensor]] | None = None,
    sequential_dense_weight: float = 0.0,
    show_progress: bool = False,
):
    r"""
    Factors the encoder of a fine-tuned model and returns a **new** DRONE model of the same family and head (e.g.
    [`DroneBertForSequenceClassification`], `DroneRobertaForTokenClassification`, `DroneMPNetModel`); `model` is not
    modified.

    Args:
        model (`PreTrainedModel`): The fine-tuned model: any head of a supported family (see
            `drone_hf.architecture.supported_model_types()`), or a DRONE model whose dense layers are factored further.
        stats (`dict[str, Tensor]`, *optional*): Output of [`collect_activation_stats`]; required by data-aware
            methods (`"drone"`, `"drone-bc"`, `"drone-act"`), ignored by `"svd"`.
        settings ([`DroneCompressionArguments`], *optional*): The budget, method, targets and deployment form as one
            settings object (the same dataclass the Trainer callback takes); keywords given explicitly override it.
        method (`str`, *optional*, defaults to `"drone"`): A registered method (`drone_hf.methods`): `"drone"` (the
            paper's closed form), `"drone-bc"` (on centred statistics, with the optimal bias shift), `"drone-act"`
            (the FFN's first linear weighted by its activation's slope, docs/methods.md §1d) or `"svd"`.
        rank (`int`, *optional*): One rank for every target linear.
        ranks (`Mapping[str, int]`, *optional*): Full module name (e.g. `"bert.encoder.layer.0.attention.self.query"`),
            role (e.g. `"intermediate"`) or `"re:<regex>"` -> rank. Exact names win over patterns (roles and regexes),
            the first matching pattern wins over `rank`; targets without a rank stay dense. Exact names of attention
            blocks (`"...attention.self"` in BERT) set per-head query/key ranks, as in `attention_ranks`.
        param_ratio (`float`, *optional*): Fraction of the candidates' weight parameters to keep; ranks are allocated
            by [`allocate_ranks`] from the closed form's residual energy (no evaluations).
        attention_rank (`int`, *optional*): DRONE attention (docs/methods.md §1a): factor every head's `W_Q W_K^T`
            to this per-head query/key width (`< d_h`). Refused, with the reason, for families where it does not apply
            (rotary position embeddings in ModernBERT, relative-position projections in DeBERTa-v2).
        attention_ranks (`Mapping[str, int]`, *optional*): Attention block name or `"re:<regex>"` -> per-head rank,
            with the same precedence as `ranks`.
        target_modules (`Sequence[str]` or `str`, *optional*): Roles (`query, key, value, attention_output,
            intermediate, output`; `qkv` for a fused projection), full names or `re:` regexes. Defaults to every
            encoder linear.
        max_accuracy_drop (`float`, *optional*): Budget in metric points on `eval_dataloader`; ranks (linears and,
            with `attention=True`, attention blocks) are chosen by [`allocate_ranks`].
        target_speedup (`float`, *optional*): Multiply-add reduction target; ranks chosen by [`allocate_ranks`]
            from the closed form's residual energy, without evaluations.
        eval_dataloader (`Iterable[dict]`, *optional*): Held-out batches with labels, carved from the training
            split (never the dev split you report), for `max_accuracy_drop`.
        rank_grid (`Sequence[int]`, *optional*), attention (`bool`, *optional*, defaults to `True`),
        allocation_report (`dict`, *optional*): Passed to [`allocate_ranks`] as `report`.
        allocation_options (`Mapping`, *optional*): Further keyword arguments of [`allocate_ranks`] (`metric_fn`,
            `screening_samples`, `screening_dtype`, `safety_margin`, `refine_steps`, `search`, `seq_len`,
            `show_progress`).
        bias_correction (`bool`, *optional*): drone_hf 0.1's switch: `True` selects `method="drone-bc"`.
        rank_multiple (`int`, *optional*, defaults to 8): Granularity of the ranks budgets choose.
        calibration_info (`Mapping`, *optional*): Provenance (dataset, split, samples, seed) saved in the config.
        embedding (`tuple[int, int]` or `float`, *optional*): Projective clustering of the word embedding
            (docs/methods.md §3) into a [`DroneEmbedding`]: `(k, j)` (`k` subspaces of dimension `j`; `k = 1` is
            truncated SVD), or a parameter ratio in `(0, 1)` of the embedding to keep (`0.6` is -40%), for which the
            `(k, j)` of lowest cost over `embedding_options["k_grid"]` is chosen ([`choose_kj`]). Data-free, so it
            works with any method, alone or with any linear/attention budget. The chosen `(k, j)`, its cost and the
            SVD cost at the same size are recorded in `config.drone_calibration["embedding"]`.
        embedding_options (`Mapping`, *optional*): `module` (default: the family's word embedding, e.g.
            `"bert.embeddings.word_embeddings"`), `k_grid` (default `(1, 2, 4, 8)`, ratio only), `n_init` (2),
            `max_iter` (15), `seed` (0) and `weights` (`(vocab_size,)` row weights, e.g.
            `1 + torch.log1p(token_frequencies(loader, vocab_size))`).
        dtype (`torch.dtype` or `str`, *optional*): Deployment dtype, `float32`, `bfloat16` or `float16`. Statistics
            and factors are computed as always (float64/float32); the result is cast once. `save_pretrained` writes
            it in that dtype with `"dtype"` in `config.json`, and `from_pretrained` (whose default is `dtype="auto"`
            in transformers 5) reloads it in that dtype. A budget (`target_speedup`, `max_accuracy_drop`,
            `param_ratio`) then keeps only ranks measured faster than the dense layer in this dtype on this machine
            and splits `max_accuracy_drop` by measured time shares, whose joint checks score the model cast to this
            dtype (see [`allocate_ranks`]).
        quantize (`str`, *optional*): `"int8"`: dynamic int8 of every encoder linear (dense and factored halves) and
            narrowed query/key projection ([`quantize_model`]), for CPU inference; listed in
            `config.drone_quantization`, saved as int8 weights + float32 per-channel scales. Budgets are measured for
            int8 kernels, as for `dtype`, and `max_accuracy_drop` is joint-checked on the int8 model. Needs a CPU
            model and float32.
        sequential (`bool`, *optional*, defaults to `False`): Refit the factored linears layer after layer on the
            inputs the compressed model itself feeds them (docs/methods.md §1c, [`refit_sequential`]): each layer
            then also corrects the error of the layers before it. Same ranks, speed and format; needs
            `calibration_dataloader`. With `max_accuracy_drop` (fast search) the joint checks judge refitted models
            and search further ranks (`allocation_options={"sequential_checks": 4}`).
        calibration_dataloader (`Iterable[dict]`, *optional*): The calibration batches (token ids, attention masks)
            for `sequential=True`, e.g. those `stats` were collected on.
        sequential_dense_weight (`float`, *optional*, defaults to 0): With `sequential=True`, the anchored refit: the
            dense model's own inputs join each layer's least squares with this weight (docs/methods.md §1c), which
            bounds the large weights the plain refit (0) can put on directions the compressed inputs barely excite;
            a large value tends to `method="drone-bc"`. Recorded in `config.drone_calibration`.
        show_progress (`bool`, *optional*, defaults to `False`): Progress bars for the allocation and the
            factorisation (`transformers.utils.logging.tqdm`: `disable_progress_bar()` hides them).

    Returns:
        The compressed model (a `DroneModelMixin` subclass of `model`'s class), on the device of `model`, in `dtype`
        (default: the dtype of `model`), with int8 modules if `quantize`. Linears whose rank would not reduce their
        cost (`k (in + out) >= in * out`) are left dense with a warning.

    Raises:
        `ValueError`: for an unsupported family, a model on the meta device, an unknown `method` or module, a module
            that is not a compression target (the pooler/classifier head) or is already factored, a rank outside
            `[1, min(in, out))` (attention: `[1, d_h)`), statistics missing, of the wrong shape, not symmetric
            positive semi-definite, or collected on another model (see [`ActivationStats`]), no budget, or a
            `dtype`/`quantize` outside the allowed values (or `quantize` with a GPU model).

    Example:

    ```py
    >>> stats = drone_hf.collect_activation_stats(model, loader)  # doctest: +SKIP
    >>> small = drone_hf.compress_model(model, stats, rank=96, attention_rank=16)  # doctest: +SKIP
    >>> small.save_pretrained("minilm-sst2-drone")  # doctest: +SKIP
    ```
    """
    check_supported_model(model)
    check_materialized(model, "compress")
    dtype, quantize = check_deployment(model, dtype, quantize)  # before any expensive work
    if settings is not None:
        from .arguments import DroneCompressionArguments

        if not isinstance(settings, DroneCompressionArguments):
            raise TypeError(f"`settings` must be a DroneCompressionArguments, got {type(settings).__name__}.")
        given = {
            "method": method,
            "rank": rank,
            "ranks": ranks,
            "param_ratio": param_ratio,
            "attention_rank": attention_rank,
            "target_modules": target_modules,
            "max_accuracy_drop": max_accuracy_drop,
            "target_speedup": target_speedup,
            "bias_correction": bias_correction,
            "allocation_options": allocation_options,
        }
        merged = {**settings.compress_kwargs(), **{k: v for k, v in given.items() if v is not None}}
        for key in ("attention",):
            merged.setdefault(key, attention)
        # `sequential` and its weight default to off, so a keyword turns them on and the settings cannot be undone
        sequential = sequential or merged.pop("sequential", False)
        sequential_dense_weight = sequential_dense_weight or merged.pop("sequential_dense_weight", 0.0)
        return compress_model(
            model,
            stats,
            eval_dataloader=eval_dataloader,
            rank_grid=rank_grid,
            allocation_report=allocation_report,
            rank_multiple=rank_multiple,
            calibration_info=calibration_info,
            embedding=embedding,
            embedding_options=embedding_options,
            attention_ranks=attention_ranks,
            dtype=dtype if dtype is not None else settings.dtype,
            quantize=quantize if quantize is not None else settings.quantize,
            sequential=sequential,
            calibration_dataloader=calibration_dataloader,
            sequential_dense_weight=sequential_dense_weight,
            show_progress=show_progress,
            **merged,
        )
    method = resolve_method(DEFAULT_METHOD if method is None else method, bias_correction)
    factorizer = get_method(method)
    _check_ranks_mapping("ranks", ranks)
    _check_ranks_mapping("attention_ranks", attention_ranks)
    if calibration_info is not None and not isinstance(calibration_info, Mapping):
        raise TypeError(
            "`calibration_info` must be a mapping of provenance fields (e.g. {'dataset': 'glue/sst2', 'split': "
            f"'train', 'num_samples': 512}}), got {type(calibration_info).__name__} {calibration_info!r}."
        )
    embedding_args = _check_embedding_args(model, embedding, embedding_options)  # before any expensive work
    if check_sequential_flag(sequential) and calibration_dataloader is None:
        raise ValueError("`sequential=True` needs `calibration_dataloader` (the calibration batches to refit on).")
    if sequential:
        check_sequential(model)
        check_sequential_method(factorizer)
    sequential_dense_weight = check_dense_weight(
        sequential_dense_weight, sequential=sequential, name="sequential_dense_weight"
    )
    if calibration_dataloader is not None and not sequential:
        logger.warning("`calibration_dataloader` is only used with `sequential=True`; ignored.")
    decompositions = {}  # filled by a budget's allocation and reused to factor the ranks it chose
    if max_accuracy_drop is not None or target_speedup is not None or param_ratio is not None:
        explicit = {"rank": rank, "ranks": ranks, "attention_rank": attention_rank, "attention_ranks": attention_ranks}
        clashing = [key for key, value in explicit.items() if value is not None]
        budgets = [
            k
            for k, v in (
                ("max_accuracy_drop", max_accuracy_drop),
                ("target_speedup", target_speedup),
                ("param_ratio", param_ratio),
            )
            if v is not None
        ]
        if clashing:
            raise ValueError(f"A budget ({budgets[0]}) cannot be combined with {clashing}; pass one budget.")
        from .allocation import allocate_ranks

        ranks = allocate_ranks(
            model,
            stats,
            eval_dataloader=eval_dataloader,
            max_accuracy_drop=max_accuracy_drop,
            target_speedup=target_speedup,
            param_ratio=param_ratio,
            rank_grid=rank_grid,
            method=method,
            attention=attention,
            target_modules=target_modules,
            rank_multiple=rank_multiple,
            report=allocation_report,
            dtype=dtype,
            quantize=quantize,
            # only the accuracy budget's joint checks refit; the closed-form budgets would warn that it is unused
            sequential_dataloader=calibration_dataloader if sequential and max_accuracy_drop is not None else None,
            sequential_dense_weight=sequential_dense_weight,
            decompositions=decompositions,
            **{"show_progress": show_progress, **_allocation_options(allocation_options)},
        )
        if not ranks:
            value = {"max_accuracy_drop": max_accuracy_drop, "target_speedup": target_speedup}.get(budgets[0])
            value = param_ratio if value is None else value
            raise ValueError(
                f"The budget cannot be met: no module can be compressed within {budgets[0]}={value}; loosen it."
            )
    else:
        given = [
            key
            for key, value in (
                ("eval_dataloader", eval_dataloader),
                ("rank_grid", rank_grid),
                ("allocation_options", allocation_options),
            )
            if value is not None
        ]
        if given:
            logger.warning(
                f"{given} only apply to budgets that allocate ranks (`max_accuracy_drop`, `target_speedup`, "
                "`param_ratio`); ignored with explicit ranks."
            )
    ranks, chosen_attention = _resolve_attention(model, ranks, attention_rank, attention_ranks)
    # The query/key of a DRONE-factored attention block are replaced as a pair; they are no longer linear targets.
    replaced_qk = {name for block in chosen_attention for name in qk_linear_names(model, block)}
    clash = sorted(replaced_qk & set(ranks or {}))
    if clash:
        raise ValueError(f"{clash} have a linear rank but their attention block gets an attention rank; pass one.")
    targets = [name for name in resolve_target_modules(model, target_modules) if name not in replaced_qk]
    shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in targets}
    queries = {block: qk_linear_names(model, block)[0] for block in chosen_attention}
    all_shapes = {**shapes, **{q: tuple(model.get_submodule(q).weight.shape) for q in queries.values()}}
    no_linear_budget = rank is None and ranks is None
    chosen = (
        {}
        if no_linear_budget and (chosen_attention or embedding_args)
        else _explicit_ranks(model, targets, shapes, rank=rank, ranks=ranks)
    )
    if not chosen and not chosen_attention and not embedding_args:
        done = factored_modules(model)
        if not targets and done:
            raise ValueError(
                f"Every encoder linear of this model is already factored ({len(done)} modules, e.g. `{done[0]}`); a "
                "factored layer cannot be factored again. Compress the original dense model at the ranks you want."
            )
        raise ValueError("Every selected module would stay dense at these ranks; nothing to compress.")
    # Only the modules actually factored need statistics (the embedding clustering needs none).
    needs_stats = factorizer.data_aware and (chosen or queries)
    needed = list(chosen) + list(queries.values())
    checked = check_stats(stats, needed, all_shapes, model=model) if needs_stats else {}
    with tqdm(total=len(chosen) + len(chosen_attention), desc="Factorising", disable=not show_progress) as bar:
        factors, attention_factors = {}, {}
        for name, k in chosen.items():
            factors[name] = _factor_linear(model, factorizer, name, checked.get(name), k, decompositions.get(name))
            bar.update(1)
        for block, k in chosen_attention.items():
            attention_factors[block] = _factor_attention(model, factorizer, block, checked.get(queries[block]), k)
            bar.update(1)
    provenance = dict(calibration_info or {})
    if sequential:
        provenance["sequential_refit"] = True
        if sequential_dense_weight:
            provenance["sequential_dense_weight"] = sequential_dense_weight
    if checked:
        provenance.setdefault("num_tokens", int(split_stats(next(iter(checked.values())))[2]))
    embedding_factors = None
    if embedding_args:
        spec, tensors, provenance["embedding"] = _factor_embedding(*embedding_args)
        embedding_factors = (spec, tensors)
    compressed = _build_compressed(
        model,
        chosen,
        factors,
        chosen_attention,
        attention_factors,
        method,
        provenance or None,
        embedding=embedding_factors,
    )
    if sequential:
        refit_sequential(
            model,
            compressed,
            calibration_dataloader,
            dense_weight=sequential_dense_weight,
            show_progress=show_progress,
        )
    return prepare_for_deployment(compressed, dtype, quantize)


def _factor_linear(model, factorizer, name: str, stats: torch.Tensor | None, rank: int, decomposition=None):
    """`(down, up, bias)` of one linear by the registered method (from `decomposition` when the allocation already
    computed it, from the same weights and statistics)."""
    if decomposition is None:
        decomposition = decompose_linear(model, factorizer, name, stats)
    return decomposition.factors(rank)


_EMBEDDING_OPTIONS = {
    "module": None,  # the family's word embedding
    "k_grid": (1, 2, 4, 8),
    "n_init": 2,
    "max_iter": 15,
    "seed": 0,
    "weights": None,
}


def _check_embedding_args(model, embedding, options) -> tuple | None:
    """Validates `embedding`/`embedding_options` (cheap) and returns what [`_factor_embedding`] needs, or None."""
    if embedding is None:
        if options is not None:
            raise ValueError("`embedding_options` was given without `embedding`; pass `embedding=(k, j)` or a ratio.")
        return None
    options = dict(options or {})
    unknown = sorted(set(options) - set(_EMBEDDING_OPTIONS))
    if unknown:
        raise ValueError(f"Unknown `embedding_options` keys {unknown}; allowed: {sorted(_EMBEDDING_OPTIONS)}.")
    options = {**_EMBEDDING_OPTIONS, **options}
    if options["module"] is None:
        options["module"] = word_embedding_name(model)
    name = options["module"]
    layer = dict(model.named_modules()).get(name) if isinstance(name, str) else None
    if isinstance(layer, DroneEmbedding):
        raise ValueError(
            f"`{name}` is already a DroneEmbedding (k={layer.k}, j={layer.j}); it cannot be re-clustered."
        )
    if not isinstance(layer, nn.Embedding):
        raise ValueError(f"`embedding_options['module']` must name an nn.Embedding of `model`, got {name!r}.")
    n, d = layer.weight.shape
    if isinstance(embedding, (tuple, list)):
        if len(embedding) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in embedding):
            raise ValueError(
                f"`embedding` must be a (k, j) pair of ints or a float ratio in (0, 1), got {embedding!r}."
            )
        k, j = embedding
        if not 1 <= k <= n:
            raise ValueError(f"`embedding` k must be in [1, {n}] (at most the vocabulary size), got k={k}.")
        if not 1 <= j < d:
            raise ValueError(f"`embedding` j must be in [1, {d - 1}] (below the embedding width {d}), got j={j}.")
        embedding = (k, j)
    elif isinstance(embedding, bool) or not isinstance(embedding, Real) or not 0 < embedding < 1:
        raise ValueError(f"`embedding` must be a (k, j) pair of ints or a float ratio in (0, 1), got {embedding!r}.")
    elif embedding * n * d < n + d:
        raise ValueError(
            f"`embedding`={embedding} is too small for a {n}x{d} embedding: even k=1, j=1 needs a ratio >= "
            f"{(n + d) / (n * d):.3g}."
        )
    return model, name, layer, embedding, options


def _factor_embedding(model, name: str, layer: nn.Embedding, embedding, options) -> tuple[dict, tuple, dict]:
    """Clusters the embedding rows; returns the config spec, `(coefficients, bases, assignments)` and a report."""
    weight = layer.weight.detach()
    n, d = weight.shape
    fit = {key: options[key] for key in ("n_init", "max_iter", "seed", "weights")}
    if isinstance(embedding, tuple):
        k, j = embedding
        result = projective_clustering(weight, k, j, **fit)
    else:
        k, j, result = choose_kj(weight, float(embedding), k_grid=options["k_grid"], **fit)
    factored = DroneEmbedding.from_embedding(weight, result, padding_idx=layer.padding_idx)
    parameters = embedding_parameter_count(n, d, k, j)
    # SVD at the same size: the largest rank j' with n j' + j' d <= that many parameters; its cost is the tail of
    # the squared singular values (eigenvalues of the d x d Gram, float64).
    svd_j = parameters // (n + d)
    energies = torch.linalg.eigvalsh(weight.double().T @ weight.double()).flip(0).clamp_min(0)
    total = float(energies.sum())
    cost = projective_clustering_cost(weight, result.assignments, result.bases)
    svd_cost = float(energies[svd_j:].sum())
    report = {
        "module": name,
        "k": k,
        "j": j,
        "parameters": parameters,
        "dense_parameters": n * d,
        "param_ratio": parameters / (n * d),
        "requested": list(embedding) if isinstance(embedding, tuple) else embedding,
        "cost": cost,
        "relative_cost": cost / total,
        "svd_j": svd_j,
        "svd_cost": svd_cost,
        "relative_svd_cost": svd_cost / total,
        "weighted": options["weights"] is not None,
        "n_init": options["n_init"],
        "max_iter": options["max_iter"],
        "seed": options["seed"],
        "n_iter": result.n_iter,
    }
    if not isinstance(embedding, tuple):
        report["k_grid"] = list(options["k_grid"])
    if options["weights"] is not None:
        report["weighted_cost"] = result.cost
    tensors = (factored.coefficients.detach(), factored.bases.detach(), factored.assignments)
    return {"module": name, "k": k, "j": j}, tensors, report


def _factor_attention(model, factorizer, block: str, stats: torch.Tensor | None, rank: int):
    query, key, num_heads, _ = attention_geometry(model, block)
    tensors = tuple(t.detach() for t in (query.weight, query.bias, key.weight, key.bias))
    return factorizer.factor_attention(tensors, stats, num_heads, rank)


def _build_compressed(model, chosen, factors, attention_ranks, attention_factors, method, provenance, embedding=None):
    config_dict = model.config.to_dict()
    for key in _CONFIG_KEYS_NOT_COPIED:
        config_dict.pop(key, None)
    previous = config_dict.pop("drone_ranks", None) or {}
    previous_attention = config_dict.pop("drone_attention_ranks", None) or {}
    previous_calibration = config_dict.pop("drone_calibration", None) or {}
    previous_embedding = config_dict.pop("drone_embedding", None)  # an already clustered embedding is kept
    if previous_embedding and not embedding and "embedding" in previous_calibration:
        provenance = {**(provenance or {}), "embedding": previous_calibration["embedding"]}  # and its provenance
    family_config = CONFIG_MAPPING[base_model_type(model.config.model_type)]
    config = drone_config_class(family_config)(
        **config_dict,
        drone_ranks={**previous, **chosen} or None,
        drone_attention_ranks={**previous_attention, **attention_ranks} or None,
        drone_embedding=embedding[0] if embedding else previous_embedding,
        drone_method=method,
        drone_calibration=provenance,
    )
    model_class = drone_model_class(type(model))
    config.architectures = [model_class.__name__]
    config._attn_implementation = model.config._attn_implementation
    reference = next(model.parameters())
    state = dict(model.state_dict())
    for name, (down, up, bias) in factors.items():
        state.pop(f"{name}.bias", None)
        del state[f"{name}.weight"]
        state[f"{name}.down.weight"], state[f"{name}.up.weight"] = down, up
        if bias is not None:
            state[f"{name}.up.bias"] = bias
    for block, (q_weight, q_bias, k_weight, k_bias) in attention_factors.items():
        query, key = qk_linear_names(model, block)
        state[f"{query}.weight"], state[f"{query}.bias"] = q_weight, q_bias
        state[f"{key}.weight"], state[f"{key}.bias"] = k_weight, k_bias
    if embedding:
        name, (coefficients, bases, assignments) = embedding[0]["module"], embedding[1]
        del state[f"{name}.weight"]
        state[f"{name}.coefficients"], state[f"{name}.bases"] = coefficients, bases
        state[f"{name}.assignments"] = assignments
    compressed = model_class(config)
    compressed.load_state_dict(state, strict=True)
    compressed.to(device=reference.device, dtype=reference.dtype)
    copy_training_modes(model, compressed)  # module by module, as the input's
    return compressed


__all__ = ["compress_model"]
