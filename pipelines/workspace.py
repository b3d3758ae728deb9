"""The workspace: one folder that holds every step's inputs and outputs.

Layout::

    WORKSPACE/
      manifest.json          what was written, by which step, from what input
      tables/NAME.parquet    the canonical tables (see pipelines.schemas)
      models/                recommender and policy files (later steps)
      cache/                 LLM cache and ledger (later steps)
      reports/               evaluation tables and reports
      private/               the deny-list of the privacy guard (mode 0700)
      .lock                  the writers' lock (`pipelines.lock`): who holds it
      .txn/                  transactions being written or published

The default folder is ``./pmlm-workspace``; the environment variable
``PMLM_WORKSPACE`` or the ``--workspace`` option of every command overrides it.

Transactions. A step writes everything inside ``with ws.transaction("step")``
(or a function decorated with `transactional`): it holds the workspace lock,
and every table, file, folder (`publishing_dir`) and manifest entry it writes
goes to ``.txn/ID/`` first. At the end the files are fsynced, a journal
``.txn/ID/COMMIT`` listing them is written and fsynced (the commit point),
each file is renamed into place, the manifest last (its ``generation`` counts
the commits), and the folder is removed. A step killed before the commit point
leaves the previous state (its folder is removed by the next writer); one
killed after it is finished by the next writer or reader, which replays the
journal: the workspace is the old state or the new one, never a mix. A reader
that meets an unfinished journal it cannot replay (a writer is publishing, or
the workspace is read-only) refuses with `IncompleteWorkspaceError`.
``write_table``, ``record_step`` and `atomic_write_bytes` outside a
transaction are each a transaction of their own; inside one they join it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import lock
from pipelines.errors import MissingStepError
from pipelines.schemas import SCHEMA_VERSION, TABLES

DEFAULT_WORKSPACE = Path("pmlm-workspace")
TXN_DIR = ".txn"
JOURNAL = "COMMIT"
#: Test hook: the process exits (code 9) right after its N-th staged write or rename.
FAULT_ENV = "PMLM_FAULT_AFTER_WRITES"

P = ParamSpec("P")
R = TypeVar("R")


def default_workspace() -> Path:
    """The workspace folder used when none is given: ``$PMLM_WORKSPACE`` or ``./pmlm-workspace``."""
    return Path(os.environ.get("PMLM_WORKSPACE", DEFAULT_WORKSPACE))


class MissingTableError(MissingStepError):
    """A step asked for a table that no earlier step has written."""


class IncompleteWorkspaceError(RuntimeError):
    """The workspace holds a step's half-published files that cannot be finished now."""


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


_writes = [0]


def _fault_point() -> None:
    """The kill hook of the crash tests (`FAULT_ENV`): count a write, exit at the N-th."""
    limit = os.environ.get(FAULT_ENV)
    if limit:
        _writes[0] += 1
        if _writes[0] >= int(limit):
            os._exit(9)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder under a folder."""
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        for folder in [path, *(c for c in path.rglob("*") if c.is_dir())]:
            _fsync_dir(folder)
    else:
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())


def _write_now(path: Path, data: bytes, mode: int | None) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync it and rename it over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half;
    ``mode``: its permissions (default: readable as the umask allows).

    Inside a transaction of the workspace that holds ``path``, the file is published with
    the transaction's other files.
    """
    txn = _transaction_of(path)
    if txn is not None:
        txn.write_bytes(path, data, mode)
    else:
        _write_now(path, data, mode)


_local = threading.local()
_commit_guard = threading.Lock()


def _active() -> dict[Path, Transaction]:
    active: dict[Path, Transaction] | None = getattr(_local, "active", None)
    if active is None:
        active = _local.active = {}
    return active


def _transaction_of(path: Path) -> Transaction | None:
    """This thread's open transaction of the workspace holding ``path`` (the innermost)."""
    active = _active()
    if not active:
        return None
    resolved = path.resolve()
    roots = [root for root in active if resolved.is_relative_to(root)]
    if not roots:
        return None
    root = max(roots, key=lambda r: len(r.parts))
    # a file inside a staged folder (a model's part) is written where it is
    return None if resolved.is_relative_to(root / TXN_DIR) else active[root]


class Transaction:
    """What one step writes, staged under ``.txn/ID/`` until `commit` publishes it all."""

    def __init__(self, workspace: Workspace, step: str, manifest: bool = True) -> None:
        self.workspace = workspace
        self.step = step
        #: False for a folder that is not a workspace (an export): no manifest.json
        self.manifest = manifest
        self.folder = workspace.root / TXN_DIR / f"{_safe(step)}-{uuid.uuid4().hex[:12]}"
        (self.folder / "files").mkdir(parents=True)
        #: final path (relative to the workspace) → staged path; in write order
        self.staged: dict[str, Path] = {}
        self.steps: dict[str, dict[str, Any]] = {}

    def _relative(self, path: Path) -> str:
        return str(path.resolve().relative_to(self.workspace.root.resolve()))

    def stage_path(self, path: Path) -> Path:
        """Where to write the new ``path`` (a file or a folder) of this transaction."""
        relative = self._relative(path)
        staged = self.folder / "files" / relative
        staged.parent.mkdir(parents=True, exist_ok=True)
        self.staged[relative] = staged
        return staged

    def staged_version(self, path: Path) -> Path | None:
        """The staged new version of ``path``, if this transaction wrote one."""
        return self.staged.get(self._relative(path))

    def write_bytes(self, path: Path, data: bytes, mode: int | None = None) -> None:
        staged = self.stage_path(path)
        staged.write_bytes(data)
        os.chmod(staged, 0o666 & ~_umask() if mode is None else mode)
        _fault_point()

    def write_table(self, name: str, table: pa.Table) -> Path:
        staged = self.stage_path(self.workspace.table_path(name))
        pq.write_table(table, staged, compression="zstd")
        os.chmod(staged, 0o666 & ~_umask())
        _fault_point()
        return self.workspace.table_path(name)

    def record_step(self, step: str, details: Mapping[str, Any]) -> None:
        self.steps[step] = {
            **details,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }

    def commit(self) -> None:
        """Publish every staged file and the manifest together (see the module docstring)."""
        if not self.staged and not self.steps:
            shutil.rmtree(self.folder)
            return
        pairs = [
            [str(staged.relative_to(self.folder)), relative]
            for relative, staged in self.staged.items()
        ]
        if self.manifest:
            manifest = self.workspace.read_manifest()
            manifest["schema_version"] = SCHEMA_VERSION
            manifest["generation"] = int(manifest.get("generation", 0)) + 1
            manifest.setdefault("steps", {}).update(self.steps)
            staged_manifest = self.folder / "manifest.json"
            staged_manifest.write_bytes(json.dumps(manifest, indent=2, default=str).encode())
            os.chmod(staged_manifest, 0o666 & ~_umask())
            pairs.append(["manifest.json", "manifest.json"])  # last: readers check it
        for staged, _ in pairs:
            _fsync_tree(self.folder / staged)
        for folder in {p.parent for p in self.folder.rglob("*")}:
            _fsync_dir(folder)
        journal = {"step": self.step, "pid": os.getpid(), "files": pairs}
        _write_now(self.folder / JOURNAL, json.dumps(journal).encode(), None)  # the commit point
        _fault_point()
        _replay(self.workspace.root, self.folder)


def _safe(step: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in step)[:40] or "step"


def _replay(root: Path, folder: Path) -> None:
    """Rename a committed transaction's files into place (again: each rename is done
    once), then remove its folder. A folder replaces the old one, which goes to trash."""
    journal = json.loads((folder / JOURNAL).read_text())
    touched: set[Path] = set()
    for staged_rel, final_rel in journal["files"]:
        staged, final = folder / staged_rel, root / final_rel
        if not staged.exists() and not staged.is_symlink():
            continue  # renamed before a kill
        final.parent.mkdir(parents=True, exist_ok=True)
        if staged.is_dir() and final.exists():
            trash = folder / "trash" / staged_rel
            trash.parent.mkdir(parents=True, exist_ok=True)
            os.replace(final, trash)
        os.replace(staged, final)
        touched.add(final.parent)
        _fault_point()
    for parent in touched:
        _fsync_dir(parent)
    shutil.rmtree(folder)
    with contextlib.suppress(OSError):  # another transaction's folder is in it
        folder.parent.rmdir()
    _fsync_dir(root)


def _pending(root: Path) -> list[Path]:
    txn = root / TXN_DIR
    if not txn.is_dir():
        return []
    return sorted(f for f in txn.iterdir() if (f / JOURNAL).exists())


def recover(root: Path) -> None:
    """With the lock held: finish committed transactions, drop unfinished ones."""
    txn = root / TXN_DIR
    if not txn.is_dir():
        return
    for folder in sorted(txn.iterdir()):
        if (folder / JOURNAL).exists():
            _replay(root, folder)
        else:
            shutil.rmtree(folder)  # killed before its commit point: the old state stands


def transactional(
    step: str, folder: str | None = None
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Run the decorated function in one transaction of the workspace given as its first
    argument (a `Workspace`, a path, or None for the default).

    ``folder``: instead, the name of the argument holding a folder that is not a
    workspace (an export's): its files publish together, with no manifest.json.
    """

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            if folder is None:
                first = args[0]
                root = first if isinstance(first, Workspace) else Workspace.at(first)  # type: ignore[arg-type]
            else:
                root = Workspace.at(signature.bind(*args, **kwargs).arguments[folder])
            with root.transaction(step, manifest=folder is None):
                return function(*args, **kwargs)

        return run

    return decorate


def publish_file(done: Path, final: Path) -> None:
    """Rename the finished file ``done`` to ``final``: with the other files of the
    transaction of ``final``'s folder, or now (fsynced first)."""
    txn = _transaction_of(final)
    if txn is not None:
        os.replace(done, txn.stage_path(final))
        _fault_point()
        return
    _fsync_tree(done)
    os.replace(done, final)
    _fsync_dir(final.parent)


@contextlib.contextmanager
def publishing_dir(final: Path) -> Iterator[Path]:
    """A new empty folder to fill; on success it replaces ``final`` whole.

    Inside a transaction of ``final``'s workspace it is published with the rest;
    otherwise now: the folder is fsynced, the old one renamed aside, the new one
    into place, the old one removed.
    """
    txn = _transaction_of(final)
    if txn is not None:
        staged = txn.stage_path(final)
        if staged.exists():
            shutil.rmtree(staged)
        staged.mkdir(parents=True)
        yield staged
        _fault_point()
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        _fsync_tree(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_frame(path: Path, frame: pd.DataFrame) -> None:
    """Write ``frame`` as parquet to ``path`` atomically (fsynced, then renamed; `atomic_write_bytes`)."""
    buffer = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), buffer)
    atomic_write_bytes(path, buffer.getvalue().to_pybytes())


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

    # -- transactions ----------------------------------------------------------

    @contextlib.contextmanager
    def transaction(
        self, step: str, wait: float | None = None, manifest: bool = True
    ) -> Iterator[Transaction]:
        """Hold the workspace lock and publish everything written inside at the end, together.

        ``wait``: seconds to wait for another writer (default ``$PMLM_LOCK_WAIT``,
        0); `pipelines.lock.WorkspaceBusy` names the holder. Inside a transaction
        of this workspace (this thread), joins it. On an exception nothing is
        published. ``manifest=False``: a folder that is not a workspace (no
        manifest.json is written).
        """
        key = self.root.resolve()
        outer = _active().get(key)
        if outer is not None:
            yield outer
            return
        first = lock.acquire(self.root, wait)
        try:
            if first:  # another thread of this process may have a transaction open
                recover(self.root)
            txn = Transaction(self, step, manifest)
            _active()[key] = txn
            try:
                yield txn
            except BaseException:
                shutil.rmtree(txn.folder, ignore_errors=True)
                with contextlib.suppress(OSError):  # another transaction's folder is in it
                    txn.folder.parent.rmdir()
                raise
            finally:
                del _active()[key]
            with _commit_guard:  # threads of one process: one manifest update at a time
                txn.commit()
        finally:
            lock.release(self.root)

    def _current(self) -> Transaction | None:
        return _active().get(self.root.resolve()) if _active() else None

    def ensure_complete(self, wait: float = 30.0) -> None:
        """Finish a step's half-published files, or wait up to ``wait`` seconds for the
        process publishing them; else raise `IncompleteWorkspaceError`."""
        deadline = time.monotonic() + wait
        while (pending := _pending(self.root)) and not lock.holds(self.root):
            if lock.try_acquire(self.root):
                try:
                    recover(self.root)
                    return
                except PermissionError as exc:
                    journal = json.loads((pending[0] / JOURNAL).read_text())
                    raise IncompleteWorkspaceError(
                        f"workspace {self.root} holds the half-published step "
                        f"{journal.get('step')!r} of a killed process and this user cannot "
                        f"finish it ({exc}): run any writing `pmlm` command on it as its owner"
                    ) from exc
                finally:
                    lock.release(self.root)
            if time.monotonic() >= deadline:
                raise IncompleteWorkspaceError(
                    f"workspace {self.root} is being published by {lock.holder(self.root)} "
                    f"for more than {wait:g} s: read it again when that step has finished"
                )
            time.sleep(0.05)

    def read_tables(self, names: Sequence[str]) -> dict[str, pd.DataFrame]:
        """Several tables of one published state: read again if a step published meanwhile."""
        for _ in range(5):
            before = self.generation()
            tables = {name: self.read_table(name) for name in names}
            if not _pending(self.root) and self.generation() == before:
                return tables
        raise IncompleteWorkspaceError(
            f"workspace {self.root} changed while its tables were read, five times: "
            "read it when no step is writing"
        )

    # -- tables and the manifest -------------------------------------------------

    def has_table(self, name: str) -> bool:
        txn = self._current()
        if txn is not None and txn.staged_version(self.table_path(name)) is not None:
            return True
        return self.table_path(name).exists()

    def write_table(self, name: str, frame: pd.DataFrame | pa.Table) -> Path:
        """Write a canonical table (schema-checked) in this step's transaction; its path."""
        table = frame if isinstance(frame, pa.Table) else to_arrow(name, frame)
        if name in TABLES and not table.schema.equals(TABLES[name]):
            table = table.select(TABLES[name].names).cast(TABLES[name])
        with self.transaction(f"write-{name}") as txn:
            return txn.write_table(name, table)

    def read_table(self, name: str) -> pd.DataFrame:
        """Read a table as a pandas frame; MissingTableError says which step writes it.

        Inside a transaction, a table it wrote is read as written.
        """
        txn = self._current()
        staged = txn.staged_version(self.table_path(name)) if txn is not None else None
        if staged is not None:
            return pq.read_table(staged).to_pandas()
        self.ensure_complete()
        path = self.table_path(name)
        if not path.exists():
            raise MissingTableError(
                f"{path} does not exist: run `pmlm ingest ...` (or `pmlm run`) "
                f"with --workspace {self.root} first"
            )
        return pq.read_table(path).to_pandas()

    def read_manifest(self) -> dict[str, Any]:
        """The manifest: ``schema_version``, ``generation`` (commits so far), ``steps``."""
        if not lock.holds(self.root):
            self.ensure_complete()
        if not self.manifest_path.exists():
            return {"schema_version": SCHEMA_VERSION, "generation": 0, "steps": {}}
        data: dict[str, Any] = json.loads(self.manifest_path.read_text())
        return data

    def generation(self) -> int:
        """How many transactions have been published (a reader checks it did not change)."""
        return int(self.read_manifest().get("generation", 0))

    def record_step(self, step: str, details: Mapping[str, Any]) -> None:
        """Record in the manifest that ``step`` ran, with what it read and wrote (published
        with the step's files)."""
        with self.transaction(step) as txn:
            txn.record_step(step, details)
