"""Dynamic int8 module kinds: int8 weights with per-output-channel scales, activations quantised at run time.

Part of the format layer (imported by `structure.py`, copied beside the weights for the remote-code path), so it
imports only torch and siblings. The structure lives in `config.drone_quantization`; the tensors are plain int8 and
float32 buffers, so the checkpoint is ordinary safetensors (no pickles, no packed parameters).

The matrix product runs in `quantized::linear_dynamic`, the CPU kernel (fbgemm / onednn) behind
`torch.ao.quantization.quantize_dynamic`: it quantises each call's activations (one affine scale per call, 7-bit range
as `quantize_dynamic` uses on x86) and multiplies in int8 with int32 accumulation. Its packed weight cannot be saved,
so it is built from the saved buffers at the first forward and rebuilt when they change. `torch._int_mm`, the other
int8 product torch offers, is a plain loop on CPU (tens of times slower than float32), so it is not used.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .layers import DroneQKLinear


INT8_METHOD = "int8-dynamic"
"""`config.drone_quantization["method"]` of dynamic int8 (the only quantisation drone_hf writes)."""

# quantize_dynamic's per-channel observer (PerChannelMinMaxObserver, qint8, symmetric): scale = max|w| / 127.5.
_HALF_RANGE = 127.5
_EPS = torch.finfo(torch.float32).eps


def quantize_weight_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 quantisation of a `(out, in)` weight: `(int8 weight, float32 scale)` with
    `weight ≈ int8 * scale[:, None]`, as `quantize_dynamic` with `per_channel_dynamic_qconfig` computes them."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / _HALF_RANGE).clamp_min(_EPS)
    # Times the float32 inverse, not divided by the scale: the rounding `quantize_per_channel` does, to the bit.
    return torch.round(weight * (1.0 / scale)[:, None]).clamp(-128, 127).to(torch.int8), scale


def _kernel_available() -> bool:
    return hasattr(torch.ops.quantized, "linear_dynamic") and hasattr(torch.ops.quantized, "linear_prepack")


class _Int8Kernel:
    """The int8 product of a module with `weight` (int8), `weight_scale` (float32) and `bias` buffers: packs them for
    `quantized::linear_dynamic` lazily and caches the packed weight until a buffer changes."""

    def _int8_linear(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if hidden_states.device.type != "cpu":
            raise RuntimeError(
                f"{type(self).__name__} runs on CPU only (the fbgemm/onednn dynamic int8 kernel), got an input on "
                f"{hidden_states.device}; load int8 checkpoints on CPU."
            )
        packed = self._packed()
        inputs = hidden_states.float()
        if packed is not None:
            output = torch.ops.quantized.linear_dynamic(inputs, packed, True)
        else:  # no quantized engine in this torch build: the dequantised int8 weights in float (activations exact)
            output = nn.functional.linear(inputs, self.weight.float() * self.weight_scale[:, None].float(), None)
            if self.bias is not None:
                output = output + self.bias.float()
        return output.to(hidden_states.dtype)

    def _packed(self):
        if not _kernel_available():
            return None
        tensors = (self.weight, self.weight_scale, self.bias)
        key = tuple(None if t is None else (t.data_ptr(), None if t.is_inference() else t._version) for t in tensors)
        cache = self.__dict__.get("_packed_cache")
        if cache is not None and cache[0] == key:
            return cache[1]
        with warnings.catch_warnings():  # quantised-tensor constructors warn about their future removal
            warnings.simplefilter("ignore")
            zero_points = torch.zeros(self.weight.shape[0], dtype=torch.long)
            qweight = torch._make_per_channel_quantized_tensor(self.weight, self.weight_scale.double(), zero_points, 0)
            bias = None if self.bias is None else self.bias.detach().float()
            packed = torch.ops.quantized.linear_prepack(qweight, bias)
        self.__dict__["_packed_cache"] = (key, packed)
        return packed

    def __getstate__(self):
        # The packed weight is a C++ object that neither pickles nor deep-copies; it is rebuilt on demand.
        state = dict(super().__getstate__())
        state.pop("_packed_cache", None)
        return state

    def _register_int8_buffers(self, out_features: int, in_features: int, bias: bool, device) -> None:
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32, device=device) if bias else None)

    def _load_int8(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        qweight, scale = quantize_weight_int8(weight)
        self.weight.copy_(qweight)
        self.weight_scale.copy_(scale)
        if bias is not None:
            self.bias.copy_(bias.detach().float())


class DroneInt8Linear(_Int8Kernel, nn.Module):
    r"""
    A dynamically quantised replacement of an `nn.Linear` (dense, or the `down`/`up` half of a [`DroneLinear`]):
    `y = dequantise(quantise(x) @ W_int8^T) + b` on CPU.

    Persisted tensors (buffers, so nothing here trains): `weight` (`out x in`, int8), `weight_scale` (`out`, float32,
    `W ≈ weight * weight_scale[:, None]`) and `bias` (`out`, float32, only if the original layer had one). The output
    has the input's dtype.

    Args:
        in_features (`int`), out_features (`int`): Sizes of the linear.
        bias (`bool`, *optional*, defaults to `True`): Whether the layer has a bias.
        device: Of the buffers (CPU to run it; meta while `from_pretrained` builds the model).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._register_int8_buffers(out_features, in_features, bias, device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self._int8_linear(hidden_states)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DroneInt8Linear:
        """Quantises `linear` (its weight per output channel; its bias kept in float32)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="cpu")
        layer._load_int8(linear.weight, linear.bias)
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 dynamic"


class DroneInt8QKLinear(_Int8Kernel, DroneQKLinear):
    r"""
    A [`DroneQKLinear`] (narrowed query/key projection, zero-padded per head) whose narrow product runs in dynamic
    int8. Persisted tensors: `weight` (`num_heads * rank x in`, int8), `weight_scale` and `bias` (float32).
    """

    def __init__(self, in_features: int, num_heads: int, head_size: int, rank: int, bias: bool = True, device=None):
        super().__init__(in_features, num_heads, head_size, rank, bias=bias, device="meta")
        del self.weight, self.bias  # the float parameters become int8 / float32 buffers
        self._register_int8_buffers(num_heads * rank, in_features, bias, device)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        narrow = self._int8_linear(hidden_states)
        narrow = narrow.view(*narrow.shape[:-1], self.num_heads, self.rank)
        return nn.functional.pad(narrow, (0, self.head_size - self.rank)).flatten(-2)

    @classmethod
    def from_qk_linear(cls, layer: DroneQKLinear) -> DroneInt8QKLinear:
        """Quantises a float [`DroneQKLinear`]."""
        new = cls(layer.in_features, layer.num_heads, layer.head_size, layer.rank, layer.bias is not None, "cpu")
        new._load_int8(layer.weight, layer.bias)
        return new

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, int8 dynamic"


def replace_linear_with_int8(model: nn.Module, names: list[str] | tuple[str, ...]) -> list[str]:
    """Replaces each module named in `names` (an `nn.Linear` or a [`DroneQKLinear`]) by its dynamic int8 kind, in
    place; float weights are quantised (on the meta device only the shapes are built, for `from_pretrained` to fill).

    All names are checked before the first swap. Already quantised modules are skipped.

    Returns:
        `list[str]`: The names of the replaced modules.

    Raises:
        `ValueError`: for an unknown module or one of another kind.
    """
    modules = dict(model.named_modules())
    for name in names:
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, DroneQKLinear)):
            found = "no such module" if module is None else f"a {type(module).__name__}"
            raise ValueError(
                f"`drone_quantization` lists `{name}`, which is {found}; only nn.Linear and DroneQKLinear modules "
                "can be quantised to int8."
            )
    replaced = []
    for name in names:
        old = modules[name]
        if isinstance(old, (DroneInt8Linear, DroneInt8QKLinear)):
            continue
        meta = old.weight.device.type == "meta"
        if isinstance(old, DroneQKLinear):
            args = (old.in_features, old.num_heads, old.head_size, old.rank, old.bias is not None)
            new = DroneInt8QKLinear(*args, device="meta") if meta else DroneInt8QKLinear.from_qk_linear(old)
        else:
            args = (old.in_features, old.out_features, old.bias is not None)
            new = DroneInt8Linear(*args, device="meta") if meta else DroneInt8Linear.from_linear(old)
        if not meta and old.weight.device.type != "cpu":
            new = new.to(old.weight.device)
        new.train(old.training)
        model.set_submodule(name, new)
        replaced.append(name)
    return replaced


__all__ = ["INT8_METHOD", "DroneInt8Linear", "DroneInt8QKLinear", "quantize_weight_int8", "replace_linear_with_int8"]
