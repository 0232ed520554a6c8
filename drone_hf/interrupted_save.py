"""The `config.json` that stands in a checkpoint folder while a save moves the new files in (`drone_hf.saving`), so
that a load in that window, or after a kill in it, says what happened instead of "no config.json".

- Without drone_hf, transformers refuses its `model_type` (`"drone_hf_interrupted_save"`) by name, and a stock class
  (`BertForSequenceClassification`) stops at the placeholder's `drone_hf_guard` (see `configuration_drone`), whose
  text tells what to do.
- With drone_hf, [`DroneInterruptedSaveConfig`] (registered with `AutoConfig`) finishes the save
  (`recover_interrupted_save`) and loads the folder's real config, so `AutoModel*.from_pretrained(folder)` loads the
  new checkpoint; if the save cannot be finished (another process is still saving), it raises with the text.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import PretrainedConfig

from .configuration_drone import DRONE_GUARD_KEY


INTERRUPTED_MODEL_TYPE = "drone_hf_interrupted_save"
_MESSAGE_KEY = "drone_hf_interrupted_save"
_MAX_BYTES = 16384


def placeholder_text(folder: Path, new_config: Path) -> str:
    """The placeholder `config.json` for a save of `new_config` into `folder`."""
    message = (
        f"A drone_hf save into {str(folder)!r} is in progress or was interrupted while it moved the new files in. "
        "With drone_hf installed, `import drone_hf` and load the folder again (drone_hf finishes the save first), or "
        f'run `python -c "import drone_hf; drone_hf.saving.recover_interrupted_save({str(folder)!r})"`.'
    )
    placeholder = {"model_type": INTERRUPTED_MODEL_TYPE, _MESSAGE_KEY: message}
    try:
        family = json.loads(new_config.read_text(encoding="utf-8")).get(DRONE_GUARD_KEY, {}).get("model_type")
    except (OSError, ValueError, AttributeError):
        family = None
    if isinstance(family, str):  # a stock class of the family stops here too, showing the message
        placeholder[DRONE_GUARD_KEY] = {"model_type": family, "vocab_size": message}
    return json.dumps(placeholder, indent=2) + "\n"


def is_placeholder(path: Path) -> bool:
    """Whether `path` (a `config.json`) is the placeholder of a save in progress."""
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > _MAX_BYTES:
            return False
        return json.loads(path.read_text(encoding="utf-8")).get("model_type") == INTERRUPTED_MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


class DroneInterruptedSaveConfig(PretrainedConfig):
    r"""
    What `AutoConfig` makes of a placeholder `config.json`: never an instance. Reading one finishes the interrupted
    save in that folder and returns the folder's real config.

    Raises:
        `OSError`: if the save cannot be finished (another process holds the folder, or the folder is not local).
    """

    model_type = INTERRUPTED_MODEL_TYPE

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        from transformers import AutoConfig

        from .saving import CONFIG_NAME, recover_interrupted_save

        folder = kwargs.pop("name_or_path", None)
        if isinstance(folder, (str, os.PathLike)) and Path(folder).is_dir():
            recover_interrupted_save(folder)
            if (Path(folder) / CONFIG_NAME).is_file() and not is_placeholder(Path(folder) / CONFIG_NAME):
                return AutoConfig.from_pretrained(folder, **kwargs)
        raise OSError(config_dict.get(_MESSAGE_KEY) or f"{folder}: a drone_hf save there was interrupted.")


__all__ = ["INTERRUPTED_MODEL_TYPE", "DroneInterruptedSaveConfig", "is_placeholder", "placeholder_text"]
