"""Scale of the recommender: fit time, self+peer signal throughput and peak memory.

    .venv/bin/python benchmarks/recsys_scale.py --workspace /tmp/pmlm-dev-ws \
        --sizes 10000 100000 1000000 --model lightfm

For each size N, a fresh process (so that peak memory is per size) takes the
cohort's patient states (the workspace's real cohort; the seeded synthetic
cohort when the workspace has no tables), bootstraps whole patients with
replacement under new ids to N states (80/10/10 train/validation/test by new
patient), fits the model on the train states, then computes for all N states
(or a seeded sample of ``--max-queries`` of them) the self signals (top-10 items with 3 reasons each) and the peer signals (20
peers among the train states, statements with >= 5 supporters), in batches of
100k states. Reported: fit seconds; wall seconds of the signals (pool
embedding, self, peer, total), their CPU seconds (user+sys: the machine may be
shared, and the 1-minute load average is printed with each row) and states per
second; and the process's peak resident memory (``ru_maxrss``, everything
included, from the cohort tables to the signal frames).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _states(workspace: str, seed: int) -> tuple[object, str]:
    from pipelines.workspace import Workspace
    from recsys.interactions import CohortTables, build_dataset

    # the seeded test-data generator lives with the tests, not in the library
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from synthetic_cohort import synthetic_cohort

    ws = Workspace.at(workspace)
    if ws.has_table("index_encounters"):
        return build_dataset(CohortTables.from_workspace(ws)), f"real cohort at {workspace}"
    frames = synthetic_cohort(n_patients=300, seed=seed)
    return build_dataset(CohortTables.from_frames(frames)), "synthetic cohort (300 patients)"


def run_one(args: argparse.Namespace, n_states: int) -> dict[str, object]:
    import numpy as np

    from recsys.base import make_recommender
    from recsys.interactions import PatientStates, bootstrap_states
    from recsys.signals import peer_signals, self_signals

    t0 = time.perf_counter()
    source_states, source = _states(args.workspace, args.seed)
    assert isinstance(source_states, PatientStates)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    states = bootstrap_states(source_states, n_states, seed=args.seed)
    del source_states
    bootstrap_s = time.perf_counter() - t0
    train = states.split("train")
    params = json.loads(args.params) if args.params else {}
    t0 = time.perf_counter()
    model = make_recommender(args.model, **params).fit(train)
    fit_s = time.perf_counter() - t0

    # the loop of recsys.signals.signal_batches, timed part by part
    load_before = os.getloadavg()[0]
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    self_s = peer_s = 0.0
    n_items = n_reasons = n_peers = n_statements = 0
    pool_embeddings = model.embed(train)
    embed_s = time.perf_counter() - t0
    queries = states
    if args.max_queries and len(states) > args.max_queries:
        pick = np.random.default_rng(args.seed).choice(len(states), args.max_queries, replace=False)
        queries = states.subset(np.sort(pick))
    for start in range(0, len(queries), args.batch_size):
        batch = queries.subset(np.arange(start, min(len(queries), start + args.batch_size)))
        t1 = time.perf_counter()
        own = self_signals(model, batch, k=10, n_reasons=3)
        t2 = time.perf_counter()
        peers = peer_signals(
            model, batch, train, k=20, min_support=5, pool_embeddings=pool_embeddings
        )
        t3 = time.perf_counter()
        self_s += t2 - t1
        peer_s += t3 - t2
        n_items += len(own.items)
        n_reasons += len(own.reasons)
        n_peers += len(peers.peers)
        n_statements += len(peers.statements)
    signals_s = time.perf_counter() - t0
    signals_cpu_s = _cpu_seconds() - cpu0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {
        "source": source,
        "model": args.model,
        "n_states": len(states),
        "n_train_states": len(train),
        "n_query_states": len(queries),
        "n_items": states.n_items,
        "n_features": states.n_features,
        "build_source_s": round(build_s, 1),
        "bootstrap_s": round(bootstrap_s, 1),
        "fit_s": round(fit_s, 1),
        "pool_embed_s": round(embed_s, 1),
        "self_s": round(self_s, 1),
        "peer_s": round(peer_s, 1),
        "signals_s": round(signals_s, 1),
        "signals_cpu_s": round(signals_cpu_s, 1),
        "states_per_s": round(len(queries) / signals_s),
        "self_rows": n_items,
        "reason_rows": n_reasons,
        "peer_rows": n_peers,
        "statement_rows": n_statements,
        "peak_rss_gb": round(peak_gb, 2),
        "load_avg_1min": f"{load_before:.1f}->{os.getloadavg()[0]:.1f}",
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workspace", "-w", default="/tmp/pmlm-dev-ws")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--model", default="lightfm")
    parser.add_argument("--params", default="", help="model parameters as JSON")
    parser.add_argument("--batch-size", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--max-queries",
        type=int,
        default=0,
        help="compute signals for a seeded sample of this many states (0: all)",
    )
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.one is not None:
        print(json.dumps(run_one(args, args.one)))
        return
    rows = []
    for size in args.sizes:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--one", str(size)]
        cmd += ["--workspace", args.workspace, "--model", args.model, "--seed", str(args.seed)]
        cmd += ["--batch-size", str(args.batch_size), "--max-queries", str(args.max_queries)]
        if args.params:
            cmd += ["--params", args.params]
        t0 = time.perf_counter()
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        row["wall_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    import pandas as pd

    from recsys.evaluate import to_markdown

    table = pd.DataFrame(rows)
    print()
    print(f"source: {table['source'].iloc[0]}; model: {args.model}")
    print(to_markdown(table.drop(columns=["source", "model"]), digits=1))


if __name__ == "__main__":
    main()
