"""An optional LLM-as-judge score: how well an answer agrees with the physician's next plan.

The embedding scores of `promptenv.reward` ask whether each plan item is
*mentioned*; a judge LLM reads the whole answer and grades its agreement with
the plan on a fixed rubric, so it also sees contradictions and advice that
matches an item in other words. It only adds a column: the reward is unchanged.

- **Rubric**: one integer from 0 (none of the plan, or contradicts it) to 10
  (every item, nothing against it); the reply must hold exactly one line
  ``SCORE: <0-10>``. Anything else (no such line, two of them, a value out of
  range, a fraction) is *unparsed*: the score is NaN and the judge counts it
  (`PlanJudge.stats`), never 0. The score is the rating / 10, in [0, 1].
- **What the judge sees**: the fixed instructions, the plan items (their
  displays, without SNOMED's semantic tags) and the answer text. Nothing else
  about the patient: no ids, names, dates or record text; the free plan text is
  not sent either (it is written by the physician and may name people). The
  remote call still goes through the client's privacy guard.
- **Calls** go through `promptenv.llm.LLMClient` (cache, budget, ledger,
  retries, privacy guard) at temperature 0: judging the same answer against the
  same items again is a cache hit.
- **Who judges**: a remote backend (``openai:MODEL[@URL]``,
  ``anthropic:MODEL[@URL]``). The default local model (SmolLM2-135M) is not a
  credible judge: it cannot reliably compare an answer with a list, and its
  grades would look like measurements. A local backend is refused unless
  ``allow_local=True`` (for a capable local GGUF model, or for tests).

Example::

    judge = PlanJudge(LLMClient("anthropic:claude-sonnet-4-5", workspace=ws))
    verdict = judge.judge(["routine antenatal care (regime/therapy)"], answer)
    verdict.score, verdict.rating, judge.stats.unparsed
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

from promptenv.llm import BackendConfigError, GenerationParams, GenerationRequest, LLMClient
from promptenv.reward import clean_item

log = logging.getLogger(__name__)

#: The judge's generation settings: greedy, and room for one short line.
JUDGE_PARAMS = GenerationParams(max_tokens=32, temperature=0.0, seed=0)
#: The top of the rubric.
MAX_RATING = 10

JUDGE_SYSTEM = (
    "You grade clinical guidance. You compare an answer with the plan that the physician "
    "actually ordered for the patient's next visit, and you reply with a score only."
)
RUBRIC = """Rubric: how well does the answer agree with the plan?
10 = recommends every plan item and nothing that goes against the plan
7-9 = recommends most plan items, nothing against the plan
4-6 = recommends about half of the plan items, or a few minor points against it
1-3 = recommends few plan items, or is mostly unrelated to the plan
0 = recommends none of the plan items, contradicts the plan, or is empty

Reply with exactly one line: SCORE: <an integer from 0 to 10>"""

# one line "SCORE: n" (optionally "n/10"), tolerating markdown emphasis around it
_SCORE_LINE = re.compile(
    r"^[ \t*_`>#-]*SCORE[ \t*_`]*:[ \t*_`]*(\d+)[ \t]*(?:/[ \t]*10)?[ \t*_`.]*$",
    re.IGNORECASE | re.MULTILINE,
)

VerdictStatus: TypeAlias = Literal["ok", "unparsed", "no_reference"]


def judge_messages(items: Sequence[str], answer: str) -> tuple[str, str]:
    """The (system, user) text the judge reads: the fixed instructions, the plan items and
    the answer. Nothing else goes in (see the module docstring)."""
    listed = "\n".join(f"- {item}" for item in dict.fromkeys(clean_item(i) for i in items))
    user = (
        f"Plan the physician ordered for the next visit:\n{listed}\n\n"
        f"Answer to grade:\n<<<\n{answer.strip()}\n>>>\n\n{RUBRIC}"
    )
    return JUDGE_SYSTEM, user


def parse_rating(reply: str) -> int | None:
    """The rating in a judge reply, or None when the reply does not follow the rubric.

    Exactly one ``SCORE: n`` line with an integer n from 0 to 10 is required
    (other lines are ignored); a reply with no such line, with several, with a
    decimal or with a value above 10 gives None.
    """
    found = _SCORE_LINE.findall(reply)
    if len(found) != 1:
        return None
    rating = int(found[0])
    return rating if 0 <= rating <= MAX_RATING else None


@dataclass(frozen=True)
class Verdict:
    """One judged answer.

    - ``score``: ``rating / 10`` in [0, 1]; NaN when the reply was unparsed or
      there was no plan item to judge against.
    - ``rating``: the 0-10 integer, or None.
    - ``status``: ``ok``, ``unparsed`` (the reply broke the rubric) or
      ``no_reference`` (no plan items: nothing was asked).
    - ``reply``: the judge's text (empty when nothing was asked).
    - ``cached``: the reply came from the LLM cache.
    """

    score: float
    rating: int | None
    status: VerdictStatus
    reply: str = ""
    cached: bool = False


@dataclass(frozen=True)
class JudgeStats:
    """What a judge did: answers graded, unparsed replies, answers without plan items."""

    judged: int = 0
    unparsed: int = 0
    no_reference: int = 0

    def summary(self) -> str:
        return (
            f"{self.judged} answers judged, {self.unparsed} unparsed replies (NaN), "
            f"{self.no_reference} without plan items (NaN)"
        )


class PlanJudge:
    """Grades answers against plan items with an LLM (see the module docstring).

    ``client``: the judge's LLM client, normally a remote backend; a local one
    raises ``BackendConfigError`` unless ``allow_local=True``. ``params``: its
    generation settings (temperature must stay 0 so that grades are reproducible
    and cached). Thread-safe.
    """

    def __init__(
        self,
        client: LLMClient,
        *,
        allow_local: bool = False,
        params: GenerationParams = JUDGE_PARAMS,
    ) -> None:
        if client.backend.kind == "local" and not allow_local:
            raise BackendConfigError(
                f"the judge backend is {client.label}, a local model: the default SmolLM2-135M "
                "is not a credible judge. Use a remote backend (openai:MODEL[@URL] or "
                "anthropic:MODEL[@URL]), or force a capable local model with allow_local=True "
                "(pmlm evaluate --allow-local-judge)"
            )
        if params.temperature != 0:
            raise ValueError(f"the judge runs at temperature 0, got {params.temperature}")
        self.client = client
        self.params = params
        self._lock = threading.Lock()
        self._stats = JudgeStats()

    @property
    def label(self) -> str:
        """The judge LLM, ``kind:model``."""
        return self.client.label

    @property
    def stats(self) -> JudgeStats:
        """Counts since this judge was made."""
        with self._lock:
            return self._stats

    def judge(self, items: Sequence[str], answer: str) -> Verdict:
        """Grade one answer against one plan's items."""
        return self.judge_many([items], [answer])[0]

    def judge_many(
        self, items: Sequence[Sequence[str]], answers: Sequence[str], concurrency: int = 2
    ) -> list[Verdict]:
        """Grade aligned lists of plan items and answers, ``concurrency`` calls at a time.

        LLM errors (budget, privacy refusal, retries exhausted...) are raised as
        `LLMClient.generate_many` raises them.
        """
        if len(items) != len(answers):
            raise ValueError("items and answers must have the same length")
        asked = [i for i, its in enumerate(items) if its]
        requests = [
            GenerationRequest(*judge_messages(items[i], answers[i]), self.params) for i in asked
        ]
        completions = self.client.generate_many(requests, concurrency=concurrency)
        verdicts = [Verdict(math.nan, None, "no_reference") for _ in answers]
        for i, completion in zip(asked, completions, strict=True):
            rating = parse_rating(completion.text)
            if rating is None:
                log.warning(
                    "the judge %s broke the rubric (score NaN): %r",
                    self.label,
                    completion.text[:200],
                )
                verdicts[i] = Verdict(
                    math.nan, None, "unparsed", completion.text, completion.cached
                )
            else:
                verdicts[i] = Verdict(
                    rating / MAX_RATING, rating, "ok", completion.text, completion.cached
                )
        with self._lock:
            s = self._stats
            self._stats = JudgeStats(
                judged=s.judged + len(asked),
                unparsed=s.unparsed + sum(v.status == "unparsed" for v in verdicts),
                no_reference=s.no_reference + len(answers) - len(asked),
            )
        return verdicts


__all__ = [
    "JUDGE_PARAMS",
    "JUDGE_SYSTEM",
    "MAX_RATING",
    "RUBRIC",
    "JudgeStats",
    "PlanJudge",
    "Verdict",
    "judge_messages",
    "parse_rating",
]
