"""A prototype, **not shipped**: `fuse_qkv`, one concatenated down-projection for the factored query, key and value of
each attention block, for CPU inference on short inputs. `benchmarks/qkv_concat.py --parts model` times it against the
unfused model; it was slower there (MiniLM-L6 at rank 96: -4.5% at 1 x 32 tokens, -0.6% at 8 x 128, fp32, 2 threads;
`benchmarks/results/qkv_concat.json`), so drone_hf does not include it. Kept so that the measurement can be re-run.

In a DRONE model the query, key and value of a block may each be a [`DroneLinear`] reading the same hidden state:
three thin products `in -> k`. Here one product `[V_q; V_k; V_v] x^T` (`k_q + k_k + k_v` rows) gives all three, and
each `up` product reads its rows as a transposed operand (no copy, no strided view). The attention module still calls
`query(h)`, `key(h)` and `value(h)` one by one; the first call computes the concatenated product for `h`, the other
two take their rows of it.

Safety of that hand-over:

- a part is reused only for the **same tensor object** (held, so its id cannot be reused) and only once per member:
  a second call of the same member, or any call with another tensor, recomputes;
- the state is per thread (two threads running the model at once never see each other's products), and it is
  dropped as soon as the three members have taken their parts;
- the concatenated weight is rebuilt whenever a `down` weight changes (its storage or version);
- everywhere else (autograd on, tracing / `torch.compile` / ONNX export, a non-CPU or non-float32 input, more than
  `max_tokens` rows) each member runs as a plain [`DroneLinear`].

The tensors are the members' own `down`/`up` parameters, so `state_dict()` and `save_pretrained` are those of the
unfused model: the checkpoint is the ordinary `drone_*` format and reloads unfused.
"""

from __future__ import annotations

import copy
import threading

import torch
from torch import nn

from drone_hf.layers import DroneLinear


DEFAULT_MAX_TOKENS = 128
"""Rows (batch x sequence) up to which the fused product runs: on the 2-core EPYC of `benchmarks/qkv_concat.py` it
gained at 1 x 32 and 1 x 128 tokens and lost at 8 x 128 and 32 x 128 (fp32)."""


class _SharedDown:
    """The concatenated `down` weights of a group of [`DroneLinear`] layers that read one input, and, per thread, the
    last input's product until every member has taken its rows."""

    def __init__(self, downs: list[nn.Linear]):
        self.downs = downs
        self.ranks = [down.out_features for down in downs]
        self._weight_key = None
        self._weight = None
        self._state: dict[int, tuple] = {}

    def __getstate__(self):
        # Copies (`copy.deepcopy`, pickling) start without a product or a cached weight.
        state = dict(self.__dict__)
        state.update(_weight_key=None, _weight=None, _state={})
        return state

    def weight(self) -> torch.Tensor:
        tensors = [down.weight for down in self.downs]
        key = tuple((t.data_ptr(), None if t.is_inference() else t._version, t.dtype, t.device) for t in tensors)
        if key != self._weight_key:
            self._weight = torch.cat([t.detach() for t in tensors])
            self._weight_key = key
        return self._weight

    def part(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Member `index`'s rows (`k x tokens`) of the concatenated product for `hidden_states`."""
        thread = threading.get_ident()
        state = self._state.get(thread)
        if state is None or state[0] is not hidden_states or index not in state[2]:
            rows = hidden_states.reshape(-1, hidden_states.shape[-1])
            parts = torch.mm(self.weight(), rows.t()).split(self.ranks)
            state = (hidden_states, parts, set(range(len(self.ranks))))
            self._state[thread] = state
        state[2].discard(index)
        if not state[2]:  # every member has its rows: nothing is kept
            self._state.pop(thread, None)
        return state[1][index]


class DroneFusedQKVLinear(DroneLinear):
    r"""
    A [`DroneLinear`] of a fused query/key/value group (see [`fuse_qkv`]): same parameters (`down`, `up`), same
    outputs; for short float32 CPU inputs under `torch.no_grad` / `torch.inference_mode` its down product is one
    slice of the group's concatenated product.
    """

    def _join(self, shared: _SharedDown, index: int, max_tokens: int) -> None:
        # Not a submodule (the shared object holds the members' `down` modules): kept out of `state_dict`.
        self.__dict__["_shared"] = shared
        self._index, self.max_tokens = index, max_tokens

    def _fused(self, hidden_states: torch.Tensor) -> bool:
        return (
            not torch.is_grad_enabled()
            and hidden_states.device.type == "cpu"
            and hidden_states.dtype == torch.float32 == self.up.weight.dtype
            and hidden_states.numel() <= self.max_tokens * self.in_features
            and not torch.jit.is_tracing()
            and not torch.jit.is_scripting()
            and not torch.compiler.is_compiling()
            and not torch.onnx.is_in_onnx_export()
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if not self._fused(hidden_states):
            return super().forward(hidden_states)
        part = self.__dict__["_shared"].part(self._index, hidden_states)  # k x tokens
        if self.up.bias is None:
            output = torch.mm(part.t(), self.up.weight.t())
        else:
            output = torch.addmm(self.up.bias, part.t(), self.up.weight.t())
        return output.view(*hidden_states.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fused down product {self._index} (up to {self.max_tokens} tokens)"


def fuse_qkv(model: nn.Module, *, max_tokens: int = DEFAULT_MAX_TOKENS) -> nn.Module:
    r"""
    Returns a **new** model in which each attention block whose query, key and value are all float [`DroneLinear`]
    layers computes their three down-projections as one product (see the module docstring); `model` is not
    modified. Outputs are those of `model` (up to float rounding of the product's order, well within `1e-6`).

    An inference transform for CPU float32 models on short inputs: the fused product runs under `torch.no_grad` /
    `torch.inference_mode` for inputs of at most `max_tokens` rows (batch x sequence); elsewhere each layer runs as
    before. `save_pretrained` of the result writes the ordinary unfused checkpoint (the parameters are the same), which
    reloads as the unfused model.

    Args:
        model (`PreTrainedModel`): A DRONE model of a family whose query, key and value read the same hidden state
            (`ArchitectureSpec.shared_inputs`: BERT-like, DistilBERT, MPNet, ALBERT, ...).
        max_tokens (`int`, *optional*, defaults to 128): Rows up to which the fused product runs
            ([`DEFAULT_MAX_TOKENS`]: where it was measured faster).

    Returns:
        The fused copy.

    Raises:
        `ValueError`: for an unsupported family, a bad `max_tokens`, or a model with no block whose query, key and
            value are all float `DroneLinear` layers (dense, int8 or DRONE-attention projections cannot be fused).

    Example:

    ```py
    >>> fast = drone_hf.fuse_qkv(small)  # doctest: +SKIP
    >>> with torch.inference_mode():  # doctest: +SKIP
    ...     logits = fast(**tokenizer("a short query", return_tensors="pt")).logits
    ```
    """
    from drone_hf.architecture import get_architecture, layer_names

    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"`max_tokens` must be an int >= 1 (rows of batch x sequence), got {max_tokens!r}.")
    spec = get_architecture(model)
    roles = ("query", "key", "value")
    if any(spec.shared_inputs.get(role) != "query" for role in roles[1:]) or "query" not in spec.linears:
        raise ValueError(
            f"`fuse_qkv` needs query, key and value projections that read the same input; {spec.model_type}'s do "
            "not (separate inputs or one fused projection already)."
        )
    groups = []
    for layer in layer_names(model):
        names = [f"{layer}.{spec.linears[role]}" for role in roles]
        modules = [model.get_submodule(name) for name in names]
        if all(type(m) is DroneLinear and type(m.down) is nn.Linear for m in modules):
            groups.append(names)
    if not groups:
        raise ValueError(
            "`model` has no attention block whose query, key and value are all float DroneLinear layers: nothing to "
            "fuse (dense, int8 or DRONE-attention projections are left as they are). Compress query, key and value "
            "with ranks (e.g. `compress_model(..., rank=96)`) and fuse that model."
        )
    new = copy.deepcopy(model)
    for names in groups:
        members = [new.get_submodule(name) for name in names]
        shared = _SharedDown([member.down for member in members])
        for index, (name, old) in enumerate(zip(names, members)):
            fused = DroneFusedQKVLinear(
                old.in_features, old.out_features, old.rank, bias=old.up.bias is not None, device="meta"
            )
            fused.down, fused.up = old.down, old.up
            fused._join(shared, index, max_tokens)
            fused.train(old.training)
            new.set_submodule(name, fused)
    return new


__all__ = ["DEFAULT_MAX_TOKENS", "DroneFusedQKVLinear", "fuse_qkv"]
