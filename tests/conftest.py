"""Fixtures shared by every test package: the default cohort and a small generated one."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def default_tables() -> dict[str, pd.DataFrame]:
    """Every canonical table of the built-in default cohort (derived in memory, read-only)."""
    from pipelines.cohort import load_snapshot
    from pipelines.ingest import derive

    return derive(load_snapshot())


@pytest.fixture(scope="session")
def generated_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 30-woman Synthea cohort generated for this test session (seeded, ~1 min)."""
    from pipelines.cohort import CohortSpec, generate_cohort

    out = tmp_path_factory.mktemp("synthea-30")
    fhir_dir, reused = generate_cohort(CohortSpec(n=30, seed=7), out / "cohort")
    assert not reused
    return fhir_dir
