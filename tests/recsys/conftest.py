"""Fixtures of the recommender tests: small seeded synthetic cohorts (no real data needed)."""

from __future__ import annotations

import pandas as pd
import pytest
from synthetic_cohort import synthetic_cohort

from recsys.interactions import CohortTables, PatientStates, build_dataset

#: Small, fast settings per model, used wherever a test fits every model.
FAST_PARAMS: dict[str, dict[str, object]] = {
    "popularity": {},
    "repeat_previous": {},
    "lightfm": {"no_components": 8, "epochs": 5},
    "als": {"factors": 8, "iterations": 5},
    "bpr": {"factors": 8, "iterations": 20},
    "item_knn": {"K": 50},
    "blend": {
        "components": ["als", "repeat_previous"],
        "weights": [0.7, 0.3],
        "component_params": [{"factors": 8, "iterations": 5}, {}],
    },
}


@pytest.fixture(scope="session")
def fast_params() -> dict[str, dict[str, object]]:
    """FAST_PARAMS as a fixture (test modules do not import conftest)."""
    return FAST_PARAMS


@pytest.fixture(scope="session")
def cohort_frames() -> dict[str, pd.DataFrame]:
    """A 40-patient synthetic cohort in the canonical tables (read-only: copy to modify)."""
    return synthetic_cohort(n_patients=40, seed=11)


@pytest.fixture(scope="session")
def cohort_tables(cohort_frames: dict[str, pd.DataFrame]) -> CohortTables:
    return CohortTables.from_frames(cohort_frames)


@pytest.fixture(scope="session")
def states(cohort_tables: CohortTables) -> PatientStates:
    """Every index encounter of the synthetic cohort, vocabulary from its train patients."""
    return build_dataset(cohort_tables)


@pytest.fixture(scope="session")
def train(states: PatientStates) -> PatientStates:
    return states.split("train")


@pytest.fixture(scope="session")
def unseen(states: PatientStates) -> PatientStates:
    """Validation and test states: patients no model is trained on."""
    return states.subset(states.keys["split"].isin(["validation", "test"]).to_numpy())
