"""The policy shipped with the built-in default cohort (``promptenv/data/default_policy``).

The main job's own training is a few hundred PPO steps on 8 encounters: a few minutes,
and on the default cohort it falls back to the best fixed prompt. The shipped policy
was trained longer, by the command its ``PROVENANCE.json`` records, on a workspace
that ``pmlm run`` prepared from the default cohort. The main job uses it instead of
training (`workspace_policy` in `promptenv.steps`, ``pmlm run --policy auto``) only
when the workspace's data hash, chosen recommender, the recommender's item vocabulary
and the LLM are the ones it was trained with (`policy_mismatch`), and the workspace does
not already hold a policy trained on it that fits as well; otherwise the main job trains as
before, and says why.

The files are loaded as any workspace policy is (`promptenv.policy.load_policy`: the
weights must be the version ``policy.json`` names, and nothing is unpickled), then
published into the workspace's ``models/policy`` whole.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipelines.workspace import Workspace, publishing_dir
from promptenv.policy import Policy, load_policy
from promptenv.policy_info import INFO_FILE, POLICY_FILE, PolicyInfo, policy_dir

#: Where the shipped policy lives (``policy.zip``, ``policy.json``, ``PROVENANCE.json``).
SHIPPED_POLICY = Path(__file__).parent / "data" / "default_policy"
PROVENANCE_FILE = "PROVENANCE.json"
#: What must be equal between the workspace and the shipped policy's ``trained_with``.
MATCHED = ("data_hash", "recommender", "recommender_vocabulary", "llm")


def policy_mismatch(info: PolicyInfo, versions: Mapping[str, Any]) -> str | None:
    """Why a policy trained with ``info`` does not fit a workspace of ``versions`` (its
    data hash, recommender, vocabulary and LLM label); None when it fits."""
    trained = {**dict(info.trained_with.versions), "llm": info.trained_with.llm}
    for key in MATCHED:
        have, want = versions.get(key), trained.get(key)
        if not have or have != want:
            return f"its {key.replace('_', ' ')} is {want!r}, this workspace's is {have!r}"
    return None


def shipped_provenance(folder: Path = SHIPPED_POLICY) -> dict[str, Any]:
    """The shipped policy's ``PROVENANCE.json`` (the command that trained it, when, where)."""
    data: dict[str, Any] = json.loads((folder / PROVENANCE_FILE).read_text())
    return data


def install_shipped_policy(ws: Workspace, folder: Path = SHIPPED_POLICY) -> Policy:
    """Check the policy in ``folder`` (`load_policy`) and publish it as the workspace's
    ``models/policy``, whole (a kill leaves the old policy or this one); the files are
    copied byte for byte, so the policy checked is the policy installed."""
    policy = load_policy(folder)
    with publishing_dir(policy_dir(ws)) as new:
        for name in (POLICY_FILE, INFO_FILE, PROVENANCE_FILE):
            shutil.copyfile(folder / name, new / name)
    return policy


__all__ = [
    "MATCHED",
    "PROVENANCE_FILE",
    "SHIPPED_POLICY",
    "install_shipped_policy",
    "policy_mismatch",
    "shipped_provenance",
]
