"""BERT sequence classifier whose linear layers are rebuilt in factored form from [`DroneConfig`].

Side-effect free and self-contained (transformers + files of this folder only), so it can be copied into a Hub repo
for `trust_remote_code=True` loading. Auto-class registration happens in `drone_hf/__init__.py`, never here.
"""

from __future__ import annotations

from transformers import BertForSequenceClassification
from transformers.utils import logging

from .attention import DroneBertSelfAttention
from .configuration_drone import DroneConfig
from .embedding import DroneEmbedding, replace_embedding_with_drone
from .layers import DroneLinear
from .replace import replace_attention_with_drone, replace_linear_with_drone


logger = logging.get_logger(__name__)
_FACTOR_SUFFIXES = (".down.weight", ".up.weight", ".up.bias", ".coefficients", ".bases", ".assignments")


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
        replace_embedding_with_drone(self, config.drone_embedding)  # shapes only, like the linears
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
                "The checkpoint's tensors do not match the shapes its `drone_ranks`/`drone_embedding` (config.json) "
                "describe; "
                "the checkpoint is corrupt or its config was edited. See the load report above."
            ) from error
        model._check_drone_loading_info(info)
        return (model, info) if want_info else model

    def _check_drone_loading_info(self, info: dict) -> None:
        embedding = [self.config.drone_embedding["module"]] if self.config.drone_embedding else []
        factored = tuple(
            f"{name}."
            for name in [*(self.config.drone_ranks or {}), *(self.config.drone_attention_ranks or {}), *embedding]
        )
        keys = set(info.get("missing_keys", ())) | set(info.get("unexpected_keys", ()))
        keys |= {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())}
        bad = sorted(k for k in keys if k.startswith(factored) or k.endswith(_FACTOR_SUFFIXES))
        if bad:
            raise ValueError(
                f"The checkpoint does not match its config: `drone_ranks` lists {len(self.config.drone_ranks or {})} "
                f"factored modules (`drone_embedding`: {self.config.drone_embedding}), but these tensors are "
                f"missing, unexpected or mismatched: {bad}."
            )
        for name, module in self.named_modules():
            # An out-of-range cluster id would index past `bases` at the first forward; refuse it at load instead.
            if (
                isinstance(module, DroneEmbedding)
                and not 0 <= int(module.assignments.min()) <= int(module.assignments.max()) < module.k
            ):
                raise ValueError(
                    f"The checkpoint's `{name}.assignments` must lie in [0, {module.k}) (`drone_embedding['k']`), got "
                    f"[{int(module.assignments.min())}, {int(module.assignments.max())}]."
                )

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Same as [`~transformers.PreTrainedModel.save_pretrained`]; when drone_hf is importable it also writes the
        model card (`README.md`, merged if present) and saves through a temporary folder moved into place, so an
        interrupted save never leaves a half-written checkpoint (see `drone_hf.hub.save_pretrained_with_card`).

        Without drone_hf (the `trust_remote_code=True` copy of this file) it is the plain transformers method.
        """
        try:  # lazy and guarded: this file must stay importable without drone_hf
            from drone_hf.hub import save_pretrained_with_card
        except ImportError:
            return super().save_pretrained(save_directory, *args, **kwargs)
        return save_pretrained_with_card(self, super().save_pretrained, save_directory, *args, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Same as [`~transformers.PreTrainedModel.push_to_hub`], but uploads the drone_hf model card with the
        checkpoint (`drone_hf.push_compressed_to_hub`) when drone_hf is importable; returns the commit URL."""
        try:
            from drone_hf.hub import push_compressed_to_hub
        except ImportError:
            return super().push_to_hub(repo_id, **kwargs)
        return push_compressed_to_hub(self, repo_id, **{"private": None, **kwargs})

    def resize_token_embeddings(self, *args, **kwargs):
        """Same as [`~transformers.PreTrainedModel.resize_token_embeddings`] for a dense embedding.

        Raises:
            `NotImplementedError`: if the word embedding is a [`DroneEmbedding`] (`config.drone_embedding`): new rows
                would need a cluster and coefficients; resize the dense model before `compress_model` instead.
        """
        if isinstance(self.get_input_embeddings(), DroneEmbedding):
            raise NotImplementedError(
                f"`resize_token_embeddings` cannot resize the projectively clustered embedding "
                f"(`drone_embedding`={self.config.drone_embedding}); resize the dense model before compressing it."
            )
        return super().resize_token_embeddings(*args, **kwargs)

    def drone_modules(self) -> dict[str, DroneLinear | DroneBertSelfAttention | DroneEmbedding]:
        """Returns the factored layers, attention blocks and embedding, keyed by full module name."""
        kinds = (DroneLinear, DroneBertSelfAttention, DroneEmbedding)
        return {name: module for name, module in self.named_modules() if isinstance(module, kinds)}


__all__ = ["DroneBertForSequenceClassification"]
