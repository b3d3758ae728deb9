"""The recommender steps on a workspace: fit (with validation tuning), evaluate, explain.

Each is a plain function over a workspace folder; the ``pmlm recsys`` commands
are thin wrappers around them. Models are saved under
``WORKSPACE/models/recsys/<name>/`` next to ``selection.json`` (chosen
hyperparameters, validation scores, blend weights, the best model); reports go
to ``WORKSPACE/reports/``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.errors import InputError, MissingStepError, StaleStateError
from pipelines.workspace import Workspace, atomic_write_bytes, transactional
from recsys.base import Recommender, load_recommender
from recsys.evaluate import (
    BASELINES,
    DEFAULT_GRIDS,
    PERSONALIZED_MODELS,
    comparison_table,
    grid_points,
    selection_mask,
    state_metrics,
    summarize,
    tune,
    tune_blend,
    write_report,
)
from recsys.interactions import CohortTables, PatientStates, build_dataset, build_states
from recsys.signals import PeerSignals, SelfSignals, SignalSettings, encounter_signals
from recsys.type_aliases import Progress

ALL_MODELS = (*BASELINES, *PERSONALIZED_MODELS)
BLEND = "blend"

#: One point per model: the main job fits without a grid search (`pmlm recsys fit` tunes).
QUICK_GRIDS: dict[str, dict[str, list[Any]]] = {
    "lightfm": {"epochs": [20], "max_sampled": [30]},
    "als": {"factors": [32], "regularization": [0.1], "alpha": [20.0]},
    "bpr": {"iterations": [200], "learning_rate": [0.2]},
    "item_knn": {"similarity": ["tfidf"], "K": [1000]},
}


def models_dir(workspace: Workspace) -> Path:
    return workspace.models_dir / "recsys"


def selected_model_name(workspace: Workspace | Path | str | None) -> str:
    """The recommender that `pmlm recsys fit` selected on validation patients."""
    name = read_selection(workspace).get("best")
    if name is None:
        raise MissingStepError(
            f"no fitted recommender in {models_dir(_workspace(workspace))}: "
            "run `pmlm recsys fit` first"
        )
    return str(name)


def load_fitted(workspace: Workspace | Path | str | None, name: str) -> Recommender:
    """The saved recommender ``name`` of the workspace, with its vocabulary."""
    path = models_dir(_workspace(workspace)) / name
    if not (path / "recommender.json").exists():
        raise MissingStepError(f"{path} holds no saved model: run `pmlm recsys fit --model {name}`")
    model = load_recommender(path)
    if model.vocab is None:
        raise MissingStepError(
            f"recommender {name} has no vocabulary: refit it with `pmlm recsys fit`"
        )
    return model


def _workspace(workspace: Workspace | Path | str | None) -> Workspace:
    return workspace if isinstance(workspace, Workspace) else Workspace.at(workspace)


def read_selection(workspace: Workspace | Path | str | None) -> dict[str, Any]:
    """The content of ``models/recsys/selection.json`` ({} before the first fit)."""
    path = models_dir(_workspace(workspace)) / "selection.json"
    if not path.exists():
        return {}
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def saved_models(workspace: Workspace | Path | str | None) -> dict[str, Recommender]:
    """Every saved recommender of the workspace, by name (baselines first)."""
    root = models_dir(_workspace(workspace))
    found = {p.parent.name: p.parent for p in root.glob("*/recommender.json")}
    order = [*ALL_MODELS, BLEND]
    names = sorted(found, key=lambda n: (order.index(n) if n in order else len(order), n))
    return {name: load_recommender(found[name]) for name in names}


@dataclass(frozen=True)
class FitSummary:
    """What :func:`fit_models` chose: per model its parameters and validation metrics."""

    validation: pd.DataFrame  # one row per model: model, params, ndcg@k on the selection subset
    tuning: pd.DataFrame  # every grid point tried
    best: str
    selection: dict[str, Any]


@transactional("recsys_fit")  # the models, selection and manifest publish together
def fit_models(
    workspace: Workspace | Path | str | None = None,
    names: Sequence[str] | None = None,
    *,
    k: int = 10,
    select_on: str = "all",
    grids: dict[str, dict[str, list[Any]]] | None = None,
    blend: bool = True,
    progress: Progress | None = None,
    tick: Callable[[int, int], None] | None = None,
) -> FitSummary:
    """Tune each model on validation patients, fit it on train patients, save it.

    ``tick(settings_tried, settings)`` follows the tuning of the models' grids.

    Args:
        names: models to fit (default: both baselines and every personalized model).
        k: cut-off of the selection metric (nDCG@k).
        select_on: validation subset the selection maximizes (``all``/``obstetric``/``adult``).
        grids: per-model parameter grids (default :data:`recsys.evaluate.DEFAULT_GRIDS`).
        blend: also tune a blend of the best personalized model with both baselines.
    """
    ws = _workspace(workspace)
    say = progress or (lambda _msg: None)
    names = list(names or ALL_MODELS)
    unknown = sorted(set(names) - set(ALL_MODELS) - {BLEND})
    if unknown:
        raise InputError(f"unknown model(s) {unknown}; known: {[*ALL_MODELS, BLEND]}")
    states = build_dataset(CohortTables.from_workspace(ws))
    train, validation = states.split("train"), states.split("validation")
    if len(validation) == 0:
        raise InputError("no validation patients: hyperparameters cannot be chosen")
    say(
        f"{len(train)} train / {len(validation)} validation states, "
        f"{states.n_items} items, {states.n_features} features"
    )
    grids = {**DEFAULT_GRIDS, **(grids or {})}
    root = models_dir(ws)
    selection = read_selection(ws)
    if selection.get("vocabulary_fingerprint") != states.vocab.fingerprint:
        selection = {}  # the cohort changed: earlier choices do not apply
    selection.update(
        {"k": k, "select_on": select_on, "vocabulary_fingerprint": states.vocab.fingerprint}
    )
    chosen = selection.setdefault("models", {})
    fitted: dict[str, Recommender] = {}
    tuning_parts = []
    tuned = [n for n in names if n != BLEND]
    settings = sum(len(grid_points(grids.get(n, {}))) for n in tuned)
    tried = 0

    def one_more() -> None:
        nonlocal tried
        tried += 1
        if tick is not None:
            tick(tried, settings)

    for name in tuned:
        result, model = tune(
            name,
            train,
            validation,
            grids.get(name, {}),
            k,
            select_on=select_on,
            progress=say,
            on_point=one_more,
        )
        model.save(root / name)
        fitted[name] = model
        chosen[name] = {"params": result.params, f"validation_ndcg@{k}": result.score}
        tuning_parts.append(result.trials.assign(model=name))
    if blend or BLEND in names:
        # earlier runs' models on the same vocabulary take part in the choice too
        for name, model in saved_models(ws).items():
            same_vocab = model.vocab is not None and model.vocab == states.vocab
            if name in ALL_MODELS and name not in fitted and same_vocab:
                fitted[name] = model
        personalized = [n for n in PERSONALIZED_MODELS if n in fitted]
        if personalized and all(b in fitted for b in BASELINES):
            mask = selection_mask(validation, select_on)
            scored = {
                n: summarize(state_metrics(fitted[n], validation, k), mask)["ndcg"]
                for n in personalized
            }
            lead = max(personalized, key=lambda n: scored[n])
            blended, trials = tune_blend(
                [fitted[lead], fitted["repeat_previous"], fitted["popularity"]],
                validation,
                k,
                select_on=select_on,
            )
            blended.save(root / BLEND)
            value = summarize(state_metrics(blended, validation, k), mask)["ndcg"]
            chosen[BLEND] = {
                "params": {"components": blended.params["components"], "weights": blended.weights},
                f"validation_ndcg@{k}": value,
            }
            tuning_parts.append(trials.assign(model=BLEND))
            say(f"blend of {lead} + baselines: weights {blended.weights}, nDCG@{k} = {value:.4f}")
        else:
            say("blend skipped: it needs a personalized model and both baselines")
    best = max(chosen, key=lambda n: chosen[n][f"validation_ndcg@{k}"])
    selection["best"] = best
    atomic_write_bytes(root / "selection.json", json.dumps(selection, indent=2).encode())
    validation_table = pd.DataFrame(
        [
            {"model": n, f"validation_ndcg@{k}": c[f"validation_ndcg@{k}"], "params": c["params"]}
            for n, c in chosen.items()
        ]
    )
    tuning = pd.concat(tuning_parts, ignore_index=True) if tuning_parts else pd.DataFrame()
    if not tuning.empty:
        ws.reports_dir.mkdir(parents=True, exist_ok=True)
        tuning.to_csv(ws.reports_dir / "recsys_tuning.csv", index=False)
    ws.record_step(
        "recsys_fit",
        {
            "models": sorted(chosen),
            "best": best,
            "select_on": select_on,
            "k": k,
            "n_train_states": len(train),
            "n_validation_states": len(validation),
            "vocabulary_fingerprint": states.vocab.fingerprint,
            "output": str(root),
        },
    )
    return FitSummary(validation_table, tuning, best, selection)


def evaluate_models(
    workspace: Workspace | Path | str | None = None,
    *,
    k: int = 10,
    subsets: Sequence[str] = ("all", "obstetric"),
    progress: Progress | None = None,
) -> pd.DataFrame:
    """All saved models (fitting them first if there are none) on TEST patients.

    Writes ``reports/recsys_comparison.csv`` and ``.md``; returns the table
    (see :func:`recsys.evaluate.comparison_table`).
    """
    ws = _workspace(workspace)
    say = progress or (lambda _msg: None)
    models = saved_models(ws)
    if not models:
        say("no saved recommenders: fitting them first")
        fit_models(ws, k=k, progress=progress)
        models = saved_models(ws)
    fingerprints = {m.vocab.fingerprint for m in models.values() if m.vocab is not None}
    if len(fingerprints) != 1:
        raise StaleStateError(
            "saved recommenders were fitted on different cohorts; run `pmlm recsys fit` again"
        )
    vocab = next(iter(models.values())).vocab
    assert vocab is not None
    states = build_states(CohortTables.from_workspace(ws), vocab)
    test = states.split("test")
    if len(test) == 0:
        raise InputError("no test patients in this workspace")
    table = comparison_table(models, test, k, subsets)
    csv_path, md_path = write_report(table, ws.reports_dir, "recsys_comparison")
    ws.record_step(
        "recsys_evaluate",
        {
            "models": list(models),
            "k": k,
            "n_test_states": len(test),
            "outputs": [str(csv_path), str(md_path)],
        },
    )
    return table


@dataclass(frozen=True)
class PatientExplanation:
    """One patient state's self and peer signals, ready to print."""

    model: str
    state: pd.Series  # the state's keys
    own: SelfSignals
    peers: PeerSignals

    def render(self) -> str:
        """Plain text: the top items with their reasons, then the peer statements."""
        s = self.state
        lines = [
            f"patient {s['patient_id']}  encounter {s['encounter_id']}  "
            f"index_time {s['index_time']}  split {s['split']}  "
            f"obstetric {bool(s['is_obstetric'])}  model {self.model}",
            "",
            "Self-informed: likely next items",
        ]
        reasons = self.own.reasons
        for row in self.own.items.itertuples(index=False):
            lines.append(
                f"  {row.rank:>2}. {row.item_display} [{row.item_kind}] score {row.score:.3f}"
            )
            why = reasons[reasons["rank"] == row.rank]
            for reason in why.itertuples(index=False):
                lines.append(
                    f"        because {reason.feature_display} (+{reason.contribution:.3f})"
                )
        peers = self.peers.peers
        lines += ["", f"Peer-informed: {len(peers)} similar training patients (before this visit)"]
        for row in peers.itertuples(index=False):
            lines.append(
                f"  {row.peer_rank:>2}. {row.peer_patient_id} at {row.peer_index_time} "
                f"(cosine {row.similarity:.3f})"
            )
        statements = self.peers.statements
        lines.append(f"What they received next (at least {self.peers.min_support} distinct peers):")
        if statements.empty:
            lines.append("  (no item reaches the support threshold)")
        for row in statements.itertuples(index=False):
            lines.append(
                f"  - {row.item_display}: {row.support} of {row.n_peers} peers "
                f"(mean cosine {row.mean_similarity:.3f})"
            )
        return "\n".join(lines)


def explain_patient(
    patient_id: str,
    workspace: Workspace | Path | str | None = None,
    *,
    model_name: str | None = None,
    encounter_id: str | None = None,
    k: int = 10,
    n_reasons: int = 3,
    n_peers: int = 20,
    min_support: int = 5,
) -> PatientExplanation:
    """Self and peer signals of one patient's index encounter (default: her latest).

    The model defaults to the one with the best validation score in ``selection.json``.
    """
    ws = _workspace(workspace)
    name = model_name or selected_model_name(ws)
    model = load_fitted(ws, name)
    assert model.vocab is not None
    tables = CohortTables.from_workspace(ws)
    states = build_states(tables, model.vocab)
    query = _patient_state(states, patient_id, encounter_id)
    settings = SignalSettings(
        k_self=k, n_reasons=n_reasons, n_peers=n_peers, min_support=min_support, max_statements=10
    )
    own, peers = encounter_signals(model, query, states.split("train"), settings)
    return PatientExplanation(name, query.keys.iloc[0], own, peers)


def _patient_state(
    states: PatientStates, patient_id: str, encounter_id: str | None
) -> PatientStates:
    keys = states.keys
    mine = np.flatnonzero((keys["patient_id"] == patient_id).to_numpy())
    if len(mine) == 0:
        raise InputError(f"patient {patient_id!r} has no index encounter in this workspace")
    if encounter_id is not None:
        mine = mine[(keys["encounter_id"].to_numpy()[mine] == encounter_id)]
        if len(mine) == 0:
            raise InputError(
                f"encounter {encounter_id!r} is not an index encounter of {patient_id!r}"
            )
    latest = mine[np.argmax(keys["index_us"].to_numpy()[mine])]
    return states.subset([int(latest)])
