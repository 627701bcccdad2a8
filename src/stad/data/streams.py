"""Auxiliary data streams a training stage declares (:class:`stad.core.Stream`), built here
from their ``source`` mapping; the runner shuffles and batches them.

Kinds:

- ``folder``: every image under ``root`` (recursively, sorted), RGB, resized to ``size``
  (default: the run's ``image_size``), e.g. ImageNet images for EfficientAD's penalty term.
- ``train``: the stage's own training images once more, in an order of their own (e.g. a
  second view of the normal data for a pairwise loss).
- ``synthetic_anomalies``: derived from each main batch, not loaded: its images with synthetic
  anomalies (``stad.synthesis``; keys ``synthesis``, ``size``, ``category``), as
  ``{"image", "mask", "foreground"}``, drawn from (run seed, epoch) alone (e.g. AAND's stage 1).
- ``simplex_noise``: derived too: the batch's images with a rectangle of fractal simplex noise
  added (``stad.synthesis.SimplexNoise``; its keyword arguments as keys), as ``{"image"}``
  (RD++'s noisy view).
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
from stad.synthesis import AnomalySynthesizer, SimplexNoise, build_synthesizer

STREAM_KINDS = ("folder", "train", "synthetic_anomalies", "simplex_noise")
DERIVED_KINDS = ("synthetic_anomalies", "simplex_noise")


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

    def describe(self) -> dict[str, Any]:
        """What the record says of the stream."""
        return {"kind": "folder", "root": str(self.files[0].parent), "n_images": len(self)}


class SyntheticAnomalies:
    """A stream derived from each main batch: its images with synthetic anomalies and their
    exact masks. The runner restarts it per epoch (:meth:`set_epoch`), so a resumed run draws
    the anomalies an uninterrupted one draws."""

    def __init__(self, synthesizer: AnomalySynthesizer) -> None:
        self.synthesizer = synthesizer

    def set_epoch(self, epoch: int) -> None:
        """Restart the draws at a point given by (seed, epoch)."""
        self.synthesizer.set_epoch(epoch)

    def __call__(self, batch: Item) -> Item:
        """``{"image", "mask", "foreground"}`` for the batch's images (on their device)."""
        synth = self.synthesizer(batch["image"], batch.get("foreground"))
        return {"image": synth.image, "mask": synth.mask, "foreground": synth.foreground}

    def describe(self) -> dict[str, Any]:
        """What the record says of the stream (the synthesizer's settings and textures)."""
        return {"kind": "synthetic_anomalies", **self.synthesizer.describe()}


class NoisyImages:
    """A stream derived from each main batch: its images with simplex noise added."""

    def __init__(self, noise: SimplexNoise) -> None:
        self.noise = noise

    def set_epoch(self, epoch: int) -> None:
        """Restart the draws at a point given by (seed, epoch)."""
        self.noise.set_epoch(epoch)

    def __call__(self, batch: Item) -> Item:
        """``{"image"}``: the batch's images with one noise rectangle each."""
        return {"image": self.noise(batch["image"])}

    def describe(self) -> dict[str, Any]:
        """What the record says of the stream."""
        return self.noise.describe()


def is_derived(source: Mapping[str, Any]) -> bool:
    """Whether a stream is computed from the main batch rather than loaded."""
    return str(source.get("kind", "")) in DERIVED_KINDS


def build_derived_stream(
    source: Mapping[str, Any], image_size: int, seed: int
) -> SyntheticAnomalies | NoisyImages:
    """The per-batch stream of a derived ``source`` (see :func:`is_derived`), seeded by the
    run's ``seed``.

    Raises:
        StadError: not a derived kind, or no ``synthesis`` block.
    """
    if not is_derived(source):
        raise StadError(f"stream kind {source.get('kind')!r} is loaded, not derived from a batch")
    if source.get("kind") == "simplex_noise":
        options = {k: v for k, v in source.items() if k != "kind"}
        try:
            return NoisyImages(SimplexNoise(seed=seed, **options))
        except TypeError as err:
            raise StadError(
                f"simplex_noise stream: {err}; see stad.synthesis.SimplexNoise"
            ) from None
    if not isinstance(source.get("synthesis"), Mapping):
        raise StadError(
            "a synthetic_anomalies stream needs its settings: "
            "{kind: synthetic_anomalies, synthesis: {...}} (see stad.synthesis)"
        )
    synthesizer = build_synthesizer(
        dict(source["synthesis"]),
        size=int(source.get("size") or image_size),
        category=source.get("category"),
        seed=seed,
    )
    return SyntheticAnomalies(synthesizer)


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
    if kind in DERIVED_KINDS:
        raise StadError(f"stream kind {kind!r} is derived from each batch: build_derived_stream")
    raise StadError(
        f"unknown auxiliary data stream kind {kind!r}; use one of {', '.join(STREAM_KINDS)}"
    )
