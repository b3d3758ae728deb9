"""The space of prompt edits, shared by the RL environment, the policy and per-patient search.

An edit changes a `PromptConfig` by one step (`EDITS`, indexed by action id):

==============  ==================================================================
stop            end the episode: the prompt is final
add F           put fragment F in (at its place in the canonical order)
remove F        take fragment F out (a prompt keeps at least one fragment)
more L, fewer L the next larger / smaller k of list L on `K_LADDER` (L's fragment
                must be in; ``answer`` is the style fragment's line limit)
switch style    concise ⇄ explanation (needs the style or self fragment)
==============  ==================================================================

Invalid edits are masked (`edit_mask`), never punished; so is the edit that
would undo the previous one (remove F right after add F, ...). An edit space may be
restricted to some edits by their labels (`allowed_mask`: ``("add self",)`` lets a
policy only choose between stop and adding the self list). An `EditCase` holds one
index encounter's context, signals and (for scoring only) the physician's next
plan; `case_features` turns the context and signals into the fixed-size
patient part of the observation, with no LLM call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from pipelines.clinical import active_pregnancy
from pipelines.index import ContextStore, PatientContext
from promptenv.fragments import FRAGMENTS, PatientSignals
from promptenv.prompts import INITIAL_CONFIG, PromptConfig
from promptenv.reward import Reference

EditKind = Literal["stop", "add", "remove", "more", "fewer", "style"]

#: The fragments an edit may add or remove, in their canonical prompt order.
EDITABLE_FRAGMENTS: tuple[str, ...] = tuple(FRAGMENTS)
#: The lists whose k an edit may change, and the fragment each belongs to.
K_LISTS: dict[str, str] = {
    "problems": "problems",
    "medications": "medications",
    "encounters": "encounters",
    "self": "self",
    "peer": "peer",
    "answer": "style",
}
#: The values a list's k moves along (a k off the ladder moves to its nearest neighbour).
K_LADDER: tuple[int, ...] = (1, 2, 3, 5, 8, 12)


@dataclass(frozen=True)
class Edit:
    kind: EditKind
    target: str = ""

    @property
    def label(self) -> str:
        return f"{self.kind} {self.target}".strip()


EDITS: tuple[Edit, ...] = (
    Edit("stop"),
    *(Edit("add", f) for f in EDITABLE_FRAGMENTS),
    *(Edit("remove", f) for f in EDITABLE_FRAGMENTS),
    *(Edit("more", k) for k in K_LISTS),
    *(Edit("fewer", k) for k in K_LISTS),
    Edit("style"),
)
STOP = 0
N_EDITS = len(EDITS)
#: Bumped when the meaning of the edits or masks changes: a saved policy must match it.
EDIT_SPACE_VERSION = 2


def _k(config: PromptConfig, name: str) -> int:
    return config.ks()[name]


def _next_k(k: int, up: bool) -> int | None:
    if up:
        return next((v for v in K_LADDER if v > k), None)
    return next((v for v in reversed(K_LADDER) if v < k), None)


def inverse(action: int) -> int | None:
    """The edit that undoes ``action`` (add F ⇄ remove F, more L ⇄ fewer L, style ⇄ style)."""
    e = EDITS[action]
    opposite = {
        "add": "remove",
        "remove": "add",
        "more": "fewer",
        "fewer": "more",
        "style": "style",
    }
    if e.kind not in opposite:
        return None
    return EDITS.index(Edit(opposite[e.kind], e.target))  # type: ignore[arg-type]


def edit_mask(config: PromptConfig, last: int | None = None) -> NDArray[np.bool_]:
    """Which edits are valid for ``config`` (stop always is).

    With ``last`` (the previous edit), the edit that would undo it is masked
    too: an undo only spends an edit.
    """
    present = set(config.fragments)
    mask = np.zeros(N_EDITS, dtype=bool)
    for i, e in enumerate(EDITS):
        if e.kind == "stop":
            mask[i] = True
        elif e.kind == "add":
            mask[i] = e.target not in present
        elif e.kind == "remove":
            mask[i] = e.target in present and len(present) > 1
        elif e.kind in ("more", "fewer"):
            mask[i] = (
                K_LISTS[e.target] in present
                and _next_k(_k(config, e.target), e.kind == "more") is not None
            )
        else:
            mask[i] = "style" in present or "self" in present
    undo = inverse(last) if last is not None else None
    if undo is not None:
        mask[undo] = False
    return mask


def apply_edit(config: PromptConfig, action: int) -> PromptConfig:
    """The config after edit ``action``; raises ValueError for an edit that is masked out."""
    if not 0 <= action < N_EDITS:
        raise ValueError(f"edit {action} is out of range 0..{N_EDITS - 1}")
    if not edit_mask(config)[action]:
        raise ValueError(f"edit {action} ({EDITS[action].label}) is not valid for this config")
    e = EDITS[action]
    if e.kind == "stop":
        return config
    if e.kind == "add":
        wanted = set(config.fragments) | {e.target}
        return replace(config, fragments=tuple(f for f in EDITABLE_FRAGMENTS if f in wanted))
    if e.kind == "remove":
        return replace(config, fragments=tuple(f for f in config.fragments if f != e.target))
    if e.kind in ("more", "fewer"):
        k = _next_k(_k(config, e.target), e.kind == "more")
        assert k is not None  # the mask guarantees it
        return config.with_k(e.target, k)
    return replace(config, style="explanation" if config.style == "concise" else "concise")


def config_features(config: PromptConfig, edits_used: int, max_edits: int) -> NDArray[np.float32]:
    """The config part of an observation: fragments in, each k on the ladder, style, edits used."""
    present = [1.0 if f in config.fragments else 0.0 for f in EDITABLE_FRAGMENTS]
    ks = [min(_k(config, n), K_LADDER[-1]) / K_LADDER[-1] for n in K_LISTS]
    return np.asarray(
        [
            *present,
            *ks,
            1.0 if config.style == "explanation" else 0.0,
            edits_used / max(1, max_edits),
        ],
        dtype=np.float32,
    )


class UnknownEditError(ValueError):
    """An edit label that is not in `EDITS` (``label``)."""

    def __init__(self, label: str) -> None:
        self.label = label
        known = ", ".join(e.label for e in EDITS)
        super().__init__(f"unknown edit {label!r}; the edits are: {known}")


def edit_ids(labels: Sequence[str]) -> tuple[int, ...]:
    """The action ids of edit labels (``"add self"``); `UnknownEditError` for an unknown one."""
    by_label = {e.label: i for i, e in enumerate(EDITS)}
    unknown = [label for label in labels if label not in by_label]
    if unknown:
        raise UnknownEditError(unknown[0])
    return tuple(by_label[label] for label in labels)


def allowed_mask(labels: Sequence[str]) -> NDArray[np.bool_] | None:
    """The edits a restricted edit space allows (stop and ``labels``); None when ``labels`` is
    empty: every edit."""
    if not labels:
        return None
    mask = np.zeros(N_EDITS, dtype=bool)
    mask[STOP] = True
    mask[list(edit_ids(labels))] = True
    return mask


def step_mask(
    config: PromptConfig,
    last: int | None,
    edits_used: int,
    max_edits: int,
    allowed: NDArray[np.bool_] | None = None,
) -> NDArray[np.bool_]:
    """The edits allowed at one step of an episode: `edit_mask`, within ``allowed``
    (`allowed_mask`; None: every edit), and only stop at the limit.

    The environment's ``action_masks`` and a trained policy's edits both use it."""
    mask = edit_mask(config, last)
    if allowed is not None:
        mask &= allowed
    if edits_used >= max_edits:
        mask[:] = False
        mask[STOP] = True
    return mask


def observation(
    patient: NDArray[np.float32], config: PromptConfig, edits_used: int, max_edits: int
) -> NDArray[np.float32]:
    """The observation at one step: the patient's features, then `config_features`."""
    return np.concatenate([patient, config_features(config, edits_used, max_edits)]).astype(
        np.float32
    )


@dataclass(frozen=True)
class EditCase:
    """One index encounter to edit a prompt for.

    ``reference_items`` and ``plan_text`` (the physician's next plan) are used
    only to score an answer; nothing in the observation or the prompt reads them.
    """

    encounter_id: str
    context: PatientContext
    signals: PatientSignals
    features: NDArray[np.float32]
    reference_items: tuple[str, ...] = ()
    plan_text: str = ""
    is_obstetric: bool = False


N_TOP = 8
EMBED_DIMS = 16


def _projection(dims_in: int) -> NDArray[np.float32]:
    """A fixed (seeded) random projection of sentence embeddings to `EMBED_DIMS` numbers."""
    rng = np.random.default_rng(20260101)
    return (rng.standard_normal((dims_in, EMBED_DIMS)) / np.sqrt(EMBED_DIMS)).astype(np.float32)


def patient_features(
    ctx: PatientContext, signals: PatientSignals, is_obstetric: bool
) -> NDArray[np.float32]:
    """Profile and signal numbers of one index encounter, each in [0, 1] (no embedding)."""
    t = ctx.index_time
    birth = ctx.patient["birth_date"]
    age = (t - pd.Timestamp(birth, tz="UTC")).days / 365.25 if pd.notna(birth) else 0.0
    ev = ctx.events
    cond = ev[ev["kind"] == "condition"]
    active = cond[cond["end_time"].isna()]
    pregnant = active_pregnancy(ev, t) is not None
    recent = ev[ev["recorded_time"] > t - pd.Timedelta(days=365)]
    scores = np.asarray([s.score for s in signals.self_items[:N_TOP]], dtype=float)
    if scores.size:
        soft = np.exp(scores - scores.max())
        soft = soft / soft.sum()
    else:
        soft = np.zeros(0)
    self_top = np.zeros(N_TOP)
    self_top[: soft.size] = soft
    peer_top = np.zeros(N_TOP)
    for i, p in enumerate(signals.peer_items[:N_TOP]):
        peer_top[i] = p.support / max(1, p.n_peers)
    self_keys = {s.item_key for s in signals.self_items[:N_TOP]}
    peer_keys = {p.item_key for p in signals.peer_items[:N_TOP]}
    values = [
        min(age, 60.0) / 60.0,
        float(pregnant),
        float(is_obstetric),
        min(active["display"].nunique(), 10) / 10,
        min((recent["kind"] == "medication").sum(), 10) / 10,
        min(len(recent), 200) / 200,
        min(ctx.encounters.shape[0], 100) / 100,
        min(len(signals.self_items), 15) / 15,
        min(len(signals.peer_items), 15) / 15,
        min(signals.n_peers, 20) / 20,
        len(self_keys & peer_keys) / N_TOP,
        *self_top,
        *peer_top,
    ]
    return np.clip(np.asarray(values, dtype=np.float32), 0.0, 1.0)


def signal_text(signals: PatientSignals) -> str:
    """What the signals say, as one line for the sentence embedder."""
    own = [s.display for s in signals.self_items[:N_TOP]]
    peer = [p.display for p in signals.peer_items[:N_TOP]]
    return "; ".join(own + peer) or "nothing predicted"


def case_features(
    contexts: Sequence[PatientContext],
    signals: Sequence[PatientSignals],
    obstetric: Sequence[bool],
    embed: object | None = None,
) -> list[NDArray[np.float32]]:
    """Patient parts of the observation for many encounters: numbers plus a compact embedding.

    The embedding is all-MiniLM-L6-v2 of the predicted items (`signal_text`),
    projected to `EMBED_DIMS` numbers by a fixed random projection and squashed
    with tanh. ``embed`` is a `promptenv.reward.Embedder` (the shared one by default).
    """
    from promptenv.reward import Embedder

    embedder = embed if isinstance(embed, Embedder) else Embedder.shared()
    texts = [signal_text(s) for s in signals]
    vectors = embedder.embed(texts) if texts else np.zeros((0, 384), dtype=np.float32)
    projected = np.tanh(vectors @ _projection(vectors.shape[1]) * 2.0) if len(texts) else vectors
    return [
        np.concatenate([patient_features(c, s, o), (p + 1.0) / 2.0]).astype(np.float32)
        for c, s, o, p in zip(contexts, signals, obstetric, projected, strict=True)
    ]


N_PATIENT_FEATURES = 11 + 2 * N_TOP + EMBED_DIMS
N_CONFIG_FEATURES = len(EDITABLE_FRAGMENTS) + len(K_LISTS) + 2


def build_cases(
    tables: Mapping[str, pd.DataFrame],
    chosen: pd.DataFrame,
    signals_for: Callable[[Sequence[str]], Mapping[str, PatientSignals]],
    refs: Mapping[str, Reference] | None = None,
    store: ContextStore | None = None,
) -> list[EditCase]:
    """One `EditCase` per row of ``chosen`` (rows of ``index_encounters``), in that order.

    ``refs`` (encounter → reference item displays, plan text) is given for
    training and evaluation only; applying a policy needs none.
    """
    ids = list(chosen["encounter_id"])
    if not ids:
        return []
    store = store or ContextStore(dict(tables), only_encounters=ids)
    signals = signals_for(ids)
    contexts = [store.context(e) for e in ids]
    sigs = [signals.get(e, PatientSignals()) for e in ids]
    obstetric = [bool(x) for x in chosen["is_obstetric"]]
    features = case_features(contexts, sigs, obstetric)
    refs = refs or {}
    return [
        EditCase(
            e,
            c,
            s,
            f,
            tuple(refs[e].items) if e in refs else (),
            refs[e].plan_text if e in refs else "",
            o,
        )
        for e, c, s, f, o in zip(ids, contexts, sigs, features, obstetric, strict=True)
    ]


def random_edits(
    config: PromptConfig, n_edits: int, rng: np.random.Generator
) -> tuple[PromptConfig, list[str]]:
    """``n_edits`` valid edits drawn uniformly (never stop), and their labels."""
    trace = []
    last: int | None = None
    for _ in range(n_edits):
        mask = edit_mask(config, last)
        mask[STOP] = False
        choices = np.flatnonzero(mask)
        if choices.size == 0:
            break
        last = int(rng.choice(choices))
        config = apply_edit(config, last)
        trace.append(EDITS[last].label)
    return config, trace


__all__ = [
    "EDITS",
    "EDIT_SPACE_VERSION",
    "EMBED_DIMS",
    "INITIAL_CONFIG",
    "K_LADDER",
    "K_LISTS",
    "N_CONFIG_FEATURES",
    "N_EDITS",
    "N_PATIENT_FEATURES",
    "STOP",
    "Edit",
    "EditCase",
    "UnknownEditError",
    "allowed_mask",
    "apply_edit",
    "build_cases",
    "case_features",
    "config_features",
    "edit_ids",
    "edit_mask",
    "inverse",
    "observation",
    "patient_features",
    "random_edits",
    "step_mask",
]
