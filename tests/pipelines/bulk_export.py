"""A FHIR Bulk Data exporter for tests: bundles → one NDJSON file per resource type.

There is no Bulk Data exporter to generate test data with, so the tests own
this converter: it writes what a server's ``$export`` writes. One file per
resource type (``Observation`` gzipped, as large exports are), references
rewritten from the bundles' ``urn:uuid:`` to ``Type/id``, and a
``manifest.json`` that lists the files by URL.
"""

from __future__ import annotations

import gzip
import json
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

SERVER = "https://ehr.example.org/fhir"


def _rewrite(value: Any, targets: dict[str, str]) -> Any:
    if isinstance(value, dict):
        out = {k: _rewrite(v, targets) for k, v in value.items()}
        ref = out.get("reference")
        if isinstance(ref, str) and ref in targets:
            out["reference"] = targets[ref]
        return out
    if isinstance(value, list):
        return [_rewrite(v, targets) for v in value]
    return value


def export_bulk(
    bundles: list[Path], out: Path, gzipped: tuple[str, ...] = ("Observation",)
) -> Path:
    """Convert ``bundles`` into a Bulk Data export in ``out``; returns its manifest path.

    Streams: one bundle in memory at a time (the benchmark converts 1,000).
    """
    out.mkdir(parents=True, exist_ok=True)
    handles: dict[str, IO[bytes]] = {}
    with ExitStack() as stack:
        for path in bundles:
            bundle = json.loads(path.read_bytes())
            entries = [e for e in bundle.get("entry", []) if isinstance(e.get("resource"), dict)]
            targets = {
                e["fullUrl"]: f"{e['resource']['resourceType']}/{e['resource']['id']}"
                for e in entries
                if "fullUrl" in e and "id" in e["resource"]
            }
            for entry in entries:
                resource = _rewrite(entry["resource"], targets)
                rtype = resource.get("resourceType")  # damaged resources go to a file of their own
                rtype = rtype if isinstance(rtype, str) else "Damaged"
                if rtype not in handles:
                    name = f"{rtype}.ndjson" + (".gz" if rtype in gzipped else "")
                    handles[rtype] = stack.enter_context(
                        gzip.open(out / name, "wb", compresslevel=1)  # noqa: SIM115
                        if rtype in gzipped
                        else (out / name).open("wb")
                    )
                handles[rtype].write(json.dumps(resource, separators=(",", ":")).encode() + b"\n")
    output = [
        {"type": t, "url": f"{SERVER}/bulk/files/{t}.ndjson" + (".gz" if t in gzipped else "")}
        for t in sorted(handles)
    ]
    manifest = out / "manifest.json"
    manifest.write_text(
        json.dumps(
            {
                "transactionTime": "2026-01-01T00:00:00Z",
                "request": f"{SERVER}/$export",
                "requiresAccessToken": True,
                "output": output,
                "error": [],
            },
            indent=2,
        )
    )
    return manifest
