"""FHIR datatypes → Python values: times, references, codings, text.

Every function here either returns a well-typed value or raises `Rejected`
with the reason a resource goes to quarantine. None of them trusts the JSON:
a number where a string belongs, an object where a list belongs, a list nested
5,000 deep, all give a reason, never a raw exception.
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from typing import Any


class Rejected(Exception):
    """A resource that goes to quarantine; the message is the reason."""


Coding = tuple[str | None, str | None, str | None]

SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
RXNORM = "http://www.nlm.nih.gov/research/umls/rxnorm"
CVX = "http://hl7.org/fhir/sid/cvx"

#: Event kind → the code system preferred for its items when a concept has several codings.
PREFERRED_SYSTEM: dict[str, str] = {
    "condition": SNOMED,
    "procedure": SNOMED,
    "careplan": SNOMED,
    "allergy": SNOMED,
    "observation": LOINC,
    "medication": RXNORM,
    "immunization": CVX,
}


def text(value: Any) -> str | None:
    """A string field's value; None when absent or not a string (numbers are not text)."""
    return value if isinstance(value, str) and value else None


def code_text(value: Any) -> str | None:
    """A code: a string, or a number written as one (some exporters write ``"code": 123``)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return str(value)
    return text(value)


def as_list(value: Any, what: str) -> list[Any]:
    """A repeating element: a list (absent → empty); anything else is rejected."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise Rejected(f"{what} is not a list (a {type(value).__name__})")
    return value


def as_dict(value: Any, what: str) -> dict[str, Any] | None:
    """A complex element: a dict or absent (None); anything else is rejected."""
    if value is None or isinstance(value, dict):
        return value
    raise Rejected(f"{what} is not an object (a {type(value).__name__})")


def parse_time(value: Any, what: str) -> datetime:
    """An ISO 8601 date or date-time → aware UTC datetime (dates → midnight UTC).

    A partial date (``2020`` or ``2020-05``) is the first day of that year or month.
    """
    if not isinstance(value, str) or not value:
        raise Rejected(f"missing {what}")
    try:
        if len(value) == 4:
            parsed = datetime(int(value), 1, 1)
        elif len(value) == 7:
            parsed = datetime(int(value[:4]), int(value[5:]), 1)
        elif len(value) == 10:
            parsed = datetime.combine(date.fromisoformat(value), datetime.min.time())
        else:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise Rejected(f"unparsable {what} {value[:40]!r}") from None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def reference_target(value: Any) -> str | None:
    """The target id of a reference string, in every form a server writes.

    ``urn:uuid:X`` and ``urn:oid:X`` → X; ``Type/X``, ``Type/X/_history/2`` and
    absolute URLs (``https://server/fhir/Type/X``) → X; ``#X`` (contained) → ``#X``.
    """
    if not isinstance(value, str) or not value:
        return None
    if value.startswith(("urn:uuid:", "urn:oid:")):
        return value.split(":", 2)[2] or None
    if value.startswith("#"):
        return value
    _, slash, last = value.partition("/")
    if slash and last and "/" not in last and "?" not in last:  # Type/X, as an export writes it
        return last
    parts = value.split("?", 1)[0].rstrip("/").split("/")
    if len(parts) >= 4 and parts[-2] == "_history":
        parts = parts[:-2]
    if len(parts) < 2:
        return parts[0] or None
    return parts[-1] or None


def reference_id(ref: Any) -> str | None:
    """The target id of a FHIR Reference object (see `reference_target`), or None."""
    if not isinstance(ref, dict):
        return None
    return reference_target(ref.get("reference"))


def _coding(c: dict[str, Any]) -> Coding:
    return text(c.get("system")), code_text(c.get("code")), text(c.get("display"))


def codings(concept: Any, what: str) -> list[Coding]:
    """Every coding of a CodeableConcept, in order (malformed codings are left out)."""
    if not isinstance(concept, dict):
        raise Rejected(f"missing {what}")
    return [
        _coding(c) for c in as_list(concept.get("coding"), f"{what}.coding") if isinstance(c, dict)
    ]


def best_coding(concept: Any, what: str, kind: str | None = None) -> Coding:
    """(system, code, display) of a CodeableConcept: the coding of the system preferred
    for ``kind`` (`PREFERRED_SYSTEM`) when there is one, else the first; falls back to
    its text. A missing display takes the concept's text."""
    found = [c for c in codings(concept, what) if c[1] is not None or c[2] is not None]
    label = text(concept.get("text")) if isinstance(concept, dict) else None
    if found:
        preferred = PREFERRED_SYSTEM.get(kind or "")
        system, code, display = next((c for c in found if c[0] == preferred), found[0])
        return system, code, display or label
    if label:
        return None, None, label
    raise Rejected(f"{what} has no coding and no text")


def all_codings(concept: Any) -> str | None:
    """Every usable coding of a CodeableConcept as a JSON list of ``"SYSTEM|CODE"``, in its
    order, when it has more than one (the events' ``codings``); None otherwise."""
    if not isinstance(concept, dict) or not isinstance(concept.get("coding"), list):
        return None
    found = [
        f"{c[0] or ''}|{c[1]}"
        for c in (_coding(c) for c in concept["coding"] if isinstance(c, dict))
        if c[1] is not None
    ]
    return json.dumps(list(dict.fromkeys(found))) if len(set(found)) > 1 else None


def first_coding(concept: Any, what: str) -> Coding:
    """(system, code, display) of a CodeableConcept's first usable coding, or its text."""
    return best_coding(concept, what)


def has_code(concept: Any, codes: frozenset[str]) -> bool:
    """Whether any coding of a CodeableConcept (or a plain code string) is one of ``codes``."""
    if isinstance(concept, str):
        return concept in codes
    if not isinstance(concept, dict):
        return False
    raw = concept.get("coding")
    if not isinstance(raw, list):
        return False
    return any(
        isinstance(c, dict) and isinstance(c.get("code"), str) and c["code"] in codes for c in raw
    )
