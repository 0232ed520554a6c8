"""Runtime settings of the Trainer workflow: what to compress and how to distil. Never persisted with a model."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any

from torch import nn

from .defaults import DEFAULT_SAFETY_MARGIN


_BUDGETS = ("rank", "ranks", "param_ratio", "attention_rank", "max_accuracy_drop", "target_speedup")


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _as_int(value: Any) -> Any:
    """numpy integers (e.g. from a hyper-parameter grid) as Python ints; anything else unchanged."""
    return int(value) if _is_int(value) else value


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_int(name: str, value: Any, *, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not _is_int(value) or value < minimum:
        allowed = f"an int >= {minimum}" + (" or None" if allow_none else "")
        raise ValueError(f"`{name}` must be {allowed}, got {value!r}.")


def _parse_json_mapping(name: str, value: Any) -> dict | None:
    # Command lines pass mappings as JSON strings, as TrainingArguments does for its dict fields.
    if value is None or isinstance(value, Mapping):
        return None if value is None else dict(value)
    if isinstance(value, str):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"`{name}` must be a mapping or a JSON object string, got {value!r} ({error}).") from None
        if isinstance(parsed, dict):
            return parsed
    raise ValueError(f"`{name}` must be a mapping or a JSON object string, got {value!r}.")


@dataclass
class DroneCompressionArguments:
    r"""
    What [`DroneCompressionCallback`] compresses at the end of training, and on which training rows it calibrates.

    Pass exactly one budget: explicit ranks (`rank`, `ranks` and/or `attention_rank`), `param_ratio`,
    `target_speedup` or `max_accuracy_drop`. The values are checked here (bad values raise at construction); whether
    they fit a given model is checked by [`DroneCompressionCallback`] in `on_train_begin`.

    Args:
        method (`str`, *optional*, defaults to `"drone"`): A registered method: `"drone"` (the paper's closed form),
            `"drone-bc"` (bias-corrected), `"drone-act"` (the FFN's first linear weighted by the activation's slope)
            or `"svd"` (data-free).
        rank (`int`, *optional*): One rank for every target linear.
        ranks (`dict[str, int]` or `str`, *optional*): Module name, role or `"re:<regex>"` -> rank (a JSON object
            string on the command line), with the precedence of [`compress_model`].
        param_ratio (`float`, *optional*): Fraction in `(0, 1)` of the targets' weight parameters to keep.
        attention_rank (`int`, *optional*): Per-head query/key width of DRONE attention (docs/methods.md §1a).
        max_accuracy_drop (`float`, *optional*): Budget in metric points on `heldout_samples` training rows (at
            least `300 / max_accuracy_drop` of them: a budget must be worth 3 held-out rows).
        target_speedup (`float`, *optional*): Multiply-add reduction target (> 1).
        target_modules (`list[str]`, *optional*): Roles, full names or `re:` regexes; defaults to every encoder
            linear.
        attention (`bool`, *optional*, defaults to `True`): Let `max_accuracy_drop`/`target_speedup` allocations
            use DRONE attention.
        num_calibration_samples (`int`, *optional*, defaults to 512): Training rows to calibrate on (in total,
            over all processes).
        heldout_samples (`int`, *optional*, defaults to 2048): Training rows, disjoint from the calibration rows,
            on which `max_accuracy_drop` measures drops (the dev split stays unseen).
        screening_samples (`int`, *optional*): Of the held-out rows, those scoring each module alone
            ([`allocate_ranks`]); `None`: the search's default (256 for `"fast"`, 512 for `"exhaustive"`).
        safety_margin (`float`, *optional*, defaults to 1.0): Paired standard errors added to the held-out drop
            before comparing it with `max_accuracy_drop`.
        refine_steps (`int`, *optional*): Joint checks `max_accuracy_drop` spends after its search on lowering one
            module's rank at a time, or a group of them ([`allocate_ranks`]); `None`: 6 for the fast search, 48 for the
            exhaustive one.
        allocation_search (`str`, *optional*, defaults to `"exhaustive"`): How `max_accuracy_drop` searches:
            `"exhaustive"` (a measured drop curve per module) or `"fast"` (per-module drops predicted from the
            residual energy, bisection of one scale by joint checks) ([`allocate_ranks`]'s `search`).
        screening_dtype (`str`, *optional*): `"bfloat16"` (or `"float16"`) runs `max_accuracy_drop`'s per-module
            screening under `torch.autocast` in that dtype ([`allocate_ranks`]); the joint checks that decide the
            budget never run under it (they score the deployment form, `dtype`/`quantize`, else the model's dtype).
            Stored as its name; `None` or `"float32"`: the model's own dtype.
        bias_correction (`bool`, *optional*, defaults to `False`): Factor DRONE linears on the centred statistics
            and fold the mean into the bias ([`compress_model`]); the `drone-hf` command line turns it on.
        sequential (`bool`, *optional*, defaults to `False`): Refit the factored linears layer after layer on the
            inputs the compressed model itself feeds them, to reproduce the dense layer's output ([`compress_model`]'s
            `sequential`, docs/methods.md §1c); same ranks, so the same speed and format. With `max_accuracy_drop`
            the joint checks score refitted models. Not for families that share layers (ALBERT). With several
            processes, process zero refits on its own calibration rows (data-parallel distillation starts every
            process from its weights: DDP copies them when it wraps the model).
        sequential_checks (`int`, *optional*, defaults to 4): With `sequential` and `max_accuracy_drop`: refitted
            joint checks spent past the search's result ([`allocate_ranks`]); each costs one refit.
        sequential_dense_weight (`float`, *optional*, defaults to 0): With `sequential`: the weight of the dense
            model's own inputs in each refit (the anchored refit, [`compress_model`]'s `sequential_dense_weight`).
        calibration_batch_size (`int`, *optional*, defaults to 32): Rows per calibration batch.
        seed (`int`, *optional*, defaults to 0): Seed of the random choice of calibration and held-out rows.
        dtype (`str` or `torch.dtype`, *optional*): Deployment dtype of the compressed model, `"float32"`,
            `"bfloat16"` or `"float16"` (stored as its name), as in [`compress_model`]: it is saved and reloads in
            it. Applied to the final model, after any distillation (which trains in float32); a budget keeps only
            ranks measured faster than the dense layer in this form.
        quantize (`str`, *optional*): `"int8"`: dynamic int8 of the encoder linears ([`quantize_model`]), applied
            like `dtype`; CPU models in float32 only.

    Raises:
        `ValueError`: naming the field, the value received and what is allowed.

    Example:

    ```py
    >>> from drone_hf import DroneCompressionArguments
    >>> DroneCompressionArguments(rank=64, num_calibration_samples=256).compress_kwargs()["rank"]
    64
    ```
    """

    method: str = field(
        default="drone",
        metadata={"help": "`drone`, `drone-bc` (bias-corrected), `drone-act` (activation-weighted) or `svd`."},
    )
    rank: int | None = field(default=None, metadata={"help": "One rank for every target linear."})
    ranks: dict[str, int] | str | None = field(
        default=None, metadata={"help": "Per-module ranks as a JSON object, e.g. '{\"re:.*intermediate.*\": 96}'."}
    )
    param_ratio: float | None = field(default=None, metadata={"help": "Fraction of weight parameters to keep."})
    attention_rank: int | None = field(default=None, metadata={"help": "Per-head query/key rank (DRONE attention)."})
    max_accuracy_drop: float | None = field(
        default=None, metadata={"help": "Budget in metric points on held-out training rows."}
    )
    target_speedup: float | None = field(default=None, metadata={"help": "Multiply-add reduction target (> 1)."})
    target_modules: list[str] | None = field(
        default=None, metadata={"help": "Roles, full module names or 're:' regexes (default: all encoder linears)."}
    )
    attention: bool = field(default=True, metadata={"help": "Let budgets use DRONE attention."})
    num_calibration_samples: int = field(default=512, metadata={"help": "Training rows to calibrate on."})
    heldout_samples: int = field(
        default=2048, metadata={"help": "Training rows (disjoint from calibration) for max_accuracy_drop."}
    )
    screening_samples: int | None = field(
        default=None,
        metadata={"help": "Held-out rows scoring each module alone (default: 256 fast, 512 exhaustive)."},
    )
    safety_margin: float = field(
        default=DEFAULT_SAFETY_MARGIN,
        metadata={"help": "Standard errors added to the held-out drop before the budget check."},
    )
    refine_steps: int | None = field(
        default=None,
        metadata={"help": "Joint checks spent lowering ranks after the search (default: 6 fast, 48 exhaustive)."},
    )
    allocation_search: str = field(
        default="exhaustive",
        metadata={"help": "How max_accuracy_drop searches: `exhaustive` or `fast` (predicted drops, bisection)."},
    )
    screening_dtype: str | None = field(
        default=None,
        metadata={"help": "Autocast dtype of max_accuracy_drop's per-module screening (bfloat16 on AMX CPUs)."},
    )
    bias_correction: bool = field(
        default=False, metadata={"help": "DRONE on centred statistics, the mean folded into the bias."}
    )
    sequential: bool = field(
        default=False,
        metadata={
            "help": "Refit the factored linears layer after layer on the inputs the compressed model itself feeds "
            "them (docs/methods.md section 1c); max_accuracy_drop's joint checks then score refitted models."
        },
    )
    sequential_checks: int = field(
        default=4,
        metadata={"help": "With sequential and max_accuracy_drop: refitted joint checks past the search's result."},
    )
    sequential_dense_weight: float = field(
        default=0.0,
        metadata={"help": "With sequential: weight of the dense model's own inputs in each refit (anchored refit)."},
    )
    calibration_batch_size: int = field(default=32, metadata={"help": "Rows per calibration batch."})
    seed: int = field(default=0, metadata={"help": "Seed of the choice of calibration / held-out rows."})
    dtype: str | None = field(
        default=None,
        metadata={
            "help": "Deployment dtype of the compressed model: float32, bfloat16 or float16 (after distillation)."
        },
    )
    quantize: str | None = field(
        default=None,
        metadata={"help": "`int8`: dynamic int8 encoder linears for CPU inference (after distillation)."},
    )

    def __post_init__(self):
        from .deployment import resolve_deployment
        from .methods import get_method

        get_method(self.method)
        dtype, self.quantize = resolve_deployment(self.dtype, self.quantize)
        self.dtype = None if dtype is None else str(dtype).removeprefix("torch.")
        for name in ("rank", "attention_rank", "num_calibration_samples", "heldout_samples", "screening_samples"):
            setattr(self, name, _as_int(getattr(self, name)))
        for name in ("refine_steps", "calibration_batch_size", "seed", "sequential_checks"):
            setattr(self, name, _as_int(getattr(self, name)))
        if not isinstance(self.sequential, bool):
            raise ValueError(f"`sequential` must be a bool, got {type(self.sequential).__name__} {self.sequential!r}.")
        _check_int("sequential_checks", self.sequential_checks, minimum=0, allow_none=False)
        from .sequential import check_dense_weight

        self.sequential_dense_weight = check_dense_weight(
            self.sequential_dense_weight, sequential=self.sequential, name="sequential_dense_weight"
        )
        self.ranks = _parse_json_mapping("ranks", self.ranks)
        for key, value in (self.ranks or {}).items():
            if not isinstance(key, str) or not _is_int(value) or value <= 0:
                raise ValueError(
                    f"`ranks` maps module names to positive ints (keys: full names, roles or 're:' patterns), got "
                    f"{key!r}: {value!r}."
                )
        if self.ranks is not None:
            self.ranks = {key: int(value) for key, value in self.ranks.items()}
        _check_int("rank", self.rank, minimum=1, allow_none=True)
        _check_int("attention_rank", self.attention_rank, minimum=1, allow_none=True)
        if self.param_ratio is not None and (not _is_number(self.param_ratio) or not 0 < self.param_ratio < 1):
            raise ValueError(f"`param_ratio` must be a float in (0, 1), got {self.param_ratio!r}.")
        if self.max_accuracy_drop is not None and (
            not _is_number(self.max_accuracy_drop) or self.max_accuracy_drop <= 0
        ):
            raise ValueError(
                f"`max_accuracy_drop` must be a positive number of points, got {self.max_accuracy_drop!r}."
            )
        if self.target_speedup is not None and (not _is_number(self.target_speedup) or self.target_speedup <= 1):
            raise ValueError(f"`target_speedup` must be a number > 1, got {self.target_speedup!r}.")
        if isinstance(self.target_modules, str):
            self.target_modules = [self.target_modules]
        if self.target_modules is not None and not all(isinstance(t, str) for t in self.target_modules):
            raise ValueError(f"`target_modules` must be a list of strings, got {self.target_modules!r}.")
        if self.target_modules is not None and len(self.target_modules) == 0:
            raise ValueError(
                "`target_modules` is empty: it would select no module. Pass None for every encoder linear, or name "
                "roles, full module names or 're:' patterns."
            )
        self._check_budget()
        _check_int("num_calibration_samples", self.num_calibration_samples, minimum=1)
        _check_int("heldout_samples", self.heldout_samples, minimum=0)
        if self.max_accuracy_drop is not None and self.heldout_samples == 0:
            raise ValueError("`heldout_samples` must be >= 1 with `max_accuracy_drop`, got 0.")
        if self.max_accuracy_drop is not None:
            from .budget_search import MIN_BUDGET_ROWS, min_heldout_rows

            needed = min_heldout_rows(self.max_accuracy_drop)
            if self.heldout_samples < needed:
                raise ValueError(
                    f"`max_accuracy_drop={self.max_accuracy_drop}` is finer than `heldout_samples="
                    f"{self.heldout_samples}` rows can resolve: one row moves accuracy by "
                    f"{100 / self.heldout_samples:.3g} points. A budget of {self.max_accuracy_drop} points needs at "
                    f"least {needed} held-out rows ({MIN_BUDGET_ROWS} rows' worth); raise `heldout_samples` or the "
                    "budget."
                )
        _check_int("screening_samples", self.screening_samples, minimum=1, allow_none=True)
        if not _is_number(self.safety_margin) or self.safety_margin < 0:
            raise ValueError(f"`safety_margin` must be a number >= 0 (standard errors), got {self.safety_margin!r}.")
        _check_int("refine_steps", self.refine_steps, minimum=0, allow_none=True)
        from .budget_search import SEARCHES

        if self.allocation_search not in SEARCHES:
            raise ValueError(f"`allocation_search` must be one of {list(SEARCHES)}, got {self.allocation_search!r}.")
        if self.screening_dtype is not None:
            from .deployment import resolve_dtype

            self.screening_dtype = str(resolve_dtype(self.screening_dtype, "screening_dtype")).removeprefix("torch.")
        if not isinstance(self.bias_correction, bool):
            raise ValueError(f"`bias_correction` must be True or False, got {self.bias_correction!r}.")
        if self.bias_correction and self.method not in ("drone", "drone-bc"):
            raise ValueError(f"`bias_correction=True` needs `method='drone'`, got method={self.method!r}.")
        _check_int("calibration_batch_size", self.calibration_batch_size, minimum=1)
        _check_int("seed", self.seed, minimum=0)

    def _check_budget(self) -> None:
        given = [name for name in _BUDGETS if getattr(self, name) is not None]
        explicit = [name for name in given if name in ("rank", "ranks", "attention_rank")]
        others = [name for name in given if name not in explicit]
        if not given:
            raise ValueError(f"Pass one budget among {list(_BUDGETS)}; got none.")
        if len(others) > 1 or (others and explicit):
            raise ValueError(
                f"Pass one budget: explicit ranks (`rank`/`ranks`/`attention_rank`), `param_ratio`, "
                f"`target_speedup` or `max_accuracy_drop`; got {given}."
            )

    def compress_kwargs(self, task: str | None = None) -> dict[str, Any]:
        """Keyword arguments for [`compress_model`] (budget, method and targets; no data, and not the deployment form
        `dtype`/`quantize`, which [`DroneCompressionCallback`] applies after distillation).

        Args:
            task (`str`, *optional*): GLUE task name. With `max_accuracy_drop`, the drop is then measured on the
                task's main metric ([`~glue.glue_metric_points`]: F1 for MRPC/QQP, Matthews correlation for CoLA,
                Pearson for STS-B) instead of accuracy.
        """
        kwargs = {name: getattr(self, name) for name in ("method", "target_modules", *_BUDGETS)}
        if self.bias_correction:
            kwargs["bias_correction"] = True
        if self.sequential:
            kwargs["sequential"] = True  # the caller adds `calibration_dataloader`
            if self.sequential_dense_weight:
                kwargs["sequential_dense_weight"] = self.sequential_dense_weight
        if self.max_accuracy_drop is not None or self.target_speedup is not None or self.param_ratio is not None:
            kwargs["attention"] = self.attention
        if self.max_accuracy_drop is not None:
            kwargs["allocation_options"] = {
                "screening_samples": "auto" if self.screening_samples is None else self.screening_samples,
                "safety_margin": self.safety_margin,
                "refine_steps": self.refine_steps,
                "search": self.allocation_search,
            }
            if self.screening_dtype not in (None, "float32"):
                kwargs["allocation_options"]["screening_dtype"] = self.screening_dtype
            if self.sequential:
                kwargs["allocation_options"]["sequential_checks"] = self.sequential_checks
            if task is not None:
                from .glue_metrics import glue_metric_points

                kwargs["allocation_options"]["metric_fn"] = glue_metric_points(task)
        return kwargs

    def validate_for_model(self, model: nn.Module) -> None:
        """Checks, without factoring anything, that these settings fit `model`: a model of a supported family whose
        target modules resolve, with ranks in range and a feasible budget.

        Raises:
            `ValueError`: naming the offending setting.
        """
        from .allocation import breakeven_rank
        from .compress import _resolve_attention
        from .structure import qk_linear_names, validate_drone_ranks
        from .targets import check_supported_model, resolve_ranks, resolve_target_modules

        check_supported_model(model)
        if self.sequential:
            from .sequential import check_sequential

            check_sequential(model)
        targets = resolve_target_modules(model, self.target_modules)
        if not targets:
            raise ValueError(f"`target_modules={self.target_modules!r}` selects no dense encoder linear.")
        shapes = {name: tuple(model.get_submodule(name).weight.shape) for name in targets}
        if self.rank is not None or self.ranks is not None or self.attention_rank is not None:
            linear_ranks, attention_ranks = _resolve_attention(model, self.ranks, self.attention_rank, None)
            replaced = {name for block in attention_ranks for name in qk_linear_names(model, block)}
            chosen = resolve_ranks(
                [t for t in targets if t not in replaced], rank=self.rank, ranks=linear_ranks, model=model
            )
            validate_drone_ranks(model, chosen)
            if not attention_ranks and all(k > breakeven_rank(*shapes[name]) for name, k in chosen.items()):
                largest = max(breakeven_rank(*shapes[name]) for name in chosen) if chosen else 0
                raise ValueError(
                    f"Every target would stay dense at `rank={self.rank}`/`ranks={self.ranks}`: each rank is above "
                    f"its module's break-even rank (largest here: {largest}); a rank must satisfy "
                    "k * (in + out) < in * out to reduce a layer's cost."
                )
        elif self.param_ratio is not None or self.target_speedup is not None:
            # Feasibility depends on shapes and rank grids only, not on the spectra: the data-free method suffices.
            from .allocation import allocate_ranks

            allocate_ranks(
                model,
                None,
                method="svd",
                target_speedup=self.target_speedup,
                param_ratio=self.param_ratio,
                attention=self.attention,
                target_modules=self.target_modules,
            )


@dataclass
class DroneDistillationArguments:
    r"""
    Feature distillation of the compressed student from the dense teacher (Ben Noach & Goldberg, AACL 2020; see
    [`distill`]). The loss is

    `alpha_hidden * mean_l MSE(h_teacher[l], h_student[l]) + alpha_kl * T^2 * KL(p_teacher^T || p_student^T)
    + alpha_task * task_loss`,

    with the MSE over every hidden state in `hidden_layers` (index 0 is the embeddings' output) and over non-padding
    tokens; for regression (`num_labels == 1`) the KL term is the MSE between the logits.

    Args:
        alpha_hidden (`float`, *optional*, defaults to 1.0): Weight of the hidden-state MSE.
        alpha_kl (`float`, *optional*, defaults to 1.0): Weight of the softened-logit KL divergence.
        alpha_task (`float`, *optional*, defaults to 0.0): Weight of the task loss (needs labels when > 0; for class
            labels, rows labelled -100, e.g. augmented text, take no task term: the teacher alone teaches them).
        temperature (`float`, *optional*, defaults to 2.0): Softmax temperature `T` of the KL term.
        hidden_layers (`str` or `list[int]`, *optional*, defaults to `"all"`): Hidden-state indices to match
            (`0` = embeddings, `L` = last layer) or `"all"` (`None` means `"all"`).
        max_steps (`int`, *optional*, defaults to 300): Optimiser steps.
        learning_rate (`float`, *optional*, defaults to 5e-5): Peak learning rate.
        per_device_train_batch_size (`int`, *optional*, defaults to 32): Batch size per process.
        gradient_accumulation_steps (`int`, *optional*, defaults to 1): Batches whose gradients are summed into one
            optimiser step (the loss is a per-batch mean, divided by this), so an optimiser step sees
            `per_device_train_batch_size * gradient_accumulation_steps` rows per process.
        warmup_steps (`float`, *optional*, defaults to 0.1): Warm-up steps (a float < 1 is a fraction of
            `max_steps`, as in `TrainingArguments`).
        weight_decay (`float`, *optional*, defaults to 0.0): AdamW weight decay.
        lr_scheduler_type (`str`, *optional*, defaults to `"linear"`): Scheduler name.
        logging_steps (`int`, *optional*, defaults to 50): Log every this many steps.
        seed (`int`, *optional*, defaults to 0): Seed of the data order.
        report_to (`str` or `list[str]`, *optional*): Integrations to report to; `None` means `"none"`.
        cache_teacher_outputs (`bool`, *optional*, defaults to `False`): Run the teacher once over the training rows
            before the first step and read its logits and hidden states from that cache afterwards
            (`drone_hf.teacher_cache`), instead of a teacher forward pass per batch. Cheaper when distillation sees
            each row more than once (several epochs); the cache holds each row's real tokens of every matched hidden
            state (`rows x tokens x (layers + 1) x hidden_size` values) in memory.
        teacher_cache_dtype (`str`, *optional*, defaults to `"float32"`): Storage dtype of the cached hidden states:
            `"float32"`, `"bfloat16"` (half the memory) or `"float16"`.
        balance_factors (`bool`, *optional*, defaults to `True`): Before training, rescale each factored layer's
            rank components so that `down` and `up` have equal norms ([`DroneLinear.balance_`]; the model's function
            is unchanged). DRONE's data-aware factors are far from balanced, and Adam then moves the small factor far
            more than the large one: on all-mpnet-base-v2 at 4x fewer FLOPs, MRPC distillation collapsed to a
            constant prediction without it.

    Raises:
        `ValueError`: naming the field, the value received and what is allowed.

    Example:

    ```py
    >>> from drone_hf import DroneDistillationArguments
    >>> DroneDistillationArguments(max_steps=200, alpha_task=0.5).temperature
    2.0
    ```
    """

    alpha_hidden: float = field(default=1.0, metadata={"help": "Weight of the hidden-state MSE."})
    alpha_kl: float = field(default=1.0, metadata={"help": "Weight of the softened-logit KL (regression: logit MSE)."})
    alpha_task: float = field(default=0.0, metadata={"help": "Weight of the task loss (needs labels)."})
    temperature: float = field(default=2.0, metadata={"help": "Softmax temperature of the KL term."})
    hidden_layers: str | list[int] = field(
        default="all", metadata={"help": "Hidden-state indices to match (0 = embeddings), or 'all'."}
    )
    max_steps: int = field(default=300, metadata={"help": "Distillation optimiser steps."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Distillation peak learning rate."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Distillation batch size per process."})
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Batches accumulated into one distillation optimiser step."}
    )
    warmup_steps: float = field(default=0.1, metadata={"help": "Warm-up steps (< 1: fraction of max_steps)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "Learning-rate scheduler."})
    logging_steps: int = field(default=50, metadata={"help": "Log every this many steps."})
    seed: int = field(default=0, metadata={"help": "Seed of the distillation data order."})
    report_to: str | None = field(default=None, metadata={"help": "Integrations to report to (default: none)."})
    cache_teacher_outputs: bool = field(
        default=False, metadata={"help": "Run the teacher once over the training rows and reuse its outputs."}
    )
    balance_factors: bool = field(
        default=True, metadata={"help": "Give each factor pair equal norms before training (same function)."}
    )
    teacher_cache_dtype: str = field(
        default="float32",
        metadata={"help": "Cached teacher hidden states: float32, bfloat16 or float16."},
    )

    def __post_init__(self):
        for name in ("alpha_hidden", "alpha_kl", "alpha_task", "weight_decay", "warmup_steps"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
        if self.alpha_hidden == self.alpha_kl == self.alpha_task == 0:
            raise ValueError("At least one of `alpha_hidden`, `alpha_kl`, `alpha_task` must be > 0; got all 0.")
        for name in ("temperature", "learning_rate"):
            value = getattr(self, name)
            if not _is_number(value) or value <= 0:
                raise ValueError(f"`{name}` must be a number > 0, got {value!r}.")
        if self.hidden_layers is None:  # HfArgumentParser gives None for an absent list option
            self.hidden_layers = "all"
        if isinstance(self.hidden_layers, str):
            if self.hidden_layers != "all":
                raise ValueError(f"`hidden_layers` must be 'all' or a list of ints, got {self.hidden_layers!r}.")
        elif not self.hidden_layers or not all(_is_int(i) and i >= 0 for i in self.hidden_layers):
            raise ValueError(
                f"`hidden_layers` must be 'all' or a non-empty list of ints >= 0, got {self.hidden_layers!r}."
            )
        else:
            self.hidden_layers = sorted(set(self.hidden_layers))
        _check_int("max_steps", self.max_steps, minimum=1)
        _check_int("per_device_train_batch_size", self.per_device_train_batch_size, minimum=1)
        _check_int("gradient_accumulation_steps", self.gradient_accumulation_steps, minimum=1)
        _check_int("logging_steps", self.logging_steps, minimum=1)
        _check_int("seed", self.seed, minimum=0)
        for name in ("cache_teacher_outputs", "balance_factors"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}.")
        if self.teacher_cache_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(
                "`teacher_cache_dtype` must be one of ['float32', 'bfloat16', 'float16'], got "
                f"{self.teacher_cache_dtype!r}."
            )

    def loss_kwargs(self) -> dict[str, Any]:
        """The loss settings (for [`distillation_loss`] / [`DroneDistillationTrainer`])."""
        names = ("alpha_hidden", "alpha_kl", "alpha_task", "temperature", "hidden_layers")
        return {name: getattr(self, name) for name in names}

    def training_overrides(self) -> dict[str, Any]:
        """The `TrainingArguments` fields these settings replace in a copied base."""
        names = (
            "max_steps",
            "learning_rate",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "warmup_steps",
            "weight_decay",
            "lr_scheduler_type",
            "logging_steps",
            "seed",
        )
        overrides = {name: getattr(self, name) for name in names}
        overrides["report_to"] = self.report_to if self.report_to is not None else "none"
        return overrides


__all__ = ["DroneCompressionArguments", "DroneDistillationArguments"]
