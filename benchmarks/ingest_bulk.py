"""Bulk Data ingest against the bundle path: the same patients, the same process setup.

Usage::

    .venv/bin/python benchmarks/ingest_bulk.py [--n 100] [--seed 11] [--scale 1000] [--cohort DIR]

Generates (or reuses) N women, replicates their bundles to ``--scale`` patients
with fresh ids (`benchmarks/ingest.py`), converts those bundles to a FHIR Bulk
Data export (one NDJSON file per type, Observation gzipped: the tests'
converter, `tests/pipelines/bulk_export.py`), then runs `pmlm ingest fhir`
(staged) on each in a fresh process and reports time and peak RSS. The
acceptance target: the export at least as fast as the bundles, peak RSS ≤ 2 GB.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "pipelines")]

from bulk_export import export_bulk  # noqa: E402
from ingest import replicate, run_child  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100, help="women to generate")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--scale", type=int, default=1000, help="patients ingested")
    parser.add_argument("--cohort", type=Path, default=None, help="reuse/keep the cohort here")
    args = parser.parse_args()

    from pipelines.cohort import CohortSpec, generate_cohort

    with tempfile.TemporaryDirectory(prefix="pmlm-bench-") as tmp:
        # without --cohort the generated cohort is removed with the rest
        out = args.cohort or Path(tmp) / "cohort"
        fhir_dir, _ = generate_cohort(CohortSpec(n=args.n, seed=args.seed), out)
        bundles = replicate(fhir_dir, Path(tmp) / "fhir", args.scale)
        t0 = time.perf_counter()
        export_bulk(sorted(bundles.glob("*.json")), Path(tmp) / "bulk")
        convert_s = time.perf_counter() - t0
        mb = {
            k: sum(p.stat().st_size for p in (Path(tmp) / k).iterdir()) / 2**20
            for k in ("fhir", "bulk")
        }
        bundle = run_child("fhir", str(bundles), str(Path(tmp) / "ws-bundles"))
        bulk = run_child("fhir", str(Path(tmp) / "bulk"), str(Path(tmp) / "ws-bulk"))
    assert bulk["patients"] == bundle["patients"], (bulk, bundle)
    assert bulk["index_encounters"] == bundle["index_encounters"], (bulk, bundle)
    print(
        f"# Bulk Data ingest benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.node()}, python {platform.python_version()}"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print("| input | size | ingest (read + derive + write) | patients/s | peak RSS |")
    print("|---|---|---|---|---|")
    for label, key, r in (("bundles", "fhir", bundle), ("Bulk Data export", "bulk", bulk)):
        print(
            f"| {label}, {r['patients']:.0f} patients | {mb[key]:.0f} MB | {r['total_s']:.1f} s | "
            f"{r['patients'] / r['total_s']:.1f} | {r['peak_mb']:.0f} MB (parent "
            f"{r['parent_mb']:.0f} + largest worker {r['worker_mb']:.0f}) |"
        )
    print(
        f"| Bulk ÷ bundles | | time {bulk['total_s'] / bundle['total_s']:.2f}× | | "
        f"peak RSS {bulk['peak_mb'] / bundle['peak_mb']:.2f}× |"
    )
    print(f"(conversion to Bulk Data, not part of the ingest: {convert_s:.0f} s)")


if __name__ == "__main__":
    main()
