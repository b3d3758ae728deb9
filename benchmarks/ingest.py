"""Ingest throughput and peak memory: FHIR R4 against the generator, OMOP on Eunomia.

Usage::

    .venv/bin/python benchmarks/ingest.py [--n 200] [--seed 11] [--cohort DIR]

Generates (or reuses) a Synthea cohort of N women, times the generator, then
ingests it in a fresh process (so peak RSS is the ingest's own) as `pmlm ingest
fhir` does (staged) and reports resources and patients per second and the ratio
to the generator's rate (the target is ≥ 20×). Then the same on ``--scale``
patients (the N bundles replicated with fresh ids), with peak memory (target
≤ 2 GB for 1,000), against the in-memory baseline on the same files. And OMOP
on Eunomia. Everything runs in this one invocation, so the ratios compare like
with like on a shared, noisy machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from pipelines.workspace import Workspace
kind, src, ws = sys.argv[1], sys.argv[2], sys.argv[3]
t0 = time.perf_counter()
t_read = float("nan")
if kind == "fhir":  # what `pmlm ingest fhir` runs: staged
    from pipelines.ingest import ingest_fhir
    summary = ingest_fhir(Workspace.at(ws), Path(src))
elif kind == "fhir-memory":  # the baseline: every table in this process
    from pipelines.fhir import read_fhir_folder
    from pipelines.ingest import write_cohort
    source = read_fhir_folder(Path(src))
    t_read = time.perf_counter() - t0
    summary = write_cohort(Workspace.at(ws), source, input_description=src)
else:
    from pipelines.omop import read_omop, eunomia_path
    from pipelines.ingest import write_cohort
    source = read_omop(eunomia_path())
    t_read = time.perf_counter() - t0
    summary = write_cohort(Workspace.at(ws), source, input_description="eunomia")
total = time.perf_counter() - t0
parent = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
worker = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
# CPU seconds of this process and its workers (user + system): less noisy than wall time
cpu = sum(getattr(resource.getrusage(who), f) for who in (resource.RUSAGE_SELF,
          resource.RUSAGE_CHILDREN) for f in ("ru_utime", "ru_stime"))
print(json.dumps({"read_s": t_read, "total_s": total, "records": summary["ingest"]["read"],
                  "patients": summary["patients"], "index_encounters": summary["index_encounters"],
                  "parent_mb": parent, "worker_mb": worker, "cpu_s": cpu,
                  # parent + the largest worker process: an upper bound of the peak at any one time
                  "peak_mb": parent + worker}))
"""


UUID = re.compile(rb"\b([0-9a-f])([0-9a-f]{7}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b")


def replicate(fhir_dir: Path, target: Path, n: int) -> Path:
    """``n`` bundles from the generated ones, copies given fresh ids (first hex digit of every UUID)."""
    target.mkdir(parents=True, exist_ok=True)
    files = sorted(fhir_dir.glob("*.json"))
    for i in range(n):
        src = files[i % len(files)]
        copy = i // len(files)
        raw = src.read_bytes()
        if copy:

            def shifted(m: re.Match[bytes], c: int = copy) -> bytes:
                return b"%x" % ((int(m.group(1), 16) + c) % 16) + m.group(2)

            raw = UUID.sub(shifted, raw)
        (target / f"{copy}-{src.name}").write_bytes(raw)
    return target


def run_child(kind: str, src: str, ws: str) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, src, ws], capture_output=True, text=True, check=True
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=200, help="women to generate")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument(
        "--cohort", type=Path, default=None, help="reuse/keep the generated cohort here"
    )
    parser.add_argument(
        "--scale",
        type=int,
        default=1000,
        help="patients for the memory measurement (replicated bundles)",
    )
    args = parser.parse_args()

    from pipelines.cohort import CohortSpec, generate_cohort

    out = args.cohort or Path(tempfile.mkdtemp(prefix="pmlm-bench-")) / "cohort"
    t0 = time.perf_counter()
    fhir_dir, reused = generate_cohort(CohortSpec(n=args.n, seed=args.seed), out)
    gen_s = time.perf_counter() - t0
    if reused:
        print(f"cohort reused from {out}: generator time not measured in this run", file=sys.stderr)
    mb = sum(p.stat().st_size for p in fhir_dir.glob("*.json")) / 2**20

    with tempfile.TemporaryDirectory() as ws:
        fhir = run_child("fhir", str(fhir_dir), ws)
    with tempfile.TemporaryDirectory() as ws:
        omop = run_child("omop", "", ws)
    with tempfile.TemporaryDirectory() as tmp:
        big = replicate(fhir_dir, Path(tmp) / "fhir", args.scale)
        scaled = run_child("fhir", str(big), str(Path(tmp) / "ws"))
        baseline = run_child("fhir-memory", str(big), str(Path(tmp) / "ws-memory"))

    gen_rate = args.n / gen_s if not reused else float("nan")
    rate = fhir["patients"] / fhir["total_s"]
    scaled_rate = scaled["patients"] / scaled["total_s"]
    base_rate = baseline["patients"] / baseline["total_s"]
    print(
        f"# ingest benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}"
    )
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print("| what | figure |")
    print("|---|---|")
    print(f"| generated cohort | {args.n} women, {mb:.0f} MB of FHIR JSON |")
    print(f"| generator (synthea, 2 threads) | {gen_s:.1f} s = {gen_rate:.2f} patients/s |")
    print(
        f"| FHIR ingest of the {args.n} (read + derive + write) | {fhir['total_s']:.1f} s = "
        f"{fhir['records'] / fhir['total_s']:,.0f} resources/s = {rate:.1f} patients/s = "
        f"**{rate / gen_rate:.1f}×** the generator |"
    )
    print(
        f"| FHIR ingest of {args.scale} ({args.n} bundles replicated with fresh ids) | "
        f"{scaled['total_s']:.1f} s = {scaled_rate:.1f} patients/s = **{scaled_rate / gen_rate:.1f}×** "
        f"the generator |"
    )
    print(
        f"| its peak RSS | **{scaled['peak_mb']:.0f} MB** (parent {scaled['parent_mb']:.0f} + "
        f"largest worker {scaled['worker_mb']:.0f}; target ≤ 2048 MB) |"
    )
    print(
        f"| baseline, in memory (`write_cohort(read_fhir_folder(...))`), same {args.scale} | "
        f"{baseline['total_s']:.1f} s = {base_rate:.1f} patients/s, peak RSS "
        f"{baseline['peak_mb']:.0f} MB (parent {baseline['parent_mb']:.0f} + worker "
        f"{baseline['worker_mb']:.0f}) |"
    )
    print(
        f"| staged ÷ in memory | time {scaled['total_s'] / baseline['total_s']:.2f}×, "
        f"peak RSS {scaled['peak_mb'] / baseline['peak_mb']:.2f}× |"
    )
    print(
        f"| OMOP (Eunomia) read | {omop['read_s']:.1f} s = {omop['records'] / omop['read_s']:,.0f} rows/s, {omop['patients']:.0f} patients |"
    )
    print(
        f"| OMOP read + derive + write | {omop['total_s']:.1f} s, {omop['index_encounters']:.0f} index encounters, peak RSS {omop['peak_mb']:.0f} MB |"
    )


if __name__ == "__main__":
    main()
