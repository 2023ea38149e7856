"""Every notebook in notebooks/ runs top to bottom on the synthetic data."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.setenv("QUICKSTART_STEPS", "3")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for cell in notebook.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.slow
def test_jupyter_nbconvert_executes_a_notebook_as_docs_show(tmp_path):
    """docs/workflow.md: `.venv/bin/jupyter nbconvert --to notebook --execute ...` (dev extras)."""
    import os
    import subprocess
    import sys

    jupyter = Path(sys.executable).parent / "jupyter"
    notebook = Path(__file__).resolve().parents[1] / "notebooks/deft.ipynb"
    result = subprocess.run([str(jupyter), "nbconvert", "--to", "notebook", "--execute", str(notebook),
                             "--output-dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL, cwd=tmp_path, env={**os.environ, "QUICKSTART_STEPS": "3"})
    assert result.returncode == 0, result.stderr[-3000:]
    executed = nbformat.read(tmp_path / "deft.ipynb", as_version=4)
    assert "notebook ran in" in str(executed.cells[-1].outputs)
