"""Auxiliary data streams a training stage declares (:class:`stad.core.Stream`), built here
from their ``source`` mapping; the runner shuffles and batches them.

Kinds:

- ``folder``: every image under ``root`` (recursively, sorted), RGB, resized to ``size``
  (default: the run's ``image_size``), e.g. ImageNet images for EfficientAD's penalty term.
- ``train``: the stage's own training images once more, in an order of their own (e.g. a
  second view of the normal data for a pairwise loss).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from stad.data.base import Item
from stad.data.images import as_hw, load_rgb
from stad.errors import StadError
from stad.fileio import is_image_file

STREAM_KINDS = ("folder", "train")


class FolderImages(Dataset[Item]):
    """RGB images of a folder tree as batch dicts ``{"image": 3×H×W in [0, 1], "path"}``."""

    def __init__(self, root: Path, size: int) -> None:
        root = Path(root).expanduser()
        self.files = sorted(p for p in root.rglob("*") if is_image_file(p)) if root.is_dir() else []
        if not self.files:
            raise StadError(
                f"the auxiliary image stream's folder {root} holds no images (.png/.jpg/...); "
                "give a folder of images (e.g. ImageNet's train folder)"
            )
        self.size_hw = as_hw(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        array, _ = load_rgb(path, self.size_hw)
        image = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)
        return {"image": image, "path": str(path)}


def build_stream(source: Mapping[str, Any], image_size: int, train: Dataset[Item]) -> Dataset[Item]:
    """The dataset of a stream ``source``; ``train`` is the stage's training set.

    Raises:
        StadError: unknown kind, or a folder without images.
    """
    kind = str(source.get("kind", ""))
    if kind == "folder":
        if not source.get("root"):
            raise StadError("an auxiliary folder stream needs a root: {kind: folder, root: ...}")
        return FolderImages(Path(str(source["root"])), int(source.get("size") or image_size))
    if kind == "train":
        return train
    raise StadError(
        f"unknown auxiliary data stream kind {kind!r}; use one of {', '.join(STREAM_KINDS)}"
    )
