"""DRONE-compressed models of every supported family and head: transformers' own classes with the modules listed in
the config rebuilt in factored form.

[`DroneModelMixin`] is the family-free half (shape-only construction, a strict `from_pretrained`, save/push hooks);
[`drone_model_class`] puts it on any transformers model class: `RobertaForTokenClassification` ->
`DroneRobertaForTokenClassification`, configured by `DroneRobertaConfig`. The classes for every head of every
supported family are found from transformers' Auto mappings and registered once, in `drone_hf/__init__.py`.

Side-effect free and self-contained (transformers + files of this folder only), so it can be copied into a Hub repo
for `trust_remote_code=True` loading.
"""

from __future__ import annotations

import os

from transformers import BertForSequenceClassification, PretrainedConfig, PreTrainedModel
from transformers.utils import logging

from .configuration_drone import DroneConfig, drone_config_class
from .embedding import DroneEmbedding
from .layers import DroneLinear, DroneQKLinear
from .structure import apply_drone_structure, resolve_module_name, sync_drone_ranks


logger = logging.get_logger(__name__)
_FACTOR_SUFFIXES = (
    ".down.weight",
    ".up.weight",
    ".up.bias",
    ".coefficients",
    ".bases",
    ".assignments",
    ".weight_scale",
)


class DroneModelMixin:
    r"""
    Mixin for a transformers model class whose modules listed in `config.drone_ranks` are [`DroneLinear`] layers of
    those ranks, whose attention blocks in `config.drone_attention_ranks` have [`DroneQKLinear`] query/key
    projections of that per-head width, and whose `config.drone_embedding` is a [`DroneEmbedding`].

    The constructor only allocates shapes (it is safe on the meta device, which `from_pretrained` uses); the factors
    themselves come from the checkpoint or from [`compress_model`]. Modules not listed stay dense.
    """

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_drone_structure(self, config)
        self.post_init()

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Same as [`~transformers.PreTrainedModel.from_pretrained`], but refuses a checkpoint whose tensors do not
        match its `drone_ranks` instead of silently re-initialising factored layers.

        Raises:
            `ValueError`: if a factored tensor is missing, unexpected or of another shape than the config says, or
                if `num_labels` (or `id2label`, or `config`) asks for another head size than the checkpoint's without
                `ignore_mismatched_sizes=True`.
        """
        location = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        try:  # lazy and guarded: this file must stay importable without drone_hf
            from drone_hf.saving import recover_interrupted_save
        except ImportError:
            pass
        else:  # a save killed mid-swap is finished (or rolled back) before anything reads the folder
            if isinstance(location, (str, os.PathLike)):
                recover_interrupted_save(os.path.join(location, kwargs.get("subfolder") or ""))
        want_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            raise _mismatch_error(location, kwargs) from error
        model._check_drone_loading_info(info)
        return (model, info) if want_info else model

    def _check_drone_loading_info(self, info: dict) -> None:
        config = self.config
        embedding = [config.drone_embedding["module"]] if config.drone_embedding else []
        quantized = (getattr(config, "drone_quantization", None) or {}).get("modules", [])
        names = [*(config.drone_ranks or {}), *(config.drone_attention_ranks or {}), *embedding, *quantized]
        modules = dict(self.named_modules())
        factored = tuple(f"{resolve_module_name(self, name, modules)}." for name in names)
        keys = set(info.get("missing_keys", ())) | set(info.get("unexpected_keys", ()))
        keys |= {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", ())}
        bad = sorted(k for k in keys if k.startswith(factored) or k.endswith(_FACTOR_SUFFIXES))
        if bad:
            raise ValueError(
                f"The checkpoint does not match its config: `drone_ranks` lists {len(config.drone_ranks or {})} "
                f"factored modules (`drone_embedding`: {config.drone_embedding}), but these tensors are "
                f"missing, unexpected or mismatched: {bad}."
            )
        for name, module in modules.items():
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
        model card (`README.md`, merged if present) and moves the files into place one by one, `config.json` last, so
        that an interrupted save never leaves a half-written checkpoint (see `drone_hf.saving`).

        Without drone_hf (the `trust_remote_code=True` copy of this file) it is the plain transformers method.

        `config.drone_ranks` is first brought in line with the factored layers (`sync_drone_ranks`): a LoRA merge
        (`merge_and_unload()` of role-name LoRA) raises their ranks in place, and `config.json` must describe the
        tensors written next to it.
        """
        sync_drone_ranks(self)
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

    def drone_modules(self) -> dict:
        """Returns the factored layers, narrowed query/key projections and embedding, keyed by full module name."""
        kinds = (DroneLinear, DroneQKLinear, DroneEmbedding)
        return {name: module for name, module in self.named_modules() if isinstance(module, kinds)}


def _mismatch_error(location, kwargs: dict) -> ValueError:
    """The error for transformers' "mismatched sizes" refusal: a head of another size when the caller asked for one,
    else a checkpoint whose tensors do not fit its own config."""
    config = kwargs.get("config")
    if kwargs.get("num_labels") is not None:
        asked = kwargs["num_labels"]
    elif kwargs.get("id2label"):
        asked = len(kwargs["id2label"])
    else:
        asked = getattr(config, "num_labels", None) if isinstance(config, PretrainedConfig) else None
    saved = None
    if asked is not None and isinstance(location, (str, os.PathLike)):
        try:
            options = {key: kwargs[key] for key in ("subfolder", "revision", "cache_dir", "token") if key in kwargs}
            saved_config, _ = PretrainedConfig.get_config_dict(location, **options)
            saved = (
                len(saved_config["id2label"]) if saved_config.get("id2label") else saved_config.get("num_labels", 2)
            )
        except (OSError, ValueError, TypeError):
            saved = None
    if asked is not None and saved is not None and asked != saved:
        return ValueError(
            f"The checkpoint's classification head has num_labels={saved}, but num_labels={asked} was asked for, so "
            "its head weights do not fit. Pass `ignore_mismatched_sizes=True` to start a new head of that size (as "
            "transformers does), or leave `num_labels`/`id2label` out to keep the trained head."
        )
    return ValueError(
        "The checkpoint's tensors do not match the shapes its `drone_ranks`/`drone_embedding` (config.json) "
        "describe; the checkpoint is corrupt or its config was edited. See the load report above."
    )


_MODEL_CLASSES: dict[type, type] = {}


def register_drone_model_class(base: type[PreTrainedModel], cls: type) -> type:
    """Records `cls` as the DRONE class of `base` (used for the classes written out by hand, such as
    `DroneBertForSequenceClassification`)."""
    _MODEL_CLASSES[base] = cls
    return cls


def drone_model_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """The DRONE class of a transformers model class: `RobertaForTokenClassification` ->
    `DroneRobertaForTokenClassification` (created once, then cached), configured by `drone_config_class` of its
    config class.

    Raises:
        `TypeError`: if `base` is not a `PreTrainedModel` subclass.
    """
    if base in _MODEL_CLASSES:
        return _MODEL_CLASSES[base]
    if issubclass(base, DroneModelMixin):
        return base
    if not (isinstance(base, type) and issubclass(base, PreTrainedModel)):
        raise TypeError(f"`base` must be a transformers PreTrainedModel class, got {base!r}.")
    namespace = {
        "config_class": drone_config_class(base.config_class),
        "__module__": __name__,
        "__doc__": f"[`~transformers.{base.__name__}`] with the factored modules of [`DroneModelMixin`].",
    }
    return register_drone_model_class(base, type(f"Drone{base.__name__}", (DroneModelMixin, base), namespace))


class DroneBertForSequenceClassification(DroneModelMixin, BertForSequenceClassification):
    r"""
    [`~transformers.BertForSequenceClassification`] with the factored modules of [`DroneModelMixin`] (the class
    drone_hf started with; every other family and head is made by [`drone_model_class`]).

    Args:
        config ([`DroneConfig`]): Model configuration, including the per-module ranks.

    Example:

    ```py
    >>> import drone_hf  # registers the DRONE model types with the Auto classes
    >>> from transformers import AutoModelForSequenceClassification
    >>> model = AutoModelForSequenceClassification.from_pretrained("path/to/compressed")  # doctest: +SKIP
    ```
    """

    config_class = DroneConfig
    config: DroneConfig


register_drone_model_class(BertForSequenceClassification, DroneBertForSequenceClassification)


def __getattr__(name: str):
    # `DroneRobertaForTokenClassification` and friends are made on demand, so that `auto_map` entries of the
    # remote-code copy and pickles resolve: `modeling_drone.DroneRobertaForTokenClassification`.
    if name.startswith("Drone"):
        import transformers

        base = getattr(transformers, name[len("Drone") :], None)
        if isinstance(base, type) and issubclass(base, PreTrainedModel):
            return drone_model_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DroneBertForSequenceClassification", "DroneModelMixin", "drone_model_class", "register_drone_model_class"]
