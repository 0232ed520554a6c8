"""Configuration of DRONE-compressed encoders: the `drone_*` fields on top of each family's own config.

[`DroneConfig`] is the BERT one (`model_type "drone_bert"`); [`drone_config_class`] derives the same for any
supported family (`"drone_roberta"`, `"drone_mpnet"`, ...). Part of the format layer: copied beside the weights for
`trust_remote_code` loading, so it imports only transformers, huggingface_hub and siblings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import BertConfig, PretrainedConfig

from .architecture import DRONE_MODEL_TYPE_PREFIX


DRONE_FORMAT_VERSION = 2
"""Newest on-disk format version this library reads and writes. It changes only when the tensor layout or key meaning
changes. Version 1: float factored layers. Version 2 adds int8 modules (`drone_quantization`); a checkpoint is written
with the lowest version that describes it, so float checkpoints stay version 1 and older drone_hf still reads them,
while an older drone_hf refuses an int8 one instead of loading its int8 tensors into float layers."""

DRONE_QUANTIZATION_METHODS = ("int8-dynamic",)
"""The values `drone_quantization["method"]` may take."""

DRONE_METHODS = ("drone", "drone-bc", "drone-act", "svd")
"""The built-in factorisation methods (`drone_method` is provenance: any registered method's name is accepted)."""

# A factored-module key is a plain dotted module path as printed by `model.named_modules()`.
_FQN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")

DRONE_GUARD_KEY = "drone_hf_guard"
"""A `config.json` entry that makes a stock transformers class refuse a DRONE checkpoint, with drone_hf or without.

`BertForSequenceClassification.from_pretrained(folder)` reads `config.json` with `BertConfig`, which, when the
`model_type` is not its own (`"drone_bert"`), takes the first nested dict whose `model_type` is `"bert"` (transformers'
lookup for composite configs). The guard is that dict, with a text where `vocab_size` should be: the load stops at
once, its error showing the text, instead of loading every factored layer with random weights. DRONE configs drop the
entry when they read it and write it anew."""


@dataclass(kw_only=True, repr=False)
class DroneConfigMixin:
    r"""
    The `drone_*` fields shared by every DRONE config, with their validators. They are the single source of
    structural truth: `from_pretrained` re-creates exactly the modules listed here and does no pattern matching.

    Module names are stored as they were in the model that was compressed (`"bert.encoder.layer.0..."` for a
    classifier, `"encoder.layer.0..."` for a bare encoder); loading into another head adds or strips the base-model
    prefix, as transformers does for the weights.

    Args:
        drone_format_version (`int`, *optional*, defaults to 1):
            Version of the checkpoint layout. A version newer than this library knows raises a `ValueError`.
        drone_method (`str`, *optional*, defaults to `"drone"`):
            How the factors were computed (`"drone"`, `"drone-bc"`, `"drone-act"`, `"svd"` or another registered
            method).
            Provenance: the layer layout is the same for all.
        drone_ranks (`dict[str, int]`, *optional*):
            Full module name (as in `model.named_modules()`) to rank, one entry per factored `nn.Linear`. A module
            that is absent stays dense; a rank of 0 is never stored.
        drone_attention_ranks (`dict[str, int]`, *optional*):
            Attention block name (e.g. `"bert.encoder.layer.0.attention.self"`) to the per-head query/key width
            `k < d_h` of its DRONE-factored score product. Absent means the attention scores are exact.
        drone_embedding (`dict`, *optional*):
            `{"module": full module name, "k": int, "j": int}`: that `nn.Embedding` is a [`DroneEmbedding`], a
            `(k, j)`-projective clustering of its rows (`k <= vocab_size` subspaces of dimension `j < hidden_size`).
        drone_quantization (`dict`, *optional*):
            `{"method": "int8-dynamic", "modules": [full module names]}`: those `nn.Linear` (including the `down`/`up`
            halves of factored layers, e.g. `"bert.encoder.layer.0.intermediate.dense.down"`) and narrowed query/key
            projections are dynamic int8 modules (`weight` int8, `weight_scale` float32, `bias` float32). Needs
            `drone_format_version >= 2`. Absent means every module is in float.
        drone_calibration (`dict`, *optional*):
            Provenance of the calibration data (dataset, split, number of samples/tokens, seed). Nothing reads it
            at load time; it feeds the model card.
    """

    drone_format_version: int = 1
    drone_method: str = "drone"
    drone_ranks: dict[str, int] | None = None
    drone_attention_ranks: dict[str, int] | None = None
    drone_embedding: dict | None = None
    drone_quantization: dict | None = None
    drone_calibration: dict | None = None

    def __post_init__(self, **kwargs):
        kwargs.pop(DRONE_GUARD_KEY, None)
        super().__post_init__(**kwargs)
        self.__dict__.pop(DRONE_GUARD_KEY, None)

    def to_dict(self) -> dict:
        return _with_guard(super().to_dict(), self.model_type)

    def to_diff_dict(self) -> dict:
        return _with_guard(super().to_diff_dict(), self.model_type)

    def validate_drone_format_version(self):
        """Refuses checkpoints written by a newer drone_hf, whose layout this version cannot rebuild."""
        version = self.drone_format_version
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(f"`drone_format_version` must be a positive int, got {version!r}.")
        if version > DRONE_FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint has `drone_format_version={version}` but this drone_hf only reads versions "
                f"<= {DRONE_FORMAT_VERSION}. Upgrade drone_hf (`git pull` in your clone, then `pip install -e .`)."
            )

    def validate_drone_quantization(self):
        """Checks `drone_quantization`: exactly the keys method/modules, a known method, a non-empty list of plain
        module paths without repeats, and `drone_format_version >= 2`."""
        spec = self.drone_quantization
        if spec is None:
            return
        keys = ("method", "modules")
        if not isinstance(spec, dict) or set(spec) != set(keys):
            got = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
            raise ValueError(f"`drone_quantization` must be a dict with exactly the keys {list(keys)}, got {got}.")
        if spec["method"] not in DRONE_QUANTIZATION_METHODS:
            raise ValueError(
                f"`drone_quantization['method']` must be one of {list(DRONE_QUANTIZATION_METHODS)}, got "
                f"{spec['method']!r}."
            )
        modules = spec["modules"]
        if not isinstance(modules, list) or not modules or len(set(map(str, modules))) != len(modules):
            raise ValueError(
                f"`drone_quantization['modules']` must be a non-empty list of distinct module names, got {modules!r}."
            )
        bad = [name for name in modules if not isinstance(name, str) or not _FQN_RE.match(name)]
        if bad:
            raise ValueError(f"`drone_quantization['modules']` must be full module names (no regex), got {bad}.")
        version = self.drone_format_version
        if isinstance(version, bool) or not isinstance(version, int) or version < 2:
            raise ValueError(
                f"`drone_quantization` needs `drone_format_version >= 2` (int8 tensors), got {version!r}."
            )

    def validate_drone_method(self):
        """Checks that `drone_method` is a method name (provenance only: a custom registered method is accepted)."""
        if not isinstance(self.drone_method, str) or not self.drone_method:
            raise ValueError(
                f"`drone_method` must be a method name such as {list(DRONE_METHODS)}, got {self.drone_method!r}."
            )

    def validate_drone_embedding(self):
        """Checks `drone_embedding`: exactly the keys module/k/j, a plain module path, `1 <= k <= vocab_size` and
        `1 <= j < hidden_size` (the word embedding's sizes; loading re-checks against the module itself)."""
        spec = self.drone_embedding
        if spec is None:
            return
        keys = ("module", "k", "j")
        if not isinstance(spec, dict) or set(spec) != set(keys):
            got = sorted(spec) if isinstance(spec, dict) else type(spec).__name__
            raise ValueError(f"`drone_embedding` must be a dict with exactly the keys {list(keys)}, got {got}.")
        if not isinstance(spec["module"], str) or not _FQN_RE.match(spec["module"]):
            raise ValueError(
                f"`drone_embedding['module']` must be a full module name (no regex), got {spec['module']!r}."
            )
        for key, high, what in (("k", self.vocab_size, "vocab_size"), ("j", self.hidden_size - 1, "hidden_size - 1")):
            value = spec[key]
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"`drone_embedding[{key!r}]` must be an int in [1, {high}] ({what}), got {value!r}.")

    def validate_drone_ranks(self):
        """Checks that every key is a plain module path and every rank a positive int."""
        for field in ("drone_ranks", "drone_attention_ranks"):
            for name, rank in (getattr(self, field) or {}).items():
                if not isinstance(name, str) or not _FQN_RE.match(name):
                    raise ValueError(
                        f"`{field}` keys must be full module names such as 'bert.encoder.layer.0.intermediate.dense' "
                        f"(no regex), got {name!r}."
                    )
                if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
                    raise ValueError(f"`{field}[{name!r}]` must be a positive int (absent means dense), got {rank!r}.")
        for name in self.drone_attention_ranks or {}:
            both = [f"{name}.{proj}" for proj in ("query", "key") if f"{name}.{proj}" in (self.drone_ranks or {})]
            if both:
                raise ValueError(
                    f"{both} are in `drone_ranks` but `{name}` is in `drone_attention_ranks`: the query/key of a "
                    "factored attention block are already low rank."
                )


def _with_guard(output: dict, model_type: str) -> dict:
    """`output` (a config dict) with [`DRONE_GUARD_KEY`] written last."""
    output.pop(DRONE_GUARD_KEY, None)
    family = model_type[len(DRONE_MODEL_TYPE_PREFIX) :] if model_type.startswith(DRONE_MODEL_TYPE_PREFIX) else None
    if family:
        classes = output.get("architectures") or []
        named = f" (its DRONE class is {classes[0]})" if classes else ""
        output[DRONE_GUARD_KEY] = {
            "model_type": family,
            "vocab_size": (
                f"This is a drone_hf checkpoint (model_type {model_type!r}) whose factored layers a stock "
                "transformers class would load with random weights. Install drone_hf (from its repository: "
                "`pip install -e .` in a clone), then `import drone_hf` and load it with an Auto class such as "
                f"AutoModelForSequenceClassification{named}."
            ),
        }
    return output


@strict(accept_kwargs=True)
class DroneConfig(DroneConfigMixin, BertConfig):
    r"""
    Configuration of a DRONE-compressed BERT model (any head): a [`~transformers.BertConfig`] plus the `drone_*`
    fields of [`DroneConfigMixin`]. Other families get the same through [`drone_config_class`].

    Example:

    ```py
    >>> from drone_hf import DroneConfig
    >>> config = DroneConfig(hidden_size=32, num_attention_heads=4, intermediate_size=37,
    ...                      drone_ranks={"bert.encoder.layer.0.intermediate.dense": 8})
    >>> config.model_type
    'drone_bert'
    ```
    """

    model_type = "drone_bert"


_CONFIG_CLASSES: dict[type, type] = {BertConfig: DroneConfig}


def drone_config_class(base: type[PretrainedConfig]) -> type[PretrainedConfig]:
    """The DRONE config class of a family's config class: `RobertaConfig` -> `DroneRobertaConfig` with
    `model_type "drone_roberta"` (created once, then cached; `BertConfig` gives [`DroneConfig`])."""
    if base not in _CONFIG_CLASSES:
        namespace = {
            "model_type": f"{DRONE_MODEL_TYPE_PREFIX}{base.model_type}",
            "__module__": __name__,
            "__doc__": f"[`~transformers.{base.__name__}`] plus the `drone_*` fields of [`DroneConfigMixin`].",
        }
        cls = type(f"Drone{base.__name__}", (DroneConfigMixin, base), namespace)
        _CONFIG_CLASSES[base] = strict(accept_kwargs=True)(cls)
    return _CONFIG_CLASSES[base]


def __getattr__(name: str):
    # `DroneRobertaConfig` and friends are made on demand, so that `auto_map` entries of the remote-code copy and
    # pickles resolve: `configuration_drone.DroneRobertaConfig`.
    if name.startswith("Drone") and name.endswith("Config"):
        import transformers

        base = getattr(transformers, name[len("Drone") :], None)
        if isinstance(base, type) and issubclass(base, PretrainedConfig):
            return drone_config_class(base)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DRONE_FORMAT_VERSION",
    "DRONE_GUARD_KEY",
    "DRONE_METHODS",
    "DRONE_QUANTIZATION_METHODS",
    "DroneConfig",
    "DroneConfigMixin",
    "drone_config_class",
]
