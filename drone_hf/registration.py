"""Registration of every DRONE config and model class with transformers' Auto classes (run once, on import)."""

from __future__ import annotations

from transformers.models.auto import modeling_auto
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .architecture import supported_model_types
from .configuration_drone import drone_config_class
from .modeling_drone import drone_model_class


def auto_model_classes() -> list[type]:
    """transformers' `AutoModel*` classes (each has a `_model_mapping` from config to model class names)."""
    classes = []
    for name in dir(modeling_auto):
        cls = getattr(modeling_auto, name)
        if name.startswith("AutoModel") and isinstance(cls, type) and hasattr(cls, "_model_mapping"):
            classes.append(cls)
    return classes


def family_heads(model_type: str) -> dict[str, str]:
    """`AutoModel*` class name -> transformers model class name, for every Auto mapping that has `model_type`."""
    heads = {}
    for auto in auto_model_classes():
        names = auto._model_mapping._model_mapping  # model_type -> class name (or names)
        if model_type in names and isinstance(names[model_type], str):
            heads[auto.__name__] = names[model_type]
    return heads


def register_drone_auto_classes(model_types=None) -> dict[str, dict[str, type]]:
    """Registers the DRONE config of each supported family with `AutoConfig`, and the DRONE model class of each of
    its heads with the matching `AutoModel*` class. Idempotent (re-importing or reloading is fine); a different class
    already registered under a DRONE model type is a real collision and raises.

    Returns:
        `dict[str, dict[str, type]]`: DRONE model type -> `AutoModel*` name -> registered class.
    """
    import transformers

    from .interrupted_save import INTERRUPTED_MODEL_TYPE, DroneInterruptedSaveConfig

    # The placeholder config.json of a save in progress: reading it finishes the save (drone_hf.interrupted_save).
    transformers.AutoConfig.register(INTERRUPTED_MODEL_TYPE, DroneInterruptedSaveConfig, exist_ok=True)
    registered = {}
    autos = {auto.__name__: auto for auto in auto_model_classes()}
    for model_type in model_types or supported_model_types():
        config_class = drone_config_class(CONFIG_MAPPING[model_type])
        existing = CONFIG_MAPPING._extra_content.get(config_class.model_type)
        if existing is not None and existing.__qualname__ != config_class.__qualname__:
            raise ValueError(f"Model type {config_class.model_type!r} is already registered to {existing!r}.")
        transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        classes = registered[config_class.model_type] = {}
        for auto_name, class_name in family_heads(model_type).items():
            cls = drone_model_class(getattr(transformers, class_name))
            autos[auto_name].register(config_class, cls, exist_ok=True)
            classes[auto_name] = cls
    return registered


__all__ = ["auto_model_classes", "family_heads", "register_drone_auto_classes"]
