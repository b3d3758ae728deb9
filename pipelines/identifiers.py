"""The workspace's deny-list: the direct identifiers of every patient in its source records.

The canonical tables hold no names, addresses or telecom, but the source
records do, and a prompt could carry them (a note's text, a careless prompt
builder). The ingest therefore collects, on this machine, each patient's

- names (``Patient.name``: given, family, prefixes; the parts of a Synthea
  file name such as ``Jane123_Roe456_<uuid>.json``),
- addresses (street lines, city, district, postal code),
- telecom values (phone numbers, emails),
- identifiers (``Patient.identifier`` values: MRN, SSN, licences...) and the
  source id (``Patient.id``),
- the pseudonym (``patient_id``) and the birth date,

and writes them to ``WORKSPACE/private/identifiers.json`` (mode 0600, in a
folder of mode 0700). `promptenv.llm.LLMClient` reads it (and the patients
table) and removes every one of these values from every request it sends to a
remote backend. The file never leaves the workspace.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
import simdjson

from pipelines.sources import pseudonym
from pipelines.workspace import Workspace, atomic_write_bytes

#: The kinds of value kept per patient (the fields of ``promptenv.llm.KnownIdentifiers``).
FIELDS = ("names", "ids", "dates", "addresses", "other")
IDENTIFIERS_FILE = "identifiers.json"

_FILE_NAME_PART = re.compile(r"[A-Z][A-Za-z'-]+\d*")
_UUID = re.compile(r"[0-9a-fA-F]{8}(?:-?[0-9a-fA-F]{4}){3}-?[0-9a-fA-F]{12}|[0-9a-fA-F]{8}")

PatientIdentifiers = dict[str, list[str]]


def identifiers_path(workspace: Workspace) -> Path:
    return workspace.root / "private" / IDENTIFIERS_FILE


def _strings(values: Iterable[Any]) -> list[str]:
    return [v.strip() for v in values if isinstance(v, str) and v.strip()]


def patient_identifiers(resource: dict[str, Any], salt: str | None = None) -> PatientIdentifiers:
    """The direct identifiers a FHIR Patient resource holds (any malformed part is skipped)."""
    out: PatientIdentifiers = {f: [] for f in FIELDS}

    def items(key: str, of: dict[str, Any] = resource) -> list[dict[str, Any]]:
        value = of.get(key)
        return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []

    people = [resource, *items("contact")]
    for person in people:
        names = items("name", person)
        if isinstance(person.get("name"), dict):  # Patient.contact.name is one HumanName
            names.append(person["name"])
        for name in names:
            given = name.get("given")
            parts = _strings([*(given if isinstance(given, list) else []), name.get("family")])
            parts += _strings([name.get("text")])
            out["names"].extend(parts)
            if len(parts) >= 2:
                out["names"].append(" ".join(parts[:2]))
        for telecom in items("telecom", person):
            out["other"].extend(_strings([telecom.get("value")]))
        addresses = items("address", person)
        if isinstance(person.get("address"), dict):
            addresses.append(person["address"])
        for address in addresses:
            lines = address.get("line")
            out["addresses"].extend(_strings(lines if isinstance(lines, list) else []))
            out["addresses"].extend(
                _strings([address.get(k) for k in ("city", "district", "postalCode", "text")])
            )
    for identifier in items("identifier"):
        out["ids"].extend(_strings([identifier.get("value")]))
    rid = resource.get("id")
    if isinstance(rid, str) and rid:
        out["ids"] += [rid, pseudonym("fhir", rid, salt)]
    out["dates"].extend(_strings([resource.get("birthDate")]))
    return {f: list(dict.fromkeys(v)) for f, v in out.items()}


def _patient_resources(path: Path, parser: simdjson.Parser) -> list[dict[str, Any]]:
    """The Patient resources of a bundle file, or of an NDJSON file of a Bulk Data export."""
    name = path.name.lower()
    if name.endswith((".ndjson", ".ndjson.gz")):
        from pipelines.fhir.bulk import GZIP_ERRORS, ndjson_lines

        found = []
        try:
            for line in ndjson_lines(path):
                try:
                    resource = json.loads(line)
                except ValueError:  # the ingest quarantines the line
                    continue
                if isinstance(resource, dict) and resource.get("resourceType") == "Patient":
                    found.append(resource)
        except GZIP_ERRORS:  # the ingest keeps the lines before the damage, as here
            pass
        return found
    try:
        doc = parser.parse(path.read_bytes())
    except (ValueError, RuntimeError):  # simdjson: malformed JSON, not UTF-8
        return []
    entries = doc.get("entry") if isinstance(doc, simdjson.Object) else None
    resources: list[dict[str, Any]] = []
    for e in entries if isinstance(entries, simdjson.Array) else []:
        resource = e.get("resource") if isinstance(e, simdjson.Object) else None
        if isinstance(resource, simdjson.Object) and resource.get("resourceType") == "Patient":
            resources.append(resource.as_dict())
    return resources


def merge_identifiers(
    into: dict[str, PatientIdentifiers], found: dict[str, PatientIdentifiers]
) -> dict[str, PatientIdentifiers]:
    """Add ``found`` to ``into`` (in place, returned): a patient read twice (a repeat,
    or a conflicting duplicate) keeps every value of both, in the order first seen."""
    for pid, entry in found.items():
        merged = into.get(pid)
        if merged is None:
            into[pid] = {f: list(entry.get(f, [])) for f in FIELDS}
            continue
        for f in FIELDS:
            merged[f] = list(dict.fromkeys([*merged[f], *entry.get(f, [])]))
    return into


def fhir_identifiers(
    files: Iterable[Path], salt: str | None = None
) -> dict[str, PatientIdentifiers]:
    """Pseudonym → identifiers of every Patient resource in the bundle or NDJSON ``files``.

    A file or line that is not readable is skipped: the ingest quarantines it and
    no row of it reaches the tables. ``salt`` must be the ingest's (the workspace's).
    The ingest does not call this (its readers collect the same identifiers while
    they read each file once: `pipelines.fhir.reader.FhirReader`); it is the
    reference that tests hold the ingest's deny-list to.
    """
    parser = simdjson.Parser()
    found: dict[str, PatientIdentifiers] = {}
    for path in files:
        for patient in _patient_resources(path, parser):
            rid = patient.get("id")
            if isinstance(rid, str) and rid:
                pid = pseudonym("fhir", rid, salt)
                merge_identifiers(found, {pid: patient_identifiers(patient, salt)})
    return found


def table_identifiers(patients: pd.DataFrame) -> dict[str, PatientIdentifiers]:
    """Pseudonym → the identifiers the patients table itself holds: the pseudonym, the
    birth date and the parts of the source file's name (Synthea names files after the
    patient: ``Donya_Schumm_297cb658.json``)."""
    out: dict[str, PatientIdentifiers] = {}
    births = pd.to_datetime(patients["birth_date"], errors="coerce")
    files = patients["source_file"] if "source_file" in patients else [None] * len(patients)
    for pid, birth, file in zip(patients["patient_id"], births, files, strict=True):
        entry: PatientIdentifiers = {f: [] for f in FIELDS}
        entry["ids"].append(str(pid))
        if pd.notna(birth):
            entry["dates"].append(birth.date().isoformat())
        if isinstance(file, str):
            stem = Path(file).stem
            for part in re.split(r"[_\s]+", stem):
                if _UUID.fullmatch(part):
                    entry["ids"].append(part)
                elif _FILE_NAME_PART.fullmatch(part):
                    entry["names"].append(part)
        out[str(pid)] = entry
    return out


def write_identifiers(workspace: Workspace, found: dict[str, PatientIdentifiers]) -> Path:
    """Write the deny-list file (mode 0600 in a folder of mode 0700) and return its path."""
    path = identifiers_path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    data = json.dumps({"version": 1, "patients": found}, indent=1, sort_keys=True).encode()
    atomic_write_bytes(path, data, mode=0o600)
    return path


def load_identifiers(workspace: Workspace) -> dict[str, PatientIdentifiers]:
    """Every patient's identifiers: the deny-list file's (if the ingest wrote one) and the
    patients table's. Empty for a workspace without either."""
    found: dict[str, PatientIdentifiers] = {}
    table = workspace.table_path("patients")
    if table.exists():
        columns = [c for c in ("patient_id", "birth_date", "source_file") if c in _names(table)]
        found = table_identifiers(pq.read_table(table, columns=columns).to_pandas())
    path = identifiers_path(workspace)
    if path.exists():
        try:
            stored = json.loads(path.read_text())["patients"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path} is not a deny-list file ({exc}); re-run `pmlm ingest ...` to rebuild it"
            ) from exc
        for pid, entry in stored.items():
            merged = found.setdefault(pid, {f: [] for f in FIELDS})
            for f in FIELDS:
                merged[f] = list(dict.fromkeys([*merged[f], *_strings(entry.get(f, []))]))
    return found


def _names(path: Path) -> list[str]:
    return list(pq.read_schema(path).names)
