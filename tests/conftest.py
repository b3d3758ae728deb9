"""Fixtures shared by every test package: the default cohort and a small generated one."""

from __future__ import annotations

import functools
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with the longest tests first (stable: a file's tests keep their order).

    pytest-xdist (``--dist loadfile``) hands files out one at a time in this order; a long
    file collected last (the notebooks) would leave one worker alone at the end. The cost
    of a file is the sum of its ``slow`` tests' ``seconds`` (measured alone; 30 unless
    given).
    """
    cost: dict[Path, float] = {}
    for item in items:
        marker = item.get_closest_marker("slow")
        if marker is not None:
            cost[item.path] = cost.get(item.path, 0.0) + float(marker.kwargs.get("seconds", 30))
    items.sort(key=lambda item: -cost.get(item.path, 0.0))


@pytest.fixture(scope="session")
def default_tables() -> dict[str, pd.DataFrame]:
    """Every canonical table of the built-in default cohort (derived in memory, read-only)."""
    from pipelines.cohort import load_snapshot
    from pipelines.ingest import derive

    return derive(load_snapshot())


@contextmanager
def _made_once(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[tuple[Path, bool]]:
    """A folder made once per test run, even by several pytest-xdist workers.

    Yields ``(folder, made_before)``; the caller fills the folder when ``made_before``
    is False. Other workers wait on a file lock and get it finished: read-only, copy
    it to change it. A failure leaves no half-made folder for the others.
    """
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this run's folder, above every worker's own
    folder, complete = base / name, base / f"{name}.complete"
    with FileLock(str(base / f"{name}.lock")):
        if complete.exists():
            yield folder, True
            return
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        yield folder, False
        complete.touch()


@pytest.fixture(scope="session")
def made_once(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[[str], AbstractContextManager[tuple[Path, bool]]]:
    """``with made_once(name) as (folder, made_before)``: see `_made_once`."""
    return functools.partial(_made_once, tmp_path_factory)


@pytest.fixture(scope="session")
def generated_cohort(
    made_once: Callable[[str], AbstractContextManager[tuple[Path, bool]]],
) -> Path:
    """A 30-woman Synthea cohort generated for this test run (seeded, ~1 min)."""
    from pipelines.cohort import CohortSpec, generate_cohort

    with made_once("synthea-30") as (out, made_before):
        fhir_dir, reused = generate_cohort(CohortSpec(n=30, seed=7), out / "cohort")
        assert reused == made_before
    return fhir_dir


#: Variables a command sets for its own process (``--wait``, the budget scope, ``--llm-parallel``);
#: in-process CLI tests must not leave them to the tests that follow on the same worker.
PROCESS_WIDE_ENV = ("PMLM_LOCK_WAIT", "PMLM_BUDGET_SCOPE", "PMLM_LLM_PARALLEL")


@pytest.fixture(autouse=True)
def _restore_process_wide_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in PROCESS_WIDE_ENV:
        # set, then delete: monkeypatch then restores the value from before the test
        # (absent included) whatever the test's commands set meanwhile
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
