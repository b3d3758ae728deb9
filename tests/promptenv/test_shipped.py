"""The policy shipped with the default cohort (`promptenv.shipped`, `promptenv.steps.workspace_policy`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from policy_spaces import PolicySpaces

from pipelines.errors import InputError
from pipelines.integrity import TamperedFileError
from pipelines.workspace import Workspace
from promptenv.llm import LLMClient
from promptenv.policy import POLICY_FILE, load_policy, read_policy_info, save_policy
from promptenv.policy_info import PolicyInfo, TrainedWith, policy_dir
from promptenv.shipped import (
    MATCHED,
    PROVENANCE_FILE,
    SHIPPED_POLICY,
    install_shipped_policy,
    policy_mismatch,
    shipped_provenance,
)

VERSIONS = {
    "data_hash": "d1",
    "data_input": "default cohort",
    "recommender": "blend",
    "recommender_vocabulary": "v1",
}


def _shipped(folder: Path, llm: str, seed: int = 0, provenance: bool = True) -> Path:
    """A small policy saved as the shipped one is: trained with VERSIONS and ``llm``;
    ``provenance=False``: as a policy trained in a workspace is."""
    from sb3_contrib import MaskablePPO

    info = PolicyInfo(trained_with=TrainedWith(llm=llm, versions=VERSIONS))
    save_policy(MaskablePPO("MlpPolicy", PolicySpaces(), seed=seed, device="cpu"), info, folder)
    if provenance:
        (folder / PROVENANCE_FILE).write_text(json.dumps({"command": "pmlm policy train -w W"}))
    return folder


def _fitting_shipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Workspace, str, Path]:
    """A workspace of VERSIONS, its local LLM's label, and a shipped policy that fits it;
    training fails the test."""
    import promptenv.shipped
    import promptenv.steps as steps

    ws = Workspace.at(tmp_path / "ws")
    label = LLMClient("local", workspace=ws).label
    shipped = _shipped(tmp_path / "shipped", label)
    monkeypatch.setattr(promptenv.shipped, "SHIPPED_POLICY", shipped)
    monkeypatch.setattr(steps, "workspace_versions", lambda _ws: dict(VERSIONS))

    def no_training(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a fitting policy must not be trained again")

    monkeypatch.setattr(steps, "train_workspace_policy", no_training)
    return ws, label, shipped


def test_the_mismatch_names_what_differs() -> None:
    info = PolicyInfo(trained_with=TrainedWith(llm="local:m", versions=VERSIONS))
    assert policy_mismatch(info, {**VERSIONS, "llm": "local:m"}) is None
    for key in MATCHED:
        other = {**VERSIONS, "llm": "local:m", key: "other"}
        why = policy_mismatch(info, other)
        assert why is not None and key.replace("_", " ") in why and "'other'" in why
    # a workspace that does not know a version (no recommender fitted) never matches
    missing = {k: v for k, v in {**VERSIONS, "llm": "local:m"}.items() if k != "recommender"}
    assert "recommender" in (policy_mismatch(info, missing) or "")


def test_auto_installs_a_fitting_policy_without_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import promptenv.steps as steps

    ws, _label, shipped = _fitting_shipped(tmp_path, monkeypatch)
    said: list[str] = []
    got = steps.workspace_policy(ws, "local", steps.PolicySettings(), progress=said.append)
    assert got.shipped_by == "pmlm policy train -w W"
    assert got.policy.version == read_policy_info(shipped).version
    assert load_policy(policy_dir(ws)).info.version == got.policy.version
    assert sorted(p.name for p in policy_dir(ws).iterdir()) == sorted(
        p.name for p in shipped.iterdir()
    )
    assert any("does not train one" in m for m in said)


def test_a_policy_that_does_not_fit_is_trained_or_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import promptenv.shipped
    import promptenv.steps as steps

    ws = Workspace.at(tmp_path / "ws")
    shipped = _shipped(tmp_path / "shipped", "local:another-model")
    monkeypatch.setattr(promptenv.shipped, "SHIPPED_POLICY", shipped)
    monkeypatch.setattr(steps, "workspace_versions", lambda _ws: dict(VERSIONS))
    trained: list[str] = []

    class _Trained:
        policy, path = "trained-policy", policy_dir(ws)

    def train(*_a: Any, **_k: Any) -> Any:
        trained.append("yes")
        return _Trained()

    monkeypatch.setattr(steps, "train_workspace_policy", train)
    said: list[str] = []
    got = steps.workspace_policy(ws, "local", steps.PolicySettings(), progress=said.append)
    assert trained == ["yes"] and got.shipped_by == "" and got.policy == "trained-policy"
    assert any("does not fit" in m and "another-model" in m for m in said)
    with pytest.raises(InputError, match="shipped policy does not fit this workspace: its llm"):
        steps.workspace_policy(ws, "local", steps.PolicySettings(), source="shipped")
    with pytest.raises(InputError, match="not one of auto, train, shipped"):
        steps.workspace_policy(ws, "local", steps.PolicySettings(), source="ship")
    # train never looks at the shipped policy
    assert steps.workspace_policy(ws, "local", steps.PolicySettings(), source="train").policy
    assert trained == ["yes", "yes"]
    assert not policy_dir(ws).exists()


def test_auto_keeps_a_fitting_policy_trained_in_the_workspace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto``: the workspace's own policy where it fits; the shipped one where the own
    does not fit, or was itself a shipped one installed earlier; ``shipped`` installs."""
    import promptenv.steps as steps

    ws, label, shipped = _fitting_shipped(tmp_path, monkeypatch)
    version = read_policy_info(shipped).version
    settings = steps.PolicySettings()

    def policy_here() -> str:
        return read_policy_info(policy_dir(ws)).version

    _shipped(policy_dir(ws), label, seed=1, provenance=False)
    own_version = policy_here()
    assert own_version != version
    said: list[str] = []
    got = steps.workspace_policy(ws, "local", settings, progress=said.append)
    assert got.shipped_by == "" and got.policy.version == own_version == policy_here()
    assert any("trained in this workspace" in m and "kept" in m for m in said)
    # shipped: the shipped one, even over a fitting own policy
    assert steps.workspace_policy(ws, "local", settings, source="shipped").shipped_by
    assert policy_here() == version
    # an installed shipped policy of another PMLM gives way to this PMLM's shipped one
    shutil.rmtree(policy_dir(ws))
    _shipped(policy_dir(ws), label, seed=2)
    assert policy_here() not in (version, own_version)
    assert steps.workspace_policy(ws, "local", settings).policy.version == version == policy_here()
    # an own policy trained with another LLM does not fit: the shipped one is installed
    shutil.rmtree(policy_dir(ws))
    _shipped(policy_dir(ws), "local:another-model", seed=1, provenance=False)
    assert steps.workspace_policy(ws, "local", settings).shipped_by
    assert policy_here() == version


def test_damaged_shipped_weights_are_refused_and_the_workspace_untouched(tmp_path: Path) -> None:
    ws = Workspace.at(tmp_path / "ws")
    shipped = _shipped(tmp_path / "shipped", "local:m")
    other = _shipped(tmp_path / "other", "local:m", seed=1)
    (shipped / POLICY_FILE).write_bytes(b"not a zip")
    with pytest.raises(TamperedFileError):
        install_shipped_policy(ws, shipped)
    assert not policy_dir(ws).exists()
    shutil.copyfile(other / POLICY_FILE, shipped / POLICY_FILE)  # weights of another policy
    with pytest.raises(TamperedFileError, match="is not the policy"):
        install_shipped_policy(ws, shipped)
    assert not policy_dir(ws).exists()


def test_the_shipped_policy_loads_and_fits_the_default_cohort(tmp_path: Path) -> None:
    """The files in the repository: weights of the version policy.json names, the command
    that trained them, the default cohort's data hash (as this code prepares it) and the
    local LLM."""
    from pipelines.cohort import prepare_default_cohort

    policy = load_policy(SHIPPED_POLICY)
    provenance = shipped_provenance(SHIPPED_POLICY)
    assert "pmlm policy train" in provenance["command"] and provenance["commit"]
    trained = policy.info.trained_with
    ws = Workspace.at(tmp_path / "ws")
    prepare_default_cohort(ws)
    ingest = ws.read_manifest()["steps"]["ingest"]
    assert trained.versions["data_hash"] == ingest["data_hash"]
    assert trained.versions["data_input"] == ingest["input"]
    assert trained.llm == LLMClient("local", workspace=ws).label
