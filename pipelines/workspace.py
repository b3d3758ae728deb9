"""The workspace: one folder that holds every step's inputs and outputs.

Layout::

    WORKSPACE/
      manifest.json          what was written, by which step, from what input
      tables/NAME.parquet    the canonical tables (see pipelines.schemas)
      models/                recommender and policy files (later steps)
      cache/                 LLM cache and ledger (later steps)
      reports/               evaluation tables and reports

The default folder is ``./pmlm-workspace``; the environment variable
``PMLM_WORKSPACE`` or the ``--workspace`` option of every command overrides it.
Writes are atomic: a table is written to a temporary file and renamed, so a
reader never sees half a table.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.schemas import SCHEMA_VERSION, TABLES

DEFAULT_WORKSPACE = Path("pmlm-workspace")


def default_workspace() -> Path:
    """The workspace folder used when none is given: ``$PMLM_WORKSPACE`` or ``./pmlm-workspace``."""
    return Path(os.environ.get("PMLM_WORKSPACE", DEFAULT_WORKSPACE))


class MissingTableError(FileNotFoundError):
    """A step asked for a table that no earlier step has written."""


def to_arrow(name: str, frame: pd.DataFrame) -> pa.Table:
    """Convert a frame to the canonical schema of table ``name`` (column order, types).

    Raises ValueError naming the table and the columns when the frame does not fit.
    """
    schema = TABLES[name]
    missing = [f.name for f in schema if f.name not in frame.columns]
    if missing:
        raise ValueError(f"table {name!r}: missing columns {missing}")
    try:
        return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    except (ValueError, TypeError, pa.ArrowException) as exc:
        raise ValueError(f"table {name!r} does not fit its schema: {exc}") from exc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish(tmp: str, path: Path, mode: int | None = None) -> None:
    """Give a temporary file the usual permissions (mkstemp makes it private), or ``mode``,
    and rename it."""
    os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
    os.replace(tmp, path)


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half;
    ``mode``: its permissions (default: readable as the umask allows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        _publish(tmp, path, mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class Workspace:
    """A workspace folder. Cheap to create; nothing is read until asked."""

    root: Path

    @classmethod
    def at(cls, root: Path | str | None = None) -> Workspace:
        return cls(Path(root) if root is not None else default_workspace())

    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def table_path(self, name: str) -> Path:
        return self.tables_dir / f"{name}.parquet"

    def has_table(self, name: str) -> bool:
        return self.table_path(name).exists()

    def write_table(self, name: str, frame: pd.DataFrame | pa.Table) -> Path:
        """Write a canonical table atomically (schema-checked) and return its path."""
        table = frame if isinstance(frame, pa.Table) else to_arrow(name, frame)
        if name in TABLES and not table.schema.equals(TABLES[name]):
            table = table.select(TABLES[name].names).cast(TABLES[name])
        path = self.table_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{name}.", suffix=".tmp")
        os.close(fd)
        try:
            pq.write_table(table, tmp, compression="zstd")
            _publish(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def read_table(self, name: str) -> pd.DataFrame:
        """Read a table as a pandas frame; MissingTableError says which step writes it."""
        path = self.table_path(name)
        if not path.exists():
            raise MissingTableError(
                f"{path} does not exist: run `pmlm ingest ...` (or `pmlm run`) "
                f"with --workspace {self.root} first"
            )
        return pq.read_table(path).to_pandas()

    def read_manifest(self) -> dict[str, Any]:
        if not self.manifest_path.exists():
            return {"schema_version": SCHEMA_VERSION, "steps": {}}
        data: dict[str, Any] = json.loads(self.manifest_path.read_text())
        return data

    def record_step(self, step: str, details: Mapping[str, Any]) -> None:
        """Record in the manifest that ``step`` ran, with what it read and wrote."""
        manifest = self.read_manifest()
        manifest["schema_version"] = SCHEMA_VERSION
        manifest.setdefault("steps", {})[step] = {
            **details,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        atomic_write_bytes(self.manifest_path, json.dumps(manifest, indent=2, default=str).encode())
