"""What a FHIR input is: a folder of bundles (nested folders too), or a Bulk Data
export (a folder of ``.ndjson``/``.ndjson.gz`` files, or its ``manifest.json``).

`detect_format` tells them apart; `bundle_files` lists the bundles of a folder
tree. A symbolic link that leads out of the input folder is refused: it is
listed with the reason, and its target is never read.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.sources import IngestError

FORMATS = ("auto", "bundles", "bulk")
NDJSON_SUFFIXES = (".ndjson", ".ndjson.gz")
MANIFEST = "manifest.json"


class FhirInputError(IngestError):
    """The input is not a FHIR folder, bundle or Bulk Data export; the message says what to give."""


@dataclass
class InputFiles:
    """The files of an input, in reading order, and the ones refused (path, reason)."""

    root: Path
    files: list[Path]
    refused: list[tuple[str, str]] = field(default_factory=list)
    #: the resource type a Bulk Data manifest declares for a file (its ``output[].type``)
    declared: dict[Path, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        """Each file's path relative to the input folder (how rows name their file)."""
        return [_relative(p, self.root) for p in self.files]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.name


def _missing(path: Path) -> FhirInputError:
    return FhirInputError(
        f"{path} does not exist: give a folder of FHIR R4 bundles, a Bulk Data export "
        "folder, or its manifest.json"
    )


def is_ndjson(path: Path) -> bool:
    return path.name.endswith(NDJSON_SUFFIXES)


def detect_format(path: Path, fmt: str = "auto") -> str:
    """``bundles`` or ``bulk`` for ``path``; ``fmt`` other than ``auto`` is checked, not guessed."""
    if fmt not in FORMATS:
        raise FhirInputError(f"unknown FHIR format {fmt!r}: use one of {', '.join(FORMATS)}")
    path = Path(path)
    if not path.exists():
        raise _missing(path)
    if fmt != "auto":
        return fmt
    if path.is_file():
        return "bulk" if path.name == MANIFEST or is_ndjson(path) else "bundles"
    if (path / MANIFEST).is_file() or any(is_ndjson(p) for p in path.iterdir()):
        return "bulk"
    return "bundles"


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root)
    except ValueError:
        return False
    return True


def walk(root: Path, wanted: tuple[str, ...]) -> InputFiles:
    """The files under ``root`` whose names end with one of ``wanted``, sorted by their
    relative path; links leading out of ``root`` are refused (and not followed)."""
    real_root = root.resolve()
    found = InputFiles(root=root, files=[])
    for folder, dirs, names in os.walk(root, followlinks=False):
        base = Path(folder)
        for d in sorted(dirs):
            link = base / d
            if link.is_symlink() and not _inside(link, real_root):
                found.refused.append(
                    (_relative(link, root), "symbolic link to a folder outside the input: refused")
                )
        for name in names:
            path = base / name
            if not name.endswith(wanted) or name == MANIFEST:
                continue
            if path.is_symlink() and not _inside(path, real_root):
                found.refused.append(
                    (_relative(path, root), "symbolic link to a file outside the input: refused")
                )
                continue
            if path.is_file():
                found.files.append(path)
    found.files.sort(key=lambda p: _relative(p, root))
    return found


def bundle_files(folder: Path) -> InputFiles:
    """The JSON bundles of a folder tree (``DIR``, or Synthea's ``DIR/fhir``), or one file."""
    folder = Path(folder)
    if not folder.exists():
        raise _missing(folder)
    if folder.is_file():
        return InputFiles(root=folder.parent, files=[folder])
    if (folder / "fhir").is_dir():
        folder = folder / "fhir"
    found = walk(folder, (".json",))
    if not found.files and not found.refused:
        raise FhirInputError(
            f"{folder} holds no *.json FHIR bundles (in it or its subfolders): give the folder "
            "the FHIR export was written to"
        )
    return found


def bulk_files(path: Path) -> InputFiles:
    """The NDJSON files of a Bulk Data export: those its ``manifest.json`` lists (by file
    name, in the manifest's folder), or every ``*.ndjson[.gz]`` of the folder."""
    path = Path(path)
    if not path.exists():
        raise _missing(path)
    if path.is_file() and is_ndjson(path):
        return InputFiles(root=path.parent, files=[path])
    manifest = path if path.is_file() else path / MANIFEST
    root = manifest.parent
    if not manifest.is_file():
        found = walk(root, NDJSON_SUFFIXES)
        if not found.files and not found.refused:
            raise FhirInputError(f"{root} holds no *.ndjson or *.ndjson.gz files and no {MANIFEST}")
        return found
    try:
        data = json.loads(manifest.read_bytes())
        outputs = data["output"]
        urls = [str(o["url"]) for o in outputs]
        types = [o.get("type") for o in outputs]
    except (ValueError, KeyError, TypeError) as exc:
        raise FhirInputError(
            f"{manifest} is not a Bulk Data manifest ({type(exc).__name__}: {exc}): "
            "it needs an 'output' list of {{type, url}}; or give the folder with --format bulk"
        ) from None
    found = InputFiles(root=root, files=[])
    for url, rtype in zip(urls, types, strict=True):
        local = root / url.rstrip("/").rsplit("/", 1)[-1]
        if not local.is_file():
            raise FhirInputError(
                f"{manifest} lists {url}, but {local} is missing: copy the whole export"
            )
        if local.is_symlink() and not _inside(local, root.resolve()):
            found.refused.append((local.name, "symbolic link to a file outside the input: refused"))
            continue
        found.files.append(local)
        if isinstance(rtype, str) and rtype:
            found.declared[local] = rtype
    return found
