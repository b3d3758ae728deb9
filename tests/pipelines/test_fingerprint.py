"""Per-patient record fingerprints and the row hashes of the incremental refresh."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipelines.fingerprint import (
    code_fingerprint,
    cohort_fingerprint,
    compare_fingerprints,
    matrix_row_hashes,
    patient_fingerprints,
)


def test_only_the_patients_whose_rows_changed_get_a_new_fingerprint(
    default_tables: dict[str, pd.DataFrame],
) -> None:
    before = patient_fingerprints(default_tables)
    assert len(before) == len(default_tables["patients"])
    events = default_tables["events"]
    edited = events.copy()
    edited.loc[edited.index[10], "value"] = 123.456
    changed = events.loc[events.index[10], "patient_id"]
    gone = default_tables["patients"]["patient_id"].iloc[-1]
    after_tables = {
        **default_tables,
        # rows in another order: the same records
        "encounters": default_tables["encounters"].sample(frac=1.0, random_state=0),
        "events": edited[edited["patient_id"] != gone],
    }
    after_tables["patients"] = pd.concat(
        [default_tables["patients"], default_tables["patients"].iloc[[0]].assign(patient_id="pnew")]
    )
    changes = compare_fingerprints(before, patient_fingerprints(after_tables))
    assert changes.added == ("pnew",)
    assert set(changes.modified) == {changed, gone}
    assert changes.removed == ()
    assert changes.unchanged == len(before) - 2
    assert cohort_fingerprint(before) == cohort_fingerprint(patient_fingerprints(default_tables))
    assert cohort_fingerprint(before) != cohort_fingerprint(patient_fingerprints(after_tables))


def test_a_missing_table_is_named() -> None:
    with pytest.raises(KeyError, match="notes"):
        patient_fingerprints({"patients": pd.DataFrame({"patient_id": ["p1"]})}, ["notes"])


def test_matrix_row_hashes_see_values_and_columns_and_leave_the_matrix_alone() -> None:
    # an explicit zero: cleaning it up must happen on a copy (a shared index array once
    # corrupted the recommender states that were hashed)
    matrix = sp.csr_matrix(
        (np.array([1.0, 0.0, 2.0], dtype=np.float32), np.array([0, 1, 2]), np.array([0, 2, 3])),
        shape=(2, 3),
    )
    kept = (matrix.data.copy(), matrix.indices.copy(), matrix.indptr.copy())
    hashes = matrix_row_hashes(matrix)
    assert all(
        np.array_equal(a, b)
        for a, b in zip(kept, (matrix.data, matrix.indices, matrix.indptr), strict=True)
    )
    assert hashes[0] != hashes[1]
    same_row = sp.csr_matrix(np.array([[9.0, 9.0, 9.0], [0.0, 0.0, 2.0]], dtype=np.float32))
    assert matrix_row_hashes(same_row)[1] == hashes[1]
    moved = sp.csr_matrix(np.array([[0.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=np.float32))
    assert matrix_row_hashes(moved)[1] != hashes[1]
    dense = np.array([[1.0, 0.5], [1.0, 0.5000001]], dtype=np.float32)
    first, second = matrix_row_hashes(dense)
    assert first != second


def test_the_code_fingerprint_follows_every_source_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "pmlm_fake_pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "model.py").write_text("WEIGHT = 1\n")
    (package / "notes.txt").write_text("not code")
    monkeypatch.syspath_prepend(str(tmp_path))
    key = code_fingerprint.__wrapped__(("pmlm_fake_pkg",))
    assert key == code_fingerprint.__wrapped__(("pmlm_fake_pkg",))
    (package / "notes.txt").write_text("still not code")
    assert code_fingerprint.__wrapped__(("pmlm_fake_pkg",)) == key
    (package / "sub" / "model.py").write_text("WEIGHT = 2\n")
    assert code_fingerprint.__wrapped__(("pmlm_fake_pkg",)) != key
    assert len(code_fingerprint()) == 16
    with pytest.raises(ModuleNotFoundError, match="'no_such_pmlm_pkg' is not importable"):
        code_fingerprint.__wrapped__(("no_such_pmlm_pkg",))
