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


#: The ingest options each kind of source takes (the others are refused: `check_source_options`).
SOURCE_OPTIONS: dict[str, tuple[str, ...]] = {
    "fhir": ("--format", "--plans", "--plan-header"),
    "omop": ("--plans", "--plan-header", "--cdm-schema"),
    "default": (),
    "workspace": (),
}


def check_source_options(
    source: str,
    *,
    fmt: str = "auto",
    plans: str = "auto",
    plan_headers: Sequence[str] | None = None,
    cdm_schema: str | None = None,
) -> None:
    """Raise InputError (one line) when an ingest option given (other than its default)
    does not apply to ``source``, or a ``--plans`` choice is unknown; reads nothing."""
    from pipelines.ingest import plan_choice

    kind, _ = parse_source(source)
    given = {
        "--format": fmt != "auto",
        "--plans": plans != "auto",
        "--plan-header": bool(plan_headers),
        "--cdm-schema": cdm_schema is not None,
    }
    for option, on in given.items():
        if on and option not in SOURCE_OPTIONS[kind]:
            takes = [k for k, options in SOURCE_OPTIONS.items() if option in options]
            extra = (
                ": the workspace's tables keep the plans of their ingest; re-run "
                f"`pmlm ingest` with {option}"
                if kind == "workspace"
                else ""
            )
            raise InputError(
                f"{option} does not apply to --source {source}: it is for "
                f"{' and '.join(f'{k}:' for k in takes)} sources{extra}"
            )
    plan_choice(plans)


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
    Returns the data summary (`pipelines.ingest.summarize`). An option that does not
    apply to ``source`` is refused (`check_source_options`).
    """
    from pipelines.cohort import prepare_default_cohort
    from pipelines.ingest import ingest_fhir, ingest_omop, load_tables, summarize
    from pipelines.omop import is_url

    check_source_options(
        source, fmt=fmt, plans=plans, plan_headers=plan_headers, cdm_schema=cdm_schema
    )
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
    "SOURCE_OPTIONS",
    "check_source_options",
    "describe_source",
    "parse_source",
    "prepare_source",
    "records_fingerprint",
]
