"""`pipelines.steps`: which ingest options each source takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.errors import InputError
from pipelines.steps import SOURCE_OPTIONS, check_source_options, prepare_source
from pipelines.workspace import Workspace


def test_each_source_takes_its_own_options_and_refuses_the_others() -> None:
    given = {
        "--format": {"fmt": "bulk"},
        "--plans": {"plans": "orders"},
        "--plan-header": {"plan_headers": ["Plan"]},
        "--cdm-schema": {"cdm_schema": "cdm"},
    }
    sources = {"fhir": "fhir:/x", "omop": "omop:/x.duckdb", "default": "default"}
    sources["workspace"] = "workspace"
    for kind, source in sources.items():
        for option, kwargs in given.items():
            if option in SOURCE_OPTIONS[kind]:
                check_source_options(source, **kwargs)  # type: ignore[arg-type]
            else:
                with pytest.raises(InputError, match=f"^{option} does not apply to --source"):
                    check_source_options(source, **kwargs)  # type: ignore[arg-type]
    # the defaults are not "given": every source takes them
    for source in sources.values():
        check_source_options(source, fmt="auto", plans="auto", plan_headers=[], cdm_schema=None)


def test_prepare_source_refuses_before_reading_anything(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    with pytest.raises(InputError, match="--cdm-schema does not apply to --source fhir:"):
        prepare_source(ws, f"fhir:{tmp_path / 'absent'}", cdm_schema="cdm")
    with pytest.raises(InputError, match="--plans does not apply to --source default"):
        prepare_source(ws, "default", plans="notes")
    with pytest.raises(InputError, match="--plans must be one of"):
        prepare_source(ws, f"fhir:{tmp_path / 'absent'}", plans="soap")
    assert not (tmp_path / "ws" / "tables").exists()
