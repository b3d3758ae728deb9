"""The privacy guard: no direct identifier goes to a remote LLM.

Two parts:

- ``IdentifierDetector`` finds direct identifiers in text: the caller's
  deny-list (``KnownIdentifiers``: the patient's names, ids, birth date,
  address...) and patterns for emails, SSNs, UUIDs and record ids (MRNs, long
  numbers), exact dates (2021-03-04, 03/04/2021, March 4, 2021, 4 Mar 2021),
  phone numbers, street addresses, ZIP codes and titled or labelled names
  ("Dr. Smith", "Patient: Jane Doe"). Names that are neither titled nor
  labelled can only be caught through the deny-list, so pass them.
- ``PrivacyPolicy`` says what to do: ``redact`` (the default) replaces each
  identifier with a placeholder (``[NAME]``, ``[ID]``, ``[DATE]``,
  ``[ADDRESS]``, ``[PHONE]``, ``[EMAIL]``, ``[SSN]``, ``[ZIP]``); ``refuse``
  raises ``PrivacyViolation`` and nothing is sent. The local backend is exempt
  (the data stays on this machine) unless ``guard_local=True``.

Ages, years alone, months with a year ("March 2021"), gestational weeks and
clinical codes preceded by their system's name ("SNOMED 72892002") are kept:
they are not direct identifiers and the prompts need them.

Example::

    >>> detector = IdentifierDetector(KnownIdentifiers(names=("Jane Roe",)))
    >>> detector.redact("Jane Roe, born 1990-04-12, call 555-201-3344").text
    '[NAME], born [DATE], call [PHONE]'
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, TypeAlias

from promptenv.llm.errors import PrivacyViolation
from promptenv.llm.types import ChatMessage, KnownIdentifiers

#: The placeholder kinds, in the order they are searched.
IdentifierKind: TypeAlias = Literal["NAME", "ID", "DATE", "ADDRESS", "PHONE", "EMAIL", "SSN", "ZIP"]

PrivacyMode: TypeAlias = Literal["redact", "refuse"]

_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
_STREET_SUFFIX = (
    r"(?:Street|St|Avenue|Ave|Road|Rd|Boulevard|Blvd|Lane|Ln|Drive|Dr|Court|Ct|Way|Place|Pl"
    r"|Terrace|Ter|Circle|Cir|Parkway|Pkwy|Highway|Hwy|Square|Sq|Trail|Trl|Alley|Aly|Row"
    r"|Crescent|Cres|Close|Gardens|Grove|Heights|Hill|Hills|Loop|Path|Pike|Plaza|Point"
    r"|Ridge|Run|Route|Rte|Crossing|Xing|Junction|Jct|Gateway|Harbor|Landing|Manor|Mews"
    r"|Park|Passage|Port|Station|Summit|Turnpike|Tpke|View|Village|Walk|Wynd|Bypass|Causeway)"
)
_STATE = (
    r"(?:A[KLRZ]|C[AOT]|D[CE]|FL|GA|HI|I[ADLN]|K[SY]|LA|M[ADEINOST]|N[CDEHJMVY]|O[HKR]|PA|RI"
    r"|S[CD]|T[NX]|UT|V[AT]|W[AIVY])"
)

# (kind, pattern, group): the group is the part replaced (0 = the whole match),
# so a label such as "MRN:" stays and only the value becomes [ID].
# Emails and UUIDs go first, before the deny-list could cut a name out of an email.
_EARLY_PATTERNS: tuple[tuple[IdentifierKind, re.Pattern[str], int], ...] = (
    ("EMAIL", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), 0),
    (
        "ID",
        re.compile(
            r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
        ),
        0,
    ),
)
_PATTERNS: tuple[tuple[IdentifierKind, re.Pattern[str], int], ...] = (
    ("SSN", re.compile(r"\b\d{3}-\d{2}-\d{4}\b"), 0),
    (
        "DATE",
        re.compile(
            r"\b\d{4}-\d{1,2}-\d{1,2}(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?\b"
            r"|\b\d{4}/\d{1,2}/\d{1,2}\b"
            # not inside decimals: "Hb 12.5-13.5" is a reference range, not a date
            r"|(?<![\d.])\b\d{1,2}[/.-]\d{1,2}[/.-](?:\d{4}|\d{2})\b(?!\.?\d)"
            rf"|\b{_MONTH}\.?\s+{_DAY},?\s+\d{{4}}\b"
            rf"|\b{_DAY}\s+(?:of\s+)?{_MONTH}\.?,?\s+\d{{4}}\b"
            # a day and a month without the year is still an element of a date
            rf"|\b{_MONTH}\.?\s+{_DAY}\b(?!\s*(?:mg|ml|mcg|g|kg|units?|%)\b)"
        ),
        0,
    ),
    (
        "PHONE",
        re.compile(
            r"(?<![\w-])(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}\b"
            r"|(?<![\w-])\+\d{1,3}(?:[\s.-]?\d{2,4}){2,5}\b"
        ),
        0,
    ),
    (
        "ADDRESS",
        re.compile(
            r"\b\d{1,6}[A-Za-z]?\s+(?:[NSEW]\.?\s+)?(?:[A-Z][A-Za-z0-9'-]*\.?\s+){1,4}"
            rf"{_STREET_SUFFIX}\b\.?(?:,?\s*(?:Apt|Apartment|Suite|Ste|Unit|#)\.?\s*[\w-]+)?"
            r"|\bP\.?\s?O\.?\s+Box\s+\d+\b"
        ),
        0,
    ),
    ("ZIP", re.compile(rf"\b{_STATE},?\s+(\d{{5}}(?:-\d{{4}})?)\b"), 1),
    (
        "ID",
        re.compile(
            r"\b(?:MRN|medical record(?:\s+(?:number|no\.?))?|record(?:\s+(?:id|number|no\.?))|"
            r"patient\s+id|member\s+id|account(?:\s+(?:number|no\.?))|encounter\s+id|"
            r"insurance\s+(?:id|number))\s*[:#]?\s*((?=[A-Za-z0-9-]*\d)[A-Za-z0-9][A-Za-z0-9-]{2,})",
            re.IGNORECASE,
        ),
        1,
    ),
    ("ID", re.compile(r"\b[A-Za-z]{1,5}[-_]?\d{5,}\b|\b\d{6,}\b"), 0),
    (
        "NAME",
        re.compile(
            r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\.?\s+([A-Z][A-Za-z'-]*\d*(?:\s+[A-Z][A-Za-z'-]*\d*)?)"
        ),
        1,
    ),
    (
        "NAME",
        re.compile(
            r"\b(?i:name|patient name|full name|mother|father|spouse|partner|next of kin|"
            r"emergency contact|physician|provider|clinician|attending)\s*:\s*"
            r"([A-Z][A-Za-z'-]*\d*(?:\s+[A-Z][A-Za-z'-]*\d*){0,3})"
        ),
        1,
    ),
)

# A number right after one of these is a clinical code, not a record id.
_CODE_LABEL = re.compile(
    r"(?:SNOMED(?:[\s-]?CT)?|LOINC|RxNorm|ICD(?:-?1[01])?(?:-?CM)?|CPT|NDC|CVX|code)\s*[:#]?\s*$",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Redaction:
    """The text after redaction and how many identifiers of each kind were replaced."""

    text: str
    kinds: dict[str, int] = field(default_factory=dict)

    @property
    def count(self) -> int:
        return sum(self.kinds.values())


@dataclass(frozen=True)
class PrivacyPolicy:
    """What the guard does with identifiers in prompts for remote backends.

    ``mode="redact"`` (default) replaces them with placeholders and the ledger
    records how many of each kind (never the identifiers). ``mode="refuse"``
    raises ``PrivacyViolation`` before anything is sent. ``guard_local=True``
    applies the same guard to the local backend, which is otherwise exempt.
    """

    mode: PrivacyMode = "redact"
    guard_local: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("redact", "refuse"):
            raise ValueError(f"privacy mode must be 'redact' or 'refuse', got {self.mode!r}")

    def applies_to(self, *, remote: bool) -> bool:
        return remote or self.guard_local


def _name_variants(name: str) -> set[str]:
    """A full name, each of its parts, and each part without trailing digits (Synthea: 'Jane123')."""
    variants = {name.strip()}
    for part in re.split(r"[\s,]+", name):
        part = part.strip(".'")
        for candidate in (part, part.rstrip("0123456789")):
            if len(candidate) >= 2 and not candidate.isdigit():
                variants.add(candidate)
    return variants


def _address_variants(address: str) -> set[str]:
    """A full address and each comma-separated part (street line, city, 'MA 01103')."""
    variants = {address.strip()}
    variants.update(part.strip() for part in address.split(",") if len(part.strip()) >= 3)
    return variants


def _literal_pattern(terms: Iterable[str]) -> re.Pattern[str] | None:
    """One case-insensitive pattern matching any term as a whole word; longest terms first."""
    cleaned = sorted({t for t in terms if len(t.strip()) >= 2}, key=len, reverse=True)
    if not cleaned:
        return None
    body = "|".join(re.escape(t.strip()) for t in cleaned)
    return re.compile(rf"(?<![A-Za-z0-9])(?:{body})(?![A-Za-z0-9])", re.IGNORECASE)


class IdentifierDetector:
    """Finds and replaces direct identifiers in text.

    ``known``: the identifiers of the patient at hand (checked first, so a
    known MRN becomes ``[ID]`` even in a format no pattern knows).
    """

    def __init__(self, known: KnownIdentifiers | None = None) -> None:
        known = known or KnownIdentifiers()
        names: set[str] = set()
        for name in known.names:
            names |= _name_variants(name)
        addresses: set[str] = set()
        for address in known.addresses:
            addresses |= _address_variants(address)
        deny_terms: list[tuple[IdentifierKind, set[str]]] = [
            ("ID", set(known.ids)),
            ("DATE", set(known.dates)),
            ("ADDRESS", addresses),
            ("NAME", names),
        ]
        for term in known.other:
            deny_terms.append((_kind_of(term), {term}))
        self._deny: list[tuple[IdentifierKind, re.Pattern[str]]] = []
        for kind, terms in deny_terms:
            pattern = _literal_pattern(terms)
            if pattern is not None:
                self._deny.append((kind, pattern))

    def redact(self, text: str) -> Redaction:
        """Replace every identifier in ``text`` with its placeholder."""
        counts: Counter[str] = Counter()
        for kind, pattern, group in _EARLY_PATTERNS:
            text = pattern.sub(_counting(kind, group, counts, text_check=None), text)
        for kind, pattern in self._deny:
            text = pattern.sub(_counting(kind, 0, counts, text_check=None), text)
        for kind, pattern, group in _PATTERNS:
            text = pattern.sub(_counting(kind, group, counts, text_check=_is_code), text)
        return Redaction(text=text, kinds=dict(counts))

    def find(self, text: str) -> dict[str, int]:
        """Count the identifiers in ``text`` per kind (empty when it is clean)."""
        return self.redact(text).kinds


def _kind_of(term: str) -> IdentifierKind:
    """The placeholder for a free-form known identifier: the pattern it matches whole, else ID."""
    for kind, pattern, _ in (*_EARLY_PATTERNS, *_PATTERNS):
        if pattern.fullmatch(term.strip()):
            return kind
    return "ID"


def _is_code(match: re.Match[str]) -> bool:
    """True when a number is a clinical code ('SNOMED 72892002'), which is kept."""
    return bool(_CODE_LABEL.search(match.string[max(0, match.start() - 24) : match.start()]))


def _counting(
    kind: IdentifierKind,
    group: int,
    counts: Counter[str],
    *,
    text_check: Callable[[re.Match[str]], bool] | None,
) -> Callable[[re.Match[str]], str]:
    placeholder = f"[{kind}]"

    def substitute(match: re.Match[str]) -> str:
        if kind == "ID" and group == 0 and text_check is not None and text_check(match):
            return match.group(0)
        counts[kind] += 1
        if group == 0:
            return placeholder
        whole, start = match.group(0), match.start()
        return whole[: match.start(group) - start] + placeholder + whole[match.end(group) - start :]

    return substitute


def guard_messages(
    messages: Sequence[ChatMessage],
    known: KnownIdentifiers | None,
    policy: PrivacyPolicy,
    *,
    backend: str,
) -> tuple[list[ChatMessage], dict[str, int]]:
    """Apply ``policy`` to the messages bound for ``backend``.

    Returns the messages to send and the count of identifiers replaced per
    kind. In ``refuse`` mode raises ``PrivacyViolation`` when any is found.
    """
    detector = IdentifierDetector(known)
    guarded: list[ChatMessage] = []
    kinds: Counter[str] = Counter()
    for message in messages:
        redaction = detector.redact(message.content)
        kinds.update(redaction.kinds)
        guarded.append(replace(message, content=redaction.text))
    if kinds and policy.mode == "refuse":
        found = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        raise PrivacyViolation(
            f"the prompt for {backend} contains direct identifiers ({found}); nothing was sent. "
            "Remove them from the prompt, or use PrivacyPolicy(mode='redact') to send it with "
            "placeholders, or the local backend",
            kinds=dict(kinds),
        )
    return guarded, dict(kinds)
