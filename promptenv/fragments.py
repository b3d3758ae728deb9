"""Prompt fragments: pieces of text about one patient, each with its provenance.

A fragment renders from a patient's context as of an index encounter (nothing
recorded later; see `pipelines.index.context_as_of`) and from her recommender
signals. Every fragment records where its text came from: the event ids it
lists, the model scores, the peer support counts. No fragment prints a name, an
id or an exact date: ages are in years and times are relative ("3 weeks ago").

Fragments and what they say:

==============  ================================================================
profile         age, sex, pregnancy state (weeks since onset), obstetric history
problems        active conditions, most recently recorded first (k)
medications     medications of the last year (k) and allergies
encounters      the most recent encounters, relative times (k)
self            the recommender's top-k predictions of her next orders
peer            what similar patients received next, with support (top-k)
style           how to answer: a concise list, or a short explanation per item
safety          decision support for a clinician; do not invent findings
==============  ================================================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipelines.clinical import active_pregnancy
from pipelines.index import PatientContext
from promptenv.reward import clean_item

OBSTETRIC_HISTORY = r"pregnan|miscarriage|delivery|childbirth|abortion|ectopic"


@dataclass(frozen=True)
class SignalItem:
    """One self-informed prediction: an item, its model score and why."""

    item_key: str
    display: str
    score: float
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class PeerItem:
    """One peer-informed pattern: an item and how many distinct similar patients received it next."""

    item_key: str
    display: str
    support: int
    n_peers: int


@dataclass(frozen=True)
class PatientSignals:
    """The recommender's signals for one index encounter (empty when none were computed)."""

    model: str = ""
    self_items: tuple[SignalItem, ...] = ()
    peer_items: tuple[PeerItem, ...] = ()
    n_peers: int = 0
    min_support: int = 0


@dataclass(frozen=True)
class Fragment:
    """A piece of prompt text and where it came from."""

    name: str
    text: str
    provenance: Mapping[str, Any] = field(default_factory=dict)


def relative(delta: pd.Timedelta) -> str:
    """A time span as a person says it: "today", "5 days ago", "3 weeks ago", "2 years ago"."""
    days = int(delta / pd.Timedelta(days=1))
    if days < 1:
        return "today"
    if days < 14:
        return f"{days} day{'s' if days > 1 else ''} ago"
    if days < 60:
        return f"{days // 7} weeks ago"
    if days < 730:
        return f"{days // 30} months ago"
    return f"{days // 365} years ago"


def _distinct_latest(events: pd.DataFrame, k: int) -> pd.DataFrame:
    """The k most recently recorded events with distinct displays."""
    ordered = events.sort_values(["recorded_time", "event_id"], ascending=[False, True])
    cleaned = ordered.assign(clean=ordered["display"].fillna("").map(clean_item).str.lower())
    return cleaned[cleaned["clean"] != ""].drop_duplicates("clean").head(k)


def profile(ctx: PatientContext, signals: PatientSignals, k: int) -> Fragment:
    t = ctx.index_time
    birth = ctx.patient["birth_date"]
    age = int((t - pd.Timestamp(birth, tz="UTC")).days // 365.25) if pd.notna(birth) else None
    sex = {"female": "woman", "male": "man"}.get(str(ctx.patient["sex"]), "patient")
    parts = [
        # Safe Harbor: every age of 90 or more is one group
        f"Patient: {f'{age}-year-old' if age < 90 else '90-or-older'} {sex}."
        if age is not None
        else f"Patient: {sex}, age unknown."
    ]
    cond = ctx.events[ctx.events["kind"] == "condition"]
    pregnancy = active_pregnancy(ctx.events, t)
    used: list[str] = []
    if pregnancy is not None:
        parts.append(
            f"Currently pregnant, about {pregnancy.whole_weeks} weeks since the pregnancy began."
        )
        used.append(pregnancy.event_id)
    history = cond[cond["display"].fillna("").str.contains(OBSTETRIC_HISTORY, case=False)]
    past = history[history["end_time"].notna()]
    if len(past):
        kinds = past["display"].map(clean_item).str.lower().value_counts()
        listed = ", ".join(f"{d} ({n}×)" if n > 1 else d for d, n in kinds.head(k).items())
        parts.append(f"Obstetric history: {listed}.")
        used.extend(past["event_id"].astype(str))
    elif sex == "woman":
        parts.append("No previous pregnancy recorded.")
    return Fragment("profile", " ".join(parts), {"event_ids": used, "age_years": age})


def problems(ctx: PatientContext, signals: PatientSignals, k: int) -> Fragment | None:
    cond = ctx.events[(ctx.events["kind"] == "condition") & ctx.events["end_time"].isna()]
    latest = _distinct_latest(cond, k)
    if latest.empty:
        return None
    lines = [f"- {clean_item(d)}" for d in latest["display"]]
    return Fragment(
        "problems", "Active problems:\n" + "\n".join(lines), {"event_ids": list(latest["event_id"])}
    )


def medications(ctx: PatientContext, signals: PatientSignals, k: int) -> Fragment | None:
    t = ctx.index_time
    ev = ctx.events
    meds = ev[(ev["kind"] == "medication") & (ev["recorded_time"] > t - pd.Timedelta(days=365))]
    meds = _distinct_latest(meds, k)
    allergies = _distinct_latest(ev[ev["kind"] == "allergy"], k)
    if meds.empty and allergies.empty:
        return None
    lines = []
    if len(meds):
        lines.append(
            "Medications in the last year: "
            + "; ".join(clean_item(d) for d in meds["display"])
            + "."
        )
    lines.append(
        "Allergies: "
        + (
            "; ".join(clean_item(d) for d in allergies["display"])
            if len(allergies)
            else "none recorded"
        )
        + "."
    )
    return Fragment(
        "medications", "\n".join(lines), {"event_ids": [*meds["event_id"], *allergies["event_id"]]}
    )


def encounters(ctx: PatientContext, signals: PatientSignals, k: int) -> Fragment | None:
    enc = ctx.encounters.sort_values(["start", "encounter_id"], ascending=[False, True]).head(k)
    if enc.empty:
        return None
    t = ctx.index_time
    lines = [
        f"- {relative(t - row.start)}: {clean_item(str(row.type_display or 'visit'))}"
        for row in enc.itertuples(index=False)
    ]
    return Fragment(
        "encounters",
        "Recent visits:\n" + "\n".join(lines),
        {"encounter_ids": list(enc["encounter_id"])},
    )


def self_informed(
    ctx: PatientContext, signals: PatientSignals, k: int, explain: bool = False
) -> Fragment | None:
    items = signals.self_items[:k]
    if not items:
        return None
    lines = []
    for item in items:
        why = f" (because: {'; '.join(item.reasons[:2])})" if explain and item.reasons else ""
        lines.append(f"- {clean_item(item.display)}{why}")
    return Fragment(
        "self",
        "From her own history, she is likely to need next:\n" + "\n".join(lines),
        {
            "model": signals.model,
            "items": [
                {
                    "item_key": i.item_key,
                    "score": round(float(i.score), 4),
                    "reasons": list(i.reasons),
                }
                for i in items
            ],
        },
    )


def peer_informed(ctx: PatientContext, signals: PatientSignals, k: int) -> Fragment | None:
    items = signals.peer_items[:k]
    if not items:
        return None
    n = signals.n_peers
    lines = [f"- {clean_item(i.display)} ({i.support} of {i.n_peers})" for i in items]
    return Fragment(
        "peer",
        f"Among {n} similar patients, what they received at their next visit:\n" + "\n".join(lines),
        {
            "model": signals.model,
            "n_peers": n,
            "min_support": signals.min_support,
            "items": [
                {"item_key": i.item_key, "support": i.support, "n_peers": i.n_peers} for i in items
            ],
        },
    )


STYLE_TEXT = {
    "concise": "Answer with a short list of concrete orders for the next visit (tests, procedures, "
    "medications, immunizations, care plans), one per line, no more than {k} lines.",
    "explanation": "Answer with a short list of concrete orders for the next visit (tests, procedures, "
    "medications, immunizations, care plans), one per line, no more than {k} lines, each with a "
    "few words on why it fits this patient.",
}


def style(ctx: PatientContext, signals: PatientSignals, k: int, kind: str = "concise") -> Fragment:
    return Fragment("style", STYLE_TEXT[kind].format(k=k), {"style": kind})


def safety(ctx: PatientContext, signals: PatientSignals, k: int) -> Fragment:
    return Fragment(
        "safety",
        "This is decision support for her clinician: do not invent findings; follow standard guidelines.",
        {},
    )


FragmentBuilder = Callable[[PatientContext, PatientSignals, int], Fragment | None]

#: Every fragment by name, in the default order of a prompt.
FRAGMENTS: dict[str, FragmentBuilder] = {
    "profile": profile,
    "problems": problems,
    "medications": medications,
    "encounters": encounters,
    "self": self_informed,
    "peer": peer_informed,
    "style": style,
    "safety": safety,
}
LIST_FRAGMENTS: tuple[str, ...] = ("problems", "medications", "encounters", "self", "peer")


def patient_signals_by_encounter(
    self_items: pd.DataFrame,
    self_reasons: pd.DataFrame | None,
    peer_statements: pd.DataFrame,
    peers: pd.DataFrame | None,
    *,
    model: str,
    min_support: int,
) -> dict[str, PatientSignals]:
    """Group the recommender's signal frames (`recsys.signals`) into one PatientSignals per encounter."""
    reasons: dict[tuple[str, int], list[str]] = {}
    if self_reasons is not None and len(self_reasons):
        enc_of_state = dict(zip(self_items["state"], self_items["encounter_id"], strict=False))
        for row in self_reasons.itertuples(index=False):
            key = (enc_of_state[row.state], int(row.rank))
            reasons.setdefault(key, []).append(str(row.feature_display))
    own: dict[str, list[SignalItem]] = {}
    for row in self_items.sort_values(["encounter_id", "rank"]).itertuples(index=False):
        own.setdefault(row.encounter_id, []).append(
            SignalItem(
                str(row.item_key),
                str(row.item_display),
                float(row.score),
                tuple(reasons.get((row.encounter_id, int(row.rank)), ())),
            )
        )
    n_peers: dict[str, int] = {}
    if peers is not None and len(peers):
        n_peers = peers.groupby("encounter_id")["peer_patient_id"].nunique().to_dict()
    peer: dict[str, list[PeerItem]] = {}
    ordered = peer_statements.sort_values(
        ["encounter_id", "support", "item_key"], ascending=[True, False, True]
    )
    for row in ordered.itertuples(index=False):
        peer.setdefault(row.encounter_id, []).append(
            PeerItem(str(row.item_key), str(row.item_display), int(row.support), int(row.n_peers))
        )
        n_peers.setdefault(row.encounter_id, int(row.n_peers))
    encounter_ids = set(own) | set(peer) | set(n_peers)
    return {
        e: PatientSignals(
            model,
            tuple(own.get(e, ())),
            tuple(peer.get(e, ())),
            int(n_peers.get(e, 0)),
            min_support,
        )
        for e in encounter_ids
    }


def render_fragments(
    ctx: PatientContext,
    signals: PatientSignals,
    names: Sequence[str],
    ks: Mapping[str, int],
    style_kind: str,
    memo: dict[tuple[str, int, str], Fragment | None] | None = None,
) -> list[Fragment]:
    """The fragments ``names`` for one patient, in that order (empty fragments are left out).

    ``memo`` (one dict per patient and signals) keeps fragments already rendered, by
    everything a fragment depends on: trimming re-renders only the list it shortens.
    """
    out = []
    for name in names:
        k = ks.get(name, 5)
        if name == "style":
            key = (name, ks.get("answer", 8), style_kind)
        else:
            key = (name, k, style_kind if name == "self" else "")
        if memo is not None and key in memo:
            frag = memo[key]
        else:
            if name == "style":
                frag = style(ctx, signals, key[1], style_kind)
            elif name == "self":
                frag = self_informed(ctx, signals, k, explain=style_kind == "explanation")
            else:
                frag = FRAGMENTS[name](ctx, signals, k)
            if memo is not None:
                memo[key] = frag
        if frag is not None:
            out.append(frag)
    return out
