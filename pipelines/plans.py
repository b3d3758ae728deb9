"""Reference plans: what the physician ordered at an encounter, as items and as text.

From a note, the plan is its "Assessment and Plan" section. Synthea writes the
orders as sentences followed by bullets, for example::

    # Assessment and Plan
    Patient is presenting with normal pregnancy (finding).

    ## Plan
    The following procedures were conducted:
    - evaluation of uterine fundal height (procedure)
    Patient was given the following immunizations: influenza, seasonal, injectable.
    The patient was placed on a careplan:
    - routine antenatal care (regime/therapy)

The section headers are configurable (``headers``, ``--plan-header``,
``PMLM_PLAN_HEADERS``; default `DEFAULT_PLAN_HEADERS`): a Markdown heading
(``# Plan de tratamiento``) or a line of its own ending in a colon (``Plan:``)
whose title is one of them starts the plan section, which ends at the next
heading of the same or a higher level. When the section holds a sub-heading
that is also one of them (Synthea's ``## Plan``), the orders are read after it;
otherwise from the whole section.

Each item is resolved to a coded event of the same encounter when one has the
same display (case-insensitive); its ``item_key`` is then ``SYSTEM|CODE``, the
same key whatever the note's wording, otherwise ``text|display``.

Without notes (OMOP CDM), the plan is built from the orders recorded at the
encounter: procedures, medications, immunizations, care plans and measurements.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import pandas as pd

from pipelines.errors import InputError
from pipelines.schemas import PLAN_ITEMS, REFERENCE_PLANS

#: The titles of a plan section's headers that Synthea writes (``# Assessment and Plan``,
#: then ``## Plan`` above the orders).
DEFAULT_PLAN_HEADERS: tuple[str, ...] = ("Assessment and Plan", "Plan")
_HEADING = re.compile(r"^(?P<marks>#{1,6})[ \t]*(?P<title>.*?)[ \t]*:?[ \t]*$", re.MULTILINE)
_BARE = re.compile(r"^(?P<title>[^#\-\s][^\n:]*?)[ \t]*:[ \t]*$", re.MULTILINE)


def _norm_title(title: str) -> str:
    return " ".join(title.lower().split())


def plan_headers(headers: Sequence[str] | None = None) -> tuple[str, ...]:
    """The plan section titles to look for: ``headers``, else `DEFAULT_PLAN_HEADERS`.

    Raises InputError for an empty title (the message names the option).
    """
    if headers is None:
        return DEFAULT_PLAN_HEADERS
    chosen = tuple(h.strip().lstrip("#").strip().rstrip(":").strip() for h in headers)
    if not chosen or not all(chosen):
        raise InputError(
            f"--plan-header needs a section title such as 'Plan de tratamiento', not {headers!r}"
        )
    return chosen


def _headings(text: str) -> list[tuple[int, int, int, str]]:
    """Every heading as (start, end, level, normalized title); a bare ``Title:`` line is level 1."""
    found = [
        (m.start(), m.end(), len(m["marks"]), _norm_title(m["title"]))
        for m in _HEADING.finditer(text)
    ]
    found += [(m.start(), m.end(), 0, _norm_title(m["title"])) for m in _BARE.finditer(text)]
    return sorted(found)


def _plan_parts(note_text: str, headers: Sequence[str] | None) -> tuple[str, str] | None:
    """(the plan section's text, the part of it that lists the orders), or None."""
    wanted = {_norm_title(h) for h in plan_headers(headers)}
    heads = _headings(note_text)
    first = next((i for i, h in enumerate(heads) if h[3] in wanted), None)
    if first is None:
        return None
    _, start, level, _ = heads[first]

    def end_of(i: int, lvl: int) -> int:
        # bare lines (level 0) never end a section: they are too common in prose
        return next((h[0] for h in heads[i + 1 :] if 0 < h[2] <= max(lvl, 1)), len(note_text))

    end = end_of(first, level)
    section = note_text[start:end]
    sub = next(
        (
            j
            for j in range(first + 1, len(heads))
            if heads[j][0] < end and heads[j][2] > level and heads[j][3] in wanted
        ),
        None,
    )
    if sub is None:
        return section.strip(), section
    return section.strip(), note_text[heads[sub][1] : min(end_of(sub, heads[sub][2]), end)]


#: Lead-in sentence → plan item kind. Matched on the lower-cased line.
LEAD_INS: tuple[tuple[str, str], ...] = (
    ("procedures", "procedure"),
    ("lab", "lab"),
    ("medication", "medication"),
    ("immunization", "immunization"),
    ("careplan", "careplan"),
    ("care plan", "careplan"),
    # Spanish (EHDS, `synthea --locale es`)
    ("procedimiento", "procedure"),
    ("medicamento", "medication"),
    ("vacuna", "immunization"),
    ("plan de cuidados", "careplan"),
)

#: Which event kinds an item of each plan kind may resolve to, in preference order.
RESOLVES_TO: dict[str, tuple[str, ...]] = {
    "procedure": ("procedure", "observation"),
    "lab": ("observation", "procedure"),
    "medication": ("medication",),
    "immunization": ("immunization",),
    "careplan": ("careplan",),
    "other": ("procedure", "observation", "medication", "immunization", "careplan"),
}

#: Event kind → plan item kind, for plans built from recorded orders (no note).
ORDER_KINDS: dict[str, str] = {
    "procedure": "procedure",
    "medication": "medication",
    "immunization": "immunization",
    "careplan": "careplan",
    "observation": "lab",
}


@dataclass(frozen=True)
class PlanSection:
    """The parsed "Assessment and Plan" of one note."""

    text: str
    items: tuple[tuple[str, str], ...]  # (kind, display as written)


def _kind_of(lead_in: str) -> str:
    low = lead_in.lower()
    for needle, kind in LEAD_INS:
        if needle in low:
            return kind
    return "other"


def assessment_and_plan(note_text: str, headers: Sequence[str] | None = None) -> str | None:
    """The text of the note's plan section ("Assessment and Plan"), or None if it has none."""
    parts = _plan_parts(note_text, headers)
    return None if parts is None else parts[0]


def parse_plan(
    note_text: str,
    known_displays: dict[str, list[str]] | None = None,
    headers: Sequence[str] | None = None,
) -> PlanSection:
    """Parse the orders of a note's plan section into (kind, display) items.

    ``known_displays`` maps a plan kind to the displays of the encounter's coded
    events; it splits inline lists ("given the following immunizations: a, b.")
    whose displays themselves contain commas. Without it, inline lists are
    split on ", ". ``headers``: the section titles (`plan_headers`).
    """
    parts = _plan_parts(note_text, headers)
    if parts is None:
        return PlanSection(text="", items=())
    section, plan_part = parts
    items: list[tuple[str, str]] = []
    kind = "other"
    for raw in plan_part.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith(("- ", "* ")):
            display = line[2:].strip()
            if display:
                items.append((kind, display))
            continue
        kind = _kind_of(line)
        if ":" in line:
            inline = line.split(":", 1)[1].strip().rstrip(".").strip()
            if inline:
                items.extend((kind, d) for d in _split_inline(inline, kind, known_displays))
    return PlanSection(text=section, items=tuple(items))


def _split_inline(text: str, kind: str, known: dict[str, list[str]] | None) -> list[str]:
    candidates = []
    if known:
        for k in RESOLVES_TO.get(kind, (kind,)):
            candidates.extend(known.get(k, []))
    out: list[str] = []
    rest = text
    low_candidates = sorted({c.lower() for c in candidates if c}, key=len, reverse=True)
    while rest:
        low = rest.lower()
        hit = next((c for c in low_candidates if low.startswith(c)), None)
        if hit is None:
            head, _, tail = rest.partition(", ")
            out.append(head.strip())
            rest = tail
        else:
            out.append(rest[: len(hit)].strip())
            rest = rest[len(hit) :].lstrip(",").strip()
    return [d for d in out if d]


def normalize_display(display: str) -> str:
    return " ".join(display.lower().split())


#: Event kinds whose displays split inline lists ("given the following immunizations: a, b.").
INLINE_KINDS = ("immunization", "medication")


def plans_from_notes(
    notes: pd.DataFrame, events: pd.DataFrame, headers: Sequence[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reference plans and their items from every note that has a plan section (``headers``).

    Returns (reference_plans, plan_items) frames with the canonical columns. A
    note whose plan lists no order ("No orders placed at this visit.") gives a
    plan with ``n_items == 0``; an encounter with several notes keeps its first.
    Items are resolved to codes with one merge against the encounter's events
    (memory stays proportional to the events, not to Python objects per event).
    """
    coded = events.loc[
        events["encounter_id"].notna()
        & events["display"].notna()
        & events["kind"].isin(list(RESOLVES_TO["other"])),
        ["encounter_id", "kind", "display", "code_system", "code"],
    ]
    knowns: dict[str, dict[str, list[str]]] = {}
    inline = coded[coded["kind"].isin(list(INLINE_KINDS))]
    for eid, kind, display in zip(
        inline["encounter_id"].tolist(),
        inline["kind"].tolist(),
        inline["display"].tolist(),
        strict=True,
    ):
        knowns.setdefault(eid, {}).setdefault(kind, []).append(display)

    plan_rows: list[dict[str, object]] = []
    raw: list[tuple[int, str, str, int, str, str]] = []
    seen_encounters: set[str] = set()
    with_encounter = notes.dropna(subset=["encounter_id"]).sort_values(["time", "note_id"])
    for note in with_encounter.itertuples(index=False):
        if note.encounter_id in seen_encounters:
            continue
        plan = parse_plan(note.text, knowns.get(note.encounter_id, {}), headers)
        if not plan.text:
            continue
        seen_encounters.add(note.encounter_id)
        n = len(plan_rows)
        plan_rows.append(
            {
                "encounter_id": note.encounter_id,
                "patient_id": note.patient_id,
                "time": note.time,
                "plan_source": "note",
                "plan_text": plan.text,
            }
        )
        raw.extend(
            (n, note.encounter_id, note.patient_id, j, kind, d)
            for j, (kind, d) in enumerate(plan.items)
        )
    plans = pd.DataFrame(plan_rows, columns=[c for c in REFERENCE_PLANS.names if c != "n_items"])
    items = pd.DataFrame(
        raw, columns=["plan", "encounter_id", "patient_id", "order", "kind", "display"]
    )
    items["norm"] = items["display"].map(normalize_display)

    # Resolve: the first event kind (in RESOLVES_TO order) with the same display wins.
    ranks = pd.DataFrame(
        [(k, ek, r) for k, eks in RESOLVES_TO.items() for r, ek in enumerate(eks)],
        columns=["kind", "event_kind", "rank"],
    )
    wanted = coded[coded["encounter_id"].isin(seen_encounters)]
    wanted = wanted.assign(norm=wanted["display"].map(normalize_display))
    wanted = wanted.drop_duplicates(["encounter_id", "kind", "norm"], keep="first")
    wanted = wanted.rename(columns={"kind": "event_kind"})[
        ["encounter_id", "event_kind", "norm", "code_system", "code"]
    ]
    candidates = (
        items.reset_index()
        .merge(ranks, on="kind")
        .merge(wanted, on=["encounter_id", "event_kind", "norm"], how="inner")
    )
    best = candidates.sort_values(["index", "rank"]).drop_duplicates("index").set_index("index")
    system = best["code_system"].reindex(items.index)
    code = best["code"].reindex(items.index)
    resolved = system.notna() & code.notna() & (system != "") & (code != "")
    items["code_system"] = system.where(resolved)
    items["code"] = code.where(resolved)
    items["item_key"] = (system + "|" + code).where(resolved, "text|" + items["norm"])
    items = items.sort_values(["plan", "order"]).drop_duplicates(["plan", "item_key"], keep="first")
    items["position"] = items.groupby("plan").cumcount().astype("int32")
    counts = items.groupby("plan").size()
    plans["n_items"] = counts.reindex(range(len(plans)), fill_value=0).astype("int32").to_numpy()
    return plans[REFERENCE_PLANS.names], items[PLAN_ITEMS.names].reset_index(drop=True)


def plans_from_orders(
    events: pd.DataFrame, encounters: pd.DataFrame
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Reference plans built from the orders recorded at each encounter (for sources without notes)."""
    orders = events[events["kind"].isin(list(ORDER_KINDS)) & events["encounter_id"].notna()].copy()
    orders = orders.dropna(subset=["code"])
    orders["plan_kind"] = orders["kind"].map(ORDER_KINDS)
    orders["item_key"] = orders["code_system"].fillna("unknown") + "|" + orders["code"].astype(str)
    orders = orders.sort_values(["encounter_id", "time", "event_id"]).drop_duplicates(
        ["encounter_id", "item_key"]
    )
    orders["display"] = orders["display"].fillna(orders["item_key"])
    orders["position"] = orders.groupby("encounter_id").cumcount().astype("int32")
    items = pd.DataFrame(
        {
            "encounter_id": orders["encounter_id"],
            "patient_id": orders["patient_id"],
            "position": orders["position"],
            "kind": orders["plan_kind"],
            "item_key": orders["item_key"],
            "code_system": orders["code_system"],
            "code": orders["code"].astype(str),
            "display": orders["display"],
        },
        columns=PLAN_ITEMS.names,
    ).reset_index(drop=True)
    if items.empty:
        return pd.DataFrame(columns=REFERENCE_PLANS.names), items
    grouped = items.groupby("encounter_id", sort=True)
    texts = ("- " + items["display"]).groupby(items["encounter_id"], sort=True).agg("\n".join)
    texts = "## Plan\nOrders recorded at this encounter:\n" + texts
    starts = encounters.set_index("encounter_id")["start"]
    plans = pd.DataFrame(
        {
            "encounter_id": texts.index,
            "patient_id": grouped["patient_id"].first().reindex(texts.index).to_numpy(),
            "time": starts.reindex(texts.index).to_numpy(),
            "plan_source": "events",
            "plan_text": texts.to_numpy(),
            "n_items": grouped.size().reindex(texts.index).astype("int32").to_numpy(),
        },
        columns=REFERENCE_PLANS.names,
    )
    return plans.reset_index(drop=True), items
