"""The data steps on a workspace: bring a source's records in, and fingerprint them.

Plain functions over a workspace folder; the ``pmlm ingest`` commands and the
flows' tasks are thin wrappers around them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipelines.errors import InputError
from pipelines.workspace import Workspace

#: The forms of ``source`` that `prepare_source` takes.
SOURCE_FORMS = "default, fhir:FOLDER, omop, omop:PATH or workspace"


def prepare_source(ws: Workspace, source: str = "default", split_seed: int = 0) -> dict[str, Any]:
    """Canonical tables, reference plans, index encounters and the patient split of ``source``.

    ``source``: ``default`` (the built-in cohort), ``fhir:FOLDER``, ``omop`` (Eunomia),
    ``omop:PATH``, or ``workspace`` (the tables an earlier ingest wrote are kept as they
    are; ``split_seed`` is then theirs). Returns the data summary (`pipelines.ingest.summarize`).
    """
    from pipelines.cohort import prepare_default_cohort
    from pipelines.ingest import ingest_fhir, ingest_omop, load_tables, summarize

    kind, _, where = source.partition(":")
    if kind == "default" and not where:
        return prepare_default_cohort(ws, split_seed=split_seed)
    if kind == "workspace" and not where:
        return summarize(load_tables(ws))
    if kind == "fhir" and where:
        return ingest_fhir(ws, Path(where), split_seed=split_seed)
    if kind == "omop":
        return ingest_omop(ws, Path(where) if where else None, split_seed=split_seed)
    raise InputError(f"unknown data source {source!r}: use {SOURCE_FORMS}")


def records_fingerprint(ws: Workspace) -> str:
    """A hash of every patient's records (`pipelines.fingerprint`): what a fit was made from."""
    from pipelines.fingerprint import PATIENT_TABLES, cohort_fingerprint, patient_fingerprints
    from pipelines.ingest import load_tables

    tables = load_tables(ws, PATIENT_TABLES)
    return cohort_fingerprint(patient_fingerprints(tables))


__all__ = ["SOURCE_FORMS", "prepare_source", "records_fingerprint"]
