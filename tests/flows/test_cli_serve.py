"""``pmlm serve`` stopped the way systemd or a container runtime stops it, then started again:
its deployments' schedules stay active, so the nightly refresh resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from flows.cli_serve import NIGHTLY, ON_DEMAND

NIGHTLY_NAME = f"pmlm-refresh/{NIGHTLY}"


def read_deployment(name: str) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(name)
        except ObjectNotFound:
            return None


def start_serve(prefect_api: str, workspace: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PREFECT_API_URL": prefect_api}
    with log.open("ab") as out:
        return subprocess.Popen(
            [str(Path(sys.executable).parent / "pmlm"), "serve", "-w", str(workspace)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )


def wait_until_served(process: subprocess.Popen[bytes], log: Path, since: float) -> Any:
    """The nightly deployment once this process's runner has polled for its runs."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"pmlm serve exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        found = read_deployment(NIGHTLY_NAME)
        if found is not None and found.last_polled and found.last_polled.timestamp() > since:
            return found
        time.sleep(1)
    pytest.fail(f"pmlm serve did not serve {NIGHTLY_NAME} in 240 s:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, as ``systemctl stop`` and ``docker stop`` send it."""
    process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def assert_schedule_active(name: str) -> None:
    found = read_deployment(name)
    assert found is not None, name
    assert found.paused is False, f"{name} was paused on shutdown"
    assert found.schedules and all(s.active for s in found.schedules), found.schedules


@pytest.mark.slow
def test_the_schedules_stay_active_across_a_restart(tmp_path: Path, prefect_server: str) -> None:
    log = tmp_path / "serve.log"
    for attempt in ("first start", "after a restart"):
        started = time.time()
        process = start_serve(prefect_server, tmp_path / "ws", log)
        try:
            served = wait_until_served(process, log, started)
        finally:
            code = stop(process)
        assert served.paused is False, attempt
        assert code in (0, -signal.SIGTERM), log.read_text()[-3000:]
        assert_schedule_active(NIGHTLY_NAME)
        on_demand = read_deployment(f"pmlm-evaluate/{ON_DEMAND}")
        assert on_demand is not None and on_demand.paused is False, attempt
