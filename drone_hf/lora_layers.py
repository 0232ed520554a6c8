r"""
peft LoRA layers for the module kinds of a compressed model, so that the usual
`LoraConfig(target_modules=["query", "value"])` works on it (peft finds them through
`drone_hf.peft_lora.register_peft_dispatch`, done on `import drone_hf`).

* [`DroneLoraLinear`] adapts a factored [`DroneLinear`] as a whole: `y = up(down(x)) + b + s·B(A(x))`, the LoRA of the
  dense layer it replaces. Its merge is exact and needs no SVD: `U V + s·B A = [U | s·B] [V; A]`, so the merged layer
  is a `DroneLinear` of rank `k + r` (`drone_ranks` follows at `save_pretrained`); unmerging cuts the factors back to
  rank `k`, to the bit.
* [`DroneLoraQKLinear`] adapts the narrowed query/key projection of a DRONE attention block (a [`DroneQKLinear`]) on
  its narrow side: `s·B(A(x))` has `num_heads * rank` outputs and is zero-padded per head like the projection, so a
  merge adds `s·B A` to the narrow weight and keeps every shape.

The merge math is in [`merged_factors`] and [`unmerged_factors`] (tensors in, tensors out). peft's LoRA variants
(DoRA, ...) and the initialisations that read a dense base weight (PiSSA, OLoRA, LoftQ, ...) are refused with an error
that names the option. This file imports peft: only `drone_hf.peft_lora` imports it, once peft is known to be there.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .layers import DroneLinear, DroneQKLinear


# `init_lora_weights` values that need nothing from the base weight (the others start from a dense weight's SVD).
_PLAIN_INITS = (True, False, "gaussian")


def merged_factors(
    down: torch.Tensor, up: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors of `up @ down + scaling * lora_b @ lora_a` at rank `k + r`: `([down; lora_a], [up | s·lora_b])`,
    in the dtype of `down`/`up` (exact: no decomposition)."""
    return (
        torch.cat([down, lora_a.to(down.dtype)], dim=0),
        torch.cat([up, (lora_b * scaling).to(up.dtype)], dim=1),
    )


def unmerged_factors(down: torch.Tensor, up: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `rank` factor pairs of `(down, up)`: what [`merged_factors`] was given, to the bit."""
    return down[:rank].clone(), up[:, :rank].clone()


def _set_factors(layer: DroneLinear, down: torch.Tensor, up: torch.Tensor) -> None:
    """Gives `layer` the factors `down` (`rank x in`) and `up` (`out x rank`), keeping whether they train."""
    layer.down.weight = nn.Parameter(down, requires_grad=layer.down.weight.requires_grad)
    layer.up.weight = nn.Parameter(up, requires_grad=layer.up.weight.requires_grad)
    layer.rank = layer.down.out_features = layer.up.in_features = down.shape[0]


class _DroneLoraLayer(nn.Module, LoraLayer):
    """What both LoRA kinds share: peft's bookkeeping (`LoraLayer`), the option checks, and a forward that adds the
    (widened) LoRA outputs of the active adapters to the base layer's output."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = False
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config, **kwargs) -> None:
        # Also the way in for a second adapter on the same layer, so the options are checked here.
        _check_options(self.get_base_layer(), config, kwargs.get("target_name") or type(self.base_layer).__name__)
        with warnings.catch_warnings():
            if self._base_bias() is not None:  # peft looks for `base_layer.bias`, which a DroneLinear keeps in `up`
                warnings.filterwarnings("ignore", message="`lora_bias=True` was passed but the targeted layer")
            super().update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, self._lora_out_features(module)

    def _get_base_layer_device_and_dtype(self, base_layer):
        parameter = next(base_layer.parameters())
        return parameter.device, parameter.dtype

    def _widen(self, delta: torch.Tensor) -> torch.Tensor:
        return delta

    def _base_bias(self) -> torch.Tensor | None:
        return self.get_base_layer().bias

    def _lora_output(self, x: torch.Tensor, adapter: str) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[adapter], self.lora_B[adapter]
        x = self._cast_input_dtype(x, lora_a.weight.dtype)
        return self._widen(lora_b(lora_a(self.lora_dropout[adapter](x))) * self.scaling[adapter])

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        kwargs.pop("alora_offsets", None)
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        if adapter_names is not None:  # peft's mixed batch: one adapter (or "__base__") per row
            result = result.clone()
            for adapter in set(adapter_names) & set(self.lora_A):
                rows = [i for i, name in enumerate(adapter_names) if name == adapter]
                result[rows] += self._lora_output(x[rows], adapter).to(result.dtype)
            return result
        for adapter in self.active_adapters:
            if adapter in self.lora_A:
                result = result + self._lora_output(x, adapter).to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        """`scaling * B @ A` of `adapter` (`lora out x in`), in float32 for half-precision weights on CPU."""
        lora_a, lora_b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        if lora_b.device.type == "cpu" and lora_b.dtype in (torch.float16, torch.bfloat16):
            return ((lora_b.float() @ lora_a.float()) * self.scaling[adapter]).to(lora_b.dtype)
        return (lora_b @ lora_a) * self.scaling[adapter]

    def _bias_delta(self, adapter: str, bias: torch.Tensor | None) -> torch.Tensor | None:
        """`scaling * lora_B.bias` for `lora_bias=True`; refuses it on a layer without a bias."""
        if not self.lora_bias[adapter]:
            return None
        if bias is None:
            raise RuntimeError(
                f"Cannot merge adapter {adapter!r} with `lora_bias=True` into a layer without a bias "
                f"({self.base_layer!r})."
            )
        return (self.lora_B[adapter].bias * self.scaling[adapter]).to(bias.dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


class DroneLoraLinear(_DroneLoraLayer):
    r"""
    LoRA on a factored [`DroneLinear`] (`U V x + b`, rank `k`): `U V x + b + s·B A x`, as for the dense layer.

    `merge()` concatenates the factors to rank `k + r` (`[V; A]`, `[U | s·B]`, exact); `unmerge()` cuts them back to
    the original `k` factors (to the bit). A merge that would reach `min(in, out)` is refused: the factored form would
    then cost at least the dense layer, and `drone_ranks` only holds ranks below it.
    """

    def _lora_out_features(self, module: DroneLinear) -> int:
        return module.out_features

    def _base_bias(self) -> torch.Tensor | None:
        return self.get_base_layer().up.bias

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merges the active (or the named) adapters into the factors, raising the rank by `r` each (exact)."""
        base = self.get_base_layer()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            rank = base.rank + self.r[adapter]
            limit = min(base.in_features, base.out_features)
            if rank >= limit:
                raise ValueError(
                    f"Merging adapter {adapter!r} (r={self.r[adapter]}) into `{self.kwargs.get('target_name', '')}` "
                    f"(a DroneLinear of rank {base.rank}, {base.out_features}x{base.in_features}) gives rank {rank}, "
                    f"but a factored layer must stay below min(in, out) = {limit}. Use a LoRA `r` below "
                    f"{limit - base.rank} for this layer (`rank_pattern`), or keep the adapter unmerged."
                )
            down, up = merged_factors(
                base.down.weight.data,
                base.up.weight.data,
                self.lora_A[adapter].weight.data,
                self.lora_B[adapter].weight.data,
                self.scaling[adapter],
            )
            bias = self._bias_delta(adapter, self._base_bias())
            if safe_merge and not all(torch.isfinite(t).all() for t in (down, up, bias) if t is not None):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            _set_factors(base, down, up)
            if bias is not None:
                base.up.bias.data += bias
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Takes the merged adapters out again, last merged first: the factors are cut back to their rank before."""
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            rank = base.rank - self.r[adapter]
            _set_factors(base, *unmerged_factors(base.down.weight.data, base.up.weight.data, rank))
            bias = self._bias_delta(adapter, self._base_bias())
            if bias is not None:
                base.up.bias.data -= bias


class DroneLoraQKLinear(_DroneLoraLayer):
    r"""
    LoRA on the narrowed query/key projection of a DRONE attention block (a [`DroneQKLinear`]): the adapter's
    `num_heads * rank` outputs are added to the narrow projection before the per-head zero padding, so `merge()` adds
    `s·B A` to the narrow weight (every shape is kept) and `unmerge()` subtracts it, as peft does for `nn.Linear`.
    """

    def _lora_out_features(self, module: DroneQKLinear) -> int:
        return module.num_heads * module.rank

    def _widen(self, delta: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        delta = delta.view(*delta.shape[:-1], base.num_heads, base.rank)
        return nn.functional.pad(delta, (0, base.head_size - base.rank)).flatten(-2)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Adds `s·B A` (and `s·b_B` with `lora_bias`) of the active (or the named) adapters to the narrow weight."""
        base = self.get_base_layer()
        for adapter in check_adapters_to_merge(self, adapter_names):
            if adapter not in self.lora_A:
                continue
            weight = base.weight.data + self.get_delta_weight(adapter).to(base.weight.dtype)
            bias = self._bias_delta(adapter, self._base_bias())
            if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            base.weight.data = weight
            if bias is not None:
                base.bias.data += bias
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        """Subtracts the merged adapters again, last merged first."""
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            base.weight.data -= self.get_delta_weight(adapter).to(base.weight.dtype)
            bias = self._bias_delta(adapter, self._base_bias())
            if bias is not None:
                base.bias.data -= bias


def _check_options(base_layer: nn.Module, config, name: str) -> None:
    """Refuses the LoRA options these layers do not implement, naming the option and what is allowed."""
    kind = type(base_layer).__name__
    variants = [
        field.name
        for field in dataclasses.fields(config)
        if field.metadata.get("is_lora_variant") and getattr(config, field.name, None)
    ]
    if variants:
        raise ValueError(
            f"LoRA variants {variants} are not supported on `{name}` ({kind}, a layer of a DRONE-compressed model): "
            "plain LoRA is. Leave them unset, or target the factors with "
            "`drone_hf.lora_target_modules(model, [...])` (plain nn.Linear layers)."
        )
    if config.init_lora_weights not in _PLAIN_INITS:
        raise ValueError(
            f"`init_lora_weights={config.init_lora_weights!r}` is not supported on `{name}` ({kind}): it starts from "
            f"a dense weight. Use one of {list(_PLAIN_INITS)}, or target the factors with "
            "`drone_hf.lora_target_modules(model, [...])`."
        )
    if config.fan_in_fan_out:
        raise ValueError(f"`fan_in_fan_out=True` does not apply to `{name}` ({kind}); leave it False.")


__all__ = ["DroneLoraLinear", "DroneLoraQKLinear", "merged_factors", "unmerged_factors"]
