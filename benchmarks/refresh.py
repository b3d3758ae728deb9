"""Incremental refresh of the prompt table: the work of a first build and of a refresh after
one patient's records change.

    .venv/bin/python benchmarks/refresh.py [--change visit|late-record] [--workspace DIR]

1. The built-in default cohort is ingested as it was BEFORE the change (``visit``:
   without one training patient's latest visit; ``late-record``: as shipped), the
   recommenders are fitted (quick grids; not timed) and the prompt table is
   built from scratch: the FIRST run.
2. Her new records arrive and the cohort is re-ingested (not timed): ``visit``
   adds the withheld visit (its encounter, events and note); ``late-record``
   adds one condition documented late, at her latest index encounter.
3. The prompt table is refreshed without refitting: the SECOND run.
4. A copy of the workspace recomputes the table from scratch on the same data;
   the refreshed table must equal it (``created_at`` aside).

Work is counted as the patients whose signals and prompts were computed; wall
time is that of `promptenv.prompt_table.refresh_prompt_table` (plan, batches,
write) in this process, without Prefect. Both runs also pay for what grows with
the cohort whatever changed: reading the tables, fingerprinting every patient
and one vectorized pass over every recommender state (a state also depends on
the plan items of the whole cohort). The machine's load average is printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from pipelines.cohort import load_snapshot
from pipelines.ingest import derive, write_cohort
from pipelines.sources import SourceTables
from pipelines.workspace import Workspace
from promptenv.prompt_table import RefreshResult, refresh_prompt_table
from recsys.steps import QUICK_GRIDS, fit_models


def pick_patient(source: SourceTables) -> str:
    """The first training patient (by id) with at least four index encounters."""
    index = derive(source)["index_encounters"]
    train = index[index["split"] == "train"]
    counts = train.groupby("patient_id").size()
    return str(sorted(counts[counts >= 4].index)[0])


def without_latest_visit(source: SourceTables, patient: str) -> SourceTables:
    """The records as they were before the patient's latest visit."""
    enc = source.encounters
    mine = enc[enc["patient_id"] == patient].sort_values("start")
    latest = str(mine["encounter_id"].iloc[-1])
    return replace(
        source,
        encounters=enc[enc["encounter_id"] != latest],
        events=source.events[source.events["encounter_id"] != latest],
        notes=source.notes[source.notes["encounter_id"] != latest],
    )


def with_late_record(source: SourceTables, patient: str) -> SourceTables:
    """One more condition of hers, recorded at her latest index encounter (appended rows)."""
    index = derive(source)["index_encounters"]
    latest = index[index["patient_id"] == patient].sort_values("index_time").iloc[-1]
    events = source.events
    hers = set(events.loc[events["patient_id"] == patient, "code"].dropna())
    others = events[(events["kind"] == "condition") & ~events["code"].isin(hers)]
    row = others.iloc[[0]].assign(
        event_id=f"late-record-{patient}",
        patient_id=patient,
        encounter_id=latest["encounter_id"],
        time=latest["index_time"],
        recorded_time=latest["index_time"],
        end_time=pd.NaT,
    )
    return replace(source, events=pd.concat([events, row], ignore_index=True))


def timed(ws: Workspace, full: bool = False) -> tuple[RefreshResult, float]:
    started = time.perf_counter()
    result = refresh_prompt_table(ws, full=full)
    return result, time.perf_counter() - started


def prompts(ws: Workspace) -> pd.DataFrame:
    return pd.read_parquet(ws.table_path("prompts")).drop(columns="created_at")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--change", choices=("visit", "late-record"), default="visit")
    parser.add_argument("--workspace", type=Path, help="Folder to use (default: a temporary one).")
    args = parser.parse_args()
    if args.workspace is not None:
        run(args.change, args.workspace)
        return
    with tempfile.TemporaryDirectory(prefix="pmlm-refresh-") as folder:
        run(args.change, Path(folder))


def run(change: str, root: Path) -> None:
    """Both runs and the check, in ``root/refreshed`` and ``root/recomputed``."""
    ws = Workspace.at(root / "refreshed")
    full_ws = Workspace.at(root / "recomputed")
    for folder in (ws.root, full_ws.root):
        shutil.rmtree(folder, ignore_errors=True)

    after = load_snapshot()
    patient = pick_patient(after)
    before = without_latest_visit(after, patient) if change == "visit" else after
    if change == "late-record":
        after = with_late_record(after, patient)
    print(f"load average {os.getloadavg()}; change: {change} of patient {patient}")

    write_cohort(ws, before, input_description=f"before the {change}")
    fit_models(ws, grids=QUICK_GRIDS)
    first, first_s = timed(ws)
    write_cohort(ws, after, input_description=f"after the {change}")
    second, second_s = timed(ws)

    shutil.copytree(ws.root / "models", full_ws.root / "models")
    write_cohort(full_ws, after, input_description=f"after the {change}")
    _, full_s = timed(full_ws, full=True)
    equal = prompts(ws).equals(prompts(full_ws))

    print(f"patients with a prompt: {second.patients}")
    print(
        f"first run:  {first.recomputed_patients} patients computed, {first_s:.1f} s "
        f"({first.full_reason})"
    )
    print(
        f"second run: {second.recomputed_patients} patients computed, {second_s:.1f} s "
        f"(reasons: {dict(second.reasons)}, removed {second.removed})"
    )
    print(
        f"ratio second/first: {second.recomputed_patients / first.recomputed_patients:.1%} "
        f"of the patients, {second_s / first_s:.1%} of the wall time"
    )
    print(f"full recompute on the same data: {full_s:.1f} s; refreshed table equal: {equal}")
    if not equal:
        raise SystemExit("the refreshed prompt table differs from a full recompute")


if __name__ == "__main__":
    main()
