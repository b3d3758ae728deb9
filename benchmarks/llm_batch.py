"""Batched local generation: answers per second on the same evaluation prompts, one at a time and batched.

The prompts are those `pmlm evaluate` asks first (every method on seeded test
encounters of a built workspace, evaluation settings: greedy, at most 128
tokens). Each configuration (OpenMP wait policy and llama.cpp threads) runs in
its own process, because the OpenMP runtime reads its wait policy once when it
loads. The prompts are split into chunks and, for every chunk, every
configuration answers it one at a time and then batched, so that the shared
machine's load (printed with each figure) weighs on all of them alike. Answers
go through ``LLMClient.generate_many`` without the cache (ledger included).

Then: how many batched answers equal the one-at-a-time answer to the same
prompt, and the plan-item recall of both (``PlanScorer`` at its default
threshold), to see whether batching moves the evaluation.

Usage (the workspace from ``pmlm run`` or the build flow; without one, the
default cohort is built in a temporary folder first, about a minute)::

    .venv/bin/python benchmarks/llm_batch.py --workspace pmlm-workspace \\
        --prompts 32 --chunk 8 --parallel 8 --configs passive:2,active:2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHILD = "--child"


@dataclass(frozen=True)
class Config:
    """One process setting: the OpenMP wait policy and llama.cpp's thread count."""

    omp: str
    threads: int

    @property
    def name(self) -> str:
        return f"{self.omp}:{self.threads}"

    @staticmethod
    def parse(text: str) -> Config:
        omp, _, threads = text.partition(":")
        if omp not in ("passive", "active") or not threads.isdigit():
            raise SystemExit(f"bad config {text!r}: expected passive:N or active:N")
        return Config(omp, int(threads))


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def evaluation_prompts(workspace: Path | None, n: int) -> list[dict[str, Any]]:
    """The first ``n`` prompts `pmlm evaluate` would ask on the workspace (seed 0)."""
    from pipelines.index import ContextStore
    from pipelines.ingest import load_tables
    from pipelines.workspace import Workspace
    from promptenv.evaluate import EvalSettings, build_prompts, pick_encounters, references
    from promptenv.prompts import METHODS
    from promptenv.signals import signals_for

    if workspace is None:
        from flows.pipeline import build

        workspace = Path(tempfile.mkdtemp(prefix="llm-batch-ws-")) / "ws"
        print(f"building the default cohort's workspace in {workspace} ...", flush=True)
        build(workspace=str(workspace))
    ws = Workspace.at(workspace)
    tables = load_tables(ws)
    per_subset = -(-n // (2 * len(METHODS)))  # enough encounters for n prompts
    chosen = pick_encounters(
        tables["index_encounters"], EvalSettings(n_obstetric=per_subset, n_adult=per_subset)
    )
    store = ContextStore(dict(tables), only_encounters=list(chosen["encounter_id"]))
    refs = references(tables, chosen)
    signals = signals_for(ws, list(chosen["encounter_id"]))
    prompts = build_prompts(store, chosen, signals, refs, METHODS)[:n]
    if len(prompts) < n:
        raise SystemExit(f"the workspace gives only {len(prompts)} evaluation prompts, not {n}")
    return [
        {
            "encounter": eid,
            "method": p.method,
            "system": p.system,
            "user": p.user,
            "items": refs[eid][0],
            "plan": refs[eid][1],
        }
        for eid, p in prompts
    ]


def child(args: argparse.Namespace) -> None:
    """Answer one chunk one at a time and then batched, in this process; print JSON."""
    from promptenv.evaluate import EVAL_PARAMS
    from promptenv.llm import ClientConfig, GenerationParams, GenerationRequest, LLMClient

    prompts = json.loads(Path(args.prompts_file).read_text())[args.start : args.stop]
    requests = [GenerationRequest(p["system"], p["user"], EVAL_PARAMS) for p in prompts]
    root = Path(tempfile.mkdtemp(prefix="llm-batch-"))
    result: dict[str, Any] = {"omp": os.environ.get("OMP_WAIT_POLICY")}
    for mode, parallel in (("one", 1), ("batched", args.parallel)):
        config = ClientConfig(local_n_threads=args.threads, local_parallel=parallel)
        client = LLMClient("local", workspace=root / mode, config=config, use_cache=False)
        client.generate("", "Say hi.", GenerationParams(max_tokens=2))  # load, warm up
        before = loadavg()
        started = time.perf_counter()
        answers = client.generate_many(requests, concurrency=1)
        seconds = time.perf_counter() - started
        result[mode] = {
            "seconds": seconds,
            "load_before": before,
            "load_after": loadavg(),
            "texts": [a.text for a in answers],
            "tokens_out": sum(a.usage.output_tokens for a in answers),
            "tokens_in": sum(a.usage.input_tokens for a in answers),
            "ledger_rows": len(client.ledger.entries(client.run_id)) - 1,
        }
    print(json.dumps(result))


def run_child(config: Config, args: argparse.Namespace, start: int, stop: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_WAIT_POLICY": config.omp}
    command = [
        sys.executable,
        __file__,
        CHILD,
        "--prompts-file",
        args.prompts_file,
        "--start",
        str(start),
        "--stop",
        str(stop),
        "--threads",
        str(config.threads),
        "--parallel",
        str(args.parallel),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{config.name} chunk {start}-{stop} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def recall(scorer: Any, texts: list[str], prompts: list[dict[str, Any]]) -> float:
    scores = scorer.score_many(texts, [p["items"] for p in prompts], [p["plan"] for p in prompts])
    return sum(s.recall for s in scores) / len(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workspace", type=Path, help="a built workspace (default: build one)")
    parser.add_argument("--prompts", type=int, default=32, help="evaluation prompts")
    parser.add_argument("--chunk", type=int, default=8, help="prompts per interleaved chunk")
    parser.add_argument("--parallel", type=int, default=8, help="sequences of the batch")
    parser.add_argument(
        "--configs", default="passive:2,active:2", help="OMP policy:threads, comma-separated"
    )
    parser.add_argument(CHILD, action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    configs = [Config.parse(c) for c in args.configs.split(",")]
    prompts = evaluation_prompts(args.workspace, args.prompts)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(prompts, f)
        args.prompts_file = f.name
    print(
        f"{len(prompts)} prompts ({sum(p['method'] == 'general' for p in prompts)} general ...), "
        f"chunks of {args.chunk}, batch of {args.parallel}; load {loadavg()}",
        flush=True,
    )
    runs: dict[str, list[dict[str, Any]]] = {c.name: [] for c in configs}
    for start in range(0, len(prompts), args.chunk):
        stop = min(start + args.chunk, len(prompts))
        for config in configs:
            out = run_child(config, args, start, stop)
            runs[config.name].append(out)
            one, batched = out["one"], out["batched"]
            print(
                f"chunk {start}-{stop} {config.name}: one at a time {one['seconds']:.1f} s "
                f"(load {one['load_before']}), batched {batched['seconds']:.1f} s "
                f"(load {batched['load_before']}), {one['seconds'] / batched['seconds']:.2f}x",
                flush=True,
            )
    from promptenv.reward import PlanScorer

    scorer = PlanScorer()
    baseline = configs[0].name
    base_seconds = sum(r["one"]["seconds"] for r in runs[baseline])
    print(
        f"\n| config | mode | answers | seconds | answers/s | vs {baseline} one at a time "
        "| tokens out | recall | equal to one at a time |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, chunks in runs.items():
        single = [t for r in chunks for t in r["one"]["texts"]]
        for mode in ("one", "batched"):
            seconds = sum(r[mode]["seconds"] for r in chunks)
            texts = [t for r in chunks for t in r[mode]["texts"]]
            equal = sum(a == b for a, b in zip(single, texts, strict=True))
            rows = sum(r[mode]["ledger_rows"] for r in chunks)
            assert rows == len(texts), f"the ledger has {rows} rows for {len(texts)} answers"
            print(
                f"| {name} | {'one at a time' if mode == 'one' else f'batch of {args.parallel}'} "
                f"| {len(texts)} | {seconds:.1f} | {len(texts) / seconds:.3f} "
                f"| {base_seconds / seconds:.2f}x | {sum(r[mode]['tokens_out'] for r in chunks)} "
                f"| {recall(scorer, texts, prompts):.3f} | {equal}/{len(texts)} |"
            )
    print(f"\nload at the end {loadavg()}")


if __name__ == "__main__":
    main()
