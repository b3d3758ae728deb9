"""Steps that write tables, run in a subprocess by the crash tests (`test_workspace`).

``python crash_writers.py STEP WORKSPACE ARG``: ``cohort N`` ingests the first N
patients of the default cohort (`write_cohort`, the OMOP and snapshot path);
``fhir FOLDER`` ingests a folder of FHIR bundles (`ingest_fhir`, staged);
``fit MODELS`` fits the comma-separated recommenders on a synthetic cohort (written
first if the workspace has no tables); ``export N`` exports a table of N rows to
``WORKSPACE/export`` as Parquet and JSONL (`export_table`); ``prompts WHICH:METHODS`` builds
the prompt table of the comma-separated METHODS for the WHICH encounters with the refresh
(`refresh_prompt_table`: the table, its refresh state and its manifest entry), fitting a
synthetic cohort first if the workspace has no tables; ``copy FOLDER`` copies a workspace; ``hold SIGNAL`` holds the workspace lock
until the file SIGNAL exists.
With ``PMLM_FAULT_AFTER_WRITES=k`` the process dies (exit 9) after its k-th write.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import time
from pathlib import Path

from pipelines.cohort import load_snapshot
from pipelines.ingest import ingest_fhir, write_cohort
from pipelines.sources import SourceTables
from pipelines.workspace import Workspace


def cohort_subset(n: int) -> SourceTables:
    source = load_snapshot()
    keep = set(source.patients["patient_id"].iloc[:n])
    tables = {
        name: getattr(source, name)[getattr(source, name)["patient_id"].isin(keep)]
        for name in ("patients", "encounters", "events", "notes")
    }
    return dataclasses.replace(source, **tables)


def synthetic_tables(ws: Workspace, n_patients: int = 36) -> None:
    """The tables of a small synthetic cohort, unless the workspace has tables."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from synthetic_cohort import synthetic_cohort

    if not ws.has_table("patients"):
        with ws.transaction("synthetic"):
            for name, frame in synthetic_cohort(n_patients=n_patients, seed=5).items():
                ws.write_table(name, frame)


def main(step: str, root: str, arg: str) -> None:
    ws = Workspace.at(root)
    if step == "cohort":
        write_cohort(ws, cohort_subset(int(arg)), input_description=f"subset:{arg}")
    elif step == "fhir":
        ingest_fhir(ws, Path(arg), workers=1)
    elif step == "copy":
        shutil.copytree(arg, root, dirs_exist_ok=True)
    elif step == "fit":
        from recsys.steps import fit_models

        synthetic_tables(ws)
        fit_models(ws, arg.split(","), blend=False)
    elif step == "prompts":
        from promptenv.prompt_table import PromptTableSpec, refresh_prompt_table
        from recsys.steps import fit_models

        if not ws.has_table("patients"):
            synthetic_tables(ws, n_patients=16)  # few: the step runs once per write
            fit_models(ws, ["popularity"], blend=False)
        which, methods = arg.split(":")
        spec = PromptTableSpec(methods=tuple(methods.split(",")), which=which)  # type: ignore[arg-type]
        refresh_prompt_table(ws, spec)
    elif step == "export":
        import pyarrow as pa

        from pipelines.export import export_table

        rows = int(arg)
        table = pa.table({"patient_id": [f"p{i}" for i in range(rows)], "n": list(range(rows))})
        export_table(table, Path(root) / "export", formats=("parquet", "jsonl"))
    elif step == "hold":
        with ws.transaction("hold"):
            print("holding", flush=True)
            while not Path(arg).exists():
                time.sleep(0.05)
    else:
        raise SystemExit(f"unknown step {step!r}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
