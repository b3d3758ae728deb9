"""Where the cached tasks keep their results: signed files in ``WORKSPACE/cache/prefect``.

Prefect stores a cached task's result as a record file whose ``metadata`` names
the serializer that reads it back; ours are cloudpickle, because the results are
dataframes and dataclasses. Prefect reads that record, and so unpickles it, both
to decide whether the cache holds a result (``ResultStore.exists``) and to
return it. A record doctored by anyone who can write to a shared workspace would
therefore run their code as the pipeline's user, and a record that merely names
another serializer would bypass any check made by our own serializer.

So the check sits below Prefect, in the storage: `SignedLocalFileSystem` seals
every record it writes with the workspace's HMAC (`pipelines.integrity.seal`,
under the secret in ``WORKSPACE/private/secret``, mode 0600) and checks it before
Prefect sees a byte (`pipelines.integrity.unseal`). An unsigned or altered
record raises `pipelines.integrity.TamperedFileError`, which Prefect's cache
lookup takes as a miss: the task runs again and its new, signed result replaces
the refused one. The refusal is logged as a warning naming the file.

Records are written with the workspace's atomic writer (fsync, then rename).

Prefect accepts a storage block for a task only once the block is saved on its
server (`saved`): the saved document holds the two folders' paths, no secret.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from prefect._internal.compatibility.async_dispatch import async_dispatch
from prefect.filesystems import LocalFileSystem

from pipelines.integrity import TamperedFileError, seal, unseal
from pipelines.workspace import atomic_write_bytes

logger = logging.getLogger(__name__)


class SignedLocalFileSystem(LocalFileSystem):
    """A local folder whose files are sealed with the workspace's HMAC when written and
    refused (`TamperedFileError`) when read back unsigned or altered."""

    _block_type_name = "PMLM Signed Local File System"

    #: the workspace whose secret signs the files
    workspace_root: str

    def _checked(self, path: Path, blob: bytes) -> bytes:
        try:
            return unseal(Path(self.workspace_root), blob, f"cached task result {path}")
        except TamperedFileError as refused:
            logger.warning("%s", refused)
            raise

    def _read(self, path: str) -> bytes:
        resolved: Path = self._resolve_path(path)
        if not resolved.is_file():  # Prefect's own message: a cache miss, not an error
            raise ValueError(f"Path {resolved} does not exist or is not a file.")
        return self._checked(resolved, resolved.read_bytes())

    def _write(self, path: str, content: bytes) -> str:
        resolved: Path = self._resolve_path(path)
        resolved.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(resolved, seal(Path(self.workspace_root), content))
        return str(resolved)

    async def aread_path(self, path: str) -> bytes:
        return self._read(path)

    # the same sync-or-async dispatch as LocalFileSystem's, which mypy cannot follow
    @async_dispatch(aread_path)
    def read_path(self, path: str) -> bytes:  # type: ignore[override]
        return self._read(path)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self._write(path, content)

    @async_dispatch(awrite_path)
    def write_path(self, path: str, content: bytes) -> str:  # type: ignore[override]
        return self._write(path, content)


_SAVED: dict[tuple[str, str], SignedLocalFileSystem] = {}


def saved(storage: SignedLocalFileSystem) -> SignedLocalFileSystem:
    """``storage`` saved on the current Prefect server (once per process and server), as a
    task's ``result_storage`` must be; named after its folder."""
    from prefect.settings import PREFECT_API_URL

    # the folder fixes the workspace (it lies inside it), so it and the server are the key
    key = (str(storage.basepath), str(PREFECT_API_URL.value()))
    if key not in _SAVED:
        name = "pmlm-cache-" + hashlib.sha256(key[0].encode()).hexdigest()[:20]
        storage.save(name, overwrite=True, _sync=True)  # type: ignore[call-arg]
        _SAVED[key] = storage
    return _SAVED[key]
