"""``pmlm policy train|show|apply`` on a built workspace, answers from the echoing stub LLM server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


@pytest.mark.slow
def test_policy_train_show_apply(built_workspace: Path, tmp_path: Path, echo_llm: Any) -> None:
    ws = tmp_path / "ws"
    shutil.copytree(built_workspace, ws)
    with echo_llm() as (stub, backend):
        args = ["--timesteps", "64", "--n-train", "4", "--n-validation", "2", "--eval-freq", "32"]
        trained = runner.invoke(
            app, ["policy", "train", "-w", str(ws), "--backend", backend, *args]
        )
        assert trained.exit_code == 0, trained.output
        asked = len(stub.requests)
    assert asked > 0
    info = json.loads((ws / "models" / "policy" / "policy.json").read_text())
    assert f"policy {info['version']}" in trained.output
    # the workspace's data and recommender versions travel with the policy
    assert info["trained_with"]["recommender"] and info["trained_with"]["data_hash"]
    assert info["trained_with"]["train_encounters"] == 4
    # PPO trains whole rollouts: 64 steps asked are one rollout of n_steps
    assert info["training"]["timesteps"] == max(64, info["settings"]["n_steps"])

    shown = runner.invoke(app, ["policy", "show", "-w", str(ws)])
    assert shown.exit_code == 0 and info["version"] in shown.output
    applied = runner.invoke(app, ["policy", "apply", "-w", str(ws)])  # no LLM: the stub is gone
    assert applied.exit_code == 0, applied.output
    prompts = pd.read_parquet(ws / "tables" / "prompts.parquet")
    refined = prompts[prompts["method"] == "pmlm"]
    assert len(refined) == prompts["patient_id"].nunique()
    assert (refined["provenance"].map(lambda p: json.loads(p)["policy"]) == info["version"]).all()


@pytest.mark.slow
def test_policy_train_with_the_reward_model_and_batched_answers(
    built_workspace: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    echo_llm: Any,
) -> None:
    """``--reward-model`` trains in rounds within ``--max-llm-calls``; ``--llm-parallel`` reaches
    every LLM client of the process (through $PMLM_LLM_PARALLEL)."""
    from promptenv.llm.config import PARALLEL_ENV, ClientConfig

    ws = tmp_path / "ws"
    shutil.copytree(built_workspace, ws)
    monkeypatch.setenv(PARALLEL_ENV, "1")  # monkeypatch restores what the command sets
    with echo_llm() as (_, backend):
        args = ["--reward-model", "--model-rounds", "2", "--timesteps", "64", "--n-train", "4"]
        args += ["--n-validation", "2", "--max-llm-calls", "30", "--llm-parallel", "3"]
        args += ["--edits", "add self, fewer self"]
        trained = runner.invoke(
            app, ["policy", "train", "-w", str(ws), "--backend", backend, *args]
        )
    assert trained.exit_code == 0, trained.output
    assert ClientConfig().local_parallel == 3
    info = json.loads((ws / "models" / "policy" / "policy.json").read_text())
    assert info["settings"]["reward_model"] and info["settings"]["model_rounds"] == 2
    assert info["training"]["llm_calls"] <= 30
    assert 1 <= len(info["training"]["validation_curve"]) <= 2
    assert info["settings"]["edits"] == ["add self", "fewer self"]

    bad = runner.invoke(app, ["policy", "train", "-w", str(ws), "--llm-parallel", "0"])
    assert bad.exit_code == 2 and "--llm-parallel" in bad.output


def test_policy_edits_lists_what_edits_takes_and_an_unknown_one_is_a_one_line_error(
    tmp_path: Path,
) -> None:
    listed = runner.invoke(app, ["policy", "edits"])
    assert listed.exit_code == 0
    labels = listed.output.splitlines()
    assert "add self" in labels and "fewer peer" in labels and "stop" not in labels
    bad = runner.invoke(app, ["policy", "train", "-w", str(tmp_path), "--edits", "add selff"])
    assert bad.exit_code == 2
    assert "'add selff'" in bad.output and "pmlm policy edits" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "models").exists()
