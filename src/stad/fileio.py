"""Files: atomic writing (readers see the old file or the complete new one, never a part: run
records, reports, checkpoints, predictions, exports and the resume state all go through it) and
the image-file filter every reader and image folder shares."""

from __future__ import annotations

import json
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


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (:func:`write_atomic`)."""
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=_jsonable) + "\n")


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
