"""The matching threshold: calibrated once per workspace and LLM, stored with its provenance."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd
import pytest
from echo_llm import EchoBackend, history_signals

from pipelines.workspace import Workspace
from promptenv.calibration import (
    CALIBRATION_ENCOUNTERS,
    CALIBRATION_SEED,
    Calibration,
    calibrated_scorer,
    calibration_path,
    workspace_calibration,
)
from promptenv.evaluate import EvalSettings, evaluate_methods
from promptenv.llm import LLMClient


class OtherEcho(EchoBackend):
    model = "echo-2"


def test_the_workspace_calibrates_once_per_llm_and_records_how(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    ws = Workspace.at(tmp_path)
    backend = EchoBackend()
    client = LLMClient(backend, workspace=ws, use_cache=False)
    said: list[str] = []
    first = workspace_calibration(ws, client, default_tables, progress=said.append)
    n = len(first.encounters)
    assert backend.calls == n >= 20 and first.n_encounters == CALIBRATION_ENCOUNTERS
    assert first.llm == client.label and first.seed == CALIBRATION_SEED
    assert first.when and first.fingerprint and 0 < first.threshold <= 1
    validation = set(
        default_tables["index_encounters"].query("split == 'validation'")["encounter_id"]
    )
    assert set(first.encounters) <= validation  # nothing chosen on test patients
    stored = json.loads(calibration_path(ws, client.label).read_text())
    assert Calibration.from_json(stored) == first

    # the same LLM and data: the stored threshold, no LLM call (the client has no cache)
    again = workspace_calibration(ws, client, default_tables, progress=said.append)
    assert again == first and backend.calls == n
    assert any(f"calibrated on {n} validation encounters" in line for line in said)

    # another LLM gets its own calibration, beside the first
    other = workspace_calibration(ws, LLMClient(OtherEcho(), workspace=ws), default_tables)
    assert other.llm == "local:echo-2" and other.fingerprint != first.fingerprint
    assert workspace_calibration(ws, client, default_tables) == first

    # changed data (a calibration encounter's next plan): calibrated again
    plans = default_tables["plan_items"]
    index = default_tables["index_encounters"].set_index("encounter_id")
    nxt = index.loc[first.encounters[0], "next_encounter_id"]
    changed = {**default_tables, "plan_items": plans[plans["encounter_id"] != nxt]}
    redone = workspace_calibration(ws, client, changed)
    assert redone.fingerprint != first.fingerprint
    assert backend.calls == 2 * n


def test_training_and_evaluation_score_with_the_calibration_they_are_given(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> None:
    backend = EchoBackend()
    client = LLMClient(backend, workspace=tmp_path, use_cache=False)
    _, calibration = calibrated_scorer(client, default_tables, 6)
    given = dataclasses.replace(calibration, threshold=0.99)
    calls = backend.calls
    evaluation = evaluate_methods(
        client,
        default_tables,
        history_signals(default_tables),  # type: ignore[arg-type]
        ["general", "peer"],
        EvalSettings(n_obstetric=2, n_adult=1, bootstrap=20),
        calibration=given,
    )
    assert evaluation.calibration["threshold"] == 0.99
    # one answer per encounter and method, no oracle answers to calibrate
    assert backend.calls - calls == len(evaluation.results)


def test_a_stored_calibration_that_is_not_one_says_what_to_do(tmp_path: Path) -> None:
    from promptenv.calibration import read_calibration

    path = tmp_path / "c.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="delete it"):
        read_calibration(path)


def test_a_subset_the_validation_split_lacks_is_made_up_by_the_other(
    default_tables: dict[str, pd.DataFrame],
) -> None:
    from promptenv.calibration import calibration_encounters, describe
    from promptenv.encounters import pick_encounters

    index = default_tables["index_encounters"]
    usual = calibration_encounters(index, 20)
    assert (usual["in_obstetric"].sum(), usual["in_adult"].sum()) == (10, 10)
    men = index.assign(is_obstetric=False)  # a cohort with no obstetric encounter
    only_adult = calibration_encounters(men, 20)
    assert (only_adult["in_obstetric"].sum(), only_adult["in_adult"].sum()) == (0, 20)
    # topping up keeps the adult encounters chosen without it
    plain = pick_encounters(men, EvalSettings(split="validation", n_obstetric=10, n_adult=10))
    assert len(plain) == 10 and set(plain["encounter_id"]) < set(only_adult["encounter_id"])
    assert describe(only_adult, 20) == (
        f"20 validation encounters (0 obstetric, 20 adult; "
        f"{only_adult['patient_id'].nunique()} patients)"
    )
    # a validation split of two patients holds no more than 3 encounters of each per subset
    two = sorted(index.loc[index["split"] == "validation", "patient_id"].unique())[:2]
    small = men[men["split"].ne("validation") | men["patient_id"].isin(two)]
    few = calibration_encounters(small, 20)
    assert len(few) <= 6 and describe(few, 20).endswith(
        ": 20 were asked, and the validation split has no more at 3 per patient"
    )
