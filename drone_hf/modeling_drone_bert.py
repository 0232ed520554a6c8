"""BERT sequence classifier whose linear layers are rebuilt in factored form from [`DroneConfig`].

Side-effect free and self-contained (transformers + files of this folder only), so it can be copied into a Hub repo
for `trust_remote_code=True` loading. Auto-class registration happens in `drone_hf/__init__.py`, never here.
"""

from __future__ import annotations

from transformers import BertForSequenceClassification
from transformers.utils import logging

from .configuration_drone import DroneConfig
from .layers import DroneLinear
from .attention import DroneBertSelfAttention
from .replace import replace_attention_with_drone, replace_linear_with_drone


logger = logging.get_logger(__name__)
_FACTOR_SUFFIXES = (".down.weight", ".up.weight", ".up.bias")


class DroneBertForSequenceClassification(BertForSequenceClassification):
    r"""
    [`~transformers.BertForSequenceClassification`] with the modules listed in `config.drone_ranks` replaced by
    [`DroneLinear`] layers of those ranks, and the self-attention blocks listed in `config.drone_attention_ranks` by
    [`DroneBertSelfAttention`] blocks whose per-head query/key width is that rank.

    The constructor only allocates shapes (it is safe on the meta device, which `from_pretrained` uses); the factors
    themselves come from the checkpoint or from [`compress_model`]. Modules not listed stay dense.

    Args:
        config ([`DroneConfig`]): Model configuration, including the per-module ranks.

    Example:

    ```py
    >>> import drone_hf  # registers "drone_bert" with the Auto classes
    >>> from transformers import AutoModelForSequenceClassification
    >>> model = AutoModelForSequenceClassification.from_pretrained("path/to/compressed")  # doctest: +SKIP
    ```
    """

    config_class = DroneConfig
    config: DroneConfig

    def __init__(self, config: DroneConfig):
        super().__init__(config)
        # Attention blocks first: a factored `value` linear then lands inside the new block.
        replace_attention_with_drone(self, config.drone_attention_ranks or {})
        replace_linear_with_drone(self, config.drone_ranks or {})
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Same as [`~transformers.PreTrainedModel.from_pretrained`], but refuses a checkpoint whose tensors do not
        match its `drone_ranks` instead of silently re-initialising factored layers.

        Raises:
            `ValueError`: if a factored tensor is missing, unexpected or of another shape than the config says.
        """
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            raise ValueError(
                "The checkpoint's tensors do not match the shapes its `drone_ranks` (config.json) describes; "
                "the checkpoint is corrupt or its config was edited. See the load report above."
            ) from error
        model._check_drone_loading_info(info)
        return (model, info) if want_info else model

    def _check_drone_loading_info(self, info: dict) -> None:
        factored = tuple(
            f"{name}." for name in {**(self.config.drone_ranks or {}), **(self.config.drone_attention_ranks or {})}
        )
        keys = set(info.get("missing_keys", ())) | set(info.get("unexpected_keys", ()))
        keys |= {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())}
        bad = sorted(k for k in keys if k.startswith(factored) or k.endswith(_FACTOR_SUFFIXES))
        if bad:
            raise ValueError(
                f"The checkpoint does not match its config: `drone_ranks` lists {len(self.config.drone_ranks or {})} "
                f"factored modules, but these tensors are missing, unexpected or mismatched: {bad}."
            )

    def drone_modules(self) -> dict[str, DroneLinear | DroneBertSelfAttention]:
        """Returns the factored layers and attention blocks, keyed by full module name."""
        kinds = (DroneLinear, DroneBertSelfAttention)
        return {name: module for name, module in self.named_modules() if isinstance(module, kinds)}


__all__ = ["DroneBertForSequenceClassification"]
