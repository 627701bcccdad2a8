"""Files: atomic writing (readers see the old file or the complete new one, never a part: run
records, reports, checkpoints, predictions, exports and the resume state all go through it) and
the image-file filter every reader and image folder shares."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def write_atomic(path: Path, data: str | bytes | Callable[[Path], None]) -> Path:
    """Write a file so that readers see the old file or the complete new one, never a part.

    ``data`` is the content, or a function that writes the file at the temporary path it is
    given (e.g. a serialiser); an exception leaves no temporary file behind. The file gets mode
    0644 like any other (mkstemp's private 0600 would hide runs from a team's other users).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "wb") as f:
            if not callable(data):
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
        if callable(data):
            data(Path(tmp))
            os.chmod(tmp, 0o644)  # the writer may have replaced the file with its own
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def strict_json(data: Any) -> Any:
    """``data`` with every NaN or infinite float (Python or numpy/torch scalar) as None, so
    that it serialises as strict JSON (RFC 8259 has no NaN; browsers' ``JSON.parse`` refuses
    it)."""
    if isinstance(data, Mapping):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [strict_json(v) for v in data]
    if hasattr(data, "item") and getattr(data, "ndim", 1) == 0:
        data = data.item()
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def dumps_strict(data: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``data`` (:func:`strict_json`; ``allow_nan=False`` guards it)."""
    return json.dumps(strict_json(data), indent=indent, default=_jsonable, allow_nan=False)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write strict JSON atomically (:func:`write_atomic`, :func:`dumps_strict`)."""
    write_atomic(path, dumps_strict(data) + "\n")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


IMAGE_EXTENSIONS: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
"""File suffixes read as images (compared case-insensitively); every other file is ignored."""


def is_image_file(path: Path) -> bool:
    """Whether ``path`` is an image file stad reads.

    Hidden files are skipped: macOS writes ``._name.png`` resource forks next to real images,
    which carry an image suffix but are not images.
    """
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".") and path.is_file()
    )


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (deterministic order)."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_image_file(p)), key=lambda p: p.name)
