"""What every source reader returns: raw canonical tables plus an ingest summary.

A source reader (FHIR R4, OMOP CDM) produces the record-level tables
(patients, encounters, events, notes) and a quarantine of what it rejected.
The derived tables (reference plans, index encounters) are computed from these
by `pipelines.ingest`, the same way for every source.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipelines.errors import InputError

#: Salt of the patient pseudonyms. Set PMLM_PSEUDONYM_SALT to a secret of the
#: hospital's own so that pseudonyms cannot be recomputed from source ids.
DEFAULT_SALT = "pmlm"
#: Internal column of ``patients`` as a reader returns it: the source id (for the
#: crosswalk, `pipelines.identity`); never written to a table.
SOURCE_ID_COLUMN = "_source_id"


def pseudonym(source: str, source_id: str, salt: str | None = None) -> str:
    """A stable pseudonymous patient id: ``p`` + 16 hex digits of a salted SHA-256."""
    salt = salt if salt is not None else os.environ.get("PMLM_PSEUDONYM_SALT", DEFAULT_SALT)
    digest = hashlib.sha256(f"{salt}\x1f{source}\x1f{source_id}".encode()).hexdigest()
    return "p" + digest[:16]


class IngestError(InputError):
    """An input that cannot be ingested at all; the message says what is wrong, where,
    and what to do (one line, for the command line to print without a traceback)."""


@dataclass
class IngestSummary:
    """Counts that reconcile: ``read == kept + quarantined + skipped``.

    ``read`` counts records (FHIR resources, OMOP rows) found in readable files;
    ``files_quarantined`` counts files that could not be read at all (their
    records cannot be counted and are not in ``read``). ``skipped`` is the sum of
    ``skipped_by_type`` (types that are not read) and ``skipped_by_reason``
    (records that are read but hold no fact: an identical repeat of a record
    already kept, a status such as entered-in-error, refuted or cancelled).
    """

    source: str
    files_read: int = 0
    files_quarantined: int = 0
    read: int = 0
    kept: int = 0
    quarantined: int = 0
    skipped_by_type: Counter[str] = field(default_factory=Counter)
    kept_by_type: Counter[str] = field(default_factory=Counter)
    skipped_by_reason: Counter[str] = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    @property
    def skipped(self) -> int:
        return sum(self.skipped_by_type.values()) + sum(self.skipped_by_reason.values())

    def add(self, other: IngestSummary) -> None:
        """Add the counts of ``other`` (another part of the same input) to these."""
        self.files_read += other.files_read
        self.files_quarantined += other.files_quarantined
        self.read += other.read
        self.kept += other.kept
        self.quarantined += other.quarantined
        self.skipped_by_type.update(other.skipped_by_type)
        self.kept_by_type.update(other.kept_by_type)
        self.skipped_by_reason.update(other.skipped_by_reason)
        self.notes.extend(n for n in other.notes if n not in self.notes)

    def reconciles(self) -> bool:
        return self.read == self.kept + self.quarantined + self.skipped

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "files_read": self.files_read,
            "files_quarantined": self.files_quarantined,
            "read": self.read,
            "kept": self.kept,
            "quarantined": self.quarantined,
            "skipped": self.skipped,
            "skipped_by_type": dict(sorted(self.skipped_by_type.items())),
            "kept_by_type": dict(sorted(self.kept_by_type.items())),
            "skipped_by_reason": dict(sorted(self.skipped_by_reason.items())),
            "notes": list(self.notes),
        }


@dataclass
class SourceTables:
    """Record-level canonical tables from one source, before derivation."""

    patients: pd.DataFrame
    encounters: pd.DataFrame
    events: pd.DataFrame
    notes: pd.DataFrame
    quarantine: pd.DataFrame
    summary: IngestSummary
    #: pseudonym → the direct identifiers of its source records (the deny-list,
    #: `pipelines.identifiers`); a FHIR reader fills it from the Patients it reads
    identifiers: dict[str, dict[str, list[str]]] = field(default_factory=dict)


def frame(rows: list[dict[str, Any]], schema_names: list[str]) -> pd.DataFrame:
    """A frame with exactly ``schema_names`` as columns, even when ``rows`` is empty."""
    return pd.DataFrame(rows, columns=schema_names)
