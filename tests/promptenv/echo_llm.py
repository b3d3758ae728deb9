"""A fast, deterministic stand-in LLM and model-free signals for the RL tests.

`EchoBackend` answers with the bullet lines of the system prompt, in order, up
to the line limit the style fragment states (8 without one): an answer then
depends on the prompt exactly as much as the config decides what the prompt
lists, so rewards move with edits. `history_signals` gives each encounter
signals without a fitted recommender: self = the items of the plan written
at the index encounter (repeat the current plan), peer = the items most often planned for training
patients, with their support.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

import pandas as pd

from promptenv.fragments import PatientSignals, PeerItem, SignalItem
from promptenv.llm import GenerationParams
from promptenv.llm.backends import BackendReply
from promptenv.llm.types import ChatMessage

LIMIT = re.compile(r"no more than (\d+) lines")


class EchoBackend:
    kind: Literal["local"] = "local"
    model = "echo"
    endpoint = "memory"
    is_local = True
    identity: Mapping[str, object] = {"kind": "local", "file": "echo"}

    def __init__(self) -> None:
        self.calls = 0

    def complete(self, messages: Sequence[ChatMessage], params: GenerationParams) -> BackendReply:
        self.calls += 1
        system = next((m.content for m in messages if m.role == "system"), "")
        limit = LIMIT.search(system)
        k = int(limit.group(1)) if limit else 8
        bullets = [line[2:].split(" (")[0] for line in system.splitlines() if line.startswith("- ")]
        text = "\n".join(bullets[:k]) or "Routine follow-up visit."
        return BackendReply(text, self.model, len(system.split()), len(text.split()), "stop")


def history_signals(tables: Mapping[str, pd.DataFrame]) -> object:
    """A ``signals_for`` callable built from the tables alone (see the module docstring)."""
    idx = tables["index_encounters"]
    items = tables["plan_items"]
    train_next = set(idx.loc[idx["split"] == "train", "next_encounter_id"])
    popular = (
        items[items["encounter_id"].isin(train_next)]
        .groupby(["item_key", "display"])["patient_id"]
        .nunique()
        .sort_values(ascending=False)
        .head(10)
    )
    peer = tuple(PeerItem(k, d, int(n), 20) for (k, d), n in popular.items())
    plan_of = items.groupby("encounter_id")[["item_key", "display"]].apply(
        lambda f: list(zip(f["item_key"], f["display"], strict=True))
    )

    def signals_for(ids: Sequence[str]) -> dict[str, PatientSignals]:
        out = {}
        for eid in ids:
            # the plan written at the index encounter itself: known at the index time
            mine = plan_of.get(eid, [])
            own = tuple(SignalItem(k, d, 1.0 - i / 20) for i, (k, d) in enumerate(mine[:15]))
            out[eid] = PatientSignals("history", own, peer, 20, 5)
        return out

    return signals_for
