"""Parsing the "Assessment and Plan" of notes into reference plan items."""

from __future__ import annotations

import pandas as pd

from pipelines.plans import assessment_and_plan, parse_plan, plans_from_notes, plans_from_orders

NOTE = """2001-08-26

# Chief Complaint
No complaints.

# Assessment and Plan
Patient is presenting with normal pregnancy (finding).

## Plan
The following procedures were conducted:
- evaluation of uterine fundal height (procedure)
- auscultation of the fetal heart (procedure)
Patient was given the following immunizations: hep b, adolescent or pediatric, influenza, seasonal, injectable, preservative free.
The following lab reports were completed:
- cbc panel - blood by automated count
The patient was prescribed the following medications:
- prenatal multivitamin
The patient was placed on a careplan:
- routine antenatal care (regime/therapy)

# Follow-up
Return in four weeks.
"""


def test_section_stops_at_next_top_heading() -> None:
    section = assessment_and_plan(NOTE)
    assert section is not None
    assert section.startswith("Patient is presenting")
    assert "Return in four weeks" not in section
    assert assessment_and_plan("# Chief Complaint\nnone") is None


def test_items_and_kinds() -> None:
    known = {
        "immunization": [
            "Hep B, adolescent or pediatric",
            "Influenza, seasonal, injectable, preservative free",
        ]
    }
    plan = parse_plan(NOTE, known)
    assert plan.items == (
        ("procedure", "evaluation of uterine fundal height (procedure)"),
        ("procedure", "auscultation of the fetal heart (procedure)"),
        ("immunization", "hep b, adolescent or pediatric"),
        ("immunization", "influenza, seasonal, injectable, preservative free"),
        ("lab", "cbc panel - blood by automated count"),
        ("medication", "prenatal multivitamin"),
        ("careplan", "routine antenatal care (regime/therapy)"),
    )


def test_inline_list_without_known_displays_splits_on_commas() -> None:
    plan = parse_plan(
        "# Assessment and Plan\n## Plan\nPatient was given the following immunizations: a, b.\n"
    )
    assert plan.items == (("immunization", "a"), ("immunization", "b"))


def test_no_orders_gives_an_empty_plan() -> None:
    plan = parse_plan(
        "# Assessment and Plan\nRoutine visit.\n\n## Plan\nNo orders placed at this visit.\n"
    )
    assert plan.text.startswith("Routine visit.")
    assert plan.items == ()


def _events(rows: list[tuple[str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "event_id": f"e{i}",
                "patient_id": "p1",
                "encounter_id": enc,
                "time": pd.Timestamp("2020-01-01", tz="UTC"),
                "kind": kind,
                "code_system": "http://snomed.info/sct",
                "code": code,
                "display": display,
            }
            for i, (enc, kind, code, display) in enumerate(rows)
        ]
    )


def test_items_resolve_to_codes_of_the_same_encounter() -> None:
    notes = pd.DataFrame(
        [
            {
                "note_id": "n1",
                "patient_id": "p1",
                "encounter_id": "E1",
                "time": pd.Timestamp("2020-01-01", tz="UTC"),
                "text": NOTE,
            }
        ]
    )
    events = _events(
        [
            ("E1", "procedure", "274804006", "Evaluation of uterine fundal height (procedure)"),
            (
                "E2",
                "procedure",
                "999",
                "Auscultation of the fetal heart (procedure)",
            ),  # another encounter
        ]
    )
    plans, items = plans_from_notes(notes, events)
    assert (
        plans.iloc[0]["n_items"] == len(items) == 11
    )  # the inline list falls back to ", " splitting
    keys = dict(zip(items["display"], items["item_key"], strict=True))
    assert (
        keys["evaluation of uterine fundal height (procedure)"]
        == "http://snomed.info/sct|274804006"
    )
    assert (
        keys["auscultation of the fetal heart (procedure)"]
        == "text|auscultation of the fetal heart (procedure)"
    )
    assert list(items["position"]) == list(range(11))


def test_plans_from_orders_when_there_are_no_notes() -> None:
    events = _events(
        [
            ("E1", "procedure", "1", "Pap smear"),
            ("E1", "procedure", "1", "Pap smear"),  # recorded twice, one item
            ("E1", "condition", "2", "Hypertension"),  # a diagnosis is not an order
            ("E2", "medication", "3", "Folic acid"),
        ]
    )
    encounters = pd.DataFrame(
        {
            "encounter_id": ["E1", "E2"],
            "start": pd.to_datetime(["2020-01-01", "2020-02-01"], utc=True),
        }
    )
    plans, items = plans_from_orders(events, encounters)
    assert list(plans["encounter_id"]) == ["E1", "E2"]
    assert list(plans["n_items"]) == [1, 1]
    assert plans.iloc[0]["plan_text"].endswith("- Pap smear")
    assert set(plans["plan_source"]) == {"events"}
    assert list(items["kind"]) == ["procedure", "medication"]


SPANISH = """2024-03-02

# Motivo de consulta
Control prenatal.

# Plan de tratamiento
Se realizaron los siguientes procedimientos:
- ecografía obstétrica
Se prescribieron los siguientes medicamentos:
- ácido fólico 5 mg

# Seguimiento
Volver en cuatro semanas.
"""


def test_spanish_plan_headers_parse_when_configured() -> None:
    # the default headers are Synthea's: a Spanish note gives no plan ...
    assert assessment_and_plan(SPANISH) is None
    assert parse_plan(SPANISH).items == ()
    # ... the configured ones do, and the section stops at the next heading of its level
    plan = parse_plan(SPANISH, headers=["Plan", "Plan de tratamiento"])
    assert plan.items == (
        ("procedure", "ecografía obstétrica"),
        ("medication", "ácido fólico 5 mg"),
    )
    assert "Volver" not in plan.text


def test_a_bare_plan_line_and_a_sub_heading_are_plan_headers() -> None:
    plain = "Paciente estable.\nPlan:\n- control de glucemia\n"
    assert parse_plan(plain, headers=["Plan"]).items == (("other", "control de glucemia"),)
    nested = "# Evaluación y plan\nEmbarazo normal.\n## Plan\n- vacuna antigripal\n"
    plan = parse_plan(nested, headers=("Evaluación y plan", "plan:"))
    assert plan.items == (("other", "vacuna antigripal"),)  # read after the sub-heading
    assert plan.text.startswith("Embarazo normal.")


def test_empty_plan_header_is_refused() -> None:
    import pytest

    from pipelines.plans import plan_headers

    with pytest.raises(ValueError, match="--plan-header"):
        plan_headers(["  "])
    assert plan_headers(None) == ("Assessment and Plan", "Plan")


def test_the_summary_says_why_no_plan_was_derived() -> None:
    from pipelines.ingest import no_plan_reason

    notes = pd.DataFrame({"note_id": ["n1"], "text": [SPANISH]})
    events = pd.DataFrame({"encounter_id": pd.Series([], dtype=object), "kind": []})
    reason = no_plan_reason({"notes": notes, "events": events}, None)
    assert "'Assessment and Plan' or 'Plan'" in reason and "--plan-header" in reason
    reason = no_plan_reason({"notes": notes, "events": events}, ["Plan de tratamiento"])
    assert "'Plan de tratamiento'" in reason
