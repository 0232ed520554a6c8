"""Remote-code export: the files that ship beside the weights so that a checkpoint loads with
`trust_remote_code=True` and without drone_hf, and the temporary Auto-class registration that writes `auto_map`.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path


_MISSING = object()


def _remote_code_files() -> tuple[str, ...]:
    """`modeling_drone.py` and every sibling it imports, as transformers' `custom_object_save` copies them."""
    from transformers.dynamic_module_utils import get_relative_import_files

    modeling = Path(__file__).parent / "modeling_drone.py"
    siblings = sorted({Path(name).name for name in get_relative_import_files(str(modeling))} - {modeling.name})
    return (modeling.name, *siblings)


REMOTE_CODE_FILES = _remote_code_files()


@contextlib.contextmanager
def _remote_code_export(model, enabled: bool) -> Iterator[None]:
    """Registers the model and config classes for the Auto classes for the duration of one save, so that transformers
    writes `auto_map` and copies the modelling files (and their relative imports) beside the weights; restores the
    classes and the in-memory config afterwards, so later saves are unaffected."""
    if not enabled:
        yield
        return
    config, classes = model.config, (type(model.config), type(model))
    before = [cls.__dict__.get("_auto_class", _MISSING) for cls in classes]
    auto_map = config.__dict__.get("auto_map", _MISSING)
    classes[0].register_for_auto_class("AutoConfig")
    classes[1].register_for_auto_class(_auto_class_name(type(model)))
    try:
        yield
    finally:
        for cls, value in zip(classes, before):
            if value is _MISSING:
                del cls._auto_class
            else:
                cls._auto_class = value
        if auto_map is _MISSING:
            config.__dict__.pop("auto_map", None)
        else:
            config.auto_map = auto_map


def _auto_class_name(cls: type) -> str:
    """The `AutoModel*` class registered for this DRONE class (the head's; `AutoModel` for a bare encoder)."""
    from .registration import auto_model_classes

    preferred = ("AutoModelForPreTraining", "AutoModelForTextEncoding")
    names = [auto.__name__ for auto in auto_model_classes() if cls in auto._model_mapping._extra_content.values()]
    names = sorted(names, key=lambda name: (name in preferred, name != "AutoModel", name))
    return names[0] if names else "AutoModel"


def _ensure_remote_code_files(save_dir: Path) -> None:
    """transformers 5.23 copies the relative imports of the modelling file; copy any sibling it did not."""
    for name in REMOTE_CODE_FILES:
        if not (save_dir / name).is_file():
            shutil.copyfile(Path(__file__).parent / name, save_dir / name)


__all__ = ["REMOTE_CODE_FILES"]
