"""Sequential refit of a compressed model (`sequential=True`; docs/methods.md §1c): module surgery around
[`~factorize.drone_refit`].

DRONE factors every linear on the inputs the *dense* model feeds it. In the compressed model those inputs have
already been changed by the factored layers before it, and the errors add up layer after layer. The refit walks the
encoder from the first layer to the last and, for each group of linears that read one input, refits them on the
inputs the compressed model (as refitted so far) actually feeds them, to reproduce the dense layer's output on the
dense model's inputs: each layer then also corrects the error of those before it. Ranks do not change, so neither do
speed, size nor the checkpoint format."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn
from transformers.utils.logging import tqdm

from .architecture import get_architecture, layer_names
from .calibration import model_inputs
from .factorize import drone_refit
from .heldout import LayerReplay
from .layers import DroneLinear
from .model_state import restore_training_modes, training_modes
from .structure import swap_module


_TARGETS = ("labels", "start_positions", "end_positions")


def _inputs(module: nn.Module, stream: LayerReplay, layer: int) -> list[torch.Tensor]:
    """The inputs of `module` in every batch when `stream` runs up to `layer` (from its cached layer)."""
    seen: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    try:
        stream.outputs_of(layer)
    finally:
        handle.remove()
    return seen


def _augmented(rows: torch.Tensor) -> torch.Tensor:
    """`[x; 1]` per token in float64: the products must be float64 too. After a LayerNorm the inputs have (nearly)
    null directions that the pseudo-inverse must see as null; float32 products fill them with rounding noise that
    `S^{-1}` then amplifies (a tiny BERT's refitted error was 31% larger with float32 products)."""
    rows = rows.double()
    return torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)


def _refitted(dense: nn.Module, current: nn.Module, cross, stats) -> nn.Module:
    """A new module computing what `dense` computed, refitted on the compressed inputs (same rank as `current`)."""
    dense = dense.to_dense() if isinstance(dense, DroneLinear) else dense
    weight, bias = dense.weight.detach().float(), None if dense.bias is None else dense.bias.detach().float()
    if isinstance(current, DroneLinear):
        down, up, new_bias = drone_refit(weight, bias, cross, stats, current.rank)
        module = DroneLinear.from_factors(down, up, new_bias)
    else:
        full, _, new_bias = drone_refit(weight, bias, cross, stats, None)
        module = nn.Linear(full.shape[1], full.shape[0], bias=True)
        with torch.no_grad():
            module.weight.copy_(full)
            module.bias.copy_(new_bias)
    return module.to(next(current.parameters()).device)


@torch.no_grad()
def refit_modules(
    model: nn.Module,
    compressed: nn.Module,
    batches: list[dict],
    *,
    dense_linears: bool = False,
    dense_weight: float = 0.0,
    show_progress: bool = False,
) -> dict[str, nn.Module]:
    """Swaps refitted modules into `compressed`, layer by layer, and returns the modules they replaced (name ->
    module), so that a caller can put them back (the rank search does). See [`refit_sequential`]."""
    spec = get_architecture(model)
    layers = layer_names(model)
    dense_stream, stream = LayerReplay(model, batches, layers), LayerReplay(compressed, batches, layers)
    masks = [batch["attention_mask"].bool() if "attention_mask" in batch else None for batch in batches]
    groups: dict[str, list[str]] = {}
    for role in spec.linears:
        groups.setdefault(spec.shared_inputs.get(role, role), []).append(role)
    replaced: dict[str, nn.Module] = {}
    for index, layer in enumerate(tqdm(layers, desc="Sequential refit", disable=not show_progress)):
        dense_stream.advance_to(index)
        stream.advance_to(index)
        for source, roles in groups.items():
            names = [f"{layer}.{spec.linears[role]}" for role in roles]
            todo = [
                name
                for name in names
                if isinstance(compressed.get_submodule(name), DroneLinear)
                or (dense_linears and type(compressed.get_submodule(name)) is nn.Linear)
            ]
            if not todo:
                continue
            source_name = f"{layer}.{spec.linears[source]}"
            dense_inputs = _inputs(model.get_submodule(source_name), dense_stream, index)
            compressed_inputs = _inputs(compressed.get_submodule(source_name), stream, index)
            width = dense_inputs[0].shape[-1] + 1
            cross = torch.zeros(width, width, dtype=torch.float64)
            stats = torch.zeros(width, width, dtype=torch.float64)
            dense = torch.zeros(width, width, dtype=torch.float64) if dense_weight else None
            for x, x_tilde, mask in zip(dense_inputs, compressed_inputs, masks):
                x = _augmented(x[mask] if mask is not None else x.reshape(-1, x.shape[-1]))
                x_tilde = _augmented(x_tilde[mask] if mask is not None else x_tilde.reshape(-1, x_tilde.shape[-1]))
                cross += (x.T @ x_tilde).cpu()
                stats += (x_tilde.T @ x_tilde).cpu()
                if dense is not None:
                    dense += (x.T @ x).cpu()
            if dense is not None:
                # The dense inputs as more tokens of weight `dense_weight`: the least squares then also asks each
                # layer to stay right on the dense model's own inputs (docs/methods.md §1c, the anchored refit).
                cross, stats = cross + dense_weight * dense, stats + dense_weight * dense
            for name in todo:
                current = compressed.get_submodule(name)
                module = _refitted(model.get_submodule(name), current, cross, stats)
                replaced.setdefault(name, swap_module(compressed, name, module))
    return replaced


def refit_sequential(
    model: nn.Module,
    compressed: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    dense_linears: bool = False,
    dense_weight: float = 0.0,
    show_progress: bool = False,
) -> nn.Module:
    r"""
    Refits the factored linears of `compressed` in place, layer after layer, on the inputs the compressed model
    itself feeds them, so that each reproduces the dense layer's output on the dense model's inputs (docs/methods.md
    §1c). Ranks, shapes and the checkpoint format do not change; the error of earlier layers is compensated by later
    ones. `compress_model(..., sequential=True, calibration_dataloader=...)` calls it, also inside an accuracy
    budget's joint checks.

    Args:
        model (`PreTrainedModel`): The dense model `compressed` was made from; run in eval mode, left as it was.
        compressed (`PreTrainedModel`): Its compressed copy (same family and head), changed in place.
        dataloader (`Iterable[dict]`): Calibration batches (token ids and attention masks; labels are ignored), e.g.
            those the statistics were collected on.
        dense_linears (`bool`, *optional*, defaults to `False`): Also refit the linears left dense (full-rank least
            squares on the same statistics).
        dense_weight (`float`, *optional*, defaults to 0): The anchored refit: the dense model's own inputs join the
            least squares as tokens of this weight, so each layer must also stay right on them (docs/methods.md §1c).
            0 is the plain refit; a large weight tends to DRONE with bias correction. The plain refit can put large
            weights on directions the compressed inputs barely excite; the anchor bounds them.
        show_progress (`bool`, *optional*, defaults to `False`): A progress bar over the layers.

    Returns:
        `compressed`.

    Raises:
        `ValueError`: when `dataloader` yields no batch, the two models are not of one family and depth, or the
            family shares its layers (ALBERT).
    """
    if type(get_architecture(model)) is not type(get_architecture(compressed)) or len(layer_names(model)) != len(
        layer_names(compressed)
    ):
        raise ValueError(
            f"`compressed` ({type(compressed).__name__}) must be a compressed copy of `model` "
            f"({type(model).__name__}): same family and number of layers."
        )
    refit = make_refit(
        model, dataloader, dense_linears=dense_linears, dense_weight=dense_weight, show_progress=show_progress
    )
    modes = training_modes(compressed)
    flags = {name: module.training for name, module in compressed.named_modules()}
    replaced = {}
    try:
        replaced = refit(compressed)
    finally:
        restore_training_modes(modes)
        for name in replaced:
            compressed.get_submodule(name).train(flags[name])
    return compressed


def check_sequential_flag(sequential) -> bool:
    """`sequential` itself, refused unless a bool (as `compress_model` and `compress_sentence_transformer` take it).

    Raises:
        `TypeError`: naming the value and its type.
    """
    if not isinstance(sequential, bool):
        raise TypeError(f"`sequential` must be a bool, got {type(sequential).__name__} {sequential!r}.")
    return sequential


def check_dense_weight(dense_weight, *, sequential: bool = True, name: str = "dense_weight") -> float:
    """`dense_weight` as a float, refused unless a finite number >= 0 (0 is the plain refit), and refused above 0
    when there is no refit to weigh (`sequential=False`). `name` is the argument's name in the error.

    Raises:
        `ValueError`: naming the argument, the value and what is allowed.
    """
    if (
        isinstance(dense_weight, bool)
        or not isinstance(dense_weight, (int, float))
        or not 0 <= dense_weight < math.inf
    ):
        raise ValueError(
            f"`{name}` must be a finite number >= 0 (the weight of the dense model's own inputs in the refit; 0: "
            f"none), got {dense_weight!r}."
        )
    if dense_weight and not sequential:
        raise ValueError(
            f"`{name}={dense_weight}` weighs the dense inputs in the sequential refit; it needs `sequential=True`."
        )
    return float(dense_weight)


def check_sequential(model: nn.Module) -> None:
    """Refuses families whose layers are shared (ALBERT): one module runs at every depth there, so no single refit
    can match each layer's own inputs (measured on a tiny ALBERT: the final error grew 25-fold).

    Raises:
        `ValueError`: for such a family.
    """
    spec = get_architecture(model)
    if not spec.layerwise:
        raise ValueError(
            f"`sequential=True` needs layers that each run once; {spec.model_type} shares one layer module across "
            "its depth, so a layer cannot be refitted on its own inputs. Compress it without `sequential`."
        )


def check_sequential_method(method) -> None:
    """Refuses a method whose factors the refit would overwrite against another objective: the refit minimises each
    linear's unweighted output error, which undoes `"drone-act"`'s activation weighting (`method` is a
    `FactorizationMethod`).

    Raises:
        `ValueError`: naming the method and what to use instead.
    """
    if getattr(method, "activation_aware", False):
        raise ValueError(
            f"`sequential=True` refits every factored linear to its unweighted output error, which would undo "
            f"method={method.name!r}'s activation weighting; use method='drone' or 'drone-bc' with the sequential "
            "refit, or drop `sequential`."
        )


def make_refit(
    model: nn.Module,
    dataloader: Iterable[Mapping[str, torch.Tensor]],
    *,
    dense_linears: bool = False,
    dense_weight: float = 0.0,
    show_progress: bool = False,
) -> Callable[[nn.Module], dict[str, nn.Module]]:
    """`working -> replaced modules`: [`refit_modules`] of a compressed copy of `model` (put in eval mode) on
    `dataloader`'s batches (prepared once), `model` in eval mode meanwhile and then as it was. What an accuracy
    budget's joint checks run before they score an assignment, and what [`refit_sequential`] runs once."""
    check_sequential(model)
    check_dense_weight(dense_weight)
    batches = _prepare(model, dataloader)

    def refit(working: nn.Module) -> dict[str, nn.Module]:
        modes = training_modes(model)
        try:
            model.eval()
            return refit_modules(
                model,
                working.eval(),
                batches,
                dense_linears=dense_linears,
                dense_weight=dense_weight,
                show_progress=show_progress,
            )
        finally:
            restore_training_modes(modes)

    return refit


def _prepare(model: nn.Module, dataloader) -> list[dict]:
    device = next(model.parameters()).device
    batches = [
        {k: v for k, v in model_inputs(model, batch, device).items() if k not in _TARGETS} for batch in dataloader
    ]
    if not batches:
        raise ValueError("The calibration dataloader yielded no batch; the sequential refit needs some.")
    return batches


__all__ = [
    "check_dense_weight",
    "check_sequential",
    "check_sequential_flag",
    "check_sequential_method",
    "make_refit",
    "refit_modules",
    "refit_sequential",
]
