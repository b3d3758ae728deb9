"""The data steps on a workspace: bring a source's records in, and fingerprint them.

Plain functions over a workspace folder; the ``pmlm ingest`` commands and the
flows' tasks are thin wrappers around them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.errors import InputError
from pipelines.workspace import Workspace

#: The forms of ``source`` that `prepare_source` takes.
SOURCE_FORMS = "default, fhir:PATH, omop, omop:PATH_OR_URL or workspace"


def parse_source(source: str) -> tuple[str, str]:
    """(kind, where) of a ``source`` (`SOURCE_FORMS`); raises InputError for another form.

    ``fhir:PATH`` is a folder of bundles, a Bulk Data export or its manifest.json;
    ``omop:PATH_OR_URL`` a DuckDB file, a CSV folder or a SQLAlchemy URL
    (``omop:postgresql://user@host/db``).
    """
    kind, _, where = source.partition(":")
    if (kind in ("default", "workspace") and not where) or (kind == "fhir" and where):
        return kind, where
    if kind == "omop":
        return kind, where
    raise InputError(f"unknown data source {source!r}: use {SOURCE_FORMS}")


def describe_source(source: str) -> str:
    """What ``source`` is, in words, for a header line (a URL's password is hidden)."""
    from pipelines.omop import is_url

    kind, where = parse_source(source)
    if kind == "default":
        return "the built-in default cohort"
    if kind == "workspace":
        return "the tables already in the workspace"
    if kind == "fhir":
        return f"the FHIR input {where}"
    if not where:
        return "the OMOP CDM Eunomia"
    if is_url(where):
        where = re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", where)
    return f"the OMOP CDM {where}"


def prepare_source(
    ws: Workspace,
    source: str = "default",
    split_seed: int = 0,
    *,
    fmt: str = "auto",
    plans: str = "auto",
    plan_headers: Sequence[str] | None = None,
    cdm_schema: str | None = None,
) -> dict[str, Any]:
    """Canonical tables, reference plans, index encounters and the patient split of ``source``.

    ``source``: ``default`` (the built-in cohort), ``fhir:PATH`` (bundles, a Bulk
    Data export or its manifest.json; ``fmt``), ``omop`` (Eunomia),
    ``omop:PATH_OR_URL`` (``cdm_schema``), or ``workspace`` (the tables an earlier
    ingest wrote are kept as they are; ``split_seed`` is then theirs). ``plans``
    and ``plan_headers``: where reference plans come from (`pipelines.ingest.write_cohort`).
    Returns the data summary (`pipelines.ingest.summarize`).
    """
    from pipelines.cohort import prepare_default_cohort
    from pipelines.ingest import ingest_fhir, ingest_omop, load_tables, summarize
    from pipelines.omop import is_url

    kind, where = parse_source(source)
    if kind == "default":
        return prepare_default_cohort(ws, split_seed=split_seed)
    if kind == "workspace":
        return summarize(load_tables(ws))
    if kind == "fhir":
        return ingest_fhir(
            ws,
            Path(where),
            split_seed=split_seed,
            fmt=fmt,
            plans=plans,
            plan_headers=plan_headers,
        )
    location: Path | str | None = (where if is_url(where) else Path(where)) if where else None
    return ingest_omop(
        ws,
        location,
        split_seed=split_seed,
        cdm_schema=cdm_schema,
        plans=plans,
        plan_headers=plan_headers,
    )


def records_fingerprint(ws: Workspace) -> str:
    """A hash of every patient's records (`pipelines.fingerprint`): what a fit was made from."""
    from pipelines.fingerprint import PATIENT_TABLES, cohort_fingerprint, patient_fingerprints
    from pipelines.ingest import load_tables

    tables = load_tables(ws, PATIENT_TABLES)
    return cohort_fingerprint(patient_fingerprints(tables))


__all__ = [
    "SOURCE_FORMS",
    "describe_source",
    "parse_source",
    "prepare_source",
    "records_fingerprint",
]
