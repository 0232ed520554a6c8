"""BERT self-attention whose per-head query/key width is narrowed by DRONE (docs/methods.md §1a).

Copied next to the weights for the Hub remote-code path, so it imports nothing from drone_hf.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.bert.modeling_bert import BertSelfAttention, eager_attention_forward


class DroneBertSelfAttention(BertSelfAttention):
    r"""
    [`~transformers.models.bert.modeling_bert.BertSelfAttention`] with `query` and `key` projecting to `qk_rank`
    dimensions per head instead of `d_h`, so that each head's logits are `x_q^T M x_k` with a rank-`qk_rank`
    bilinear form `M` (the DRONE optimum of `W_Q^h W_K^h^T` under the data). Values keep their full width, and the
    logits are still scaled by the **original** `1/sqrt(d_h)`.

    Persisted tensors: `query.weight` / `key.weight` (`num_heads * qk_rank x hidden`), `query.bias` / `key.bias`
    (`num_heads * qk_rank`), and `value.*` unchanged.

    Args:
        config: The model config.
        qk_rank (`int`): Per-head query/key width, `1 <= qk_rank < d_h`.
        is_causal, layer_idx: As in `BertSelfAttention`.
    """

    def __init__(self, config, qk_rank: int, is_causal: bool = False, layer_idx: int | None = None):
        super().__init__(config, is_causal=is_causal, layer_idx=layer_idx)
        if isinstance(qk_rank, bool) or not isinstance(qk_rank, int) or not 0 < qk_rank < self.attention_head_size:
            raise ValueError(
                f"`qk_rank` must be an int in [1, {self.attention_head_size - 1}] (the head size is "
                f"{self.attention_head_size}), got {qk_rank!r}."
            )
        self.qk_rank = qk_rank
        width = self.num_attention_heads * qk_rank
        self.query = nn.Linear(config.hidden_size, width)
        self.key = nn.Linear(config.hidden_size, width)
        # self.scaling stays attention_head_size ** -0.5: the factors were fitted to the original logits.

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if past_key_values is not None:
            raise NotImplementedError("DroneBertSelfAttention does not support a key/value cache (decoder use).")
        input_shape = hidden_states.shape[:-1]
        query = self.query(hidden_states).view(*input_shape, -1, self.qk_rank).transpose(1, 2)
        key = self.key(hidden_states).view(*input_shape, -1, self.qk_rank).transpose(1, 2)
        value = self.value(hidden_states).view(*input_shape, -1, self.attention_head_size).transpose(1, 2)
        if self.config._attn_implementation == "sdpa" and not kwargs.get("output_attentions", False):
            attn_output = self._narrow_attention(query, key, value, attention_mask)
            return attn_output.transpose(1, 2).reshape(*input_shape, -1), None
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout.p,
            scaling=self.scaling,
            **kwargs,
        )
        return attn_output.reshape(*input_shape, -1).contiguous(), attn_weights

    def _narrow_attention(self, query, key, value, attention_mask) -> torch.Tensor:
        """Softmax attention with query/key narrower than value, `(batch, heads, tokens, d_h)` out.

        PyTorch's fused attention kernels need equal query/key/value widths; with narrower query/key, SDPA falls
        back to a reference path that is slower than the dense head (measured on CPU: 3.8 ms vs 1.9 ms for 8 x 12
        heads x 128 tokens). Zero-padding query and key to `d_h` keeps every logit unchanged (the extra coordinates
        contribute `0 * 0`) and keeps the fused kernel; the saving is in the query/key projections.
        """
        pad = self.attention_head_size - self.qk_rank
        return nn.functional.scaled_dot_product_attention(
            nn.functional.pad(query, (0, pad)),
            nn.functional.pad(key, (0, pad)),
            value,
            attn_mask=attention_mask,
            dropout_p=self.dropout.p if self.training else 0.0,
            scale=self.scaling,
        )

    def extra_repr(self) -> str:
        return f"num_heads={self.num_attention_heads}, head_size={self.attention_head_size}, qk_rank={self.qk_rank}"


__all__ = ["DroneBertSelfAttention"]
