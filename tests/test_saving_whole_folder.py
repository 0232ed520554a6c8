"""Crash-safe saving of whole folders (`drone_hf.saving.atomic_save` as the CLI's `--output` and sentence-transformers
saves use it): module folders, tokenizer, card and results move in together; a SIGKILL at any step leaves the old
folder or the new one (recovery or the next save finishing a swap that was under way), never a mix, and never loses
the user's own files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


REPO = Path(__file__).resolve().parents[1]

# For each step of one whole-folder save, a forked child SIGKILLs itself at that step; the parent then reads the
# folder as it is, after `recover_interrupted_save`, and (in a copy) after the next save.
KILL_SCRIPT = r"""
import json, os, shutil, signal, sys, time
from pathlib import Path

from drone_hf import saving
from drone_hf.cli_checks import output_folder
from drone_hf.interrupted_save import is_placeholder
from drone_hf.sentence_embeddings import _owned_sentence_transformer_files

work, how = Path(sys.argv[1]), sys.argv[2]
OLD = {
    "config.json": '{"v": "old"}', "model.safetensors": "old", "tokenizer.json": "old", "vocab.txt": "old",
    "modules.json": json.dumps([{"path": "1_Pooling"}, {"path": "2_Dense"}]), "1_Pooling/config.json": "old",
    "2_Dense/config.json": "old", "README.md": "old", "drone_results.json": json.dumps({"files": ["vocab.txt"]}),
}
NEW = {
    "config.json": '{"v": "new"}', "model.safetensors": "new", "tokenizer.json": "new", "merges.txt": "new",
    "modules.json": json.dumps([{"path": "1_Pooling"}]), "1_Pooling/config.json": "new", "README.md": "new",
    "drone_results.json": "new",
}
if how == "sentence-transformers":  # the CLI's results are not the model save's
    OLD.pop("drone_results.json"), NEW.pop("drone_results.json")
USER = {"notes.txt": "mine", "logs/run.txt": "mine"}


def write(folder, files):
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def state(folder):
    return {str(p.relative_to(folder)): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)}


def save(folder):
    if how == "cli":
        with output_folder(str(folder)) as staging:
            write(staging, NEW)
    else:
        with saving.atomic_save(folder, owned_files=_owned_sentence_transformer_files) as staging:
            write(staging, NEW)


def verdict(folder):
    config = folder / "config.json"
    if not config.exists() or is_placeholder(config):
        return "in progress"
    found = state(folder)
    return "old" if found == {**OLD, **USER} else "new" if found == {**NEW, **USER} else f"mixed: {found}"


pristine, target, twin = work / "pristine", work / "target", work / "twin"
write(pristine, {**OLD, **USER})
steps = []
shutil.copytree(pristine, target)
saving._STEP_HOOK = steps.append
save(target)
saving._STEP_HOOK = None
rows = [{"step": "none", "plain": verdict(target)}]
for k, step in enumerate(steps):
    shutil.rmtree(target)
    shutil.copytree(pristine, target)
    pid = os.fork()
    if pid == 0:
        try:
            calls = []

            def hook(name):
                if len(calls) == k:
                    os.kill(os.getpid(), signal.SIGKILL)
                calls.append(name)

            saving._STEP_HOOK = hook
            save(target)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    row = {"step": step, "killed": os.WIFSIGNALED(status), "plain": verdict(target)}
    row["placeholder"] = is_placeholder(target / "config.json")
    shutil.copytree(target, twin)
    row["message"] = saving.recover_interrupted_save(target)
    row["recovered"] = verdict(target)
    row["hidden"] = sorted(name for name in os.listdir(target) if name.startswith("."))
    save(twin)
    row["next_save"] = verdict(twin)
    row["next_hidden"] = sorted(name for name in os.listdir(twin) if name.startswith("."))
    shutil.rmtree(twin)
    rows.append(row)
print(json.dumps({"steps": steps, "rows": rows}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("how", ["cli", "sentence-transformers"])
def test_killed_whole_folder_save_leaves_the_old_or_the_new_folder(tmp_path, how):
    env = {**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(tmp_path), how], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    steps, rows = report["steps"], report["rows"]
    assert rows[0]["plain"] == "new"  # the save itself replaces the folder whole, stale files included
    assert steps.index("config-aside") < steps.index("placeholder") < steps.index("committed")
    assert any(step == "aside:2_Dense" for step in steps) and any(step == "in:1_Pooling" for step in steps)
    swap = range(steps.index("config-aside"), steps.index("committed"))
    for k, row in enumerate(rows[1:]):
        context = json.dumps(row)
        assert row["killed"], context
        if k < swap.start:
            assert row["plain"] == "old" and row["recovered"] == "old", context
        elif k in swap:  # no real config.json: every loader refuses the folder; recovery finishes the swap
            assert row["plain"] == "in progress" and row["recovered"] == "new", context
            assert row["placeholder"] == (k > steps.index("config-aside")), context
            assert row["message"].startswith("Finished the interrupted save"), context
        else:
            assert row["plain"] == "new" and row["recovered"] == "new", context
        assert row["hidden"] == [] and row["next_hidden"] == [] and row["next_save"] == "new", context
