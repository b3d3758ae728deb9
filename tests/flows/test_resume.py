"""A main job killed with SIGKILL in the middle of its LLM calls resumes without asking again.

``pmlm run`` runs in a subprocess against the stub LLM server (an OpenAI-compatible
server on loopback that records every request). The stub answers the first
requests and then holds the later ones; once the answered ones are in the LLM
client's cache, the subprocess is killed with SIGKILL. The rerun must finish,
and none of the requests answered before the kill may reach the stub again.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ANSWERED_BEFORE_KILL = 6


def _run_main_job(ws: Path, backend: str, api_url: str, log: Path) -> subprocess.Popen[bytes]:
    pmlm = Path(sys.executable).parent / "pmlm"
    env = {
        **os.environ,
        "OPENAI_API_KEY": "stub-key",
        "PREFECT_API_URL": api_url,  # the session's test server: no server of its own
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    env.pop("OPENAI_BASE_URL", None)
    with log.open("ab") as out:
        # its own process group, so that the kill reaches any child it started
        return subprocess.Popen(
            # a short policy training: this test is about the resume, not the policy
            [
                *(
                    str(pmlm),
                    "run",
                    "-w",
                    str(ws),
                    "--backend",
                    backend,
                    "--n-obstetric",
                    "2",
                    "--n-adult",
                    "2",
                ),
                *("--policy-timesteps", "64", "--policy-encounters", "6"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _cached_answers(ws: Path) -> int:
    from promptenv.llm.cache import ResponseCache

    path = ws / "cache" / "llm_cache.sqlite"
    return len(ResponseCache(path)) if path.exists() else 0


@pytest.mark.slow(seconds=115)
def test_main_job_killed_mid_evaluation_resumes_without_repeating_llm_calls(
    built_workspace: Path, prefect_server: str, tmp_path: Path, stub_llm_server: Any
) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(built_workspace, ws)
    log = tmp_path / "run.log"
    # echoed answers mention what the prompts told: the threshold calibration needs that
    stub = stub_llm_server(echo=True).start()
    try:
        backend = f"openai:stub-model@{stub.url}/v1"
        stub.hold_after(ANSWERED_BEFORE_KILL)
        job = _run_main_job(ws, backend, prefect_server, log)
        deadline = time.monotonic() + 600
        # the answered requests are cached, and the job is waiting for a held one
        while not (
            _cached_answers(ws) >= ANSWERED_BEFORE_KILL
            and len(stub.requests) > ANSWERED_BEFORE_KILL
        ):
            assert job.poll() is None, f"the job ended early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no LLM call came:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
        assert job.returncode == -signal.SIGKILL
        answered = [r.body for r in stub.requests[:ANSWERED_BEFORE_KILL]]
        held = {r.body for r in stub.requests[ANSWERED_BEFORE_KILL:]}
        assert _cached_answers(ws) == ANSWERED_BEFORE_KILL
        sent_before_rerun = len(stub.requests)

        stub.release()
        rerun = _run_main_job(ws, backend, prefect_server, log)
        assert rerun.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        stub.release()
        stub.stop()

    resent = [r.body for r in stub.requests[sent_before_rerun:]]
    assert resent, "the rerun asked the LLM nothing"
    assert not set(answered) & set(resent), "an answer received before the kill was asked again"
    assert held <= set(resent), "a request left unanswered by the kill was not asked again"
    assert (ws / "tables" / "prompts.parquet").exists()
    report = (ws / "reports" / "evaluation.md").read_text()
    counts = re.search(r"LLM cache: (\d+) hits, (\d+) misses", report)
    assert counts is not None, report
    # the evaluation's misses are among the rerun's requests (the policy's training asks too)
    assert int(counts[1]) >= ANSWERED_BEFORE_KILL and 0 < int(counts[2]) <= len(set(resent))
    assert (ws / "export" / "prompts.manifest.json").exists()
    assert "Report:" in log.read_text()
