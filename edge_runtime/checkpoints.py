"""Crash-safe checkpoint folders, shared by the device's run folder and the coordinator's state folder.

A save writes a new folder ``<name>.partial`` completely, renames it to ``<name>``, then replaces a small pointer
file (which names the folder and the SHA-256 of its files) in one atomic rename, then deletes the older folders.
A crash at any moment leaves the previous pointer and the folder it names intact; a reader checks the hashes.
Files and folders are flushed to disk (fsync) before each rename, so a power cut cannot leave a committed pointer
naming files whose contents never reached the disk. The fault points of ``edge_runtime.faults`` mark each step.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from collections.abc import Collection
from typing import Any, Callable

from edge_runtime.bundle import sha256_file
from edge_runtime.faults import reach


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, after a rename) to disk; a no-op where the
    platform cannot open folders (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str, fault_point: str = "checkpoint.pointer-partial") -> None:
    """Replace ``path`` with ``text`` in one rename: readers see the old or the new file, never a part.
    ``fault_point`` is reached between the two (empty: none; only a checkpoint's pointer is a fault point)."""
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    if fault_point:
        reach(fault_point)
    os.replace(tmp, path)
    fsync_path(path.parent)


def checkpoint_name(prefix: str, number: str) -> str:
    """A fresh folder name, ``<prefix><number>-<6 hex>``: saving the same step twice never reuses the live folder."""
    return f"{prefix}{number}-{secrets.token_hex(3)}"


def commit_checkpoint(
    root: Path, prefix: str, number: str, write: Callable[[Path], None], pointer: Path, pointer_text: Callable[[str, dict[str, str]], str],
    spare: Collection[str] = (),
) -> Path:
    """Save one checkpoint folder under ``root`` and commit it.

    ``write(folder)`` writes the files; ``pointer_text(name, {file: sha256})`` gives the pointer's content, which is
    written to ``pointer`` atomically; then the other ``prefix*`` folders are deleted, except those named in
    ``spare`` (older checkpoints the pointer still lists). Returns the new folder.
    """
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(prefix, number)
    tmp = root / (name + ".partial")
    tmp.mkdir()
    write(tmp)
    reach("checkpoint.written")
    files = {}
    for p in sorted(tmp.iterdir()):
        files[p.name] = sha256_file(p)
        fsync_path(p)
    fsync_path(tmp)
    os.replace(tmp, root / name)
    fsync_path(root)
    reach("checkpoint.renamed")
    atomic_write_text(pointer, pointer_text(name, files))
    reach("checkpoint.committed")
    for old in root.glob(prefix + "*"):
        if old.name != name and old.name not in spare:
            shutil.rmtree(old, ignore_errors=True)
    return root / name


def first_mismatch(folder: Path, files: dict[str, str]) -> Path | None:
    """The first file of ``folder`` whose SHA-256 differs from ``files`` (name -> hex), or None when all match."""
    for file_name, digest in files.items():
        if sha256_file(folder / file_name) != digest:
            return folder / file_name
    return None


def read_pointer(
    pointer: Path, fmt: str, version: int, error: type[Exception], missing: str, files_key: str = "files"
) -> tuple[dict[str, Any], Path]:
    """The fields of a committed pointer and the checkpoint folder it names, after checking what can be damaged.

    Raises ``error`` naming the file when the pointer is absent (``missing`` says what to do), unreadable, of another
    format or version, or when a file of the folder differs from its recorded SHA-256 (``pointer[files_key]``).
    """
    if not pointer.is_file():
        raise error(f"{pointer}: {missing}")
    try:
        raw = json.loads(pointer.read_text(encoding="utf-8"))
        if not isinstance(raw, dict) or raw.get("format") != fmt or raw.get("format_version") != version:
            raise error(f"{pointer}: not a {fmt} version {version} file (written by another fftmoe?)")
        folder = pointer.parent / str(raw["checkpoint"])
        bad = first_mismatch(folder, raw.get(files_key) or {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise error(f"{pointer}: damaged ({exc})") from exc
    if bad is not None:
        raise error(f"{bad}: contents differ from the SHA-256 recorded in {pointer}")
    return raw, folder
