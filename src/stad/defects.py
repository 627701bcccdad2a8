"""Ground truth beyond one mask per image: MVTec LOCO AD's defect types (its
``defects_config.json``) and the regions (one defect instance each) of its test images.

Plain data, read by the LOCO reader (``stad.data.mvtec_loco``) and received by the sPRO metric
(``stad.metrics.spro``), so neither imports the other.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stad.errors import DatasetError

ANOMALY_GROUPS: tuple[str, ...] = ("logical_anomalies", "structural_anomalies")
"""Test folders of MVTec LOCO's anomalous images; each is scored together with the good ones."""


@dataclass(frozen=True)
class DefectConfig:
    """One entry of a LOCO category's ``defects_config.json``.

    Attributes:
        name: The defect type, e.g. ``"missing_almonds"``.
        pixel_value: The value (1..255) of this defect's pixels in its ground-truth PNGs.
        saturation_threshold: A fraction of the region's area in (0, 1] when
            ``relative_saturation``, else a number of pixels.
        relative_saturation: How ``saturation_threshold`` is read.
    """

    name: str
    pixel_value: int
    saturation_threshold: float
    relative_saturation: bool


def parse_defects_config(entries: Any, source: str | Path) -> dict[int, DefectConfig]:
    """Check the entries of a ``defects_config.json`` and index them by pixel value.

    Args:
        entries: The decoded JSON: a list of objects with ``defect_name``, ``pixel_value``,
            ``saturation_threshold`` and ``relative_saturation``.
        source: The file, named in errors.

    Raises:
        DatasetError: The content does not follow that format.
    """
    fix = (
        f"Each entry of {source} needs defect_name (text), pixel_value (1..255), "
        "saturation_threshold (a fraction in (0, 1] when relative_saturation is true, else a "
        "pixel count) and relative_saturation (true/false); restore the file from the MVTec LOCO "
        "AD archive."
    )
    if not isinstance(entries, list) or not entries:
        raise DatasetError(f"{source} must hold a non-empty JSON list of defect entries. {fix}")
    out: dict[int, DefectConfig] = {}
    for i, entry in enumerate(entries):
        try:
            value, threshold = entry["pixel_value"], entry["saturation_threshold"]
            relative, name = entry["relative_saturation"], entry["defect_name"]
        except (TypeError, KeyError) as err:
            raise DatasetError(f"Entry {i} of {source} lacks {err}. {fix}") from None
        valid = (
            isinstance(name, str)
            and isinstance(value, int)
            and not isinstance(value, bool)
            and 1 <= value <= 255
            and isinstance(relative, bool)
            and isinstance(threshold, int | float)
            and not isinstance(threshold, bool)
            and threshold > 0
            and (not relative or threshold <= 1)
        )
        if not valid:
            raise DatasetError(f"Entry {i} of {source} is invalid: {entry!r}. {fix}")
        if value in out:
            raise DatasetError(
                f"{source} gives pixel value {value} to both {out[value].name!r} and {name!r}; "
                f"each defect type needs its own value. {fix}"
            )
        out[value] = DefectConfig(name, value, float(threshold), relative)
    return out


def load_defects_config(path: str | Path) -> dict[int, DefectConfig]:
    """Read a LOCO category's ``defects_config.json``, indexed by pixel value.

    Raises:
        DatasetError: The file is missing, not JSON, or malformed.
    """
    path = Path(path)
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(
            f"{path} does not exist; every MVTec LOCO AD category folder holds a "
            "defects_config.json with the saturation threshold of each defect type. Restore it "
            "from the dataset archive."
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(
            f"Cannot read {path} as JSON ({err}); restore it from the MVTec LOCO AD archive."
        ) from None
    return parse_defects_config(entries, path)


@dataclass(frozen=True, eq=False)
class Region:
    """One ground-truth channel of a test image, at the resolution it is evaluated at.

    Attributes:
        mask: bool (H, W), the defect instance's pixels.
        defect: Its defect type's entry of ``defects_config.json``.
        pixel_scale: Evaluated pixels per original pixel, ``(H × W) / (H0 × W0)``; scales
            absolute saturation thresholds (1.0 when the mask has its file's resolution).
    """

    mask: np.ndarray
    defect: DefectConfig
    pixel_scale: float = 1.0

    @property
    def area(self) -> int:
        """Number of pixels of the region."""
        return int(self.mask.sum())

    def saturation_area(self) -> float:
        """Detected pixels from which the region counts as fully found (at least 1 pixel).

        ``int(threshold × area)`` when relative (the official code truncates), else
        ``min(threshold × pixel_scale, area)``. Values below one pixel become one: the official
        code then saturates with the first detected pixel too (it divides by the raw value).
        """
        area = self.area
        if self.defect.relative_saturation:
            saturation = float(math.floor(self.defect.saturation_threshold * area))
        else:
            saturation = min(self.defect.saturation_threshold * self.pixel_scale, float(area))
        return max(saturation, 1.0)
