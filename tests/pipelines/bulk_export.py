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
from pathlib import Path
from typing import Any

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
    """Convert ``bundles`` into a Bulk Data export in ``out``; returns its manifest path."""
    out.mkdir(parents=True, exist_ok=True)
    by_type: dict[str, list[bytes]] = {}
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
            by_type.setdefault(rtype if isinstance(rtype, str) else "Damaged", []).append(
                json.dumps(resource, separators=(",", ":")).encode()
            )
    output = []
    for rtype in sorted(by_type):
        data = b"\n".join(by_type[rtype]) + b"\n"
        name = f"{rtype}.ndjson" + (".gz" if rtype in gzipped else "")
        (out / name).write_bytes(gzip.compress(data, mtime=0) if rtype in gzipped else data)
        output.append({"type": rtype, "url": f"{SERVER}/bulk/files/{name}"})
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
