"""Crash-safe saving (`drone_hf.saving`): a save works into a bind mount, under a read-only parent and from inside
the target folder; a full disk or a kill at any step leaves the old or the new checkpoint, whole; stale files go, user
files stay. The mount tests need root and `unshare` and skip otherwise."""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification

import drone_hf
from drone_hf import saving
from drone_hf.hub import REMOTE_CODE_FILES
from drone_hf.saving import STAGING_PREFIX, recover_interrupted_save

from .testing_utils import tiny_batches, tiny_teacher, tiny_tokenizer, torch_threads


REPO = Path(__file__).resolve().parents[1]
INPUTS = {key: tiny_batches()[0][key] for key in ("input_ids", "attention_mask")}
SHARDED = {"max_shard_size": "20KB"}  # the tiny models then save as three shards and an index

# Loads each source checkpoint and saves it into the target (optionally after filling the disk), then reports the
# error (if any), the target's listing and the logits of the checkpoint reloaded from the target.
SAVE_SCRIPT = """
import json, os, shutil, sys
import torch
torch.set_num_threads(1)
import drone_hf  # registers the DRONE models with the Auto classes
from transformers import AutoModelForSequenceClassification

spec = json.loads(sys.argv[1])
target, report = spec["target"], {"error": None}
if "probe" in spec:  # can this process write into the target's parent? (it must not)
    try:
        open(spec["probe"], "w").close()
        report["parent_writable"] = True
    except PermissionError:
        report["parent_writable"] = False
if "leave_free" in spec:  # fill the file system up to `leave_free` bytes
    with open(os.path.join(target, "filler.bin"), "wb") as handle:
        handle.write(bytes(max(shutil.disk_usage(target).free - spec["leave_free"], 0)))
for source, kwargs in spec["saves"]:
    model = AutoModelForSequenceClassification.from_pretrained(source)
    try:
        model.save_pretrained(target, **kwargs)
    except Exception as error:
        report["error"] = [type(error).__name__, isinstance(error, OSError), getattr(error, "errno", None), str(error)]
        break
report["listing"] = sorted(os.listdir(target))
report["parent_listing"] = sorted(os.listdir(os.path.dirname(target)))
model = AutoModelForSequenceClassification.from_pretrained(target).eval()
with torch.no_grad():
    report["logits"] = model(**torch.load(spec["inputs"])).logits
torch.save(report, spec["report"])
"""

# Saves `new` over a copy of the `old` checkpoint in a forked child that SIGKILLs itself at the k-th step of the
# protocol, for every k; after each kill, classifies what the folder loads as: without recovery, after
# `recover_interrupted_save`, and (in a copy) after the next save, which must clean up on its own.
KILL_SCRIPT = """
import json, os, shutil, signal, sys, time
import torch
torch.set_num_threads(1)  # no thread pools in the parent: forking stays safe
import drone_hf
from drone_hf import saving
from transformers import AutoModelForSequenceClassification
from transformers.utils import logging

logging.disable_progress_bar()
logging.set_verbosity_error()
spec = json.loads(sys.argv[1])
work = spec["work"]
inputs = torch.load(spec["inputs"])
pristine, target, twin = (os.path.join(work, name) for name in ("pristine", "target", "twin"))
old_model = AutoModelForSequenceClassification.from_pretrained(spec["old"])
new_model = AutoModelForSequenceClassification.from_pretrained(spec["new"])
old_model.save_pretrained(pristine, **spec["old_kwargs"])
with open(os.path.join(pristine, "vocab.txt"), "w") as handle:  # a user file, not the save's
    handle.write("[PAD]\\n[UNK]\\n")


def logits(folder):
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(**inputs).logits


def classify(folder):
    try:
        found = logits(folder)
    except Exception as error:
        return f"error: {type(error).__name__}"
    return "old" if torch.equal(found, old) else "new" if torch.equal(found, new) else "mixed"


def reset(folder):
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(pristine, folder, symlinks=True)


def listing(folder):
    names = sorted(os.listdir(folder))
    return [n for n in names if not n.startswith(".")], [n for n in names if n.startswith(".")]


old = logits(pristine)
steps = []
reset(target)
saving._STEP_HOOK = steps.append
new_model.save_pretrained(target, **spec["new_kwargs"])
saving._STEP_HOOK = None
new = logits(target)
report = {"steps": steps, "old": listing(pristine)[0], "new": listing(target)[0], "kills": []}
for k, step in enumerate(steps):
    reset(target)
    pid = os.fork()
    if pid == 0:
        try:
            calls = []

            def hook(name):
                if len(calls) == k:
                    os.kill(os.getpid(), signal.SIGKILL)
                calls.append(name)

            saving._STEP_HOOK = hook
            new_model.save_pretrained(target, **spec["new_kwargs"])
        finally:
            os._exit(0)  # only reached if the kill did not happen
    deadline = time.monotonic() + 60
    while not (status := os.waitpid(pid, os.WNOHANG))[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    if not status[0]:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    row = {"step": step, "killed": bool(status[0]) and os.WIFSIGNALED(status[1]) and os.WTERMSIG(status[1]) == 9}
    row["config"] = os.path.exists(os.path.join(target, "config.json"))
    row["plain"] = classify(target)
    shutil.copytree(target, twin, symlinks=True)
    row["message"] = saving.recover_interrupted_save(target)
    row["recovered"] = classify(target)
    row["files"], row["hidden"] = listing(target)
    new_model.save_pretrained(twin, **spec["new_kwargs"])
    row["next_save"] = classify(twin)
    row["next_files"], row["next_hidden"] = listing(twin)
    shutil.rmtree(twin)
    report["kills"].append(row)
print(json.dumps(report))
"""


# ------------------------------------------------------------------------------------------------------- helpers


def _compressed(rank: int):
    teacher = tiny_teacher()
    return drone_hf.compress_model(teacher, drone_hf.collect_activation_stats(teacher, tiny_batches()), rank=rank)


@pytest.fixture(scope="module")
def old_model():
    return _compressed(4).eval()


@pytest.fixture(scope="module")
def new_model():
    return _compressed(2).eval()


def _logits(folder) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad(), torch_threads(1):
        return model(**INPUTS).logits


def _expected(model) -> torch.Tensor:
    with torch.no_grad(), torch_threads(1):
        return model.eval()(**INPUTS).logits


def _hidden(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.startswith("."))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}


def _run_python(tmp_path: Path, script: str, spec: dict, prefix: str = "", timeout: int = 120):
    """Runs `script` with `spec` (in JSON) under the shell command `prefix`, which ends with `exec` or is empty."""
    (tmp_path / "script.py").write_text(script)
    torch.save(INPUTS, tmp_path / "inputs.pt")
    spec = {"inputs": str(tmp_path / "inputs.pt"), "report": str(tmp_path / "report.pt"), **spec}
    command = f"{prefix} {shlex.quote(sys.executable)} {shlex.quote(str(tmp_path / 'script.py'))} "
    command += shlex.quote(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _require_mount_namespace(tmp_path: Path) -> None:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare to mount")
    probe = tmp_path / "probe"
    probe.mkdir()
    command = f"mount -t tmpfs -o size=64k tmpfs {shlex.quote(str(probe))}"
    result = subprocess.run(["unshare", "-m", "sh", "-c", command], capture_output=True, text=True)
    probe.rmdir()
    if result.returncode != 0:
        pytest.skip(f"cannot mount in a new mount namespace: {result.stderr.strip()}")


# ------------------------------------------------------------------------------------- where plain saving works


def test_save_into_a_bind_mount(tmp_path, old_model, new_model):
    """`docker run -v host:/out`: the target folder is a mount point, which cannot be renamed (EBUSY)."""
    _require_mount_namespace(tmp_path)
    old_model.save_pretrained(tmp_path / "old")
    new_model.save_pretrained(tmp_path / "new")
    host, mount = tmp_path / "host", tmp_path / "out"
    host.mkdir()
    mount.mkdir()
    spec = {"target": str(mount), "saves": [[str(tmp_path / "old"), {}], [str(tmp_path / "new"), SHARDED]]}
    script = 'mount --bind "$1" "$2" && shift 2 && exec "$@"'
    prefix = f"unshare -m sh -c {shlex.quote(script)} sh {shlex.quote(str(host))} {shlex.quote(str(mount))}"
    _run_python(tmp_path, SAVE_SCRIPT, spec, prefix=prefix)
    report = torch.load(tmp_path / "report.pt")
    assert report["error"] is None  # into the empty mount, then over the checkpoint there
    assert os.listdir(mount) == []  # the files went to the host folder, through the mount
    assert not _hidden(host)
    assert "model.safetensors" not in os.listdir(host) and "model.safetensors.index.json" in os.listdir(host)
    expected = _logits(tmp_path / "new")
    assert torch.equal(_logits(host), expected) and torch.equal(report["logits"], expected)


def test_save_under_a_read_only_parent(tmp_path, old_model, new_model):
    """The target folder is writable, its parent is not (the save may create nothing beside the target)."""
    parent, target = tmp_path / "parent", tmp_path / "parent" / "ckpt"
    old_model.save_pretrained(target)
    new_model.save_pretrained(tmp_path / "new")
    parent.chmod(0o555)
    try:
        if os.geteuid() != 0:  # permissions apply to this process already
            new_model.save_pretrained(target)
        else:  # root ignores permissions unless it drops the capabilities that override them
            if shutil.which("setpriv") is None:
                pytest.skip("needs setpriv to drop root's CAP_DAC_OVERRIDE")
            spec = {"target": str(target), "saves": [[str(tmp_path / "new"), {}]], "probe": str(parent / "probe")}
            _run_python(
                tmp_path, SAVE_SCRIPT, spec, prefix="exec setpriv --bounding-set=-dac_override,-dac_read_search"
            )
            report = torch.load(tmp_path / "report.pt")
            if report["parent_writable"]:
                pytest.skip("could not drop the right to write into a read-only folder")
            assert report["error"] is None
    finally:
        parent.chmod(0o755)
    assert sorted(os.listdir(parent)) == ["ckpt"] and not _hidden(target)
    assert torch.equal(_logits(target), _logits(tmp_path / "new"))


def test_full_disk_keeps_the_old_checkpoint(tmp_path, old_model, new_model):
    """A small tmpfs holds the old checkpoint; the new one does not fit beside it."""
    _require_mount_namespace(tmp_path)
    old_model.save_pretrained(tmp_path / "old")
    new_model.save_pretrained(tmp_path / "new")
    mount = tmp_path / "disk"
    mount.mkdir()
    spec = {
        "target": str(mount / "ckpt"),
        "saves": [[str(tmp_path / "new"), {}]],
        "leave_free": 24576,
    }  # room for the card and config, not the weights
    script = 'mount -t tmpfs -o size=1m tmpfs "$1" && cp -a "$2" "$1/ckpt" && shift 2 && exec "$@"'
    prefix = (
        f"unshare -m sh -c {shlex.quote(script)} sh {shlex.quote(str(mount))} {shlex.quote(str(tmp_path / 'old'))}"
    )
    _run_python(tmp_path, SAVE_SCRIPT, spec, prefix=prefix)
    report = torch.load(tmp_path / "report.pt")
    name, is_os_error, code, message = report["error"]
    assert is_os_error and code == 28, report["error"]  # errno.ENOSPC, not safetensors' own error type
    assert "Not enough space" in message and "left as it was" in message
    assert report["listing"] == sorted([*os.listdir(tmp_path / "old"), "filler.bin"])  # no temporary folder left
    assert report["parent_listing"] == ["ckpt"]
    assert torch.equal(report["logits"], _logits(tmp_path / "old"))


def test_save_into_the_working_directory(tmp_path, monkeypatch, old_model, new_model):
    target = tmp_path / "ckpt"
    target.mkdir()
    inode = target.stat().st_ino
    monkeypatch.chdir(target)
    old_model.save_pretrained(".")
    new_model.save_pretrained(".")  # over the checkpoint in the working directory
    assert Path.cwd().stat().st_ino == inode and os.getcwd() == str(target)
    assert sorted(os.listdir(".")) == ["README.md", "config.json", "model.safetensors"]
    assert torch.equal(_logits("."), _expected(new_model))


def test_save_replaces_the_checkpoint_files_and_keeps_the_users(tmp_path, old_model, new_model):
    """Old shards, index and stale modelling code go; tokenizer, training and unrelated files stay, untouched, and the
    folder stays the same folder."""
    target = tmp_path / "ckpt"
    old_model.save_pretrained(target, **SHARDED)
    tiny_tokenizer().save_pretrained(target)
    config = json.loads((target / "config.json").read_text())
    config["auto_map"] = {
        "AutoModelForSequenceClassification": "modeling_old_drone.OldDrone",
        "AutoTokenizer": ["tokenization_mine.MyTokenizer", None],
    }
    (target / "config.json").write_text(json.dumps(config))
    (target / "modeling_old_drone.py").write_text("from .old_helpers import helper\n")
    (target / "old_helpers.py").write_text("helper = 1\n")
    (target / "tokenization_mine.py").write_text("MyTokenizer = None\n")  # the tokenizer's code, not the model's
    (target / REMOTE_CODE_FILES[0]).write_text("# exported by an earlier save\n")
    (target / "training_args.bin").write_bytes(b"training state")
    (target / "notes.py").write_text("# mine\n")
    (target / "logs").mkdir()
    kept = {
        name: (target / name).stat().st_ino
        for name in os.listdir(target)
        if not name.startswith(("model", "config", "old_helpers", "README", REMOTE_CODE_FILES[0]))
    }
    inode = target.stat().st_ino
    new_model.save_pretrained(target)
    assert sorted(os.listdir(target)) == sorted(["README.md", "config.json", "model.safetensors", *kept])
    assert {name: (target / name).stat().st_ino for name in kept} == kept and target.stat().st_ino == inode
    assert "tokenizer_config.json" in kept and "logs" in kept and "training_args.bin" in kept
    assert torch.equal(_logits(target), _expected(new_model))


# ------------------------------------------------------------------------------------------ failures and kills


@pytest.mark.slow
@pytest.mark.parametrize("sharded_first", [True, False], ids=["sharded-to-single", "single-to-sharded"])
def test_killed_save_leaves_the_old_or_the_new_checkpoint(tmp_path, old_model, new_model, sharded_first):
    """SIGKILL at every step of the protocol. A loader sees the old model, the new one, or (while config.json is
    away) a folder it refuses: never a mixture; recovery and the next save leave a whole checkpoint, no leftovers."""
    old_model.save_pretrained(tmp_path / "old")
    new_model.save_pretrained(tmp_path / "new")
    spec = {
        "work": str(tmp_path),
        "old": str(tmp_path / "old"),
        "new": str(tmp_path / "new"),
        "old_kwargs": SHARDED if sharded_first else {},
        "new_kwargs": {} if sharded_first else SHARDED,
    }
    report = json.loads(_run_python(tmp_path, KILL_SCRIPT, spec).stdout.splitlines()[-1])
    steps = report["steps"]
    assert steps[:4] == ["staged-folder", "written", "manifest", "ready"] and steps[-2:] == ["committed", "done"]
    assert "config-aside" in steps and "placeholder" in steps and any(step.startswith("aside:model") for step in steps)
    assert report["old"] != report["new"] and "vocab.txt" in report["new"]
    swap = range(steps.index("config-aside"), steps.index("committed"))
    for k, row in enumerate(report["kills"]):
        context = json.dumps(row)
        assert row["killed"], context
        if k < swap.start:  # the old checkpoint was not touched
            assert row["plain"] == "old" and row["recovered"] == "old" and row["files"] == report["old"], context
        elif k in swap:  # the old config.json is away: no real config in the folder
            if row["config"]:  # the placeholder: the Auto class's load finishes the swap itself
                assert row["plain"] == "new" and row["message"] is None, context
            else:  # just after the old config left: transformers refuses the folder; recovery finishes the swap
                assert row["plain"].startswith("error: "), context
                assert row["message"].startswith("Finished the interrupted save"), context
            assert row["recovered"] == "new" and row["files"] == report["new"], context
        else:  # committed
            assert row["plain"] == "new" and row["recovered"] == "new" and row["files"] == report["new"], context
        assert row["hidden"] == [] and row["next_hidden"] == [], context
        assert row["next_save"] == "new" and row["next_files"] == report["new"], context
    assert len(report["kills"]) == len(steps)


def test_failed_step_rolls_back_to_the_old_checkpoint(tmp_path, old_model, new_model):
    """An error (not a kill) at any step before the commit leaves the old files, byte for byte, and no leftovers."""
    target, steps = tmp_path / "ckpt", []
    old_model.save_pretrained(target, **SHARDED)
    (target / "vocab.txt").write_text("[PAD]\n")
    before = _snapshot(target)
    pristine = tmp_path / "pristine"
    shutil.copytree(target, pristine)
    saving._STEP_HOOK = steps.append
    try:
        new_model.save_pretrained(target)
        steps = steps[: steps.index("committed")]
        assert "config-aside" in steps and "in:model.safetensors" in steps
        for step in steps:
            shutil.rmtree(target)
            shutil.copytree(pristine, target)

            def fail(name, step=step):
                if name == step:
                    raise OSError(f"injected at {name}")

            saving._STEP_HOOK = fail
            with pytest.raises(OSError, match=f"injected at {step}"):
                new_model.save_pretrained(target)
            assert _snapshot(target) == before and not _hidden(target), step
    finally:
        saving._STEP_HOOK = None
    assert torch.equal(_logits(target), _expected(old_model))


def test_save_without_config_is_refused(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="wrote no config.json"):
        with saving.atomic_save(tmp_path / "ckpt") as staging:
            (staging / "model.safetensors").write_bytes(b"weights")
    assert os.listdir(tmp_path / "ckpt") == ["config.json"]


# -------------------------------------------------------------------------------------------------- leftovers


def test_recovery_of_leftovers_and_of_the_former_two_rename_save(tmp_path, old_model, new_model):
    parent = tmp_path / "runs"
    # drone_hf 0.1.0 killed between its two renames: only `.ckpt.old-*/ckpt` holds the checkpoint.
    old_model.save_pretrained(parent / ".ckpt.old-abcd1234" / "ckpt")
    (parent / ".ckpt.tmp-efgh_567" / "ckpt").mkdir(parents=True)
    (parent / ".ckpt.tmp-efgh_567" / "ckpt" / "config.json").write_text("{}")
    assert recover_interrupted_save("not/a/folder") is None
    message = recover_interrupted_save(parent / "ckpt")
    assert "Restored" in message and "Removed 2 leftover folder(s)" in message
    assert sorted(os.listdir(parent)) == ["ckpt"]
    assert torch.equal(_logits(parent / "ckpt"), _expected(old_model))
    assert recover_interrupted_save(parent / "ckpt") is None  # nothing left to do

    # a staging folder of a save killed while writing, and a folder locked by a save in progress
    (parent / "ckpt" / f"{STAGING_PREFIX}x1y2z3w4" / "incoming" / "ckpt").mkdir(parents=True)
    fd = os.open(parent / "ckpt", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert recover_interrupted_save(parent / "ckpt") is None  # another save holds the folder: hands off
        assert _hidden(parent / "ckpt") == [f"{STAGING_PREFIX}x1y2z3w4"]
    finally:
        os.close(fd)
    (parent / ".ckpt.tmp-ijkl9012").mkdir()  # and a sibling leftover of the former save
    new_model.save_pretrained(parent / "ckpt")  # cleans both up
    assert not _hidden(parent / "ckpt") and sorted(os.listdir(parent)) == ["ckpt"]
    assert torch.equal(_logits(parent / "ckpt"), _expected(new_model))


def test_hidden_staging_folder_is_inside_the_target(tmp_path, new_model):
    """While the save writes, its files are in `target/.drone_hf-save-*/`, never beside the target."""
    seen = []

    def look(name):
        if name == "written":
            seen.extend([_hidden(tmp_path / "ckpt"), sorted(os.listdir(tmp_path))])

    saving._STEP_HOOK = look
    try:
        new_model.save_pretrained(tmp_path / "ckpt")
    finally:
        saving._STEP_HOOK = None
    (staging,), beside = seen
    assert staging.startswith(STAGING_PREFIX) and beside == ["ckpt"]
    assert not _hidden(tmp_path / "ckpt")


def test_concurrent_saves_into_one_folder_take_turns(tmp_path, old_model, new_model):
    """The folder lock: a save's recovery step must not delete the staging folder of a save still writing."""
    import threading

    target, errors = tmp_path / "ckpt", []

    def save(model, kwargs):
        try:
            for _ in range(3):
                model.save_pretrained(target, **kwargs)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=save, args=args) for args in ((old_model, SHARDED), (new_model, {}))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and not _hidden(target)
    found = _logits(target)
    assert torch.equal(found, _expected(old_model)) or torch.equal(found, _expected(new_model))
    weights = sorted(name for name in os.listdir(target) if name.startswith("model"))
    assert weights in (
        ["model.safetensors"],
        [
            "model-00001-of-00003.safetensors",
            "model-00002-of-00003.safetensors",
            "model-00003-of-00003.safetensors",
            "model.safetensors.index.json",
        ],
    )
