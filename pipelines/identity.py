"""Who a pseudonym is, kept on premises: the workspace's pseudonym secret, the
crosswalk from source ids to pseudonyms, and the ids of the input files.

- **The secret.** Pseudonyms are a salted hash of the source id
  (`pipelines.sources.pseudonym`). The salt is a random secret created at the
  first ingest in ``WORKSPACE/private/pseudonym.key`` (file mode 0600), so that
  pseudonyms cannot be recomputed from record numbers without it. The
  environment variable ``PMLM_PSEUDONYM_SALT`` overrides it (several workspaces
  that must share pseudonyms set the same value).
- **The crosswalk.** ``WORKSPACE/private/crosswalk.parquet`` maps (source
  system, source id) to the pseudonym: an app inside the hospital finds its
  patient's rows with `lookup` (``pmlm prompts lookup SOURCE_ID``). It never
  goes into an export, which writes only the table it is given.
- **File ids.** ``patients.source_file`` holds a file id (``f`` + 12 hex
  digits of a salted hash of the file's path), not a file name, which may hold
  a patient's name (Synthea writes ``Given_Family_uuid.json``).
  ``WORKSPACE/private/files.parquet`` maps ids back to paths.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipelines.errors import InputError, MissingStepError
from pipelines.integrity import secret_text
from pipelines.sources import DEFAULT_SALT
from pipelines.workspace import Workspace, atomic_write_bytes

SALT_ENV = "PMLM_PSEUDONYM_SALT"
CROSSWALK_COLUMNS = ["source_system", "source_id", "patient_id"]


def private_dir(workspace: Workspace) -> Path:
    return workspace.root / "private"


def secret_path(workspace: Workspace) -> Path:
    return private_dir(workspace) / "pseudonym.key"


def workspace_salt(workspace: Workspace) -> str:
    """``$PMLM_PSEUDONYM_SALT``, else the workspace's secret (created now if absent, mode 0600)."""
    if os.environ.get(SALT_ENV):
        return os.environ[SALT_ENV]
    return secret_text(
        secret_path(workspace),
        "restore it from a backup (a new one gives every patient a new pseudonym: "
        "ingest again and rebuild everything)",
    )


def file_id(name: str, salt: str | None = None) -> str:
    """The id of an input file (``f`` + 12 hex digits): stable, and no file name in it."""
    salt = salt if salt is not None else os.environ.get(SALT_ENV, DEFAULT_SALT)
    return "f" + hashlib.sha256(f"{salt}\x1ffile\x1f{name}".encode()).hexdigest()[:12]


def _write(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)  # as `workspace_salt` makes it: only its owner reads it
    # inside the ingest's transaction the file is published with its tables, mode kept
    atomic_write_bytes(path, frame.to_parquet(index=False), mode=0o600)


def write_crosswalk(
    workspace: Workspace, crosswalk: pd.DataFrame, files: list[str] | None, salt: str | None
) -> None:
    """Replace the crosswalk (``CROSSWALK_COLUMNS``) and, when given, the file list."""
    _write(
        private_dir(workspace) / "crosswalk.parquet",
        crosswalk[CROSSWALK_COLUMNS].astype(str).drop_duplicates().reset_index(drop=True),
    )
    if files is not None:
        ids = pd.DataFrame({"file_id": [file_id(n, salt) for n in files], "path": files})
        _write(private_dir(workspace) / "files.parquet", ids)


def lookup(workspace: Workspace, source_id: str, source_system: str | None = None) -> pd.DataFrame:
    """The crosswalk rows of ``source_id`` (in ``source_system`` when given).

    Raises MissingStepError (a FileNotFoundError) when the workspace has no
    crosswalk (ingest first).
    """
    path = private_dir(workspace) / "crosswalk.parquet"
    if not path.exists():
        raise MissingStepError(
            f"{path} does not exist: run `pmlm ingest ...` with --workspace {workspace.root} first"
        )
    crosswalk = pd.read_parquet(path)
    rows = crosswalk[crosswalk["source_id"] == str(source_id)]
    if source_system is not None:
        rows = rows[rows["source_system"] == source_system]
    return rows.reset_index(drop=True)


#: The prompt table's columns that `find_patient` returns (not the prompt text itself).
PROMPT_COLUMNS = ["patient_id", "encounter_id", "index_time", "method", "tokens"]


@dataclass(frozen=True)
class PatientRows:
    """Where an app finds one source patient: her pseudonyms and her prompt rows."""

    crosswalk: pd.DataFrame  # CROSSWALK_COLUMNS
    prompts: pd.DataFrame | None  # PROMPT_COLUMNS of the workspace's prompt table; None: none yet
    prompt_table: Path
    export: Path | None  # the exported parquet, when `pmlm export` has run


def find_patient(
    workspace: Workspace, source_id: str, source_system: str | None = None
) -> PatientRows:
    """``source_id``'s pseudonyms (`lookup`) and her rows of the prompt table.

    Raises InputError when the crosswalk does not hold ``source_id``.
    """
    rows = lookup(workspace, source_id, source_system)
    if rows.empty:
        where = f" of source system {source_system!r}" if source_system else ""
        raise InputError(
            f"no patient with source id {source_id!r}{where} in "
            f"{private_dir(workspace) / 'crosswalk.parquet'}: check the id (and --source-system), "
            "or ingest the source that holds her"
        )
    table = workspace.table_path("prompts")
    prompts = None
    if table.exists():
        pseudonyms = set(rows["patient_id"])
        frame = pd.read_parquet(table, columns=PROMPT_COLUMNS)
        prompts = frame[frame["patient_id"].isin(pseudonyms)]
        prompts = prompts.sort_values(["index_time", "method"], kind="stable").reset_index(
            drop=True
        )
    export = workspace.root / "export" / "prompts.parquet"
    return PatientRows(rows, prompts, table, export if export.exists() else None)
