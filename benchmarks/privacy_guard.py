"""The privacy guard's two error rates: false positives on real prompts, recall on planted identifiers.

    .venv/bin/python benchmarks/privacy_guard.py PROMPTS.parquet WORKSPACE

``PROMPTS.parquet``: a prompt table (``system`` and ``question`` columns), e.g.
``WORKSPACE/tables/prompts.parquet`` after ``pmlm prompts build``. The prompts
of the default cohort hold no direct identifier (ages, years, clinical text),
so every replacement in them is a false positive; the script prints the share of
prompts changed and the replacements by kind, with examples.

Recall: identifiers of the workspace's real patients (names from their source
files, made-up phones, SSNs, addresses, MRNs, emails, URLs, IPs, exact dates,
ages over 89) are planted into those prompts, one sentence per patient, in
several spellings; recall is the share of planted values that no longer appear
(as whole words) in what the guard sends. The guard runs as `LLMClient` runs it
for a remote backend: with the workspace's deny-list.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter

import pandas as pd

from pipelines.identifiers import load_identifiers
from pipelines.workspace import Workspace
from promptenv.llm.deny_list import workspace_deny_list
from promptenv.llm.privacy import IdentifierDetector


def planted(pid: str, name_parts: list[str], n: int) -> tuple[str, list[str]]:
    """One sentence with identifiers of patient ``pid``, and the values that must vanish."""
    given, family = name_parts[:2]
    phone7 = f"{555 + n % 300}-{1000 + n:04d}"
    values = {
        "name": f"{given} {family}",
        "phone": f"(413) {phone7}",
        "ssn": f"078 05 {1000 + n:04d}",
        "mrn": f"MRN {48_000_000 + n}",
        "email": f"{given.lower()}.{n}@example.net",
        "url": f"https://portal.example.org/patients/{n}",
        "ip": f"10.{n % 250}.{(7 * n) % 250}.{(3 * n) % 250 + 1}",
        "date": f"March {1 + n % 28}, 2021",
        "month": "April 2019",
        "age": f"{91 + n % 14}-year-old",  # 90 stays in "90 or older"
        "zip": f"Springfield, {1000 + n:05d}",
        "pid": pid,
    }
    text = (
        f" Note: {values['name']} ({values['pid']}, {values['mrn']}), a {values['age']}, "
        f"seen {values['date']} and in {values['month']}, lives in {values['zip']}; "
        f"call {values['phone']} or {phone7}, SSN {values['ssn']}, {values['email']}, "
        f"portal {values['url']} from {values['ip']}."
    )
    must_go = [
        given,
        family,
        phone7,
        values["ssn"],
        values["mrn"].split()[1],
        values["email"],
        values["url"],
        values["ip"],
        values["date"],
        values["month"],
        values["age"].split("-")[0],
        values["zip"].split(", ")[1],
        pid,
    ]
    return text, must_go


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("prompts", help="a prompt table (system and question columns)")
    parser.add_argument("workspace", help="the workspace whose patients are planted")
    args = parser.parse_args()
    ws = Workspace.at(args.workspace)
    prompts = pd.read_parquet(args.prompts)
    detector = IdentifierDetector(None, [workspace_deny_list(ws)])
    kinds: Counter[str] = Counter()
    changed = 0
    examples: list[tuple[str, str]] = []
    for system, question in zip(prompts["system"], prompts["question"], strict=True):
        found: Counter[str] = Counter()
        for text in (system, question):
            redaction = detector.redact(text)
            found.update(redaction.kinds)
            if redaction.kinds and len(examples) < 8:
                before = set(re.findall(r"\S+", text)) - set(re.findall(r"\S+", redaction.text))
                examples.append((",".join(redaction.kinds), " ".join(sorted(before))[:120]))
        changed += bool(found)
        kinds.update(found)
    print(f"false positives: {changed} of {len(prompts)} prompts changed; by kind {dict(kinds)}")
    for kind, words in examples:
        print(f"  {kind}: {words}")

    identifiers = load_identifiers(ws)
    total = caught = 0
    missed: Counter[str] = Counter()
    for n, (pid, entry) in enumerate(identifiers.items()):
        if len(entry["names"]) < 2:
            continue  # a name the records do not hold cannot be on the deny-list
        text, must_go = planted(pid, entry["names"], n)
        base = prompts["system"].iloc[n % len(prompts)]
        sent, clean = detector.redact(base + text).text, detector.redact(base).text
        for value in must_go:
            total += 1
            word = re.compile(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])", re.I)
            if len(word.findall(sent)) > len(word.findall(clean)):  # "100 mg" may be in the prompt
                missed[value if len(missed) < 10 else "..."] += 1
            else:
                caught += 1
    print(f"recall: {caught} of {total} planted identifiers removed ({caught / total:.1%})")
    if missed:
        print(f"  missed: {dict(missed)}")


if __name__ == "__main__":
    main()
