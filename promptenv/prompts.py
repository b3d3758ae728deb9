"""Prompt assembly: a `PromptConfig` and a patient's fragments → one hard prompt, within a budget.

The prompt is the *system* text an LLM reads before the question; the question
(`QUESTION`) is the same for every method and every patient. Assembly is
deterministic: the same context, signals and config give the same text.

When the text exceeds ``config.max_tokens``, the longest list (largest k) loses
its last item, repeatedly, until it fits; then whole optional fragments are
dropped from the end. Tokens are counted with `count_tokens`, a word-and-
punctuation count that is at least as large as the BPE token count of the
small local models for English clinical text, so the budget is conservative.

Methods (DESIGN.md): ``general``, ``full_record``, ``retrieval`` (BM25 over her
own history items, as in LaMP), ``self``, ``peer``, ``pmlm_initial`` and
``oracle`` (the true next-plan items: the ceiling for an LLM).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

import pandas as pd

from pipelines.index import PatientContext
from promptenv.fragments import LIST_FRAGMENTS, Fragment, PatientSignals, relative, render_fragments
from promptenv.reward import clean_item

#: The same question, with the same answer format, for every method: differences
#: between methods come from what the prompt tells about the patient.
QUESTION = (
    "What should be planned at this patient's next visit? Answer with a list of the tests, "
    "procedures, medications, immunizations and care plans to order, one per line."
)
METHODS = ("general", "full_record", "retrieval", "self", "peer", "pmlm_initial", "oracle")
TOKEN = re.compile(r"\w+|[^\w\s]")

Style = Literal["concise", "explanation"]


def count_tokens(text: str) -> int:
    """Words and punctuation marks: a conservative token estimate (see the module docstring)."""
    return len(TOKEN.findall(text))


@dataclass(frozen=True)
class PromptConfig:
    """Which fragments, in what order, how many items each lists, in what style, within what budget.

    The initial PMLM config (`INITIAL_CONFIG`) lists the profile, up to 5 active
    problems, medications and allergies, her 8 most likely next items (self),
    the 6 items most supported by similar patients (peer), a concise answer
    style and, last, the safety note, within 400 tokens. It is the hand-written
    starting point that the policy (`promptenv.policy`) edits; on the default
    cohort with the local 135M model the trained policy removes the safety note
    and the style line for every test encounter (see BENCHMARKS.md).
    """

    fragments: tuple[str, ...] = (
        "profile",
        "problems",
        "medications",
        "self",
        "peer",
        "style",
        "safety",
    )
    k_problems: int = 5
    k_medications: int = 5
    k_encounters: int = 3
    k_self: int = 8
    k_peer: int = 6
    k_answer: int = 8
    style: Style = "concise"
    max_tokens: int = 400

    def ks(self) -> dict[str, int]:
        return {
            "problems": self.k_problems,
            "medications": self.k_medications,
            "encounters": self.k_encounters,
            "self": self.k_self,
            "peer": self.k_peer,
            "answer": self.k_answer,
        }

    def with_k(self, name: str, k: int) -> PromptConfig:
        """The same config with the list ``name`` (problems, self, peer, ...) cut or grown to ``k``."""
        if name not in self.ks():
            raise ValueError(f"{name!r} is not a list fragment of a PromptConfig")
        changes: dict[str, Any] = {f"k_{name}": max(0, k)}
        return replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fragments"] = list(self.fragments)
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PromptConfig:
        """The config `as_dict` wrote (keys it does not know are an error; missing ones default)."""
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{unknown} are not PromptConfig fields")
        values = dict(data)
        if "fragments" in values:
            values["fragments"] = tuple(values["fragments"])
        return cls(**values)


INITIAL_CONFIG = PromptConfig()

#: The fixed methods that are a `PromptConfig` (a policy's episodes may start from any of them).
CONFIG_METHODS = ("pmlm_initial", "self", "peer")


def fixed_config(method: str, base: PromptConfig = INITIAL_CONFIG) -> PromptConfig:
    """The config of a fixed method of `CONFIG_METHODS`: ``base`` itself for ``pmlm_initial``,
    its one list fragment for ``self`` and ``peer`` (with ``base``'s k and budget)."""
    if method == "pmlm_initial":
        return base
    if method in ("self", "peer"):
        return replace(base, fragments=(method,))
    raise ValueError(f"{method!r} is not a config method; known: {', '.join(CONFIG_METHODS)}")


@dataclass(frozen=True)
class Prompt:
    """A rendered prompt: the system text, the question, and its provenance."""

    method: str
    system: str
    user: str
    tokens: int
    config: PromptConfig | None
    provenance: dict[str, Any] = field(default_factory=dict)


def _join(fragments: Sequence[Fragment]) -> str:
    return "\n\n".join(f.text for f in fragments)


def assemble(
    ctx: PatientContext, signals: PatientSignals, config: PromptConfig, method: str = "pmlm"
) -> Prompt:
    """Render ``config`` for one patient, trimmed to ``config.max_tokens`` (deterministic)."""
    cfg = config
    memo: dict[tuple[str, int, str], Fragment | None] = {}
    while True:
        frags = render_fragments(ctx, signals, cfg.fragments, cfg.ks(), cfg.style, memo)
        text = _join(frags)
        if count_tokens(text) <= cfg.max_tokens:
            break
        lists = [
            (cfg.ks()[n], -i, n)
            for i, n in enumerate(cfg.fragments)
            if n in LIST_FRAGMENTS and cfg.ks()[n] > 0
        ]
        if lists:
            _, _, longest = max(lists)
            cfg = cfg.with_k(longest, cfg.ks()[longest] - 1)
        elif len(cfg.fragments) > 1:
            cfg = replace(cfg, fragments=cfg.fragments[:-1])
        else:
            text = " ".join(TOKEN.findall(text)[: cfg.max_tokens])
            break
    return Prompt(
        method=method,
        system=text,
        user=QUESTION,
        tokens=count_tokens(text),
        config=cfg,
        provenance={
            "requested_config": config.as_dict(),
            "fragments": [{"name": f.name, **dict(f.provenance)} for f in frags],
        },
    )


def _history_lines(ctx: PatientContext) -> pd.DataFrame:
    """Her recorded history as one line per distinct (kind, display), most recent first."""
    ev = ctx.events.sort_values(["recorded_time", "event_id"], ascending=[False, True])
    ev = ev[ev["display"].notna()]
    ev = ev.assign(clean=ev["display"].map(clean_item))
    ev = ev.drop_duplicates(["kind", "clean"])
    t = ctx.index_time
    line = [
        f"{relative(t - r)}: {k}: {c}"
        for r, k, c in zip(ev["recorded_time"], ev["kind"], ev["clean"], strict=True)
    ]
    return ev.assign(line=line)


def full_record(ctx: PatientContext, max_tokens: int) -> Prompt:
    """Her whole history, most recent first, cut to the budget."""
    lines = _history_lines(ctx)
    head = "Patient record (most recent first):"
    kept, used = [head], count_tokens(head)
    ids = []
    for line, eid in zip(lines["line"], lines["event_id"], strict=True):
        n = count_tokens(line)
        if used + n > max_tokens:
            break
        kept.append(line)
        used += n
        ids.append(eid)
    text = "\n".join(kept)
    return Prompt(
        "full_record",
        text,
        QUESTION,
        count_tokens(text),
        None,
        {"event_ids": ids, "history_items": len(lines)},
    )


def retrieval(ctx: PatientContext, max_tokens: int, k: int = 15) -> Prompt:
    """The k history items most relevant to the question by BM25 (``bm25s``), within the budget."""
    import bm25s

    # bm25s sets its own logger to DEBUG; keep its per-call index messages out of our output
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    lines = _history_lines(ctx)
    head = "Relevant items from the patient record:"
    if lines.empty:
        return Prompt(
            "retrieval",
            head + "\n(none)",
            QUESTION,
            count_tokens(head) + 3,
            None,
            {"event_ids": []},
        )
    corpus = lines["line"].tolist()
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize(corpus, stopwords="en", show_progress=False), show_progress=False
    )
    query = bm25s.tokenize([QUESTION], stopwords="en", show_progress=False)
    top = min(k, len(corpus))
    docs, scores = retriever.retrieve(query, k=top, show_progress=False)
    kept, used, ids, picked = [head], count_tokens(head), [], []
    for doc, score in zip(docs[0], scores[0], strict=True):
        line = corpus[int(doc)]
        if used + count_tokens(line) > max_tokens:
            break
        kept.append(line)
        used += count_tokens(line)
        ids.append(lines["event_id"].iloc[int(doc)])
        picked.append(round(float(score), 4))
    text = "\n".join(kept)
    return Prompt(
        "retrieval",
        text,
        QUESTION,
        count_tokens(text),
        None,
        {"event_ids": ids, "bm25_scores": picked},
    )


def oracle(reference_items: Sequence[str], max_tokens: int) -> Prompt:
    """The true next-plan items: the ceiling of what a prompt can tell the LLM."""
    lines = ["At the next visit, the physician will order:"]
    for item in reference_items:
        line = f"- {clean_item(item)}"
        if count_tokens("\n".join([*lines, line])) > max_tokens:
            break
        lines.append(line)
    text = "\n".join(lines)
    return Prompt(
        "oracle",
        text,
        QUESTION,
        count_tokens(text),
        None,
        {"reference_items": len(reference_items)},
    )


def method_prompt(
    method: str,
    ctx: PatientContext,
    signals: PatientSignals,
    reference_items: Sequence[str] = (),
    config: PromptConfig = INITIAL_CONFIG,
) -> Prompt:
    """The prompt of one compared method for one index encounter (same budget for all)."""
    budget = config.max_tokens
    if method == "general":
        return Prompt("general", "", QUESTION, 0, None, {})
    if method == "full_record":
        return full_record(ctx, budget)
    if method == "retrieval":
        return retrieval(ctx, budget)
    if method == "oracle":
        return oracle(reference_items, budget)
    if method in CONFIG_METHODS:
        return assemble(ctx, signals, fixed_config(method, config), method)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
