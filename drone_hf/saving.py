r"""
Crash-safe replacement of the files of a checkpoint folder: the file-system half of the DRONE models'
`save_pretrained` (the model card and the Hub upload are in `hub.py`).

The new checkpoint is written into a staging folder *inside* the target folder and then moved into place file by file
with `os.replace`. The target folder itself is never renamed, created anew or deleted, so a save works wherever
transformers' own `save_pretrained` works: into a bind mount (`docker run -v host:/out`), into a writable folder
whose parent is read-only, and into the current working directory (`save_pretrained(".")`).

The protocol, for a target `folder` and its staging folder `S = folder/.drone_hf-save-<random>/`:

1. **Recover.** Whatever an interrupted save left in `folder` is finished or cleaned up first
   ([`recover_interrupted_save`]).
2. **Stage.** The caller writes the whole new checkpoint into `S/incoming/<name>/` (`<name>` is the folder's name, so
   a model card titled after the folder comes out right). Any error here (a full disk, say) deletes `S` and leaves
   `folder` exactly as it was.
3. **Ready.** The new files are flushed to disk (`fsync`); `S/manifest.json` lists the files to add (the new set) and
   the files to remove: those of the old checkpoint that the save owns (`owned_files`: weights, shard index, modelling
   code) and does not write again, such as the shards of an earlier sharded save. Then `S/incoming/<name>` is renamed
   to `S/new`: from this rename on, the new checkpoint is complete and will be committed.
4. **Swap.** The old `config.json` is moved to `S/old/` *first*, and a placeholder `config.json` (written in step 3)
   takes its place: from then on `folder` has no real `config.json`, the mark of a save in progress, and a load
   learns what happened (`drone_hf.interrupted_save`). The old files named in the manifest are moved to `S/old/`,
   then the new files other than `config.json` are moved in from `S/new/`.
5. **Commit.** The new `config.json` is moved in *last*; then `S` is deleted.

A loader looking at `folder` at any moment therefore sees the old checkpoint whole (before 4), a folder that
transformers refuses to load (during 4: no `config.json`, or the placeholder, whose error says what to do; with
drone_hf imported the Auto classes finish the save and load the new checkpoint), or the new checkpoint whole (after
5): never old weights with a new config or the reverse. Files that the save does not own (tokenizer, training state,
logs) are never touched; a file that the new set also holds (a merged `README.md`) is replaced by the new one.

**Recovery** ([`recover_interrupted_save`], run at the start of every save and meant to be run by loaders): a
staging folder `S` beside a real `folder/config.json` is from a save that had not begun its swap, or had committed it,
so it is deleted. A staging folder with a complete `S/new` while `folder/config.json` is absent (or the placeholder) is
a swap in progress: it is finished from the manifest (each step of 4 and 5 is idempotent). An error during the swap
(not a kill) is rolled back at once by the saving process: the new files go back to `S/new/`, the old ones back into
place, the old `config.json` last (or, for a first save, the placeholder removed).

Saves into one folder are serialised by an advisory `flock` on the folder (where the platform and file system allow
one); recovery skips a folder that a live save holds, so a loader never "recovers" a save that is still running.

Leftovers of the two-rename protocol of drone_hf 0.1.0 (sibling folders `.<name>.tmp-*` and `.<name>.old-*`) are
cleaned up too, and a checkpoint left only in `.<name>.old-*/<name>/` by a save killed between its two renames is
moved back into `folder`.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from transformers.utils import logging

from .interrupted_save import is_placeholder, placeholder_text


logger = logging.get_logger(__name__)

CONFIG_NAME = "config.json"
STAGING_PREFIX = ".drone_hf-save-"
_MANIFEST = "manifest.json"
_PLACEHOLDER = "placeholder.json"
_LEGACY_RE = r"^\.{name}\.(tmp|old)-[a-z0-9_]{{8}}$"

# A test hook: called with the name of each step of a save, so that tests can kill or fail the process there.
_STEP_HOOK: Callable[[str], None] | None = None


def _step(name: str) -> None:
    if _STEP_HOOK is not None:
        _STEP_HOOK(name)


@contextlib.contextmanager
def atomic_save(
    folder: str | os.PathLike,
    owned_files: Callable[[Path], Iterable[str]] | None = None,
    name: str | None = None,
) -> Iterator[Path]:
    r"""
    Yields an empty staging folder to write a whole checkpoint into; when the block ends without an error, replaces
    the checkpoint files of `folder` with the staged ones, so that a kill at any moment leaves `folder` holding the
    old or the new checkpoint (see the module docstring for the protocol). The staged files must include
    `config.json`, which is moved in last.

    Args:
        folder (`str` or `os.PathLike`):
            The target folder; created (with its parents) if missing. Never renamed or deleted.
        owned_files (`Callable[[Path], Iterable[str]]`, *optional*):
            Given `folder`, the names of the files of its current checkpoint that the save owns: those the new set
            does not write again are removed (old weight shards, for instance). Defaults to `config.json` only.
            Files not named here and not in the new set are kept.
        name (`str`, *optional*):
            The name of the yielded folder; defaults to the name of `folder`.

    Raises:
        `OSError`: when the staged files cannot be written (a full disk: `errno.ENOSPC`) or moved into place; `folder`
            is then left as it was.
        `ValueError`: if the block did not write a `config.json`.

    Example:

    ```py
    >>> with atomic_save("out/model") as staging:  # doctest: +SKIP
    ...     model.save_pretrained(staging)
    ```
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    with _folder_lock(folder, blocking=True):
        try:
            message = _recover(folder)
        except (OSError, ValueError, KeyError, TypeError) as error:
            # Safe to go on: the swap below moves aside whatever checkpoint files the folder holds, half-moved or not.
            message = f"Could not recover an interrupted save in {folder}: {error}"
        if message:
            logger.warning(message)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=STAGING_PREFIX))
        incoming = staging / "incoming" / (name or folder.name or "checkpoint")
        try:
            incoming.mkdir(parents=True)
            (staging / "old").mkdir()
            _step("staged-folder")
            yield incoming
            _step("written")
        except BaseException as error:
            shutil.rmtree(staging, ignore_errors=True)
            clearer = _clearer_error(error, folder)
            if clearer is None:
                raise
            raise clearer from error
        try:
            manifest = _ready(folder, staging, incoming, owned_files)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            _swap(folder, staging, manifest)
        except BaseException as error:
            try:
                _roll_back(folder, staging, manifest)
            except BaseException as second:
                raise OSError(
                    f"Saving into {folder} failed while moving the files into place ({error!r}), and so did undoing "
                    f"it ({second!r}). The new checkpoint is complete in {staging}; `recover_interrupted_save` (run "
                    "by the next save or load) finishes the save."
                ) from error
            raise
        _step("committed")
        _fsync_dir(folder)
        shutil.rmtree(staging, ignore_errors=True)
        _step("done")


def recover_interrupted_save(folder: str | os.PathLike) -> str | None:
    r"""
    Finishes or cleans up what an interrupted (killed) save left in `folder`: completes a swap that was under way
    when the new checkpoint was complete, deletes staging folders that are not needed any more (an interrupted save
    leaves up to one checkpoint's worth of hidden files), and restores a checkpoint that the former two-rename save
    left in a hidden sibling folder. Does nothing while another process is saving into `folder`.

    Cheap when there is nothing to do (one directory listing), and a no-op for a path that is not a local folder (a
    Hub repo id), so loaders can call it before every load. Never raises for a file-system error: it is logged and
    returned.

    Args:
        folder (`str` or `os.PathLike`): A checkpoint folder.

    Returns:
        `str` or `None`: what was done (also logged as a warning), or `None` when there was nothing to do.

    Example:

    ```py
    >>> recover_interrupted_save("out/model")  # doctest: +SKIP
    'Finished the interrupted save into /abs/out/model from .drone_hf-save-k3j2x9a1.'
    ```
    """
    try:
        path = Path(folder)
        if not path.is_dir():  # a Hub repo id, or a folder that a save of drone_hf 0.1.0 left only a hidden copy of
            message = _recover_legacy(path.absolute()) if path.name else None
        elif not _has_leftovers(path.resolve()):
            return None
        else:
            with _folder_lock(path.resolve(), blocking=False) as locked:
                if not locked:
                    logger.info(f"Not checking {path} for an interrupted save: another process is saving into it.")
                    return None
                message = _recover(path.resolve())
    except (OSError, ValueError, KeyError, TypeError) as error:  # a file-system error, or an unreadable manifest
        message = f"Could not recover an interrupted save in {folder}: {error}"
    if message:
        logger.warning(message)
    return message


# ----------------------------------------------------------------------------------------------------- the steps


def _ready(folder: Path, staging: Path, incoming: Path, owned_files) -> dict:
    """Step 3: fsync the staged files, write the manifest, rename the staged folder to `S/new`."""
    add = sorted(os.listdir(incoming))
    if CONFIG_NAME not in add:
        raise ValueError(f"The save wrote no {CONFIG_NAME} into {incoming}; nothing was changed in {folder}.")
    owned = set(owned_files(folder) if owned_files is not None else ()) - {CONFIG_NAME}
    remove = sorted(
        name for name in owned if name not in add and not _is_staging(name) and os.path.lexists(folder / name)
    )
    for entry in add:
        _fsync_tree(incoming / entry)
    manifest = {"version": 1, "add": add, "remove": remove}
    _write_durably(staging / _MANIFEST, json.dumps(manifest, indent=2) + "\n")
    _write_durably(staging / _PLACEHOLDER, placeholder_text(folder, incoming / CONFIG_NAME))
    _step("manifest")
    os.replace(incoming, staging / "new")
    _fsync_dir(staging)
    _step("ready")
    return manifest


def _swap(folder: Path, staging: Path, manifest: dict) -> None:
    """Steps 4 and 5; idempotent, so recovery re-runs it to finish an interrupted swap."""
    new, old, config = staging / "new", staging / "old", folder / CONFIG_NAME
    old.mkdir(exist_ok=True)
    if os.path.lexists(config) and not is_placeholder(config):
        _move_aside(config, old / CONFIG_NAME)
        _fsync_dir(folder)
        _step("config-aside")
    if os.path.lexists(staging / _PLACEHOLDER):
        os.replace(staging / _PLACEHOLDER, config)  # until the commit, a load learns what is going on
        _fsync_dir(folder)
        _step("placeholder")
    files = [name for name in manifest["add"] if name != CONFIG_NAME]
    for name in manifest["remove"] + files:
        # An added file still in S/new means that the one in the folder is the old one.
        if os.path.lexists(folder / name) and (name in manifest["remove"] or os.path.lexists(new / name)):
            _move_aside(folder / name, old / name)
            _step(f"aside:{name}")
    for name in files:
        if os.path.lexists(new / name):
            os.replace(new / name, folder / name)
            _step(f"in:{name}")
    _fsync_dir(folder)
    if not os.path.lexists(new / CONFIG_NAME):
        raise FileNotFoundError(
            errno.ENOENT, f"The staged {CONFIG_NAME} is missing; cannot finish the save into {folder}", str(new)
        )
    os.replace(new / CONFIG_NAME, folder / CONFIG_NAME)


def _roll_back(folder: Path, staging: Path, manifest: dict) -> None:
    """Undoes a swap that failed with an error: new files back to S/new, old ones back, the old config last."""
    new, old, config = staging / "new", staging / "old", folder / CONFIG_NAME
    if os.path.lexists(config) and not is_placeholder(config) and not os.path.lexists(new / CONFIG_NAME):
        shutil.rmtree(staging, ignore_errors=True)  # the swap was committed: nothing to undo
        return
    for name in manifest["add"]:
        if name != CONFIG_NAME and os.path.lexists(folder / name) and not os.path.lexists(new / name):
            os.replace(folder / name, new / name)
    for name in sorted(os.listdir(old)):
        if name != CONFIG_NAME and not os.path.lexists(folder / name):
            os.replace(old / name, folder / name)
    if os.path.lexists(old / CONFIG_NAME) and (not os.path.lexists(config) or is_placeholder(config)):
        os.replace(old / CONFIG_NAME, config)
    elif is_placeholder(config):  # a first save into the folder: there was no config before
        os.unlink(config)
    _fsync_dir(folder)
    shutil.rmtree(staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------------------ recovery


def _is_staging(name: str) -> bool:
    return name.startswith(STAGING_PREFIX)


def _has_leftovers(folder: Path) -> bool:
    if any(_is_staging(name) for name in os.listdir(folder)):
        return True
    legacy = re.compile(_LEGACY_RE.format(name=re.escape(folder.name)))
    with contextlib.suppress(OSError):
        return any(legacy.match(name) for name in os.listdir(folder.parent))
    return False


def _recover(folder: Path) -> str | None:
    """The body of `recover_interrupted_save`, with the folder lock held (or unavailable)."""
    done, removed = [], []
    for staging in sorted(folder.iterdir()):
        if not _is_staging(staging.name) or not staging.is_dir() or staging.is_symlink():
            continue
        in_progress = not os.path.lexists(folder / CONFIG_NAME) or is_placeholder(folder / CONFIG_NAME)
        if in_progress and (staging / "new" / CONFIG_NAME).is_file() and (staging / _MANIFEST).is_file():
            manifest = json.loads((staging / _MANIFEST).read_text(encoding="utf-8"))
            _swap(folder, staging, manifest)
            _fsync_dir(folder)
            done.append(f"Finished the interrupted save into {folder} from {staging.name}.")
        elif in_progress and (staging / "new").is_dir():
            # Not a state a save leaves (say, a committed save whose config.json was deleted since): S/old holds a
            # config that need not match the weights in the folder, so nothing is guessed.
            done.append(
                f"{folder} has no {CONFIG_NAME} and {staging.name} holds an incomplete save; left both as they are."
            )
            continue
        elif in_progress and (staging / "old" / CONFIG_NAME).is_file():
            _roll_back(folder, staging, {"add": []})
            done.append(f"Restored the checkpoint that {folder} held before an interrupted save.")
        else:
            removed.append(staging.name)
        shutil.rmtree(staging, ignore_errors=True)
    if removed:
        done.append(f"Removed the leftovers of {len(removed)} interrupted save(s) in {folder}: {', '.join(removed)}.")
    legacy = _recover_legacy(folder)  # after the above, which may have finished a swap (and so written config.json)
    if legacy:
        done.append(legacy)
    return " ".join(done) or None


def _recover_legacy(folder: Path) -> str | None:
    """The sibling `.<name>.tmp-*` / `.<name>.old-*` folders of the two-rename save of drone_hf 0.1.0."""
    legacy = re.compile(_LEGACY_RE.format(name=re.escape(folder.name)))
    try:
        leftovers = sorted(
            (folder.parent / name for name in os.listdir(folder.parent) if legacy.match(name)),
            key=lambda path: path.stat().st_mtime,
        )
    except OSError:
        return None
    if not leftovers:
        return None
    done = []
    backups = [path / folder.name for path in leftovers if ".old-" in path.name]
    backups = [path for path in backups if (path / CONFIG_NAME).is_file()]
    if backups and not (folder / CONFIG_NAME).exists():
        # Killed between the two renames: the previous checkpoint is whole in the newest `.old-*` folder.
        folder.mkdir(exist_ok=True)
        entries = sorted(os.listdir(backups[-1]), key=lambda name: name == CONFIG_NAME)  # config.json last
        for name in entries:
            if not os.path.lexists(folder / name):
                os.replace(backups[-1] / name, folder / name)
        done.append(f"Restored {folder} from {backups[-1].parent.name}, left by an interrupted save.")
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    kept = [path.name for path in leftovers if os.path.lexists(path)]
    done.append(f"Removed {len(leftovers) - len(kept)} leftover folder(s) of interrupted saves beside {folder}.")
    if kept:
        done.append(f"Could not remove {', '.join(kept)}.")
    return " ".join(done)


# ------------------------------------------------------------------------------------------------------- helpers


def _move_aside(source: Path, destination: Path) -> None:
    if os.path.lexists(destination):  # moved aside before, and recreated since: drop it
        if source.is_dir() and not source.is_symlink():
            shutil.rmtree(source)
        else:
            source.unlink()
    else:
        os.replace(source, destination)


@contextlib.contextmanager
def _folder_lock(folder: Path, blocking: bool) -> Iterator[bool]:
    """An exclusive advisory lock on the folder itself; yields whether it is held. Where `flock` is unavailable (not
    POSIX, or a file system that refuses it) it yields `True` without a lock."""
    try:
        import fcntl
    except ImportError:
        yield True
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield True
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        locked = True
    except OSError as error:  # held by another save, or no locks on this file system (some network ones)
        locked = error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
    try:
        yield locked
    finally:
        os.close(fd)  # closing releases the lock


def _clearer_error(error: BaseException, folder: Path) -> OSError | None:
    """Staging failures as an `OSError` that says the folder is unchanged; `None` to re-raise `error` as it is."""
    if isinstance(error, OSError):
        code = error.errno
    else:  # safetensors reports I/O errors as `SafetensorError("... (os error 28)")`
        match = re.search(r"\(os error (\d+)\)", str(error))
        code = int(match.group(1)) if match else None
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return OSError(
            code,
            f"Not enough space to save into {folder}: the new checkpoint is written beside the old one before it "
            f"replaces it, so both must fit ({error}). The folder was left as it was",
        )
    if code is not None and not isinstance(error, OSError):
        return OSError(code, f"Could not save into {folder} ({error}). The folder was left as it was")
    return None


def _fsync_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        for entry in path.iterdir():
            _fsync_tree(entry)
        _fsync_dir(path)
    elif path.is_file() and not path.is_symlink():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Makes the renames in `path` durable; a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


__all__ = ["atomic_save", "recover_interrupted_save"]
