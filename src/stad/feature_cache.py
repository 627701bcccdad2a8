"""Cache of frozen-backbone features, computed once per image and reused by every stage and epoch.

A frozen extractor on un-augmented images gives the same features for the same image file at the
same resolution, so :class:`CachedFeatures` computes them once. Entries live in memory, keyed by
``(key, path, H×W)``; with a ``cache_dir`` they also go to disk, one safetensors file per image,
named by a hash of everything that determines the features (the caller's key: dataset, category,
backbone and weights; the image size; the path; the file's mtime and size). Each file carries its
full key, the shapes and a SHA-256 of its tensors, so a stale or corrupted file is detected and
rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

Entry = tuple[Tensor, ...]


def tensors_sha256(tensors: Sequence[Tensor]) -> str:
    """SHA-256 over the shapes, dtypes and bytes of tensors (CPU copies)."""
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(f"{tuple(t.shape)}{t.dtype}".encode())
        flat = t.detach().cpu().contiguous().reshape(-1)  # 0-d tensors cannot be viewed as bytes
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()


class CachedFeatures(nn.Module):
    """Wraps a feature extractor; ``forward(images, paths)`` returns cached features when it can.

    Caching is on only while the extractor is frozen (its output then depends on the image file
    alone); otherwise every call runs the extractor. Images must not be augmented: the cache
    assumes ``images[i]`` is the decoded file ``paths[i]`` at the batch's resolution.

    Attributes:
        extractor: the wrapped module: ``extractor(images) -> list[Tensor]`` (B×C_i×h_i×w_i).
        key: what else determines the features (dataset, category, backbone, weights ...).
        cache_dir: folder of the on-disk cache, or None (memory only).
        forward_passes: number of extractor calls so far (tests prove cache hits with it).
        disk_hits: entries read from disk; rebuilt: disk files found invalid and rewritten.
    """

    def __init__(self, extractor: nn.Module, key: str, cache_dir: str | Path | None = None) -> None:
        super().__init__()
        self.extractor = extractor
        self.key = key
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else None
        self.forward_passes = 0
        self.disk_hits = 0
        self.rebuilt = 0
        self._memory: dict[tuple[str, str, tuple[int, int]], Entry] = {}

    @property
    def enabled(self) -> bool:
        """Whether outputs may be cached: only a frozen extractor gives reusable features."""
        frozen = bool(getattr(self.extractor, "frozen", False))
        return frozen and not any(p.requires_grad for p in self.extractor.parameters())

    def clear(self) -> None:
        """Forget the in-memory entries (disk files stay)."""
        self._memory.clear()

    def forward(self, images: Tensor, paths: Sequence[str] | None = None) -> list[Tensor]:
        """Features of a batch.

        Args:
            images: B×3×H×W images, exactly the decoded files ``paths`` (no augmentation).
            paths: the B image files; None bypasses the cache.

        Returns:
            The extractor's output: one B×C_i×h_i×w_i tensor per level.
        """
        if paths is None or not self.enabled:
            return self._extract(images)
        size = (int(images.shape[-2]), int(images.shape[-1]))
        entries: list[Entry | None] = [self._lookup(str(p), size) for p in paths]
        missing = [i for i, e in enumerate(entries) if e is None]
        if missing:
            with torch.no_grad():
                levels = self._extract(images[missing])
            for j, i in enumerate(missing):
                entry = tuple(level[j].detach().clone() for level in levels)
                entries[i] = entry
                self._store(str(paths[i]), size, entry)
        n_levels = len(entries[0])  # type: ignore[arg-type]
        return [
            torch.stack([e[k].to(images.device) for e in entries])  # type: ignore[index]
            for k in range(n_levels)
        ]

    def _extract(self, images: Tensor) -> list[Tensor]:
        self.forward_passes += 1
        return list(self.extractor(images))

    # -- memory and disk ----------------------------------------------------------------------
    def _lookup(self, path: str, size: tuple[int, int]) -> Entry | None:
        entry = self._memory.get((self.key, path, size))
        if entry is None and self.cache_dir is not None:
            entry = self._read_disk(path, size)
            if entry is not None:
                self.disk_hits += 1
                self._memory[(self.key, path, size)] = entry
        return entry

    def _store(self, path: str, size: tuple[int, int], entry: Entry) -> None:
        self._memory[(self.key, path, size)] = entry
        if self.cache_dir is not None:
            self._write_disk(path, size, entry)

    def disk_key(self, path: str, size: tuple[int, int]) -> str:
        """Everything that determines one image's features, as one string."""
        try:
            stat = os.stat(path)
            file_id = f"{stat.st_mtime_ns}:{stat.st_size}"
        except OSError:
            file_id = "missing"
        return json.dumps([self.key, str(Path(path).resolve()), file_id, list(size)])

    def disk_path(self, path: str, size: tuple[int, int]) -> Path:
        """The cache file of one image (the name changes whenever :meth:`disk_key` does)."""
        assert self.cache_dir is not None
        name = hashlib.sha256(self.disk_key(path, size).encode()).hexdigest()[:40]
        return self.cache_dir / f"{name}.safetensors"

    def _read_disk(self, path: str, size: tuple[int, int]) -> Entry | None:
        from safetensors import safe_open

        file = self.disk_path(path, size)
        if not file.is_file():
            return None
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                names = sorted(f.keys(), key=lambda n: int(n.split("_")[1]))
                entry = tuple(f.get_tensor(n) for n in names)
            problem = self._mismatch(meta, entry, path, size)
        except Exception as error:  # truncated/garbled files raise many types
            problem = f"is unreadable ({type(error).__name__})"
        if problem:
            self.rebuilt += 1
            log.warning("feature cache file %s %s; recomputing it", file, problem)
            return None
        return entry

    def _mismatch(
        self, meta: dict[str, str], entry: Entry, path: str, size: tuple[int, int]
    ) -> str:
        """Why a read entry cannot be used ("" when it can)."""
        if meta.get("key") != self.disk_key(path, size):
            return "belongs to another key"
        if json.loads(meta.get("shapes", "null")) != [list(t.shape) for t in entry]:
            return "has unexpected shapes"
        if meta.get("sha256") != tensors_sha256(entry):
            return "fails its checksum"
        return ""

    def _write_disk(self, path: str, size: tuple[int, int], entry: Entry) -> None:
        from safetensors.torch import save_file

        file = self.disk_path(path, size)
        file.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"level_{k}": t.detach().cpu().contiguous() for k, t in enumerate(entry)}
        meta = {
            "key": self.disk_key(path, size),
            "shapes": json.dumps([list(t.shape) for t in entry]),
            "sha256": tensors_sha256(entry),
        }
        tmp = file.with_suffix(f".tmp{os.getpid()}")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, file)  # atomic: a reader never sees a half-written file
