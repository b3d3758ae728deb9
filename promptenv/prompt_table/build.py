"""The prompt table: one row per (index encounter, method), what downstream apps read.

Columns (`PROMPTS_SCHEMA`): ``encounter_id``, ``patient_id`` (pseudonym),
``index_time``, ``method``, ``config`` (JSON of the `PromptConfig`, empty for
baselines), ``system`` (the hard prompt), ``question``, ``tokens``,
``provenance`` (JSON: fragments with their event ids, model scores, peer
support counts), ``recommender``, ``created_at``.

Which encounters (``which``):

- ``latest``: each patient's most recent index encounter — her current prompt;
- ``test``: every test-split index encounter;
- ``all``: every index encounter.

Methods: those of `promptenv.prompts.METHODS` except ``oracle``, and ``pmlm``
(the initial prompt refined by the trained policy, `promptenv.policy`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Literal

import pandas as pd
import pyarrow as pa

from pipelines.index import ContextStore
from pipelines.workspace import Workspace
from promptenv.editing import build_cases
from promptenv.fragments import PatientSignals
from promptenv.policy import Policy
from promptenv.prompts import INITIAL_CONFIG, Prompt, PromptConfig, method_prompt

PROMPT_TABLE = "prompts"
PROMPTS_SCHEMA = pa.schema(
    [
        pa.field("encounter_id", pa.string(), nullable=False),
        pa.field("patient_id", pa.string(), nullable=False),
        pa.field("index_time", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("config", pa.string(), nullable=False),
        pa.field("system", pa.string(), nullable=False),
        pa.field("question", pa.string(), nullable=False),
        pa.field("tokens", pa.int32(), nullable=False),
        pa.field("provenance", pa.string(), nullable=False),
        pa.field("recommender", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)
Which = Literal["latest", "test", "all"]


def choose_encounters(index: pd.DataFrame, which: Which) -> pd.DataFrame:
    if which == "latest":
        return index.sort_values(["patient_id", "index_time"]).groupby("patient_id").tail(1)
    if which == "test":
        return index[index["split"] == "test"]
    if which == "all":
        return index
    raise ValueError(f"which must be latest, test or all, not {which!r}")


def build_prompt_table(
    tables: Mapping[str, pd.DataFrame],
    methods: Sequence[str],
    signals_for: Callable[[Sequence[str]], Mapping[str, PatientSignals]],
    which: Which = "latest",
    config: PromptConfig = INITIAL_CONFIG,
    policy: Policy | None = None,
) -> pd.DataFrame:
    """Prompts of ``methods`` for the chosen encounters (oracle prompts are not built: they need the answer).

    The method ``pmlm`` is the initial prompt refined by ``policy`` (no LLM
    call); its provenance carries the policy version and the edit trace.
    """
    if "oracle" in methods:
        raise ValueError(
            "the oracle prompt lists the true next plan: it is for evaluation only, not for the prompt table"
        )
    if "pmlm" in methods and policy is None:
        raise ValueError(
            "the pmlm method needs a trained policy: run `pmlm policy train` and pass it"
        )
    chosen = choose_encounters(tables["index_encounters"], which)
    ids = list(chosen["encounter_id"])
    store = ContextStore(dict(tables), only_encounters=ids)
    needs_signals = any(m in ("self", "peer", "pmlm_initial", "pmlm") for m in methods)
    signals = signals_for(ids) if needs_signals else {}
    refined: dict[str, Prompt] = {}
    if "pmlm" in methods and policy is not None:
        cases = build_cases(tables, chosen, lambda _ids: signals, None, store)
        refined = {c.encounter_id: p for c, p in zip(cases, policy.prompts(cases), strict=True)}
    now = datetime.now(UTC)
    rows = []
    for eid in ids:
        ctx = store.context(eid)
        sig = signals.get(eid, PatientSignals())
        for method in methods:
            p = refined[eid] if method == "pmlm" else method_prompt(method, ctx, sig, (), config)
            rows.append(
                {
                    "encounter_id": eid,
                    "patient_id": ctx.index["patient_id"],
                    "index_time": ctx.index_time,
                    "method": method,
                    "config": json.dumps(p.config.as_dict()) if p.config else "",
                    "system": p.system,
                    "question": p.user,
                    "tokens": p.tokens,
                    "provenance": json.dumps(p.provenance, default=str),
                    "recommender": sig.model,
                    "created_at": now,
                }
            )
    return pd.DataFrame(rows, columns=PROMPTS_SCHEMA.names)


def write_prompt_table(workspace: Workspace, frame: pd.DataFrame) -> None:
    table = pa.Table.from_pandas(frame, schema=PROMPTS_SCHEMA, preserve_index=False)
    workspace.write_table(PROMPT_TABLE, table)
