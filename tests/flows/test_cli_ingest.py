"""`pmlm ingest fhir|omop` options, `pmlm run --source`, `pmlm prompts lookup`, on tiny inputs."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from flows.cli import app
from pipelines.errors import InputError, MissingStepError
from pipelines.workspace import Workspace

runner = CliRunner()

PATIENT = "a1b2c3d4-0000-0000-0000-000000000001"
SNOMED = "http://snomed.info/sct"


def _note(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def spanish_bundle(patient: str = PATIENT) -> dict[str, Any]:
    """One patient, two visits, each with a procedure and a Spanish note: its plan is under
    ``# Plan de tratamiento``, a header the default parser does not know."""
    subject = {"reference": f"urn:uuid:{patient}"}
    resources: list[dict[str, Any]] = [
        {"resourceType": "Patient", "id": patient, "gender": "female", "birthDate": "1990-02-03"}
    ]
    for i, day in enumerate(("2020-01-01", "2020-02-01")):
        enc = f"{patient}-e{i}"
        ref = {"reference": f"urn:uuid:{enc}"}
        resources += [
            {
                "resourceType": "Encounter",
                "id": enc,
                "subject": subject,
                "class": {"code": "AMB"},
                "type": [
                    {"coding": [{"system": SNOMED, "code": "424441002", "display": "Visita"}]}
                ],
                "period": {"start": f"{day}T10:00:00+00:00", "end": f"{day}T11:00:00+00:00"},
            },
            {
                "resourceType": "Procedure",
                "id": f"proc-{patient}-{i}",
                "subject": subject,
                "encounter": ref,
                "code": {
                    "coding": [
                        {"system": SNOMED, "code": "252160004", "display": "prueba de embarazo"}
                    ]
                },
                "performedDateTime": f"{day}T10:10:00+00:00",
            },
            {
                "resourceType": "DocumentReference",
                "id": f"note-{patient}-{i}",
                "subject": subject,
                "date": f"{day}T10:00:00+00:00",
                "context": {"encounter": [ref]},
                "content": [
                    {
                        "attachment": {
                            "contentType": "text/plain",
                            "data": _note(
                                "# Motivo de consulta\nControl.\n\n# Plan de tratamiento\n"
                                "Se realizaron los siguientes procedimientos:\n"
                                "- prueba de embarazo\n"
                            ),
                        }
                    }
                ],
            },
        ]
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in resources],
    }


def bundles_folder(root: Path) -> Path:
    """Two patients' bundles in a nested folder, as EHDS exports write them."""
    folder = root / "fhir"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "a.json").write_text(json.dumps(spanish_bundle()))
    other = PATIENT[:-1] + "9"
    (folder / "b.json").write_text(json.dumps(spanish_bundle(other)))
    return folder


def _one_line_error(result: Any, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    assert result.output.startswith("error: ") and len(result.output.strip().splitlines()) == 1
    for needle in needles:
        assert needle in result.output, result.output


def test_ingest_fhir_format_plans_and_plan_headers(tmp_path: Path) -> None:
    folder = bundles_folder(tmp_path)
    ws = tmp_path / "ws"
    base = ["ingest", "fhir", str(folder), "-w", str(ws), "--workers", "1"]
    plain = runner.invoke(app, [*base, "--format", "bundles", "--plans", "notes"])
    assert plain.exit_code == 0, plain.output
    summary = json.loads((ws / "manifest.json").read_text())["steps"]["ingest"]["summary"]
    assert summary["patients"] == 2 and summary["reference_plans"] == 0
    # never a silent zero: the summary says why, and what to pass
    assert "--plan-header" in summary["remark"] and "--plan-header" in plain.output
    spanish = runner.invoke(
        app,
        [
            *base,
            "--plans",
            "notes",
            "--plan-header",
            "Plan",
            "--plan-header",
            "Plan de tratamiento",
        ],
    )
    assert spanish.exit_code == 0, spanish.output
    summary = json.loads((ws / "manifest.json").read_text())["steps"]["ingest"]["summary"]
    assert summary["reference_plans"] == 4 and summary["plan_sources"] == {"note": 4}
    items = pd.read_parquet(ws / "tables" / "plan_items.parquet")
    assert set(items["item_key"]) == {f"{SNOMED}|252160004"}  # resolved to the coded event
    assert summary["index_encounters"] == 2
    orders = runner.invoke(app, [*base, "--plans", "orders"])
    assert orders.exit_code == 0, orders.output
    summary = json.loads((ws / "manifest.json").read_text())["steps"]["ingest"]["summary"]
    assert summary["plan_sources"] == {"events": 4}
    assert "from orders recorded at the visit" in orders.output  # the summary says where


def test_bad_ingest_options_are_one_line_errors(tmp_path: Path) -> None:
    folder = bundles_folder(tmp_path)
    ws = tmp_path / "ws"
    base = ["ingest", "fhir", str(folder), "-w", str(ws)]
    _one_line_error(runner.invoke(app, [*base, "--format", "xml"]), InputError.exit_code, "'xml'")
    _one_line_error(
        runner.invoke(app, [*base, "--plans", "soap"]), InputError.exit_code, "--plans", "'soap'"
    )
    _one_line_error(
        runner.invoke(app, [*base, "--plan-header", " "]), InputError.exit_code, "--plan-header"
    )
    _one_line_error(
        runner.invoke(app, ["ingest", "fhir", str(tmp_path / "nowhere"), "-w", str(ws)]),
        InputError.exit_code,
        "does not exist",
    )
    _one_line_error(
        runner.invoke(app, ["ingest", "omop", str(folder), "--cdm-schema", "cdm", "-w", str(ws)]),
        InputError.exit_code,
        "--cdm-schema is for a database URL",
    )
    assert not (ws / "tables").exists()


def test_ingest_omop_takes_a_url_and_its_schema(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A SQLAlchemy URL reaches the reader as a URL (not a Path) with --cdm-schema."""
    import pipelines.ingest

    seen: dict[str, Any] = {}
    real = pipelines.ingest.ingest_omop
    cdm = tmp_path / "cdm"
    cdm.mkdir()
    (cdm / "person.csv").write_text("person_id,gender_concept_id,year_of_birth\n17,8532,1990\n")

    def fake(ws: Workspace, where: Any, **kwargs: Any) -> dict[str, Any]:
        seen.update(where=where, **kwargs)
        return real(ws, cdm, split_seed=kwargs["split_seed"])

    monkeypatch.setattr(pipelines.ingest, "ingest_omop", fake)
    url = "postgresql://pmlm:secret@db.example.org/ehr"
    args = ["ingest", "omop", url, "--cdm-schema", "cdm", "--plans", "orders", "-w", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert seen["where"] == url and isinstance(seen["where"], str)
    assert seen["cdm_schema"] == "cdm" and seen["plans"] == "orders"
    assert "secret" not in result.output and "db.example.org/ehr" in result.output


def test_ingest_omop_of_an_unreachable_server_is_one_line(tmp_path: Path) -> None:
    url = "postgresql://nobody@127.0.0.1:9/nothing"
    result = runner.invoke(app, ["ingest", "omop", url, "--cdm-schema", "cdm", "-w", str(tmp_path)])
    _one_line_error(result, InputError.exit_code, "--cdm-schema")


def _fake_outcome(summary: dict[str, Any], ws: Path) -> SimpleNamespace:
    from flows.tasks import PolicyOutcome
    from promptenv.policy_info import TrainingSummary

    ns = SimpleNamespace
    return ns(
        build=ns(summary=summary, recommender="popularity"),
        policy=PolicyOutcome("v0", ws / "models" / "policy", TrainingSummary()),
        refined=ns(
            rows=0, recomputed_patients=0, patients=0, path=ws / "tables" / "prompts.parquet"
        ),
        evaluation=ns(
            llm="stub",
            table=[],
            verdict="",
            markdown="| method |",
            report=ws / "reports" / "x.md",
        ),
        export=ns(manifest=ws / "export" / "prompts.manifest.json"),
    )


def test_run_source_reaches_prepare_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pmlm run --source fhir:PATH` hands the source to the flow, whose first step is
    `prepare_source` (the flow itself, with its LLM, is tested in test_cli.py)."""
    import flows.pipeline
    from pipelines.steps import prepare_source

    folder = bundles_folder(tmp_path)
    seen: list[str] = []

    def fake_pipeline(workspace: str, source: str, **_: Any) -> SimpleNamespace:
        seen.append(source)
        summary = prepare_source(Workspace.at(workspace), source)
        return _fake_outcome(summary, Path(workspace))

    monkeypatch.setattr(flows.pipeline, "pmlm_pipeline", fake_pipeline)
    ws = tmp_path / "ws"
    result = runner.invoke(app, ["run", "-w", str(ws), "--source", f"fhir:{folder}"])
    assert result.exit_code == 0, result.output
    assert seen == [f"fhir:{folder}"]
    header = " ".join(result.output.split())
    assert f"PMLM main job on the FHIR input {folder}" in header
    assert "built-in default cohort" not in header
    manifest = json.loads((ws / "manifest.json").read_text())
    assert manifest["steps"]["ingest"]["input"] == f"fhir:{folder}"
    assert manifest["steps"]["ingest"]["summary"]["patients"] == 2
    # the tables of an earlier ingest, kept as they are
    again = runner.invoke(app, ["run", "-w", str(ws), "--source", "workspace"])
    assert again.exit_code == 0 and seen[-1] == "workspace"
    assert "the tables already in the workspace" in " ".join(again.output.split())


def test_run_with_a_bad_source_is_one_line_before_any_flow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.pipeline

    def never(**_: Any) -> None:
        raise AssertionError("the flow must not start")

    monkeypatch.setattr(flows.pipeline, "pmlm_pipeline", never)
    for bad in ("fhir", "csv:/data", "default:x"):
        result = runner.invoke(app, ["run", "-w", str(tmp_path), "--source", bad])
        _one_line_error(result, InputError.exit_code, "unknown data source", "fhir:PATH")
    # an OMOP URL's password never reaches the header line
    from pipelines.steps import describe_source

    assert describe_source("omop:postgresql://u:pw@h/db") == "the OMOP CDM postgresql://u:***@h/db"
    assert describe_source("omop") == "the OMOP CDM Eunomia"


def test_lookup_finds_the_pseudonym_and_the_prompt_rows(tmp_path: Path) -> None:
    from promptenv.prompt_table.build import PROMPTS_SCHEMA

    folder = bundles_folder(tmp_path)
    ws = tmp_path / "ws"
    assert (
        runner.invoke(
            app, ["ingest", "fhir", str(folder), "-w", str(ws), "--workers", "1"]
        ).exit_code
        == 0
    )
    result = runner.invoke(app, ["prompts", "lookup", PATIENT, "-w", str(ws)])
    assert result.exit_code == 0, result.output
    pseudonyms = pd.read_parquet(ws / "private" / "crosswalk.parquet").set_index("source_id")
    mine = pseudonyms.loc[PATIENT, "patient_id"]
    assert f"fhir {PATIENT} -> {mine}" in result.output
    assert "No prompt table yet" in result.output
    # a prompt table with her row and another patient's: only hers is shown
    now = pd.Timestamp("2020-02-01T11:00", tz="UTC")
    rows = [
        {
            "encounter_id": f"e-{pid}",
            "patient_id": pid,
            "index_time": now,
            "method": "pmlm_initial",
            "config": "{}",
            "system": "text",
            "question": "q",
            "tokens": 7,
            "provenance": "{}",
            "recommender": "blend",
            "created_at": now,
        }
        for pid in (mine, "pffffffffffffffff")
    ]
    pq.write_table(
        pa.Table.from_pylist(rows, schema=PROMPTS_SCHEMA), ws / "tables" / "prompts.parquet"
    )
    shown = runner.invoke(
        app, ["prompts", "lookup", PATIENT, "-w", str(ws), "--source-system", "fhir"]
    )
    assert shown.exit_code == 0, shown.output
    assert "1 prompt rows" in shown.output and f"e-{mine}" in shown.output
    assert "pffffffffffffffff" not in shown.output
    _one_line_error(
        runner.invoke(app, ["prompts", "lookup", "nobody", "-w", str(ws)]),
        InputError.exit_code,
        "no patient with source id 'nobody'",
    )
    _one_line_error(
        runner.invoke(
            app, ["prompts", "lookup", PATIENT, "-w", str(ws), "--source-system", "omop"]
        ),
        InputError.exit_code,
        "source system 'omop'",
    )
    _one_line_error(
        runner.invoke(app, ["prompts", "lookup", PATIENT, "-w", str(tmp_path / "empty")]),
        MissingStepError.exit_code,
        "pmlm ingest",
    )


def test_plan_headers_from_the_environment_or_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import typer

    from flows.config import cli_defaults

    folder = bundles_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PMLM_PLAN_HEADER", '["Plan de tratamiento"]')
    defaults = cli_defaults(typer.main.get_command(app))
    assert defaults["ingest"]["fhir"]["plan_header"] == ["Plan de tratamiento"]
    ws = tmp_path / "ws"
    args = ["ingest", "fhir", str(folder), "-w", str(ws), "--workers", "1", "--plans", "notes"]
    result = runner.invoke(app, args, default_map=defaults)
    assert result.exit_code == 0, result.output
    summary = json.loads((ws / "manifest.json").read_text())["steps"]["ingest"]["summary"]
    assert summary["plan_sources"] == {"note": 4}
    monkeypatch.delenv("PMLM_PLAN_HEADER")
    (tmp_path / "pmlm.toml").write_text('plan-header = ["Plan", "Plan de tratamiento"]\n')
    defaults = cli_defaults(typer.main.get_command(app))
    assert defaults["ingest"]["omop"]["plan_header"] == ["Plan", "Plan de tratamiento"]


def bulk_export(root: Path) -> Path:
    """The two patients of `bundles_folder` as a Bulk Data export (one NDJSON file per
    resource type, ``Type/id`` references, a manifest); returns the manifest's path."""
    root.mkdir(parents=True)
    lines: dict[str, list[str]] = {}
    for patient in (PATIENT, PATIENT[:-1] + "9"):
        entries = [e["resource"] for e in spanish_bundle(patient)["entry"]]
        text = json.dumps(entries)
        for r in entries:  # urn:uuid:ID → Type/ID
            text = text.replace(f'"urn:uuid:{r["id"]}"', f'"{r["resourceType"]}/{r["id"]}"')
        for r in json.loads(text):
            lines.setdefault(r["resourceType"], []).append(json.dumps(r))
    for rtype, rows in lines.items():
        (root / f"{rtype}.ndjson").write_text("\n".join(rows) + "\n")
    outputs = [{"type": t, "url": f"https://ehr.example.org/files/{t}.ndjson"} for t in lines]
    (root / "manifest.json").write_text(json.dumps({"output": outputs}))
    return root / "manifest.json"


def test_ingest_fhir_of_a_bulk_export_by_folder_or_manifest(tmp_path: Path) -> None:
    manifest = bulk_export(tmp_path / "bulk")
    headers = ["--plan-header", "Plan de tratamiento"]
    for i, (path, fmt) in enumerate(((manifest, "auto"), (manifest.parent, "bulk"))):
        ws = tmp_path / f"ws{i}"
        args = ["ingest", "fhir", str(path), "--format", fmt, "-w", str(ws), "--workers", "1"]
        result = runner.invoke(app, [*args, *headers])
        assert result.exit_code == 0, result.output
        summary = json.loads((ws / "manifest.json").read_text())["steps"]["ingest"]["summary"]
        assert summary["patients"] == 2 and summary["plan_sources"] == {"note": 4}
        assert summary["quarantined"] == 0
    wrong = runner.invoke(
        app, ["ingest", "fhir", str(manifest.parent), "--format", "bundles", "-w", str(tmp_path)]
    )
    _one_line_error(wrong, InputError.exit_code, "holds no *.json FHIR bundles")


def test_run_forwards_the_ingest_options_to_prepare_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`pmlm run --source fhir:PATH --plans notes --plan-header ...` reaches the ingest: the
    Spanish notes' plans are found only with the header given."""
    import flows.pipeline
    from pipelines.steps import prepare_source

    folder = bundles_folder(tmp_path)
    seen: list[dict[str, Any]] = []

    def fake_pipeline(workspace: str, source: str, **kwargs: Any) -> SimpleNamespace:
        seen.append(kwargs["ingest"])
        summary = prepare_source(Workspace.at(workspace), source, **kwargs["ingest"])
        return _fake_outcome(summary, Path(workspace))

    monkeypatch.setattr(flows.pipeline, "pmlm_pipeline", fake_pipeline)
    ws = tmp_path / "ws"
    base = ["run", "-w", str(ws), "--source", f"fhir:{folder}", "--format", "bundles"]
    result = runner.invoke(app, [*base, "--plans", "notes", "--plan-header", "Plan de tratamiento"])
    assert result.exit_code == 0, result.output
    assert seen[-1] == {
        "fmt": "bundles",
        "plans": "notes",
        "plan_headers": ("Plan de tratamiento",),
        "cdm_schema": None,
    }
    summary = json.loads((ws / "manifest.json").read_text())["steps"]["ingest"]["summary"]
    assert summary["reference_plans"] == 4 and summary["plan_sources"] == {"note": 4}
    orders = runner.invoke(app, [*base, "--plans", "orders"])
    assert orders.exit_code == 0, orders.output
    summary = json.loads((ws / "manifest.json").read_text())["steps"]["ingest"]["summary"]
    assert summary["plan_sources"] == {"events": 4}


def test_run_refuses_an_ingest_option_of_another_source_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flows.pipeline

    def never(**_: Any) -> None:
        raise AssertionError("the flow must not start")

    monkeypatch.setattr(flows.pipeline, "pmlm_pipeline", never)
    base = ["run", "-w", str(tmp_path), "--source"]
    cases = [
        (["fhir:/data", "--cdm-schema", "cdm"], "--cdm-schema does not apply", "omop:"),
        (["omop:/cdm.duckdb", "--format", "bulk"], "--format does not apply", "fhir:"),
        (["default", "--plans", "orders"], "--plans does not apply", "fhir: and omop:"),
        (["workspace", "--plan-header", "Plan"], "--plan-header does not apply", "pmlm ingest"),
        (["fhir:/data", "--plans", "soap"], "--plans must be one of", "'soap'"),
    ]
    for args, *needles in cases:
        _one_line_error(runner.invoke(app, [*base, *args]), InputError.exit_code, *needles)
    assert not (tmp_path / "tables").exists()


def test_the_main_job_flows_hand_the_ingest_options_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pmlm_pipeline → build → prepare_cohort → prepare_source, each passing ``ingest`` on."""
    import logging

    import flows.pipeline
    import flows.tasks
    import pipelines.steps

    options = {"plans": "orders", "plan_headers": None, "fmt": "bundles", "cdm_schema": None}
    seen: dict[str, Any] = {}

    class Stop(Exception):
        pass

    def fake_build(*args: Any, **kwargs: Any) -> None:
        seen["build"] = kwargs["ingest"]
        raise Stop

    real_build = flows.pipeline.build
    monkeypatch.setattr(flows.pipeline, "build", fake_build)
    with pytest.raises(Stop):
        flows.pipeline.pmlm_pipeline.fn(workspace=str(tmp_path), ingest=options)
    assert seen["build"] == options

    def fake_prepare_cohort(ws: str, source: str, split_seed: int, ingest: Any) -> None:
        seen["prepare_cohort"] = ingest
        raise Stop

    monkeypatch.setattr(flows.pipeline, "get_run_logger", lambda: logging.getLogger("t"))
    monkeypatch.setattr(flows.pipeline, "prepare_cohort", fake_prepare_cohort)
    with pytest.raises(Stop):
        real_build.fn(workspace=str(tmp_path), source="fhir:x", ingest=options)
    assert seen["prepare_cohort"] == options

    def fake_prepare_source(ws: Workspace, source: str, split_seed: int, **kw: Any) -> Any:
        seen["prepare_source"] = kw
        return {}

    monkeypatch.setattr(pipelines.steps, "prepare_source", fake_prepare_source)
    flows.tasks.prepare_cohort.fn(str(tmp_path), "fhir:x", 0, options)
    assert seen["prepare_source"] == options
