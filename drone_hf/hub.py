"""Saving and pushing DRONE checkpoints: the atomic `save_pretrained` with its model card, and the one-commit Hub
upload. The card itself is written by `model_card.py` (metadata in `model_card_metadata.py`) and the remote-code
files are chosen by `remote_code.py`; their public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import HfApi
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from transformers.dynamic_module_utils import get_relative_import_files
from transformers.utils import logging

# Names imported `as` themselves were defined here before the Hub code was split; they stay importable from here.
from .model_card import _WEIGHT_FILE_RE, create_or_update_model_card
from .model_card import BEGIN_MARKER as BEGIN_MARKER
from .model_card import END_MARKER as END_MARKER
from .model_card import TEMPLATE_PATH as TEMPLATE_PATH
from .model_card_metadata import DRONE_TAGS as DRONE_TAGS
from .model_card_metadata import METRIC_VARIANTS as METRIC_VARIANTS
from .model_card_metadata import METRICS_EXAMPLE as METRICS_EXAMPLE
from .remote_code import REMOTE_CODE_FILES, _ensure_remote_code_files, _remote_code_export
from .saving import atomic_save


logger = logging.get_logger(__name__)


def _owned_files(folder: Path) -> list[str]:
    """The files of the checkpoint in `folder` that a save replaces, or removes when it does not write them again:
    `config.json`, weights and shard indexes, and the modelling code (ours, and the modules the old `auto_map` names
    with their relative imports). Tokenizer, training and other user files are not the save's."""
    names = [
        name
        for name in os.listdir(folder)
        if name == "config.json" or _WEIGHT_FILE_RE.match(name) or name in REMOTE_CODE_FILES
    ]
    try:
        auto_map = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("auto_map") or {}
    except (OSError, ValueError, AttributeError):
        return names
    for key, references in auto_map.items() if isinstance(auto_map, dict) else ():
        if key != "AutoConfig" and not key.startswith("AutoModel"):
            continue  # AutoTokenizer and the like: the tokenizer's code is not the model save's
        for reference in references if isinstance(references, list) else [references]:
            module = folder / f"{str(reference).split('--')[-1].rpartition('.')[0]}.py"
            if module.parent == folder and module.is_file():
                names.append(module.name)
                with contextlib.suppress(Exception):  # an unparsable file: just the module itself
                    names += [Path(path).name for path in get_relative_import_files(str(module))]
    return sorted(set(names))


def save_pretrained_with_card(model, save_fn: Callable, save_directory: str | os.PathLike, *args, **kwargs) -> None:
    r"""
    The body of [`DroneBertForSequenceClassification.save_pretrained`]: runs `save_fn` (transformers'
    `save_pretrained`) into a staging folder inside `save_directory`, writes the model card there (merging an existing
    `README.md`), then moves the files into place one by one, `config.json` last (`drone_hf.saving.atomic_save`), so
    that a save killed at any moment leaves the old or the new checkpoint, and the next save or load finishes or
    cleans up what it left. Files of an existing folder that the save does not own (tokenizer, training state) are
    kept; old weight shards and stale modelling files are removed.

    Distributed checkpoints and non-main processes are passed straight to `save_fn`. With `push_to_hub=True` the
    saved folder is then uploaded (`repo_id`, `commit_message`, `token`, `private`, `create_pr` as in transformers).
    """
    from transformers import PreTrainedModel

    bound = inspect.signature(PreTrainedModel.save_pretrained).bind(model, save_directory, *args, **kwargs)
    options = dict(bound.arguments)
    options.pop("self")
    options.update(options.pop("kwargs", {}))
    push = options.pop("push_to_hub", False)
    hub_options = {
        key: options.pop(key) for key in ("repo_id", "commit_message", "private", "create_pr") if key in options
    }
    target = Path(options.pop("save_directory")).resolve()
    main = model.should_save_on_this_rank(options.get("is_main_process", True))
    if options.get("distributed_checkpoint") or not main or target.is_file():
        return save_fn(target, push_to_hub=push, **hub_options, **options)
    # The staging folder is named like the target, so the card's title is right.
    with atomic_save(target, owned_files=_owned_files, name=target.name) as tmp:
        if (target / "README.md").is_file():
            shutil.copy2(target / "README.md", tmp / "README.md")
        save_fn(tmp, **options)
        if "auto_map" in json.loads((tmp / "config.json").read_text(encoding="utf-8")):
            _ensure_remote_code_files(tmp)
        try:  # a card problem (say, unreadable user metadata) must not cost the user their checkpoint
            create_or_update_model_card(tmp, tags=model.model_tags or ())
        except (ImportError, OSError, ValueError, TypeError) as error:
            logger.warning(f"Saved {target} without updating its model card: {error}")
    if push:
        api = _api()
        with reaching_the_hub(hub_options.get("repo_id", target.name), folder=target):
            repo_id = api.create_repo(
                hub_options.get("repo_id", target.name),
                private=hub_options.get("private"),
                token=options.get("token"),
                exist_ok=True,
            ).repo_id
            api.upload_folder(
                repo_id=repo_id,
                folder_path=target,
                token=options.get("token"),
                commit_message=hub_options.get("commit_message") or "Upload DRONE-compressed model",
                create_pr=hub_options.get("create_pr", False),
            )


def _network_errors() -> tuple[type[BaseException], ...]:
    """What the Hub client raises when it cannot reach the Hub (no network, a proxy, `HF_HUB_OFFLINE=1`)."""
    import importlib

    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled]
    for module, name in (("httpx", "TransportError"), ("httpx2", "TransportError"), ("requests", "ConnectionError")):
        with contextlib.suppress(ImportError, AttributeError):
            errors.append(getattr(importlib.import_module(module), name))
    return tuple(errors)


@contextlib.contextmanager
def reaching_the_hub(repo_id: str, folder: str | os.PathLike | None = None):
    """Turns the Hub client's network errors (a raw `httpx.ConnectError`, `OfflineModeIsEnabled`) into a
    `ConnectionError` that says what to do, with the original error attached as its cause.

    Raises:
        `ConnectionError`: when the Hub cannot be reached.
    """
    try:
        yield
    except _network_errors() as error:
        where = f"the saved folder {str(folder)!r}" if folder is not None else "the model"
        again = (
            f"`hf upload {repo_id} {folder}`"
            if folder is not None
            else "`drone_hf.push_compressed_to_hub(model, ...)`"
        )
        offline = " `HF_HUB_OFFLINE` is set: unset it to push." if os.environ.get("HF_HUB_OFFLINE") else ""
        raise ConnectionError(
            f"Could not reach the Hugging Face Hub to push {repo_id!r} ({type(error).__name__}: {error}).{offline} "
            f"Check the network (or your proxy / `HF_ENDPOINT`) and log in with `hf auth login`; {where} is "
            f"unaffected: push it again with {again}."
        ) from error


def _api() -> HfApi:
    from . import __version__

    return HfApi(library_name="drone_hf", library_version=__version__)


def _download_readme(api: HfApi, repo_id: str, token, revision: str | None) -> str | None:
    try:
        return api.hf_hub_download(repo_id, "README.md", token=token, revision=revision)
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        return None


def push_compressed_to_hub(
    model,
    repo_id: str,
    *,
    private: bool | None = True,
    commit_message: str | None = None,
    token: str | bool | None = None,
    trust_remote_code_export: bool = False,
    tokenizer=None,
    card_kwargs: Mapping[str, Any] | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_description: str | None = None,
    max_shard_size: int | str = "50GB",
    tags: Sequence[str] | str | None = None,
) -> str:
    r"""
    Uploads a compressed model to the Hub in one commit: weights, `config.json`, the model card (merged into the
    repo's existing `README.md`, if any), optionally the tokenizer and, for users without drone_hf, the modelling code.

    The folder is saved to a temporary directory and sent with [`~huggingface_hub.HfApi.upload_folder`]; stale
    weight shards and modelling files in the repo are deleted in the same commit. `model.push_to_hub(repo_id)` calls
    this function.

    Args:
        model ([`DroneBertForSequenceClassification`]): The compressed model (any DRONE model, or a compressed
            `SentenceTransformer`, which is uploaded as its whole sentence-transformers folder).
        repo_id (`str`): `"user/name"` or `"name"` (the token's namespace).
        private (`bool`, *optional*, defaults to `True`): Visibility of a newly created repo (`None`: the account's
            default); an existing repo keeps its visibility.
        commit_message (`str`, *optional*): Defaults to `"Upload DRONE-compressed model"`.
        token (`str` or `bool`, *optional*): Hub token; defaults to the stored login.
        trust_remote_code_export (`bool`, *optional*, defaults to `False`): Also write `auto_map` and copy
            `modeling_drone.py` with its sibling files, so that `from_pretrained(..., trust_remote_code=True)`
            works without drone_hf.
        tokenizer (`PreTrainedTokenizerBase`, *optional*): Saved beside the weights (a `SentenceTransformer` always
            saves its own; `max_shard_size` does not apply to it either).
        card_kwargs (`dict`, *optional*): Passed to [`create_or_update_model_card`] (`base_model`, `dataset`,
            `metrics`, `speed`, `tags`).
        revision, create_pr, commit_description: As in [`~huggingface_hub.HfApi.upload_folder`].
        max_shard_size (`int` or `str`, *optional*, defaults to `"50GB"`): As in `save_pretrained`.
        tags (`list[str]`, *optional*): Extra card tags (with `model.model_tags`).

    Returns:
        `str`: the URL of the commit (of the pull request with `create_pr=True`).

    Raises:
        `TypeError`: if `model` is not a DRONE model (`config.model_type` not `"drone_*"`).
        `ConnectionError`: if the Hub cannot be reached, with what to do.

    Example:

    ```py
    >>> url = push_compressed_to_hub(small, "me/minilm-sst2-drone", tokenizer=tokenizer,
    ...     card_kwargs={"base_model": "me/minilm-sst2", "dataset": "sst2"})  # doctest: +SKIP
    ```
    """
    from .sentence_embeddings import is_sentence_transformer  # does not import sentence-transformers

    if is_sentence_transformer(model):  # a compressed SentenceTransformer: its own folder layout, the same upload
        from .sentence_embeddings import push_sentence_transformer_to_hub

        return push_sentence_transformer_to_hub(  # raises the same ConnectionError
            model,
            repo_id,
            private=private,
            commit_message=commit_message,
            token=token,
            trust_remote_code_export=trust_remote_code_export,
            card_kwargs=card_kwargs,
            revision=revision,
            create_pr=create_pr,
            commit_description=commit_description,
            tags=tags,
        )
    if not str(getattr(getattr(model, "config", None), "model_type", None)).startswith("drone_"):
        raise TypeError(f"`model` must be a DRONE model (from compress_model), got {type(model).__name__}.")
    with reaching_the_hub(repo_id):
        return _push_model(
            model,
            repo_id,
            private=private,
            commit_message=commit_message,
            token=token,
            trust_remote_code_export=trust_remote_code_export,
            tokenizer=tokenizer,
            card_kwargs=card_kwargs,
            revision=revision,
            create_pr=create_pr,
            commit_description=commit_description,
            max_shard_size=max_shard_size,
            tags=tags,
        )


def _push_model(
    model,
    repo_id,
    *,
    private,
    commit_message,
    token,
    trust_remote_code_export,
    tokenizer,
    card_kwargs,
    revision,
    create_pr,
    commit_description,
    max_shard_size,
    tags,
) -> str:
    """The body of [`push_compressed_to_hub`] for a transformers model."""
    api = _api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    card_kwargs = dict(card_kwargs or {})
    extra_tags = [tags] if isinstance(tags, str) else list(tags or [])
    card_kwargs["tags"] = list(dict.fromkeys([*card_kwargs.get("tags", ()), *(model.model_tags or ()), *extra_tags]))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / repo_id.split("/")[-1]
        folder.mkdir()
        remote_readme = _download_readme(api, repo_id, token, revision)
        if remote_readme is not None:
            shutil.copyfile(remote_readme, folder / "README.md")
        with _remote_code_export(model, trust_remote_code_export):
            model.save_pretrained(folder, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        create_or_update_model_card(folder, model_id=repo_id, **card_kwargs)
        return _upload(
            api,
            folder,
            repo_id,
            token=token,
            revision=revision,
            create_pr=create_pr,
            commit_message=commit_message or "Upload DRONE-compressed model",
            commit_description=commit_description,
            trust_remote_code_export=trust_remote_code_export,
        )


def _upload(
    api,
    folder,
    repo_id,
    *,
    token,
    revision,
    create_pr,
    commit_message,
    commit_description,
    trust_remote_code_export,
    stale=(),
) -> str:
    """One commit of `folder` to `repo_id` that also deletes stale weight shards (and, without
    `trust_remote_code_export`, modelling files; and the `stale` patterns) left in the repo; returns the commit (or
    pull request) URL."""
    # modeling_drone_bert.py: the remote-code file of drone_hf 0.1 exports, superseded by modeling_drone.py.
    stale = ["model*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin", "modeling_drone_bert.py"] + [
        *stale
    ]
    if not trust_remote_code_export:
        stale += list(REMOTE_CODE_FILES)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        token=token,
        revision=revision,
        create_pr=create_pr,
        commit_message=commit_message,
        commit_description=commit_description,
        delete_patterns=stale,
    )
    logger.info(f"Uploaded {folder.name} to {repo_id}: {info.commit_url}")
    return str(info.pr_url if create_pr and info.pr_url else info.commit_url)


__all__ = ["create_or_update_model_card", "push_compressed_to_hub", "reaching_the_hub", "save_pretrained_with_card"]
