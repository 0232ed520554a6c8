"""The frozen teacher's outputs on each training row, computed once (`DroneDistillationArguments(cache_teacher_outputs=
True)`).

Feature distillation runs the dense teacher on every batch, so over several epochs it recomputes the same outputs; for
a student a few times cheaper than its teacher, that forward pass is most of a step. [`TeacherOutputCache`] runs the
teacher once over the training rows and keeps, per row, its logits and the hidden states the loss reads, for the
row's real tokens only. A batch's teacher outputs are then gathered and padded to the batch's own shape (padding
positions are zeros: the hidden-state loss leaves them out). Rows are recognised by their input ids (and token type
ids) under the attention mask, so shuffling, dynamic padding (on the right) and gradient accumulation need nothing
more; a row that was not cached (a collator that changes the inputs, such as random masking) and a left-padded batch
(whose positions depend on its length) are errors, never a wrong target.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn


CACHE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Storage dtypes of the cached hidden states (logits are always float32)."""


@dataclass
class CachedTeacherOutputs:
    """A batch's teacher outputs from the cache, shaped like a model output: `logits` (`batch x num_labels`) and
    `hidden_states` (one `batch x seq x hidden` tensor per hidden-state index; `None` at the indices not cached)."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor | None, ...] | None


def real_tokens(inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The batch's attention mask as booleans (all true without one).

    Raises:
        `ValueError`: for a left-padded row: its position ids, hence the teacher's outputs, depend on how long the
            batch is, so they cannot be cached per row.
    """
    ids = inputs["input_ids"]
    mask = inputs.get("attention_mask")
    mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if (mask[:, 1:] & ~mask[:, :-1]).any():
        raise ValueError(
            "`cache_teacher_outputs` needs right-padded batches (tokenizer.padding_side='right'): a left-padded "
            "row's positions, hence the teacher's outputs, depend on the length of its batch."
        )
    return mask


def row_keys(inputs: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None) -> list[bytes]:
    """One key per row of a batch: the row's `input_ids` (and `token_type_ids`) at its real tokens (attention mask
    1), so the same row gets the same key however far its batch is padded (on the right: [`real_tokens`]).

    Args:
        inputs (`Mapping[str, torch.Tensor]`): The batch.
        mask (`torch.Tensor`, *optional*): `real_tokens(inputs)` when the caller has it already (it is checked and
            computed here otherwise).
    """
    ids = inputs["input_ids"]
    mask = real_tokens(inputs) if mask is None else mask
    types = inputs.get("token_type_ids")
    keys = []
    for row in range(ids.shape[0]):
        key = ids[row][mask[row]].to(torch.int64).cpu().numpy().tobytes()
        if types is not None:
            key += b"|" + types[row][mask[row]].to(torch.int64).cpu().numpy().tobytes()
        keys.append(key)
    return keys


class TeacherOutputCache:
    r"""
    The teacher's logits and selected hidden states per training row (real tokens only), built once by
    [`TeacherOutputCache.build`] and read per batch by [`TeacherOutputCache.lookup`].

    Args:
        entries (`dict[bytes, tuple[Tensor, Tensor | None]]`): Row key ([`row_keys`]) -> `(logits, hidden)`, with
            `hidden` of shape `len(layers) x tokens x hidden_size` (or `None` when no layer is cached).
        layers (`Sequence[int]`): The cached hidden-state indices (0 = embeddings' output).
        num_hidden_states (`int`): How many hidden states the teacher returns (`num_hidden_layers + 1`).
    """

    def __init__(self, entries: dict, layers: Sequence[int], num_hidden_states: int):
        self.entries = entries
        self.layers = list(layers)
        self.num_hidden_states = num_hidden_states

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached tensors."""
        total = 0
        for logits, hidden in self.entries.values():
            total += logits.numel() * logits.element_size()
            if hidden is not None:
                total += hidden.numel() * hidden.element_size()
        return total

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        teacher: nn.Module,
        batches: Iterable[Mapping[str, torch.Tensor]],
        *,
        layers: Sequence[int] | str | None = "all",
        dtype: str = "float32",
        device: torch.device | str | None = None,
    ) -> TeacherOutputCache:
        r"""
        Runs `teacher` (in eval mode, its mode restored afterwards) once over `batches` and keeps each row's outputs.

        Args:
            teacher (`nn.Module`): The frozen dense model (`output_hidden_states` is requested when `layers` is
                not `None`).
            batches (`Iterable[Mapping[str, Tensor]]`): Collated training batches (`labels`, if present, are not
                passed to the teacher).
            layers (`Sequence[int]`, `"all"` or `None`, *optional*, defaults to `"all"`): Hidden-state indices to
                keep; `None` keeps the logits only.
            dtype (`str`, *optional*, defaults to `"float32"`): Storage dtype of the hidden states, one of
                [`CACHE_DTYPES`].
            device (`torch.device` or `str`, *optional*): Where the teacher runs (default: where its parameters are).
                The cache is kept on the CPU.

        Raises:
            `ValueError`: for an unknown `dtype`, a batch without `input_ids`, or no rows at all.
        """
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"`teacher_cache_dtype` must be one of {list(CACHE_DTYPES)}, got {dtype!r}.")
        storage = CACHE_DTYPES[dtype]
        if device is None:
            device = next(teacher.parameters()).device
        was_training = teacher.training
        teacher.eval()
        entries: dict[bytes, tuple[torch.Tensor, torch.Tensor | None]] = {}
        count = None
        try:
            for batch in batches:
                if "input_ids" not in batch:
                    raise ValueError(
                        f"`cache_teacher_outputs` needs `input_ids` in the training batches, got {sorted(batch)}."
                    )
                inputs = {k: v.to(device) for k, v in batch.items() if k != "labels" and torch.is_tensor(v)}
                outputs = teacher(**inputs, output_hidden_states=layers is not None)
                hidden_states = outputs.hidden_states if layers is not None else None
                if hidden_states is not None:
                    count = len(hidden_states)
                    chosen = list(range(count)) if layers == "all" else list(layers)
                mask = real_tokens(inputs)
                for row, key in enumerate(row_keys(inputs, mask)):
                    logits = outputs.logits[row].detach().float().cpu()
                    hidden = None
                    if hidden_states is not None:
                        hidden = torch.stack([hidden_states[i][row][mask[row]] for i in chosen]).to("cpu", storage)
                    entries[key] = (logits, hidden)
        finally:
            teacher.train(was_training)
        if not entries:
            raise ValueError("`cache_teacher_outputs`: the training batches held no rows.")
        if layers is None:
            return cls(entries, [], 0)
        return cls(entries, chosen, count)

    def lookup(self, inputs: Mapping[str, torch.Tensor], device=None) -> CachedTeacherOutputs:
        """The cached outputs of the rows of `inputs`, padded to its shape (zeros at padding), on `device` (default:
        that of `inputs["input_ids"]`).

        Raises:
            `KeyError`: for a row that was not cached, saying why that happens.
        """
        ids = inputs["input_ids"]
        device = ids.device if device is None else device
        mask = real_tokens(inputs)
        rows = []
        for key in row_keys(inputs, mask):
            entry = self.entries.get(key)
            if entry is None:
                raise KeyError(
                    "A training row is not in the teacher cache: `cache_teacher_outputs` needs batches made of the "
                    "training rows as they were cached (no random masking or other changes by the data collator)."
                )
            rows.append(entry)
        logits = torch.stack([logits for logits, _ in rows]).to(device)
        if not self.layers:
            return CachedTeacherOutputs(logits, None)
        batch, length = ids.shape
        width = rows[0][1].shape[-1]
        padded = torch.zeros(len(self.layers), batch, length, width, dtype=rows[0][1].dtype)
        cpu_mask = mask.cpu()
        for row, (_, hidden) in enumerate(rows):
            padded[:, row, cpu_mask[row]] = hidden
        padded = padded.to(device)
        hidden_states: list[torch.Tensor | None] = [None] * self.num_hidden_states
        for position, index in enumerate(self.layers):
            hidden_states[index] = padded[position]
        return CachedTeacherOutputs(logits, tuple(hidden_states))


__all__ = ["CACHE_DTYPES", "CachedTeacherOutputs", "TeacherOutputCache", "real_tokens", "row_keys"]
