"""The canary: identifiers of real cohort patients, planted into their records, never reach a
remote server, over every remote path: answers (system and user messages), calibration,
retries, per-patient search and the judge.

The client is given no per-call identifiers: the guard knows the patients only through
the workspace's deny-list (`pipelines.identifiers`), as in a real run.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import pandas as pd
import pytest
from echo_llm import history_signals
from llm_stub_server import StubLLMServer

from pipelines.identifiers import patient_identifiers, write_identifiers
from pipelines.workspace import Workspace
from promptenv.evaluate import EvalSettings, evaluate_methods
from promptenv.judge import PlanJudge
from promptenv.llm import ClientConfig, LLMClient, RetryPolicy
from promptenv.llm.deny_list import COMMON_WORDS
from promptenv.search import edit_methods

SETTINGS = EvalSettings(n_obstetric=3, n_adult=2, n_calibration=2, bootstrap=20)


#: Synthea-like names (the cohort's tables hold none: file ids, not Synthea's file names)
GIVEN = [
    "Donya",
    "Germaine",
    "Julee",
    "Marisela",
    "Tatyana",
    "Shalonda",
    "Kittie",
    "Ozella",
    "Rosalyn",
    "Ardith",
    "Lavonda",
    "Jacquelin",
    "Wilhelmina",
]
FAMILY = [
    "Schumm",
    "Witting",
    "Prosacco",
    "Kuhlman",
    "Bednar",
    "Hermiston",
    "Gulgowski",
    "Runolfsdottir",
    "Wehner",
    "Okuneva",
    "Bashirian",
    "Tromp",
    "Ziemann",
]


def planted_patient(pid: str, n: int) -> dict[str, object]:
    """A FHIR Patient resource for the ``n``-th cohort patient: a made-up but well-formed
    name, address, telecom and identifiers."""
    given, family = GIVEN[n % len(GIVEN)], FAMILY[(n // len(GIVEN)) % len(FAMILY)]
    return {
        "resourceType": "Patient",
        "id": pid,
        "name": [{"given": [given], "family": family}],
        "telecom": [{"system": "phone", "value": f"(413) 555-{1000 + n:04d}"}],
        "address": [
            {"line": [f"{40 + n} Birchwood Lane"], "city": "Longmeadow", "postalCode": "01106"}
        ],
        "identifier": [{"value": f"MRN-{8000000 + n}"}, {"value": f"999-{10 + n}-{4000 + n}"}],
        "birthDate": "1988-07-23",
    }


def canaries(resource: Mapping[str, object], pid: str) -> list[str]:
    (name,) = resource["name"]  # type: ignore[misc]
    (phone,) = resource["telecom"]  # type: ignore[misc]
    (address,) = resource["address"]  # type: ignore[misc]
    mrn, ssn = (i["value"] for i in resource["identifier"])  # type: ignore[attr-defined]
    return [
        *name["given"],
        name["family"],
        phone["value"][-8:],
        address["line"][0],
        address["city"],
        address["postalCode"],
        mrn.split("-")[1],
        ssn,
        pid,
    ]


def plant(tables: dict[str, pd.DataFrame], resources: dict[str, dict[str, object]]) -> None:
    """Write each patient's identifiers into the displays of her condition events, as a
    careless source system might, so that they land in her prompts."""
    events = tables["events"].copy()
    for pid, r in resources.items():
        (name,) = r["name"]  # type: ignore[misc]
        text = (
            f" (patient {name['given'][0]} {name['family']}, {pid}, "  # type: ignore[index]
            f"MRN {r['identifier'][0]['value']}, SSN {r['identifier'][1]['value']}, "  # type: ignore[index]
            f"tel {r['telecom'][0]['value']}, {r['address'][0]['line'][0]}, "  # type: ignore[index]
            f"{r['address'][0]['city']}, {r['address'][0]['postalCode']}, born July 23, 1988)"  # type: ignore[index]
        )
        mine = (events["patient_id"] == pid) & events["display"].notna()
        events.loc[mine, "display"] = events.loc[mine, "display"] + text
    tables["events"] = events


@pytest.fixture
def planted(
    default_tables: dict[str, pd.DataFrame], tmp_path: Path
) -> tuple[dict[str, pd.DataFrame], Workspace, list[str]]:
    tables = dict(default_tables)
    patients = tables["patients"]
    resources = {pid: planted_patient(pid, n) for n, pid in enumerate(patients["patient_id"])}
    plant(tables, resources)
    ws = Workspace.at(tmp_path / "ws")
    ws.write_table("patients", patients)
    write_identifiers(ws, {pid: patient_identifiers(r) for pid, r in resources.items()})
    words = [c for pid, r in resources.items() for c in canaries(r, pid)]
    return tables, ws, words


def run_every_remote_path(
    tables: dict[str, pd.DataFrame], ws: Workspace, stub: StubLLMServer
) -> None:
    config = ClientConfig(openai_api_key="k", anthropic_api_key="k")
    retry = RetryPolicy(max_attempts=8, base_delay_s=0.001, max_delay_s=0.005, jitter=0.5)
    answers = LLMClient(
        f"anthropic:claude-test@{stub.url}", workspace=ws, config=config, retry=retry
    )
    judge = PlanJudge(
        LLMClient(f"openai:judge@{stub.url}/v1", workspace=ws, config=config, retry=retry)
    )
    evaluate_methods(
        answers,
        tables,
        history_signals(tables),  # type: ignore[arg-type]
        ["general", "oracle", "pmlm_initial"],
        SETTINGS,
        edit_methods=edit_methods(["search_2"], None, max_edits=2),
        judge=judge,
    )


@pytest.fixture
def stub() -> Iterator[StubLLMServer]:
    """The stub answers with the messages it was sent: an identifier that slipped into
    an answer would reach the judge too (and calibration finds what the prompt told)."""
    with StubLLMServer(echo=True) as server:
        yield server


def test_planted_identifiers_never_reach_the_remote_server(
    planted: tuple[dict[str, pd.DataFrame], Workspace, list[str]], stub: StubLLMServer
) -> None:
    tables, ws, words = planted
    stub.inject_faults(rate=0.3, seed=11)
    run_every_remote_path(tables, ws, stub)

    bodies = [json.loads(b) for b in stub.bodies()]
    texts = [json.dumps(b).lower() for b in bodies]
    assert any(b.get("system") for b in bodies)  # system messages were sent...
    assert any("score" in t and "rubric" in t for t in texts)  # ...the judge was asked
    assert len(texts) > 20 and sum("birchwood" in t for t in texts) == 0
    assert any("[name]" in t for t in texts)  # planted text reached prompts, redacted
    retried = {
        r.request_id
        for r in LLMClient("local", workspace=ws).ledger.entries()
        if r.outcome == "retry"
    }
    assert retried  # some requests were retried
    raw = stub.bodies()
    for word in words:
        # as a whole word ("Ella" is not in "rubella"); a name that is also a common word
        # only as a name ("Will", not "the physician will": see `COMMON_WORDS`)
        common = word.lower() in COMMON_WORDS
        pattern = re.compile(
            rf"(?<![A-Za-z0-9]){re.escape(word)}(?![A-Za-z0-9])", 0 if common else re.IGNORECASE
        )
        leaked = [t for t in raw if pattern.search(t)]
        assert not leaked, (word, leaked[0][:300])


def test_without_the_deny_list_the_planted_names_do_reach_it(
    planted: tuple[dict[str, pd.DataFrame], Workspace, list[str]],
    stub: StubLLMServer,
    tmp_path: Path,
) -> None:
    """The control: the canaries are in the prompts, so the test above can fail."""
    tables, _, words = planted
    run_every_remote_path(tables, Workspace.at(tmp_path / "no-deny-list"), stub)
    texts = [b.lower() for b in stub.bodies()]
    names = {w.lower() for w in words[::9]}  # each patient's given name
    assert any(name in t for t in texts for name in names)
