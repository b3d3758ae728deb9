"""The privacy guard: no direct identifier goes to a remote LLM.

Two parts:

- ``IdentifierDetector`` finds direct identifiers in text: the deny-lists
  (``KnownIdentifiers`` of the patient at hand, and the workspace's
  `DenyList` of every patient in its source records, which `LLMClient` passes
  on every remote call) and patterns for the HIPAA Safe Harbor kinds: emails,
  URLs, IP addresses, SSNs (with dashes or spaces), UUIDs, pseudonyms and record
  ids (MRNs, long numbers), dates, phone numbers (also 7-digit), street
  addresses, ZIP codes, titled or labelled names ("Dr. Smith", "Patient: Jane
  Doe") and ages of 90 or more. Names that are neither titled nor labelled can
  only be caught through a deny-list.
- ``PrivacyPolicy`` says what to do: ``redact`` (the default) replaces each
  identifier with a placeholder (``[NAME]``, ``[ID]``, ``[DATE]``,
  ``[ADDRESS]``, ``[PHONE]``, ``[EMAIL]``, ``[SSN]``, ``[ZIP]``, ``[URL]``,
  ``[IP]``); ``refuse`` raises ``PrivacyViolation`` and nothing is sent. The
  local backend is exempt (the data stays on this machine) unless
  ``guard_local=True``.

Safe Harbor generalisations: a date is cut to its year ("2021-03-04" and
"March 2021" become "2021"; a day and month without a year become
``[DATE]``); an age of 90 or more becomes "90 or older"; a ZIP code becomes
``[ZIP]``. Ages under 90, years alone, gestational weeks, doses ("Levora
0.15/30") and clinical codes preceded by their system's name ("SNOMED
72892002", "NDA020800") are kept: they are not direct identifiers and the
prompts need them.

Example::

    >>> detector = IdentifierDetector(KnownIdentifiers(names=("Jane Roe",)))
    >>> detector.redact("Jane Roe, born 1990-04-12, call 555-201-3344").text
    '[NAME], born 1990, call [PHONE]'
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal, TypeAlias

from promptenv.llm.deny_list import DenyList
from promptenv.llm.errors import PrivacyViolation
from promptenv.llm.types import ChatMessage, KnownIdentifiers

#: The placeholder kinds.
IdentifierKind: TypeAlias = Literal[
    "NAME", "ID", "DATE", "ADDRESS", "PHONE", "EMAIL", "SSN", "ZIP", "URL", "IP", "AGE"
]

PrivacyMode: TypeAlias = Literal["redact", "refuse"]

_MONTH = (
    r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?"
    r"|Sep(?:t(?:ember)?)?|Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
)
_DAY = r"(?:0?[1-9]|[12]\d|3[01])(?:st|nd|rd|th)?"
_NUM_MONTH = r"(?:0?[1-9]|1[0-2])"
_NUM_DAY = r"(?:0?[1-9]|[12]\d|3[01])"
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
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_OLD_AGE = r"(?:9\d|1[0-2]\d)"

#: Replace the match (or the pattern's group 1) with ``[KIND]``.
PLACEHOLDER = "placeholder"
#: Replace the whole match with its ``year`` group ("March 4, 2021" → "2021"), or
#: with ``[DATE]`` when it has none.
YEAR = "year"
#: Replace the age (group 1 and what follows it) with "90 or older".
OLD = "old"

# (kind, pattern, group, how): the group is the part replaced (0 = the whole match),
# so a label such as "MRN:" stays and only the value becomes [ID].
# Emails, URLs, IPs and UUIDs go first, before a deny-list could cut a name out of them.
_EARLY_PATTERNS: tuple[tuple[IdentifierKind, re.Pattern[str], int, str], ...] = (
    ("EMAIL", re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"), 0, PLACEHOLDER),
    (
        "URL",
        re.compile(
            r"\b(?:https?|ftp)://[^\s<>\"'\])]+|\bwww\.[A-Za-z0-9-]+\.[^\s<>\"'\])]+",
            re.IGNORECASE,
        ),
        0,
        PLACEHOLDER,
    ),
    (
        "IP",
        re.compile(
            rf"(?<![\d.]){_OCTET}(?:\.{_OCTET}){{3}}(?![\d.]*\d)"
            r"|\b(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}\b"
            r"|\b(?:[0-9A-Fa-f]{1,4}:){1,6}:(?:[0-9A-Fa-f]{1,4}(?::[0-9A-Fa-f]{1,4})*)?\b"
        ),
        0,
        PLACEHOLDER,
    ),
    (
        "ID",
        re.compile(
            r"\b[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}\b"
        ),
        0,
        PLACEHOLDER,
    ),
)
_PATTERNS: tuple[tuple[IdentifierKind, re.Pattern[str], int, str], ...] = (
    ("SSN", re.compile(r"\b\d{3}-\d{2}-\d{4}\b|\b\d{3} \d{2} \d{4}\b"), 0, PLACEHOLDER),
    (
        "SSN",
        re.compile(r"\b(?:SSN|social security(?: number| no\.?)?)\s*[:#]?\s*(\d{9})\b", re.I),
        1,
        PLACEHOLDER,
    ),
    (
        "DATE",
        re.compile(
            r"\b(?P<year>\d{4})-\d{1,2}-\d{1,2}"
            r"(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?(?:Z|[+-]\d{2}:?\d{2})?)?\b"
            r"|\b(?P<year2>\d{4})/\d{1,2}/\d{1,2}\b"
            # one separator twice, and a month and day that exist: "Levora 0.15/30" is a
            # dose, "Hb 12.5-13.5" a reference range
            rf"|(?<![\d.])\b{_NUM_DAY}(?P<sep>[/.-]){_NUM_DAY}(?P=sep)"
            r"(?:(?P<year3>\d{4})|\d{2})\b(?!\.?\d)"
            rf"|\b{_MONTH}\.?\s+{_DAY},?\s+(?P<year4>\d{{4}})\b"
            rf"|\b{_DAY}\s+(?:of\s+)?{_MONTH}\.?,?\s+(?P<year5>\d{{4}})\b"
            # a month and year ("March 2021") is cut to the year too
            rf"|\b{_MONTH}\.?,?\s+(?:of\s+)?(?P<year6>(?:19|20)\d{{2}})\b"
            # a day and a month without the year is still an element of a date
            rf"|\b{_MONTH}\.?\s+{_DAY}\b(?!\s*(?:mg|ml|mcg|g|kg|units?|%)\b)"
        ),
        0,
        YEAR,
    ),
    (
        "AGE",
        re.compile(
            rf"\b({_OLD_AGE})(?:\s*|-)(?:years?|yrs?|y)(?:\s*|-)old\b"
            rf"|\b({_OLD_AGE})\s*(?:y/o|yo|y\.o\.)(?!\w)"
            rf"|\b(?:aged?|age:)\s*({_OLD_AGE})\b(?!\s*(?:weeks?|days?|months?)\b)",
            re.IGNORECASE,
        ),
        0,
        OLD,
    ),
    (
        "PHONE",
        re.compile(
            r"(?<![\w-])(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{3}\)\s?|\d{3}[\s.-])\d{3}[\s.-]\d{4}\b"
            r"|(?<![\w-])\+\d{1,3}(?:[\s.-]?\d{2,4}){2,5}\b"
            # a 7-digit local number (exchange 2-9..), not a decimal or a dose ("250-1000 mg")
            r"|(?<![\w.,/-])[2-9]\d{2}[-.]\d{4}(?![\w.,/-]*\d)(?!\s*(?:mg|ml|mcg|g|kg|units?|%))"
        ),
        0,
        PLACEHOLDER,
    ),
    (
        "ADDRESS",
        re.compile(
            r"\b\d{1,6}[A-Za-z]?\s+(?:[NSEW]\.?\s+)?(?:[A-Z][A-Za-z0-9'-]*\.?\s+){1,4}"
            rf"{_STREET_SUFFIX}\b\.?(?:,?\s*(?:Apt|Apartment|Suite|Ste|Unit|#)\.?\s*[\w-]+)?"
            r"|\bP\.?\s?O\.?\s+Box\s+\d+\b"
        ),
        0,
        PLACEHOLDER,
    ),
    ("ZIP", re.compile(rf"\b{_STATE},?\s+(\d{{5}}(?:-\d{{4}})?)\b"), 1, PLACEHOLDER),
    (
        "ZIP",
        re.compile(
            r"\b(?:ZIP|zip code|postal code|postcode)\s*[:#]?\s*(\d{5}(?:-\d{4})?)\b"
            # a 5-digit number right after a place name and a comma ("Springfield, 01103")
            r"|(?<=[A-Z][a-z]{2}, )(\d{5})(?:-\d{4})?\b|\b(\d{5}-\d{4})\b",
            re.IGNORECASE,
        ),
        1,
        PLACEHOLDER,
    ),
    (
        "ID",
        re.compile(
            r"\b(?:MRN|medical record(?:\s+(?:number|no\.?))?|record(?:\s+(?:id|number|no\.?))|"
            r"patient\s+id|member\s+id|account(?:\s+(?:number|no\.?))|encounter\s+id|"
            r"insurance\s+(?:id|number))\s*[:#]?\s*((?=[A-Za-z0-9-]*\d)[A-Za-z0-9][A-Za-z0-9-]{2,})",
            re.IGNORECASE,
        ),
        1,
        PLACEHOLDER,
    ),
    (
        "ID",
        re.compile(
            r"\b[A-Za-z]{1,5}[-_]?\d{5,}\b|\b\d{6,}\b"
            # pseudonyms (p + 16 hex digits) and other long hex ids
            r"|\bp?(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{12,}\b"
        ),
        0,
        PLACEHOLDER,
    ),
    (
        "NAME",
        re.compile(
            r"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\.?\s+([A-Z][A-Za-z'-]*\d*(?:\s+[A-Z][A-Za-z'-]*\d*)?)"
        ),
        1,
        PLACEHOLDER,
    ),
    (
        "NAME",
        re.compile(
            r"\b(?i:name|patient name|full name|mother|father|spouse|partner|next of kin|"
            r"emergency contact|physician|provider|clinician|attending)\s*:\s*"
            r"([A-Z][A-Za-z'-]*\d*(?:\s+[A-Z][A-Za-z'-]*\d*){0,3})"
        ),
        1,
        PLACEHOLDER,
    ),
)

# A number right after one of these is a clinical code, not a record id.
_CODE_LABEL = re.compile(
    r"(?:SNOMED(?:[\s-]?CT)?|LOINC|RxNorm|RXCUI|ICD(?:-?1[01])?(?:-?CM)?|CPT|HCPCS|NDC|CVX|"
    r"NDA|ANDA|BLA|UNII|ATC|code)\s*[:#]?\s*$",
    re.IGNORECASE,
)
# ... and so is one that carries the code system's prefix ("NDA020800", "ANDA076543").
_CODE_PREFIX = re.compile(r"(?:NDA|ANDA|BLA|NDC|RXCUI|CVX|UNII)[-_]?\d", re.IGNORECASE)


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


class IdentifierDetector:
    """Finds and replaces direct identifiers in text.

    ``known``: the identifiers of the patient at hand; ``deny``: deny-lists of
    many patients (the workspace's, see `LLMClient`). Both are checked before
    the patterns, so a known MRN becomes ``[ID]`` even in a format no pattern
    knows.
    """

    def __init__(
        self, known: KnownIdentifiers | None = None, deny: Sequence[DenyList] = ()
    ) -> None:
        self._deny = [*deny, DenyList([known])] if known is not None else list(deny)

    def redact(self, text: str) -> Redaction:
        """Replace every identifier in ``text`` with its placeholder (dates: their year)."""
        counts: Counter[str] = Counter()
        for kind, pattern, group, how in _EARLY_PATTERNS:
            text = pattern.sub(_counting(kind, group, how, counts), text)
        for deny in self._deny:
            text = deny.redact(text, counts)
        for kind, pattern, group, how in _PATTERNS:
            text = pattern.sub(_counting(kind, group, how, counts), text)
        return Redaction(text=text, kinds=dict(counts))

    def find(self, text: str) -> dict[str, int]:
        """Count the identifiers in ``text`` per kind (empty when it is clean)."""
        return self.redact(text).kinds


def kind_of(term: str) -> IdentifierKind:
    """The placeholder for a free-form known identifier: the pattern it matches whole, else ID."""
    for kind, pattern, _, _ in (*_EARLY_PATTERNS, *_PATTERNS):
        if pattern.fullmatch(term.strip()):
            return kind
    return "ID"


def _is_code(match: re.Match[str]) -> bool:
    """True when a number is a clinical code ('SNOMED 72892002', 'NDA020800'), which is kept."""
    if _CODE_PREFIX.match(match.group(0)):
        return True
    return bool(_CODE_LABEL.search(match.string[max(0, match.start() - 24) : match.start()]))


def _first_group(match: re.Match[str]) -> int:
    """The first group of ``match`` that took part in it (0: none)."""
    return next((g for g in range(1, (match.re.groups or 0) + 1) if match.start(g) >= 0), 0)


def _counting(
    kind: IdentifierKind, group: int, how: str, counts: Counter[str]
) -> Callable[[re.Match[str]], str]:
    placeholder = f"[{kind}]"

    def substitute(match: re.Match[str]) -> str:
        whole, start = match.group(0), match.start()
        if kind == "ID" and group == 0 and _is_code(match):
            return whole
        counts[kind] += 1
        if how == YEAR:
            years = [v for k, v in match.groupdict().items() if k.startswith("year") and v]
            return years[0] if years else placeholder
        if how == OLD:
            g = _first_group(match)
            if g == match.re.groups:  # "aged 97": only the number changes
                return (
                    whole[: match.start(g) - start] + "90 or older" + whole[match.end(g) - start :]
                )
            return "90 or older"
        g = _first_group(match) if group else 0
        if g == 0:
            return placeholder
        return whole[: match.start(g) - start] + placeholder + whole[match.end(g) - start :]

    return substitute


def guard_messages(
    messages: Sequence[ChatMessage],
    known: KnownIdentifiers | None,
    policy: PrivacyPolicy,
    *,
    backend: str,
    deny: Sequence[DenyList] = (),
) -> tuple[list[ChatMessage], dict[str, int]]:
    """Apply ``policy`` to the messages bound for ``backend``; ``deny``: deny-lists
    checked on top of ``known`` (the workspace's).

    Returns the messages to send and the count of identifiers replaced per
    kind. In ``refuse`` mode raises ``PrivacyViolation`` when any is found.
    """
    detector = IdentifierDetector(known, deny)
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
