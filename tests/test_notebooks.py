"""The notebooks of notebooks/: stored without outputs, and every cell runs on one workspace.

Notebook 3 runs first, on an empty workspace: each notebook prepares what it needs
(the cohort, the recommenders) when the notebooks before it have not run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = (
    "01_explore_cohort.ipynb",
    "02_patient_signals_and_prompt.ipynb",
    "03_compare_methods.ipynb",
)
#: The last notebook first: it must not need the others to have run.
RUN_ORDER = (NOTEBOOKS[2], NOTEBOOKS[0], NOTEBOOKS[1])
KERNEL = "python3"


def test_the_notebooks_are_stored_without_outputs() -> None:
    assert sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)
    for name in NOTEBOOKS:
        notebook = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
        nbformat.validate(notebook)
        assert notebook.metadata["kernelspec"]["name"] == KERNEL
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert cell.outputs == [] and cell.execution_count is None, (name, cell.source)
        sources = "\n".join(c.source for c in notebook.cells if c.cell_type == "code")
        assert 'os.environ.get("PMLM_WORKSPACE", "pmlm-workspace")' in sources, name


def python3_kernel_of_this_interpreter() -> str:
    """The ``python3`` kernel, run by this interpreter (so it sees this environment's packages)."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL)
    except NoSuchKernel:
        pytest.fail(
            f"no Jupyter kernel named {KERNEL!r}: install ipykernel's into this environment "
            f"with `{sys.executable} -m ipykernel install --sys-prefix`",
            pytrace=False,
        )
    # jupyter_client runs a spec whose argv starts with "python" with sys.executable
    if spec.argv[0] not in ("python", "python3", sys.executable):
        pytest.fail(
            f"the {KERNEL!r} kernel runs {spec.argv[0]}, not this environment's Python: reinstall "
            f"it with `{sys.executable} -m ipykernel install --sys-prefix`",
            pytrace=False,
        )
    return KERNEL


@pytest.mark.slow(seconds=125)
def test_every_notebook_runs_on_one_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    kernel = python3_kernel_of_this_interpreter()
    workspace = tmp_path / "workspace"
    # the kernel inherits this environment: the workspace, offline models, no telemetry
    monkeypatch.setenv("PMLM_WORKSPACE", str(workspace))
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for name in RUN_ORDER:
        notebook = nbformat.read(NOTEBOOKS_DIR / name, as_version=4)
        client = NotebookClient(
            notebook,
            kernel_name=kernel,
            timeout=600,
            resources={"metadata": {"path": str(tmp_path)}},
        )
        try:
            client.execute()
        except CellExecutionError as exc:
            pytest.fail(f"{name}: a cell failed\n{exc}", pytrace=False)
        errors = [
            output
            for cell in notebook.cells
            for output in cell.get("outputs", [])
            if output.get("output_type") == "error"
        ]
        assert errors == [], name
        images = [
            output
            for cell in notebook.cells
            for output in cell.get("outputs", [])
            if "image/png" in output.get("data", {})
        ]
        assert images, f"{name} shows no plot"
    assert (workspace / "tables" / "index_encounters.parquet").exists()
    assert (workspace / "models" / "recsys" / "selection.json").exists()
    assert (workspace / "reports" / "report.md").exists()
    assert (workspace / "reports" / "report.html").exists()
