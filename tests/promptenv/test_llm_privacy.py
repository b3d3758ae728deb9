"""The privacy guard: detection, redaction, refusal, and a canary through real HTTP requests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import pytest
from llm_stub_server import StubLLMServer

from promptenv.llm import (
    ClientConfig,
    GenerationParams,
    GenerationRequest,
    IdentifierDetector,
    KnownIdentifiers,
    LLMClient,
    PrivacyPolicy,
    PrivacyViolation,
    RetryPolicy,
)
from promptenv.llm.backends import BackendReply
from promptenv.llm.types import ChatMessage

PARAMS = GenerationParams(max_tokens=16)

# A patient record as a data pipeline would hold it; every value marked here is a
# direct identifier that must never leave the machine.
RECORD = {
    "patient_id": "8c1f5e2a-47b9-4d3e-9a61-2f0b7c4d9e15",
    "mrn": "MRN-00482913",
    "name": "Maria Gonzalez-Ortiz",
    "birth_date": "1988-07-23",
    "address": "42 Birchwood Lane, Springfield, MA 01103",
    "phone": "(413) 555-0172",
    "email": "maria.g.ortiz@example.net",
    "ssn": "078-05-1120",
    "last_visit": "2024-02-14",
    "gestational_age_weeks": 28,
    "conditions": ["gestational diabetes", "anemia"],
    "medications": ["ferrous sulfate 325 mg", "insulin glargine"],
}
CANARIES = [
    "8c1f5e2a-47b9-4d3e-9a61-2f0b7c4d9e15",
    "00482913",
    "Maria",
    "Gonzalez",
    "Ortiz",
    "1988-07-23",
    "Birchwood",
    "Springfield",
    "01103",
    "555-0172",
    "maria.g.ortiz",
    "078-05-1120",
    "2024-02-14",
    "07/23/1988",
]


def record_prompt(record: Mapping[str, object]) -> str:
    """A careless prompt builder that writes the whole record into the prompt."""
    return (
        f"Patient {record['name']} (MRN {record['mrn']}, id {record['patient_id']}), born "
        f"{record['birth_date']} (07/23/1988), lives at {record['address']}; phone "
        f"{record['phone']}, email {record['email']}, SSN {record['ssn']}. Last visit "
        f"{record['last_visit']}. Now {record['gestational_age_weeks']} weeks pregnant with "
        f"{', '.join(record['conditions'])}; takes {', '.join(record['medications'])}. "  # type: ignore[arg-type]
        "What should the next prenatal visit cover?"
    )


def record_identifiers(record: Mapping[str, object]) -> KnownIdentifiers:
    return KnownIdentifiers(
        names=(str(record["name"]),),
        ids=(str(record["patient_id"]), str(record["mrn"])),
        dates=(str(record["birth_date"]),),
        addresses=(str(record["address"]),),
        other=(str(record["phone"]), str(record["email"])),
    )


@pytest.mark.parametrize(
    ("text", "kind", "sent"),
    [
        ("call 617-555-0199 today", "PHONE", "call [PHONE] today"),
        ("call (617) 555 0199", "PHONE", "call [PHONE]"),
        ("call +44 20 7946 0958", "PHONE", "call [PHONE]"),
        ("call 555-0172 tonight", "PHONE", "call [PHONE] tonight"),
        ("SSN 123-45-6789", "SSN", "SSN [SSN]"),
        ("SSN 123 45 6789", "SSN", "SSN [SSN]"),
        ("social security number 123456789", "SSN", "social security number [SSN]"),
        ("write to jane.roe@example.org", "EMAIL", "write to [EMAIL]"),
        ("see https://portal.example.org/p?id=7 now", "URL", "see [URL] now"),
        ("see www.example-clinic.com", "URL", "see [URL]"),
        ("from 192.168.10.24 at night", "IP", "from [IP] at night"),
        ("from fe80::1ff:fe23:4567:890a", "IP", "from [IP]"),
        ("record 7f3c2a1e-9b8d-4c7e-a1f2-3b4c5d6e7f80", "ID", "record [ID]"),
        ("patient p3fa2b1c4d5e6f708 seen", "ID", "patient [ID] seen"),
        ("MRN: A12345", "ID", "MRN: [ID]"),
        ("chart 004829131", "ID", "chart [ID]"),
        ("born 1990-04-12", "DATE", "born 1990"),
        ("seen 2021-03-04T10:00:00Z", "DATE", "seen 2021"),
        ("seen 04/05/2021", "DATE", "seen 2021"),
        ("seen 4.5.21", "DATE", "seen [DATE]"),
        ("seen 04.05.2021.", "DATE", "seen 2021."),
        ("seen March 3, 2021", "DATE", "seen 2021"),
        ("seen 3rd of March 2021", "DATE", "seen 2021"),
        ("first pregnancy in March 2021", "DATE", "first pregnancy in 2021"),
        ("seen on Jan 5", "DATE", "seen on [DATE]"),
        ("a 97-year-old woman", "AGE", "a 90 or older woman"),
        ("Patient: 91 year old woman.", "AGE", "Patient: 90 or older woman."),
        ("aged 93, 102 y/o", "AGE", "aged 90 or older, 90 or older"),
        ("lives at 12 Oak Street", "ADDRESS", "lives at [ADDRESS]"),
        ("lives at 221B Baker St., Apt 4", "ADDRESS", "lives at [ADDRESS]"),
        ("P.O. Box 991", "ADDRESS", "[ADDRESS]"),
        ("Boston, MA 02115", "ZIP", "Boston, MA [ZIP]"),
        ("Springfield, 01103", "ZIP", "Springfield, [ZIP]"),
        ("zip code 01103", "ZIP", "zip code [ZIP]"),
        ("seen by Dr. Alvarez", "NAME", "seen by Dr. [NAME]"),
        ("Next of kin: John Smith", "NAME", "Next of kin: [NAME]"),
    ],
)
def test_patterns_find_each_kind(text: str, kind: str, sent: str) -> None:
    redaction = IdentifierDetector().redact(text)
    assert redaction.kinds.get(kind, 0) >= 1, redaction
    assert redaction.text == sent


@pytest.mark.parametrize(
    "text",
    [
        "34-year-old G2P1 at 28 weeks, BMI 31, BP 120/80, HbA1c 6.1%",
        "Patient: 89-year-old woman, aged 45, 92 weeks of follow-up",
        "diabetes since 2019",
        "SNOMED 72892002 and LOINC 4548-4, RxNorm 310325",
        "Levora 0.15/30 (28 Day Pack), NDA020800, ANDA076543",
        "ferrous sulfate 325 mg twice daily, insulin glargine 10 units",
        "Hb 10.5 (reference 12.5-13.5), ferritin 1.2.3 trend, platelets 150-4000",
        "Tdap vaccine, glucose tolerance test, fetal ultrasound",
        "version 1.2.3 of the guideline, dose 1/2 tablet",
    ],
)
def test_clinical_content_is_kept(text: str) -> None:
    redaction = IdentifierDetector().redact(text)
    assert redaction.text == text
    assert redaction.count == 0


def test_deny_list_catches_names_and_their_parts() -> None:
    detector = IdentifierDetector(KnownIdentifiers(names=("Jane123 Roe456",), ids=("ZX-81",)))
    redaction = detector.redact("Jane Roe (Jane123) came; ROE agreed; ZX-81 filed.")
    assert redaction.text == "[NAME] [NAME] ([NAME]) came; [NAME] agreed; [ID] filed."


def test_canary_no_identifier_reaches_remote_servers(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    prompt = record_prompt(RECORD)
    assert all(c in prompt for c in CANARIES)  # the canaries really are in the prompt
    config = ClientConfig(anthropic_api_key="k", openai_api_key="k")
    for spec in (f"anthropic:claude-test@{stub.url}", f"openai:gpt-test@{stub.url}/v1"):
        client = LLMClient(spec, workspace=workspace, config=config, retry=fast_retry)
        client.generate(
            f"You advise the care team of {RECORD['name']}.",
            prompt,
            PARAMS,
            identifiers=record_identifiers(RECORD),
        )
        client.generate_many(
            [GenerationRequest("Be brief.", prompt, PARAMS, record_identifiers(RECORD))]
        )
        rows = client.ledger.entries(client.run_id)
        assert rows and all(r.redactions >= 10 for r in rows)
        assert all("NAME:" in r.redaction_kinds and "DATE:" in r.redaction_kinds for r in rows)
    assert len(stub.requests) == 4
    for body in stub.bodies():
        lowered = body.lower()
        for canary in CANARIES:
            assert canary.lower() not in lowered, canary
        assert "[NAME]" in body and "[DATE]" in body and "[ID]" in body and "[ADDRESS]" in body
        assert "28 weeks pregnant with gestational diabetes" in body  # the clinical content stays
    for path in (workspace / "cache").iterdir():
        data = path.read_bytes().lower()
        for canary in CANARIES:
            assert canary.lower().encode() not in data, (path.name, canary)


def test_refuse_mode_sends_nothing(
    stub: StubLLMServer, workspace: Path, fast_retry: RetryPolicy
) -> None:
    client = LLMClient(
        f"anthropic:claude-test@{stub.url}",
        workspace=workspace,
        config=ClientConfig(anthropic_api_key="k"),
        retry=fast_retry,
        privacy=PrivacyPolicy(mode="refuse"),
    )
    with pytest.raises(PrivacyViolation) as caught:
        client.generate("", record_prompt(RECORD), PARAMS, identifiers=record_identifiers(RECORD))
    assert stub.requests == []
    assert caught.value.kinds["DATE"] >= 3 and caught.value.kinds["NAME"] >= 1
    for canary in CANARIES:
        assert canary not in str(caught.value)
    clean = client.generate("", "What does a 28-week visit usually include?", PARAMS)
    assert clean.redactions == 0 and len(stub.requests) == 1


class RecordingLocalBackend:
    """A stand-in local backend that keeps what it was sent."""

    kind: Literal["local"] = "local"
    model = "recorder"
    endpoint = "memory"
    is_local = True
    identity: Mapping[str, object] = {"kind": "local", "file": "recorder"}

    def __init__(self) -> None:
        self.sent: list[list[ChatMessage]] = []

    def complete(self, messages: Sequence[ChatMessage], params: GenerationParams) -> BackendReply:
        self.sent.append(list(messages))
        return BackendReply("ok", self.model, 10, 1, "stop")


def test_local_backend_is_exempt_unless_forced(workspace: Path) -> None:
    prompt = record_prompt(RECORD)
    backend = RecordingLocalBackend()
    LLMClient(backend, workspace=workspace, use_cache=False).generate("", prompt, PARAMS)
    assert backend.sent[-1][-1].content == prompt

    forced = LLMClient(
        backend, workspace=workspace, use_cache=False, privacy=PrivacyPolicy(guard_local=True)
    )
    completion = forced.generate("", prompt, PARAMS, identifiers=record_identifiers(RECORD))
    sent = backend.sent[-1][-1].content
    assert completion.redactions >= 10
    for canary in CANARIES:
        assert canary not in sent
