"""Loading a policy runs nothing of its zip: only weights are read (`promptenv.policy.load_weights`)."""

from __future__ import annotations

import base64
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from policy_spaces import PolicySpaces

from pipelines.errors import StaleStateError
from pipelines.integrity import TamperedFileError
from promptenv.editing import N_CONFIG_FEATURES, N_EDITS, N_PATIENT_FEATURES, STOP
from promptenv.policy import WEIGHTS_MEMBER, load_weights


class _Payload:
    """Unpickling this writes the marker file: what a doctored zip would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def saved(tmp_path: Path) -> tuple[Path, Any]:
    from sb3_contrib import MaskablePPO

    model = MaskablePPO("MlpPolicy", PolicySpaces(), seed=0, device="cpu")
    path = tmp_path / "policy.zip"
    model.save(path)
    return path, model


def _rewrite(path: Path, member: str, data: bytes) -> None:
    with zipfile.ZipFile(path) as archive:
        members = {n: archive.read(n) for n in archive.namelist()}
    members[member] = data
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in members.items():
            archive.writestr(name, content)


def test_the_weights_load_into_the_same_network(saved: tuple[Path, Any]) -> None:
    path, model = saved
    network = load_weights(path)
    obs = np.random.default_rng(0).random((8, N_PATIENT_FEATURES + N_CONFIG_FEATURES), np.float32)
    mask = np.ones((8, N_EDITS), dtype=bool)
    mask[:, STOP] = True
    ours, _ = network.predict(obs, action_masks=mask, deterministic=True)
    theirs, _ = model.predict(obs, action_masks=mask, deterministic=True)
    assert (ours == theirs).all()


def test_a_doctored_serialized_entry_is_never_unpickled(
    saved: tuple[Path, Any], tmp_path: Path
) -> None:
    """SB3's own load would run this entry; ours never reads it."""
    import cloudpickle

    path, _ = saved
    marker = tmp_path / "pwned-data"
    with zipfile.ZipFile(path) as archive:
        data = json.loads(archive.read("data"))
    blob = base64.b64encode(cloudpickle.dumps(_Payload(marker))).decode()
    data["observation_space"] = {":type:": "<class 'x'>", ":serialized:": blob}
    _rewrite(path, "data", json.dumps(data).encode())
    load_weights(path)
    assert not marker.exists()


def test_weights_that_are_code_are_refused_in_one_line(
    saved: tuple[Path, Any], tmp_path: Path
) -> None:
    path, _ = saved
    marker = tmp_path / "pwned-weights"
    buffer = io.BytesIO()
    torch.save({"weights": _Payload(marker)}, buffer)
    _rewrite(path, WEIGHTS_MEMBER, buffer.getvalue())
    with pytest.raises(TamperedFileError, match="holds more than weights") as caught:
        load_weights(path)
    assert not marker.exists()
    assert isinstance(caught.value, StaleStateError) and "\n" not in str(caught.value)
    assert "pmlm policy train" in str(caught.value)


def test_a_file_that_is_no_policy_is_refused(tmp_path: Path, saved: tuple[Path, Any]) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not a zip")
    with pytest.raises(TamperedFileError, match="is not a policy PMLM saved"):
        load_weights(junk)
    path, _ = saved
    _rewrite(
        path, WEIGHTS_MEMBER, _torch_bytes({"mlp_extractor.policy_net.0.weight": torch.zeros(2, 2)})
    )
    with pytest.raises(TamperedFileError, match="do not fit"):
        load_weights(path)


def _torch_bytes(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_a_saved_policy_is_published_whole_and_its_weights_must_match_its_info(
    tmp_path: Path,
) -> None:
    """policy.zip and policy.json are one folder swapped in at once; weights beside another
    policy's policy.json (a kill between two writes, or a copied file) are refused."""
    from sb3_contrib import MaskablePPO

    from promptenv.policy import POLICY_FILE, load_policy, save_policy
    from promptenv.policy_info import PolicyInfo

    one, two = tmp_path / "one", tmp_path / "two"
    saved_one = save_policy(
        MaskablePPO("MlpPolicy", PolicySpaces(), seed=0, device="cpu"), PolicyInfo(), one
    )
    saved_two = save_policy(
        MaskablePPO("MlpPolicy", PolicySpaces(), seed=1, device="cpu"), PolicyInfo(), two
    )
    assert saved_one.info.version != saved_two.info.version
    assert sorted(p.name for p in one.iterdir()) == ["policy.json", POLICY_FILE]
    assert load_policy(one).info.version == saved_one.info.version
    (one / POLICY_FILE).write_bytes((two / POLICY_FILE).read_bytes())
    with pytest.raises(TamperedFileError, match=f"is not the policy {saved_one.info.version}"):
        load_policy(one)
    # saving again replaces the folder whole: nothing of the old one is left
    (two / "stray.txt").write_text("x")
    save_policy(MaskablePPO("MlpPolicy", PolicySpaces(), seed=2, device="cpu"), PolicyInfo(), two)
    assert sorted(p.name for p in two.iterdir()) == ["policy.json", POLICY_FILE]
