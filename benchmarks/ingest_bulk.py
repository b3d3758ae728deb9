"""Bulk Data ingest against the bundle path: the same patients, the same process setup.

Usage::

    .venv/bin/python benchmarks/ingest_bulk.py [--n 100] [--seed 11] [--scale 1000] \
        [--cohort DIR] [--repeats 3]

Generates (or reuses) N women, replicates their bundles to ``--scale`` patients
with fresh ids (`benchmarks/ingest.py`), converts those bundles to a FHIR Bulk
Data export (one NDJSON file per type, Observation gzipped: the tests'
converter, `tests/pipelines/bulk_export.py`), then runs `pmlm ingest fhir`
(staged) on each in a fresh process and reports time and peak RSS. The two
inputs are ingested in turn, ``--repeats`` times (bundles, export, bundles,
export, ...), so that a shared machine's changing load weighs on both alike;
the verdict is the median of the per-pair ratios. The acceptance target: the
export at least as fast as the bundles, peak RSS ≤ 2 GB.
"""

from __future__ import annotations

import argparse
import platform
import statistics
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
    parser.add_argument("--repeats", type=int, default=3, help="pairs of ingests, in turn")
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
        pairs = []
        for _ in range(args.repeats):
            bundle = run_child("fhir", str(bundles), str(Path(tmp) / "ws-bundles"))
            bulk = run_child("fhir", str(Path(tmp) / "bulk"), str(Path(tmp) / "ws-bulk"))
            assert bulk["patients"] == bundle["patients"], (bulk, bundle)
            assert bulk["index_encounters"] == bundle["index_encounters"], (bulk, bundle)
            pairs.append((bundle, bulk))
    print(
        f"# Bulk Data ingest benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
        f"{platform.node()}, python {platform.python_version()}"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(
        "| pair | input | size | ingest (read + derive + write) | patients/s | CPU (all processes) "
        "| peak RSS |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, pair in enumerate(pairs, start=1):
        for label, key, r in zip(
            ("bundles", "Bulk Data export"), ("fhir", "bulk"), pair, strict=True
        ):
            print(
                f"| {n} | {label}, {r['patients']:.0f} patients | {mb[key]:.0f} MB | "
                f"{r['total_s']:.1f} s | {r['patients'] / r['total_s']:.1f} | {r['cpu_s']:.1f} s | "
                f"{r['peak_mb']:.0f} MB (parent {r['parent_mb']:.0f} + largest worker "
                f"{r['worker_mb']:.0f}) |"
            )
        bundle, bulk = pair
        print(
            f"| {n} | Bulk ÷ bundles | | time {bulk['total_s'] / bundle['total_s']:.2f}× | | "
            f"CPU {bulk['cpu_s'] / bundle['cpu_s']:.2f}× | "
            f"peak RSS {bulk['peak_mb'] / bundle['peak_mb']:.2f}× |"
        )
    times = [bulk["total_s"] / bundle["total_s"] for bundle, bulk in pairs]
    cpus = [bulk["cpu_s"] / bundle["cpu_s"] for bundle, bulk in pairs]
    peak = max(bulk["peak_mb"] for _, bulk in pairs)
    print(
        f"Bulk ÷ bundles, median of {len(pairs)} pairs: time {statistics.median(times):.2f}× "
        f"(pairs {', '.join(f'{t:.2f}×' for t in times)}), CPU {statistics.median(cpus):.2f}× "
        f"(pairs {', '.join(f'{t:.2f}×' for t in cpus)}); the export's largest peak RSS "
        f"{peak:.0f} MB"
    )
    print(f"(conversion to Bulk Data, not part of the ingest: {convert_s:.0f} s)")


if __name__ == "__main__":
    main()
