"""Projectively clustered word embedding (docs/methods.md §3): `k` subspaces of dimension `j` instead of one SVD.

This file is copied next to the weights for the Hub remote-code path, so it imports nothing from drone_hf; the
clustering itself lives in `drone_hf.projective` and `compress_model`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch
from torch import nn
from torch.nn import functional as F


_SPEC_KEYS = ("module", "k", "j")
_FQN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def _check_size(name: str, value, low: int, high: int, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"`{name}` must be an int in [{low}, {high}] ({why}), got {value!r}.")
    return value


class DroneEmbedding(nn.Module):
    r"""
    A `(k, j)`-projectively clustered replacement for `nn.Embedding(num_embeddings, embedding_dim)`: token `t` in
    cluster `c = assignments[t]` is embedded as `coefficients[t] @ bases[c]`.

    Parameters: `num_embeddings * j + k * j * embedding_dim` instead of `num_embeddings * embedding_dim`. The forward
    pass gathers the `(..., j)` coefficients and multiplies each cluster's tokens by its `(j, d)` basis, so it never
    materialises a `(..., j, d)` tensor. Persisted tensors: `coefficients` (`n x j`), `bases` (`k x j x d`) and the
    int64 buffer `assignments` (`n`). With `k = 1` the layer is the truncated SVD of the embedding matrix.

    Args:
        num_embeddings (`int`): Vocabulary size `n`.
        embedding_dim (`int`): Embedding width `d`.
        k (`int`): Number of subspaces, `1 <= k <= n`.
        j (`int`): Dimension of every subspace, `1 <= j < d`.
        padding_idx (`int`, *optional*): As in `nn.Embedding`: that token's coefficients get no gradient.
        device, dtype: Of the two parameters (the assignments are always int64).

    Example:

    ```py
    >>> import torch
    >>> from drone_hf import DroneEmbedding
    >>> layer = DroneEmbedding(100, 16, k=4, j=3)
    >>> layer(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 16])
    ```
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        k: int,
        j: int,
        padding_idx: int | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        _check_size("num_embeddings", num_embeddings, 1, 2**62, "rows of the embedding")
        _check_size("embedding_dim", embedding_dim, 2, 2**62, "a subspace needs j < embedding_dim")
        _check_size("k", k, 1, num_embeddings, f"at most num_embeddings={num_embeddings}")
        _check_size("j", j, 1, embedding_dim - 1, f"below embedding_dim={embedding_dim}")
        if padding_idx is not None:
            padding_idx = _check_size("padding_idx", padding_idx, -num_embeddings, num_embeddings - 1, "a row")
            padding_idx %= num_embeddings  # nn.Embedding's convention for negative indices
        self.num_embeddings, self.embedding_dim, self.k, self.j = num_embeddings, embedding_dim, k, j
        self.padding_idx = padding_idx
        self.coefficients = nn.Parameter(torch.empty(num_embeddings, j, device=device, dtype=dtype))
        self.bases = nn.Parameter(torch.empty(k, j, embedding_dim, device=device, dtype=dtype))
        self.register_buffer("assignments", torch.zeros(num_embeddings, dtype=torch.long, device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init for a model built without weights; `from_pretrained` and `compress_model` overwrite it."""
        # nn.init is a no-op inside transformers' `no_init_weights` (from_pretrained), and meta tensors hold no data.
        nn.init.normal_(self.coefficients, std=1.0)
        nn.init.normal_(self.bases, std=self.embedding_dim**-0.5)  # rows of about unit norm, like an orthonormal basis
        if self.padding_idx is not None and not self.coefficients.is_meta:
            with torch.no_grad():
                self.coefficients[self.padding_idx].fill_(0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        coefficients = F.embedding(input_ids, self.coefficients, self.padding_idx)
        if self.k == 1 or input_ids.numel() == 0:
            return coefficients @ self.bases[0]
        flat = coefficients.reshape(-1, self.j)
        clusters = self.assignments[input_ids.reshape(-1)]
        # Tokens sorted by cluster: one host sync for the counts, then one (count_c, j) @ (j, d) product per cluster.
        order = clusters.argsort(stable=True)
        counts = torch.bincount(clusters, minlength=self.k).tolist()
        parts = [part @ self.bases[c] for c, part in enumerate(flat[order].split(counts)) if counts[c]]
        inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        return torch.cat(parts)[inverse].view(*input_ids.shape, self.embedding_dim)

    @classmethod
    def from_factors(
        cls,
        coefficients: torch.Tensor,
        bases: torch.Tensor,
        assignments: torch.Tensor,
        padding_idx: int | None = None,
    ) -> DroneEmbedding:
        """Builds the layer from `coefficients` (`n x j`), `bases` (`k x j x d`) and `assignments` (`n`, in `[0, k)`).

        Raises:
            `ValueError`: If the shapes disagree or an assignment lies outside `[0, k)`.
        """
        if coefficients.dim() != 2 or bases.dim() != 3 or bases.shape[1] != coefficients.shape[1]:
            raise ValueError(
                f"`coefficients` must be (n, j) and `bases` (k, j, d) with the same j, got "
                f"{tuple(coefficients.shape)} and {tuple(bases.shape)}."
            )
        (n, j), (k, _, d) = coefficients.shape, bases.shape
        if assignments.shape != (n,) or assignments.is_floating_point():
            raise ValueError(
                f"`assignments` must be an integer tensor of shape ({n},), got {tuple(assignments.shape)}."
            )
        if n and not 0 <= int(assignments.min()) <= int(assignments.max()) < k:
            raise ValueError(
                f"`assignments` must lie in [0, {k}) (k = bases.shape[0]), got "
                f"[{int(assignments.min())}, {int(assignments.max())}]."
            )
        layer = cls(n, d, k, j, padding_idx=padding_idx, device="meta", dtype=bases.dtype)
        layer.coefficients = nn.Parameter(coefficients.detach().to(bases.dtype).clone())
        layer.bases = nn.Parameter(bases.detach().clone())
        layer.assignments = assignments.detach().to(device=bases.device, dtype=torch.long).clone()
        return layer

    @classmethod
    def from_embedding(cls, weight: torch.Tensor, result, padding_idx: int | None = None) -> DroneEmbedding:
        """Builds the layer from an `n x d` embedding matrix and its clustering (anything with `.assignments` (`n`)
        and orthonormal-row `.bases` (`k x j x d`), e.g. a `drone_hf.projective.ProjectiveClusteringResult`): every
        row's coefficients are its projection `a V_c^T` on its own subspace.

        Args:
            weight (`torch.Tensor`): The `n x d` embedding matrix (e.g. `word_embeddings.weight`).
            result: The clustering of the rows of `weight`.
            padding_idx (`int`, *optional*): Copied from the original `nn.Embedding`.
        """
        bases, assignments = result.bases, result.assignments
        if weight.dim() != 2 or bases.dim() != 3 or weight.shape[1] != bases.shape[2]:
            raise ValueError(
                f"`weight` must be (n, d) and `result.bases` (k, j, d), got {tuple(weight.shape)} and "
                f"{tuple(bases.shape)}."
            )
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        weight, bases = weight.detach(), bases.detach().to(device=weight.device, dtype=dtype)
        assignments = assignments.to(weight.device)
        coefficients = weight.new_zeros(weight.shape[0], bases.shape[1], dtype=dtype)
        for c in range(bases.shape[0]):
            rows = (assignments == c).nonzero().flatten()
            # float64 projection: the coefficients of an exact row are then as close to float32 rounding as possible
            coefficients[rows] = (weight[rows].double() @ bases[c].double().T).to(dtype)
        return cls.from_factors(coefficients, bases, assignments, padding_idx=padding_idx)

    def to_dense(self) -> nn.Embedding:
        """Returns the equivalent `nn.Embedding` whose row `t` is `coefficients[t] @ bases[assignments[t]]`."""
        with torch.no_grad():
            weight = self(torch.arange(self.num_embeddings, device=self.coefficients.device))
        dense = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx, device="meta")
        dense.weight = nn.Parameter(weight.detach().clone())
        return dense

    def extra_repr(self) -> str:
        text = f"{self.num_embeddings}, {self.embedding_dim}, k={self.k}, j={self.j}"
        return text if self.padding_idx is None else f"{text}, padding_idx={self.padding_idx}"


def validate_embedding_spec(
    spec: Mapping, num_embeddings: int | None = None, embedding_dim: int | None = None
) -> None:
    """Checks a `drone_embedding` spec `{"module": name, "k": int, "j": int}`, against the embedding's size if given.

    Raises:
        `ValueError`: naming the key, the value and the allowed range.
    """
    if not isinstance(spec, Mapping) or set(spec) != set(_SPEC_KEYS):
        got = sorted(spec) if isinstance(spec, Mapping) else type(spec).__name__
        raise ValueError(
            f"`drone_embedding` must be a dict with exactly the keys {list(_SPEC_KEYS)}, e.g. "
            f"{{'module': 'bert.embeddings.word_embeddings', 'k': 4, 'j': 219}}, got {got}."
        )
    module = spec["module"]
    if not isinstance(module, str) or not _FQN_RE.match(module):
        raise ValueError(f"`drone_embedding['module']` must be a full module name (no regex), got {module!r}.")
    for key in ("k", "j"):
        value = spec[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"`drone_embedding[{key!r}]` must be a positive int, got {value!r}.")
    if num_embeddings is not None and spec["k"] > num_embeddings:
        raise ValueError(
            f"`drone_embedding['k']` must be in [1, {num_embeddings}] (at most the vocabulary size), got {spec['k']}."
        )
    if embedding_dim is not None and spec["j"] >= embedding_dim:
        raise ValueError(
            f"`drone_embedding['j']` must be in [1, {embedding_dim - 1}] (below the embedding width), got {spec['j']}."
        )


def replace_embedding_with_drone(
    model: nn.Module,
    spec: Mapping | None,
    *,
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> str | None:
    """Replaces the `nn.Embedding` named by `spec["module"]` with a [`DroneEmbedding`] of `spec["k"]`, `spec["j"]`.

    Without `factors` the new layer only gets its shapes (on the old weight's device and dtype; safe on the meta
    device), for `from_pretrained` to fill. Everything is checked before the swap.

    Args:
        model (`nn.Module`): The model to modify in place.
        spec (`Mapping`, *optional*): `{"module": full module name, "k": int, "j": int}` (`config.drone_embedding`);
            `None` does nothing.
        factors (`tuple[Tensor, Tensor, Tensor]`, *optional*): `(coefficients, bases, assignments)` of shapes
            `(n, j)`, `(k, j, d)` and `(n,)`.

    Returns:
        `str | None`: The name of the replaced module, or `None` if nothing was replaced.

    Raises:
        `ValueError`: for a malformed spec, a module that is not an `nn.Embedding`, `k > n`, `j >= d`, or factors of
            other shapes.
    """
    if spec is None:
        return None
    validate_embedding_spec(spec)
    name, k, j = spec["module"], spec["k"], spec["j"]
    modules = dict(model.named_modules())
    old = modules.get(name)
    if isinstance(old, DroneEmbedding):
        if (old.k, old.j) != (k, j) or factors is not None:
            raise ValueError(
                f"`{name}` is already a DroneEmbedding with k={old.k}, j={old.j}; cannot set k={k}, j={j}."
            )
        return None
    if not isinstance(old, nn.Embedding):
        found = "no such module" if old is None else f"a {type(old).__name__}"
        embeddings = [n for n, m in modules.items() if isinstance(m, nn.Embedding)]
        raise ValueError(
            f"`drone_embedding['module']` {name!r} is {found}; expected an nn.Embedding, one of {embeddings}."
        )
    n, d = old.num_embeddings, old.embedding_dim
    validate_embedding_spec(spec, n, d)
    if factors is None:
        new = DroneEmbedding(n, d, k, j, old.padding_idx, device=old.weight.device, dtype=old.weight.dtype)
    else:
        expected = [(n, j), (k, j, d), (n,)]
        if len(factors) != 3 or [tuple(t.shape) for t in factors] != expected:
            raise ValueError(
                f"Factors for `{name}` must have shapes {expected} (coefficients, bases, assignments), got "
                f"{[tuple(t.shape) for t in factors]}."
            )
        coefficients, bases, assignments = factors
        new = DroneEmbedding.from_factors(
            coefficients.to(old.weight), bases.to(old.weight), assignments.to(old.weight.device), old.padding_idx
        )
    new.train(old.training)
    model.set_submodule(name, new)
    return name


@torch.no_grad()
def token_frequencies(dataloader: Iterable[Mapping[str, torch.Tensor]], vocab_size: int) -> torch.Tensor:
    """Counts how often every token id occurs in the batches' `input_ids`, skipping positions whose `attention_mask`
    is 0 (padding). The counts can weight the rows of the projective clustering (`embedding_options={"weights": ...}`
    of `compress_model`), e.g. as `1 + torch.log1p(counts)`.

    Args:
        dataloader (`Iterable[dict]`): Tokenizer batches with `input_ids` (and optionally `attention_mask`).
        vocab_size (`int`): Number of token ids (`config.vocab_size`).

    Returns:
        `torch.Tensor`: `(vocab_size,)` float64 counts.

    Raises:
        `ValueError`: If a batch has no `input_ids` or an id outside `[0, vocab_size)`.
    """
    _check_size("vocab_size", vocab_size, 1, 2**62, "number of token ids")
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    for batch in dataloader:
        if "input_ids" not in batch:
            raise ValueError(f"Every batch needs `input_ids`, got keys {sorted(batch)}.")
        ids = torch.as_tensor(batch["input_ids"])
        mask = batch.get("attention_mask")
        ids = ids[torch.as_tensor(mask).bool()] if mask is not None else ids.reshape(-1)
        if ids.numel() and not 0 <= int(ids.min()) <= int(ids.max()) < vocab_size:
            raise ValueError(
                f"`input_ids` must lie in [0, {vocab_size}) (`vocab_size`), got [{int(ids.min())}, {int(ids.max())}]."
            )
        counts += torch.bincount(ids.reshape(-1).cpu(), minlength=vocab_size).double()
    return counts


__all__ = ["DroneEmbedding", "replace_embedding_with_drone", "token_frequencies", "validate_embedding_spec"]
