"""Fixtures shared by the data-layer tests."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def real_bundle(generated_cohort: Path) -> bytes:
    """The smallest real bundle of the generated cohort."""
    return min((p.read_bytes() for p in generated_cohort.glob("*.json")), key=len)


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server started for this test run (`postgres.postgres_server`).

    Without PostgreSQL the test fails in CI (``CI=true``: `.ci/run` installs it) and is
    skipped elsewhere, saying how to install it.
    """
    from postgres import postgres_server, server_binaries

    binaries = server_binaries()
    if binaries is None:
        message = "PostgreSQL is not installed: apt-get install postgresql"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (.ci/run does this)")
        pytest.skip(message)
    with postgres_server(binaries) as url:
        yield url


@pytest.fixture(autouse=True, scope="session")
def shared_salt() -> Iterator[None]:
    """One pseudonym salt for every workspace of the data-layer tests, so that the
    tables of two workspaces (in memory and staged, say) can be compared, set before
    any module fixture reads. `test_identity` unsets it where it tests the secret."""
    before = os.environ.get("PMLM_PSEUDONYM_SALT")
    os.environ["PMLM_PSEUDONYM_SALT"] = "pmlm-tests"
    yield
    if before is None:
        del os.environ["PMLM_PSEUDONYM_SALT"]
    else:
        os.environ["PMLM_PSEUDONYM_SALT"] = before
