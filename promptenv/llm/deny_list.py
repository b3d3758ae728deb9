"""The deny-list: known identifiers of many patients, matched word by word.

A workspace's deny-list holds the names, addresses, telecom values,
identifiers, source ids, pseudonyms and birth dates of every patient in its
source records (`pipelines.identifiers` builds it at ingest, on premises). One
regular expression with thousands of alternatives would be slow, so a term is
cut into its words (runs of letters and digits) and matched against the words
of the text: a term matches wherever its words follow each other with at most
three other characters between them ("1988-07-23" also matches "1988 07 23",
"(413) 555-0172" also "413.555.0172").

Every term matches in any case (prompts lower-case the record's displays),
except a one-word name or place that is also a common English word: it matches
only where the text spells it with a capital first letter ("Hope" the name,
not "hope" the word; `COMMON_WORDS`).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from datetime import date

from pipelines.identifiers import load_identifiers
from pipelines.workspace import Workspace
from promptenv.llm.types import KnownIdentifiers

_WORD = re.compile(r"[A-Za-z0-9]+")
_GAP = re.compile(r"[^A-Za-z0-9]{1,3}")
_STATE_OR_COUNTRY = re.compile(r"[A-Z]{2}|US|USA")
_COMMON = """
    a an and are art as at be bill by can case day do for from has have he her his if in
    is it its may no not of on or our she so that the their them they this to up was we
    will with you your ace amber april august autumn back baker banks bay bell best black
    bloom blood brown care cash chase cherry child cook cross crystal daisy dale dawn de del
    di don early east faith field foot ford fox frank ginger glen glory grace grant gray
    green grey guy hale hall hand hart hay hazel head heart heather hill holly honor hope
    hunter iris ivy jack jade joy june king la lake lane le lee lily little long love low
    major mark marsh mason miles moon moss noble north oak olive page park pat peace pearl
    penny pink poppy power price rain ray read reed rice rich river rivers rob rock rose
    ruby rush sage salt savage sharp sky small snow son south spring star stone storm
    street strong sue summer sun swan sweet taylor temple van violet von wall ward wells
    west white winter wise wood woods worth young
"""
#: One-word names and places that are also common words; matched only when capitalized.
COMMON_WORDS = frozenset(_COMMON.split())
_MONTHS = (
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
)


def _words(term: str) -> tuple[str, ...]:
    return tuple(w.lower() for w in _WORD.findall(term))


def name_variants(name: str) -> set[str]:
    """A full name, each of its parts, and each part without trailing digits (Synthea: 'Jane123')."""
    variants = {name.strip()}
    for part in re.split(r"[\s,_]+", name):
        part = part.strip(".'")
        for candidate in (part, part.rstrip("0123456789")):
            if len(candidate) >= 2 and not candidate.isdigit():
                variants.add(candidate)
    return variants


def address_variants(address: str) -> set[str]:
    """A full address and each comma-separated part (street line, city, 'MA 01103', '01103');
    a state or country code alone is not an identifier and is left out."""
    variants = {address.strip()}
    for part in address.split(","):
        part = part.strip()
        if len(part) >= 3 and not _STATE_OR_COUNTRY.fullmatch(part):
            variants.add(part)
        variants.update(w for w in _WORD.findall(part) if w.isdigit() and len(w) >= 5)  # ZIP
    return variants


def date_variants(value: str) -> set[str]:
    """An ISO date and the other ways a prompt could write it (07/23/1988, July 23, 1988...)."""
    variants = {value.strip()}
    try:
        day = date.fromisoformat(value.strip()[:10])
    except ValueError:
        return variants
    month = _MONTHS[day.month - 1]
    variants |= {
        f"{day.month:02d}/{day.day:02d}/{day.year}",
        f"{day.month}/{day.day}/{day.year}",
        f"{day.day:02d}.{day.month:02d}.{day.year}",
        f"{month} {day.day} {day.year}",
        f"{month[:3]} {day.day} {day.year}",
        f"{day.day} {month} {day.year}",
        f"{day.day} {month[:3]} {day.year}",
    }
    return variants


def id_variants(value: str) -> set[str]:
    """An id and each of its long parts ('MRN-00482913' → '00482913'), which a prompt
    could show without the prefix."""
    variants = {value.strip()}
    variants.update(w for w in _WORD.findall(value) if len(w) >= 5 and any(c.isdigit() for c in w))
    return variants


def telecom_variants(value: str) -> set[str]:
    """A phone number or email and, for a phone number, its last seven digits."""
    variants = {value.strip()}
    digits = "".join(_WORD.findall(value))
    if digits.isdigit() and len(digits) >= 10:
        variants.add(f"{digits[-7:-4]}-{digits[-4:]}")
    return variants


class DenyList:
    """Known identifiers of one or many patients, each with its placeholder kind."""

    def __init__(self, known: Iterable[KnownIdentifiers] = ()) -> None:
        from promptenv.llm.privacy import kind_of  # the patterns live there

        #: first word → (words, kind, needs a capital), longest first
        self._index: dict[str, list[tuple[tuple[str, ...], str, bool]]] = {}
        self.terms = 0
        for k in known:
            for name in k.names:
                for term in name_variants(name):
                    self._add(term, "NAME", capitalized=True)
            for address in k.addresses:
                for term in address_variants(address):
                    self._add(term, "ADDRESS", capitalized=not any(c.isdigit() for c in term))
            for value in k.ids:
                for term in id_variants(value):
                    self._add(term, "ID", capitalized=False)
            for value in k.dates:
                for term in date_variants(value):
                    self._add(term, "DATE", capitalized=False)
            for value in k.other:
                kind = kind_of(value)
                for term in telecom_variants(value) if kind == "PHONE" else {value}:
                    self._add(term, kind, capitalized=False)
        for entries in self._index.values():
            entries.sort(key=lambda e: len(e[0]), reverse=True)

    def _add(self, term: str, kind: str, *, capitalized: bool) -> None:
        words = _words(term)
        if not words or (len(words) == 1 and len(words[0]) < 2):
            return
        if len(words) == 1 and words[0].isdigit() and len(words[0]) < 5:
            return  # a short number alone (a house number, a day) is not identifying
        entries = self._index.setdefault(words[0], [])
        entry = (words, kind, capitalized and len(words) == 1 and words[0] in COMMON_WORDS)
        if entry not in entries:
            entries.append(entry)
            self.terms += 1

    def __len__(self) -> int:
        return self.terms

    def redact(self, text: str, counts: Counter[str]) -> str:
        """``text`` with every known identifier replaced by its ``[KIND]`` placeholder."""
        if not self._index:
            return text
        words = list(_WORD.finditer(text))
        out: list[str] = []
        done = 0  # text[:done] is in out
        i = 0
        while i < len(words):
            match = self._match(text, words, i)
            if match is None:
                i += 1
                continue
            n, kind = match
            out.append(text[done : words[i].start()])
            out.append(f"[{kind}]")
            counts[kind] += 1
            done = words[i + n - 1].end()
            i += n
        out.append(text[done:])
        return "".join(out)

    def _match(self, text: str, words: list[re.Match[str]], i: int) -> tuple[int, str] | None:
        entries = self._index.get(words[i].group(0).lower())
        if not entries:
            return None
        for term, kind, capitalized in entries:
            n = len(term)
            if i + n > len(words):
                continue
            if capitalized and not words[i].group(0)[0].isupper():
                continue
            if all(
                words[i + j].group(0).lower() == term[j]
                and _GAP.fullmatch(text[words[i + j - 1].end() : words[i + j].start()])
                for j in range(1, n)
            ):
                return n, kind
        return None


def workspace_deny_list(workspace: Workspace) -> DenyList:
    """The deny-list of every patient of ``workspace`` (`pipelines.identifiers`)."""
    return DenyList(
        KnownIdentifiers(**{f: tuple(v) for f, v in entry.items()})
        for entry in load_identifiers(workspace).values()
    )
