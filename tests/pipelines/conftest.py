"""Fixtures shared by the data-layer tests."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def real_bundle(generated_cohort: Path) -> bytes:
    """The smallest real bundle of the generated cohort."""
    return min((p.read_bytes() for p in generated_cohort.glob("*.json")), key=len)
