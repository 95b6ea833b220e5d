"""Checksummed, atomic `.npz` files: the trainer's checkpoint and the model artifacts.

A file is written to a temporary name, fsynced and renamed over the old one (a crash leaves
the previous complete file), and carries a SHA-256 over every array's name, dtype, shape and
bytes. Reading recomputes it: a truncated, bit-rotted or hand-edited file is refused with a
clear message and never loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from core.errors import CorruptFileError

DIGEST = "__sha256__"
log = logging.getLogger(__name__)


def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def temp_path(path: Path) -> Path:
    """Where `write_npz` writes before the rename (exists only while a write is under way)."""
    return path.with_name(f".{path.name}.tmp")


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write `arrays` with their digest; atomic and durable once this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    with open(tmp, "wb") as f:
        payload: dict[str, np.ndarray] = {**arrays, DIGEST: np.array(_digest(arrays))}
        np.savez(f, **payload)  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dirfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dirfd)
    finally:
        os.close(dirfd)


def read_npz(path: Path, what: str, remedy: str) -> dict[str, np.ndarray]:
    """Every array of a file written by `write_npz`, after checking its digest.

    `what` names the file in the error ("checkpoint", "model artifact"), `remedy` says what to do.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        raise CorruptFileError(f"{what} {path} cannot be read ({type(exc).__name__}: {exc}); {remedy}") from exc
    stored = arrays.pop(DIGEST, None)
    if stored is None:
        raise CorruptFileError(f"{what} {path} has no checksum (not written by this version of Encore); {remedy}")
    if str(stored) != _digest(arrays):
        raise CorruptFileError(f"{what} {path} fails its checksum (truncated or modified); refused. {remedy}")
    return arrays


def set_aside(path: Path) -> Path | None:
    """Rename `path` to `<name>.set-aside-<unix time>` (kept for a post-mortem, never read again)."""
    if not path.exists():
        return None
    target = path.with_name(f"{path.name}.set-aside-{int(time.time())}")
    os.replace(path, target)
    log.warning("%s set aside as %s", path, target)
    return target
