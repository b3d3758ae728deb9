"""A FHIR Bulk Data export → parts that the reader reads like bundles.

An export holds one NDJSON file per resource type, and its references cross
files (``Patient/ID``). One pass over every line, holding no resource, routes
each line to the *part* of its patient: a part holds ``PATIENTS_PER_PART``
patients and everything that references them, so that references resolve
within a part as they do within a bundle, and a reader process holds one part
at a time (memory stays bounded by the part, not the export).

- A resource's patient is its ``subject`` or ``patient`` reference (a Patient:
  itself). A line whose patient comes later in the export waits in a pending
  file and is routed at the end; a line whose patient never comes goes to the
  first part, where the reader quarantines it (absent Patient).
- Medications (referenced from MedicationRequests) are shared by every part;
  a Binary goes to the part of the DocumentReference that points at it.
- Types that are not read are counted here and never written to a part. A file
  that the manifest declares to hold such a type (``output[].type``: the Bulk
  Data specification has one type per file) is counted by its lines, not parsed,
  once its first line shows that type (else it is routed line by line).
- A line that is not UTF-8, not JSON, not a resource or over the size limit is
  quarantined here, named ``FILE:LINE``.

A part is a folder of *pieces*, one per input file that has lines for it (named by
the file's place in the routing order) and one of the pending lines, so that the
reader meets its lines in the routing order whichever process wrote them. A piece
of an uncompressed file holds *spans* (``SPANS_SUFFIX``: where its lines are in
the file, consecutive lines as one span), not the lines: the pass then writes
only the lines of gzipped files and the pending ones, and the reader reads the
rest from the export itself.

Given a process pool, the parent routes the Patient files, the pool routes the
files of the other types (one task per file, no line crosses a process), and the
parent routes the Binary files and the pending lines at the end: the parts are
those of the one-process pass, line for line. An export whose files mix types (a Patient
or a Binary in another type's file) is routed by the parent alone, as before.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import simdjson
from isal import igzip, igzip_lib

from pipelines.fhir.merge import SHARED_PART
from pipelines.fhir.reader import (
    LINE_BITS,
    LINE_READ_BUFFER,
    SOURCES_FILE,
    SPANS_SUFFIX,
    first_bad_byte,
    max_file_bytes,
    origin_name,
    quarantine_row,
)
from pipelines.fhir.resources import RESOURCE_PARSERS, SOURCE, read_medication
from pipelines.fhir.values import Coding, Rejected, reference_target
from pipelines.schemas import QUARANTINE
from pipelines.sources import IngestSummary, SourceTables, frame

#: Patients per part (a reader process reads one part at a time).
PATIENTS_PER_PART = 16
#: Bytes buffered for all parts before they are appended to their files.
_BUFFER_BYTES = 32 * 2**20
#: The piece of a part that holds the lines routed at the end (after every file's).
PENDING_PIECE = "pending"
#: The bytes of the files a pool would route below which the parent routes them (a
#: process costs more than it saves on a small export).
POOL_MIN_BYTES = 32 * 2**20
#: Distinct reference strings whose target id is remembered while routing.
_MEMO_REFERENCES = 1 << 16
#: What a span costs in the buffer's count of bytes (a list of four ints).
_SPAN_BYTES = 120


#: What reading a damaged gzipped file raises: a cut stream (EOFError), a bad header or
#: checksum (OSError: gzip.BadGzipFile), data that does not inflate (IsalError).
#: (isal's stub declares IsalError as an instance of Exception, not as a class.)
_ISAL_ERROR: type[Exception] = igzip_lib.IsalError  # type: ignore[assignment]
GZIP_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, _ISAL_ERROR)


def ndjson_lines(path: Path) -> Iterator[bytes]:
    """The lines of an NDJSON file of a Bulk Data export, gzipped or not.

    Gzipped files are inflated by ISA-L (python-isal's drop-in for `gzip`), about 2.5x
    faster than zlib here: the largest file of an export is often a gzipped
    Observation file, and its routing is the partition pass's longest task.
    """
    handle: IO[bytes]
    if path.name.endswith(".gz"):
        with igzip.open(path, "rb") as handle:
            yield from handle
    else:
        with path.open("rb", buffering=LINE_READ_BUFFER) as handle:
            yield from handle


class _Medications:
    """The `Context` a Medication parser needs."""

    salt = None

    def __init__(self) -> None:
        self.medications: dict[str, Coding] = {}


@dataclass
class Partition:
    """The parts of an export, and the counts and quarantine of the pass that made them."""

    parts: list[Path]
    summary: IngestSummary
    quarantine: list[dict[str, Any]] = field(default_factory=list)

    def before(self) -> SourceTables:
        """The counts and quarantine rows of the pass, as tables to merge first."""
        empty = frame([], [])
        return SourceTables(
            patients=empty,
            encounters=empty,
            events=empty,
            notes=empty,
            quarantine=frame(self.quarantine, QUARANTINE.names),
            summary=self.summary,
        )


class _MixedFile(Exception):
    """A pool task met a Patient or a Binary: the export is routed in one process."""


class _Router:
    def __init__(
        self,
        staging: Path,
        names: list[str],
        in_pool: bool = False,
        declared: dict[int, str] | None = None,
    ) -> None:
        self.staging = staging
        self.names = names
        #: file number → the resource type the manifest declares for the file
        self.declared = declared or {}
        #: routing a file of a pool task: Patients and Binaries are the parent's
        self.in_pool = in_pool
        self.piece = PENDING_PIECE
        self.targets: dict[str, str | None] = {}
        self.parser = simdjson.Parser()
        self.summary = IngestSummary(source=SOURCE)
        self.quarantine: list[dict[str, Any]] = []
        self.patient_part: dict[str, int] = {}
        self.binary_part: dict[str, int] = {}
        self.medications = _Medications()
        self.buffers: dict[tuple[int, str], list[bytes]] = {}
        #: (part, piece) → spans [first origin, last origin, start, end]
        self.spans: dict[tuple[int, str], list[list[int]]] = {}
        self.buffered = 0
        self.pending: list[bytes] = []
        self.limit = max_file_bytes()

    def reject(self, origin: int, rtype: str | None, rid: str | None, reason: str) -> None:
        self.summary.quarantined += 1
        self.quarantine.append(quarantine_row(origin_name(origin, self.names), rtype, rid, reason))

    def write(self, part: int, origin: int, raw: bytes, start: int | None) -> None:
        """Buffer ``ORIGIN\tLINE\n`` for a piece of ``part`` (the line and its origin
        as two strings: formatting them into one costs more than the routing), or,
        for a line of an uncompressed file (``start``: where it starts there), its span."""
        if start is not None:
            self.write_span(part, origin, start, start + len(raw))
            return
        if raw[-2:-1] == b"\r" or not raw.endswith(b"\n"):
            raw = raw.rstrip(b"\r\n") + b"\n"
        key = (part, self.piece)
        lines = self.buffers.get(key)
        if lines is None:
            lines = self.buffers[key] = []
        lines.append(b"%d\t" % origin)
        lines.append(raw)
        self.buffered += len(raw)
        if self.buffered > _BUFFER_BYTES:
            self.flush(final=False)

    def write_span(self, part: int, origin: int, start: int, end: int) -> None:
        key = (part, self.piece)
        spans = self.spans.get(key)
        if spans is None:
            spans = self.spans[key] = []
        elif spans[-1][1] == origin - 1 and spans[-1][3] == start:  # the next line
            spans[-1][1], spans[-1][3] = origin, end
            return
        spans.append([origin, origin, start, end])
        self.buffered += _SPAN_BYTES
        if self.buffered > _BUFFER_BYTES:
            self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        """Append the buffered lines and spans to their pieces; not ``final``: keep each
        piece's last span, which the next line may extend (so that the pieces do not
        depend on when the buffer filled)."""
        for (part, piece), lines in self.buffers.items():
            self.append(part, piece, b"".join(lines))
        self.buffers.clear()
        kept: dict[tuple[int, str], list[list[int]]] = {}
        for (part, piece), spans in self.spans.items():
            if not final:
                kept[(part, piece)] = spans[-1:]
                spans = spans[:-1]
            if spans:
                data = b"".join(b"%d\t%d\t%d\t%d\n" % tuple(span) for span in spans)
                self.append(part, piece + SPANS_SUFFIX, data)
        self.spans = kept
        self.buffered = len(kept) * _SPAN_BYTES

    def append(self, part: int, name: str, data: bytes) -> None:
        folder = part_folder(self.staging, part)
        folder.mkdir(exist_ok=True)
        with (folder / name).open("ab") as handle:
            handle.write(data)

    def target(self, subject: Any) -> str | None:
        """`reference_id` of a simdjson ``subject``, remembered by reference string."""
        if not isinstance(subject, simdjson.Object):
            return None
        ref = subject.get("reference")
        if not isinstance(ref, str):
            return None
        found = self.targets.get(ref, "")
        if found == "":
            found = reference_target(ref)
            if len(self.targets) < _MEMO_REFERENCES:
                self.targets[ref] = found
        return found

    def route(self, origin: int, raw: bytes, final: bool, start: int | None = None) -> None:
        """Send one line to its part; ``final``: the last chance (pending lines);
        ``start``: where the line starts in its file, if that is uncompressed."""
        try:
            doc = self.parser.parse(raw)
        except UnicodeDecodeError:
            self.summary.read += 1
            self.reject(
                origin, None, None, f"not UTF-8: invalid byte at offset {first_bad_byte(raw)}"
            )
            return
        except (ValueError, RuntimeError) as exc:
            self.summary.read += 1
            self.reject(origin, None, None, f"malformed JSON: {exc}")
            return
        rtype = doc.get("resourceType") if isinstance(doc, simdjson.Object) else None
        if not isinstance(doc, simdjson.Object) or not isinstance(rtype, str):
            self.summary.read += 1
            self.reject(origin, None, None, "not a FHIR resource (no resourceType)")
            return
        if rtype not in RESOURCE_PARSERS:
            self.summary.read += 1
            self.summary.skipped_by_type[rtype] += 1
            return
        rid = doc.get("id")
        rid = rid if isinstance(rid, str) and rid else None
        if rtype == "Medication":
            self.read_medication(origin, rid, doc)
            return
        if self.in_pool and rtype in ("Patient", "Binary"):
            raise _MixedFile
        if rtype == "Patient":
            part = (
                self.patient_part.setdefault(rid, len(self.patient_part) // PATIENTS_PER_PART)
                if rid
                else 0
            )
        elif rtype == "Binary":
            found = self.binary_part.get(rid or "")
            if found is None and not final:
                self.pending.append(b"%d\t%s" % (origin, raw))
                return
            part = found or 0
        else:
            sid = self.target(doc.get("subject") or doc.get("patient"))
            found = self.patient_part.get(sid or "")
            if found is None and sid is not None and not final:
                self.pending.append(b"%d\t%s" % (origin, raw))
                return
            part = found or 0
            if rtype == "DocumentReference":
                self.note_binaries(doc, part)
        self.write(part, origin, raw, start)

    def note_binaries(self, doc: Any, part: int) -> None:
        contents = doc.get("content")
        if not isinstance(contents, simdjson.Array):
            return
        for content in contents:
            attachment = content.get("attachment") if isinstance(content, simdjson.Object) else None
            url = attachment.get("url") if isinstance(attachment, simdjson.Object) else None
            target = reference_target(url)
            if target is not None:
                self.binary_part.setdefault(target, part)

    def read_medication(self, origin: int, rid: str | None, doc: Any) -> None:
        self.summary.read += 1
        try:
            if rid is None:
                raise Rejected("missing id")
            read_medication(self.medications, rid, doc.as_dict())  # type: ignore[arg-type]
        except Rejected as why:
            self.reject(origin, "Medication", rid, str(why))
            return
        self.summary.kept += 1
        self.summary.kept_by_type["Medication"] += 1

    def read_path(self, number: int, path: Path, piece: str) -> None:
        """Route the lines of input file ``number`` into pieces named ``piece``."""
        self.piece = piece
        try:
            self.read_file(number, path)
        except GZIP_ERRORS as exc:  # a truncated or corrupt gzip file
            self.summary.files_read -= 1
            self.summary.files_quarantined += 1
            self.quarantine.append(
                {
                    "source": SOURCE,
                    "source_file": self.names[number],
                    "resource_type": None,
                    "resource_id": None,
                    "reason": f"unreadable file after the lines before it ({exc}): export it again",
                }
            )
        self.piece = PENDING_PIECE

    def count_unread(self, number: int, path: Path) -> bool:
        """Count the lines of a file whose declared type is not read, without parsing
        them, once its first line shows that type; False: route it line by line."""
        rtype = self.declared.get(number)
        if rtype is None or rtype in RESOURCE_PARSERS:
            return False
        lines = (raw for raw in ndjson_lines(path) if not raw.isspace())
        first = next(lines, None)
        if first is not None:
            try:
                doc = self.parser.parse(first)
                shown = doc.get("resourceType") if isinstance(doc, simdjson.Object) else None
                del doc
            except (ValueError, RuntimeError):  # routed line by line: quarantined there
                return False
            if shown != rtype:
                return False
        count = 0 if first is None else 1
        try:  # a damaged gzipped file: the lines before the damage are counted, as routed
            for _ in lines:
                count += 1
        finally:
            self.summary.read += count
            self.summary.skipped_by_type[rtype] += count
        return True

    def read_file(self, number: int, path: Path) -> None:
        self.summary.files_read += 1
        if self.count_unread(number, path):
            return
        plain = not path.name.endswith(".gz")
        end = 0
        for i, raw in enumerate(ndjson_lines(path), start=1):
            start, end = end, end + len(raw)
            if raw.isspace():  # a line read from a file is never empty
                continue
            origin = (number << LINE_BITS) | i
            if len(raw) > self.limit:
                self.summary.read += 1
                self.reject(
                    origin,
                    None,
                    None,
                    f"line of {len(raw) / 2**20:.0f} MB is over the {self.limit / 2**20:.0f} MB "
                    "limit: raise PMLM_MAX_FILE_MB",
                )
                continue
            self.route(origin, raw, final=False, start=start if plain else None)


#: The order in which the files of a type are routed: Patients first, in the parent (the
#: other lines find their part at once); DocumentReferences and the other types in the
#: pool; Binaries last, in the parent (after the DocumentReferences that point at them).
_FIRST, _DOCUMENTS, _OTHERS, _LAST = 0, 1, 2, 3
_READ_FIRST = {"Patient": _FIRST, "DocumentReference": _DOCUMENTS, "Binary": _LAST}


def _file_type(path: Path) -> str:
    """The resource type a file of an export holds, from its name (``Patient.ndjson``,
    ``Patient.2.ndjson.gz``, ``1.Patient.ndjson``); only the routing order depends on it."""
    parts = path.name.split(".")
    return next((p for p in parts if p in _READ_FIRST), parts[0])


def part_folder(staging: Path, part: int) -> Path:
    """The folder of a part's pieces (`pipelines.fhir.reader.FhirReader.read_part`)."""
    return staging / f"{part:08d}.part"


@dataclass
class _Routed:
    """What a pool task routed of one file, for the parent to merge in routing order."""

    summary: IngestSummary
    quarantine: list[dict[str, Any]]
    medications: dict[str, Coding]
    binaries: dict[str, int]
    pending: list[bytes]
    mixed: bool = False


def route_file(
    staging: Path,
    names: list[str],
    number: int,
    path: Path,
    piece: str,
    patient_part: dict[str, int],
    declared: dict[int, str],
) -> _Routed:
    """Route one file of an export (a pool task): the lines whose patient is known go
    to their part's piece ``piece``; the rest is returned."""
    router = _Router(staging, names, in_pool=True, declared=declared)
    router.patient_part = patient_part
    try:
        router.read_path(number, path, piece)
    except _MixedFile:
        router.buffers.clear()
        return _Routed(IngestSummary(source=SOURCE), [], {}, {}, [], mixed=True)
    router.flush()
    return _Routed(
        router.summary,
        router.quarantine,
        router.medications.medications,
        router.binary_part,
        router.pending,
    )


def _cost(path: Path) -> int:
    """A guess of a file's routing time, to hand the longest tasks out first."""
    size = path.stat().st_size
    return size * 8 if path.name.endswith(".gz") else size


def _route(
    files: list[Path],
    names: list[str],
    staging: Path,
    order: list[int],
    pool: Executor | None,
    declared: dict[int, str],
) -> _Router | None:
    """Route every file but the pending lines; None: a pool task met a mixed file."""
    router = _Router(staging, names, declared=declared)
    rank = {n: _READ_FIRST.get(_file_type(files[n]), _OTHERS) for n in order}
    piece = {n: f"{pos:06d}" for pos, n in enumerate(order)}
    parent = [n for n in order if rank[n] in (_FIRST, _LAST)]
    pooled = [n for n in order if rank[n] in (_DOCUMENTS, _OTHERS)]
    if pool is None or sum(files[n].stat().st_size for n in pooled) < POOL_MIN_BYTES:
        pooled = []
    for number in (n for n in parent if rank[n] == _FIRST):
        router.read_path(number, files[number], piece[number])
    if pooled:
        assert pool is not None
        router.flush()
        futures = {
            n: pool.submit(
                route_file,
                staging,
                names,
                n,
                files[n],
                piece[n],
                router.patient_part,
                {n: declared[n]} if n in declared else {},
            )
            for n in sorted(pooled, key=lambda n: -_cost(files[n]))
        }
        results = [futures[n].result() for n in pooled]  # in routing order
        if any(r.mixed for r in results):
            return None
        for r in results:
            router.summary.add(r.summary)
            router.quarantine.extend(r.quarantine)
            router.medications.medications.update(r.medications)
            for target, part in r.binaries.items():
                router.binary_part.setdefault(target, part)
            router.pending.extend(r.pending)
    for number in order:
        if rank[number] == _LAST or (rank[number] != _FIRST and not pooled):
            router.read_path(number, files[number], piece[number])
    return router


def partition_export(
    files: list[Path],
    names: list[str],
    staging: Path,
    pool: Executor | None = None,
    declared: dict[Path, str] | None = None,
) -> Partition:
    """Route every line of ``files`` (named ``names``) to part files in ``staging``;
    ``pool``: processes that route the files of most types (the parts are the same);
    ``declared``: the type a manifest declares for a file (`inputs.InputFiles`)."""
    known = declared or {}
    types = {n: known[path] for n, path in enumerate(files) if path in known}
    staging.mkdir(parents=True, exist_ok=True)
    # Patients first, so that the lines of other types find their part at once instead
    # of waiting in memory (an export lists Patient.ndjson after most types); Binaries
    # after the DocumentReferences that point at them. Rows keep their file's number.
    order = sorted(range(len(files)), key=lambda n: _READ_FIRST.get(_file_type(files[n]), _OTHERS))
    router = _route(files, names, staging, order, pool, types)
    if router is None:  # a file mixes types: start again, in this process
        shutil.rmtree(staging)
        staging.mkdir(parents=True)
        router = _route(files, names, staging, order, None, types)
        assert router is not None
    pending, router.pending = router.pending, []
    router.piece = PENDING_PIECE
    for line in pending:
        origin, _, raw = line.partition(b"\t")
        router.route(int(origin), raw, final=True)
    router.flush()
    shared = {k: list(v) for k, v in router.medications.medications.items()}
    (staging / SHARED_PART).write_text(json.dumps(shared))
    sources = {number: str(path.resolve()) for number, path in enumerate(files)}
    (staging / SOURCES_FILE).write_text(json.dumps(sources))
    parts = sorted(staging.glob("[0-9]*.part"))
    return Partition(parts=parts, summary=router.summary, quarantine=router.quarantine)
