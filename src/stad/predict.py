"""Score new images with a trained run: ``python -m stad.predict run=<run dir> input=<images>``.

Images are decoded and resized exactly as the run's dataset served its test split (RGB, uint8,
antialiased bilinear resize to ``image_size``, no crop, float32 in [0, 1]), so predicting a
dataset's test folder reproduces the run's scores. Each image gets a score, a decision
(``score >= image threshold``), its anomaly map (16-bit PNG scaled per image, or exact float32
``.npy``) and a colour overlay on one colour range for the whole run. Files that cannot be scored
are skipped, warned about and listed in ``skipped.csv``, never dropped silently.

The functions :func:`score_images`, :func:`read_labelled` and :func:`labelled_thresholds` are
the reusable parts (``run.py`` chooses F1 thresholds at training time with the last one).
"""

from __future__ import annotations

import csv
import io
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from stad.cli import (
    Option,
    optional_path,
    parse_bool,
    parse_choice,
    parse_options,
    positive_int,
    resolve_device,
    usage,
)
from stad.errors import StadError
from stad.fileio import dumps_strict, write_atomic
from stad.scoring import (
    NORMAL,
    Skipped,
    check_image_inputs,
    iter_scored,
    list_inputs,
    output_names,
)
from stad.thresholds import (
    IMAGE_QUANTILE,
    PIXEL_QUANTILE,
    labelled_thresholds,
    normal_thresholds,
)
from stad.viz import overlay

if TYPE_CHECKING:
    from stad.checkpoint import LoadedRun

PNG16_MAX = 65535
THRESHOLD_MODES = ("run", "quantile", "f1", "fixed")
MAP_FORMATS = ("png16", "npy")
CSV_COLUMNS = (
    "path",
    "name",
    "score",
    "decision",
    "pixel_fraction",
    "map_min",
    "map_max",
    "map_file",
    "overlay_file",
    "width",
    "height",
)


# -- key=value options (the shared parsers: stad.cli) ------------------------------------------


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _quantile(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError("must be in (0, 1]")
    return value


def _masks(text: str) -> Path | str | None:
    value = text.strip()
    if value.lower() in ("", "none", "null", "off", "false"):
        return None
    return "auto" if value.lower() == "auto" else Path(value).expanduser()


def _range(text: str) -> tuple[float, float] | None:
    if text.strip().lower() in ("", "none", "null", "auto"):
        return None
    lo, hi = (float(v) for v in text.strip("[]()").split(","))
    if not hi > lo:
        raise ValueError("needs lo < hi")
    return lo, hi


PREDICT_OPTIONS: dict[str, Option] = {
    "run": Option(Path, None, "a finished run's folder (holds model.safetensors)"),
    "input": Option(str, None, "an image file, a folder (searched recursively) or a glob"),
    "output": Option(optional_path, None, "new or empty folder; default <run>/predictions/<time>"),
    "batch_size": Option(positive_int, 8, "images per forward pass"),
    "device": Option(parse_choice("auto", "cpu", "cuda"), "auto", "auto | cpu | cuda"),
    "workers": Option(_non_negative_int, min(4, os.cpu_count() or 1), "decoding threads"),
    "map_format": Option(parse_choice(*MAP_FORMATS), "png16", "png16 (scaled) | npy (float32)"),
    "overlay": Option(parse_bool, True, "write a colour overlay PNG per image"),
    "overlay_range": Option(_range, None, "lo,hi map values of the colour ramp (default: auto)"),
    "threshold": Option(parse_choice(*THRESHOLD_MODES), "run", " | ".join(THRESHOLD_MODES)),
    "labelled": Option(optional_path, None, "f1: folder with good/ and <defect>/ subfolders"),
    "masks": Option(_masks, "auto", "f1: mask folder; auto = <labelled>/../ground_truth; none"),
    "normal": Option(optional_path, None, "quantile: folder of normal images"),
    "image_quantile": Option(_quantile, None, "quantile: of normal image scores"),
    "pixel_quantile": Option(_quantile, None, "quantile: of normal map pixels"),
    "image_threshold": Option(float, None, "fixed: image score threshold"),
    "pixel_threshold": Option(float, None, "fixed: anomaly-map pixel threshold"),
}


# -- thresholds ---------------------------------------------------------------------------------


def choose_thresholds(loaded: LoadedRun, opts: dict[str, Any], device: torch.device) -> dict:
    """The image and pixel thresholds ``threshold=`` asks for; what a mode does not set comes
    from the run (``origin`` says which)."""
    from stad.thresholds import fixed_threshold

    run = {k: {**v, "origin": "run"} for k, v in (loaded.thresholds or {}).items()}
    mode = opts["threshold"]
    common = {"device": device, "batch_size": opts["batch_size"], "workers": opts["workers"]}
    chosen: dict[str, Any] = {}
    if mode == "fixed":
        if opts["image_threshold"] is None and opts["pixel_threshold"] is None:
            raise StadError("threshold=fixed needs image_threshold=<v> and/or pixel_threshold=<v>")
        for kind in ("image", "pixel"):
            if opts[f"{kind}_threshold"] is not None:
                chosen[kind] = fixed_threshold(opts[f"{kind}_threshold"], "stad.predict option")
    elif mode == "f1":
        if opts["labelled"] is None:
            raise StadError("threshold=f1 needs labelled=<folder with good/ and defect folders>")
        chosen = labelled_thresholds(
            loaded.method, opts["labelled"], loaded.image_size, masks=opts["masks"], **common
        )
    elif mode == "quantile":
        folder = opts["normal"] or (opts["labelled"] / NORMAL if opts["labelled"] else None)
        if folder is None:
            raise StadError("threshold=quantile needs normal=<folder of normal images>")
        saved = loaded.config.get("threshold") or {}
        image_q = opts["image_quantile"] or float(saved.get("image_quantile", IMAGE_QUANTILE))
        pixel_q = opts["pixel_quantile"] or float(saved.get("pixel_quantile", PIXEL_QUANTILE))
        chosen = normal_thresholds(
            loaded.method, folder, loaded.image_size, image_q, pixel_q, **common
        )
    chosen = {k: {**v, "origin": "stad.predict"} for k, v in chosen.items()}
    return {kind: chosen.get(kind, run.get(kind)) for kind in ("image", "pixel")}


def overlay_range(
    thresholds: dict[str, Any], override: tuple[float, float] | None
) -> tuple[float, float, str] | None:
    """The map values at the ends of the colour ramp, one range for the whole run.

    From the pixel threshold t (else the image threshold, on the map's scale when the score is
    the map's maximum): [0, 2t] for t > 0 (maps are distances), so t sits at the ramp's middle
    and everything above it is yellow to red; [t − 1, t + 1] otherwise. None: per image.
    """
    if override is not None:
        return override[0], override[1], "overlay_range option"
    for kind in ("pixel", "image"):
        entry = thresholds.get(kind)
        if entry is not None:
            t = float(entry["value"])
            lo, hi = (0.0, 2.0 * t) if t > 0 else (t - 1.0, t + 1.0)
            return lo, hi, f"{kind} threshold {t:.6g} at the middle of the ramp"
    return None


# -- writing ------------------------------------------------------------------------------------
def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as CSV text (floats in full precision)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def save_map(amap: np.ndarray, path: Path, fmt: str) -> tuple[float, float]:
    """Write an H×W map; returns its (min, max).

    ``png16``: ``q = round((m − min) / (max − min) · 65535)`` as a 16-bit greyscale PNG, so
    ``m ≈ min + q / 65535 · (max − min)`` (error ≤ half a step); a constant map is all zeros.
    ``npy``: the float32 values exactly.
    """
    lo, hi = float(amap.min()), float(amap.max())
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "npy":
        np.save(path, amap.astype(np.float32))
        return lo, hi
    span = hi - lo
    scaled = (amap.astype(np.float64) - lo) / span if span > 0 else np.zeros_like(amap)
    q = np.round(np.clip(scaled, 0.0, 1.0) * PNG16_MAX).astype(np.uint16)
    Image.fromarray(q).save(path)
    return lo, hi


def read_png16_map(path: Path, map_min: float, map_max: float) -> np.ndarray:
    """Invert :func:`save_map`'s 16-bit PNG: float64 H×W map values."""
    with Image.open(path) as img:
        q = np.asarray(img).astype(np.float64)
    return map_min + q / PNG16_MAX * (map_max - map_min)


def _save_overlay(
    image: Tensor, amap: Tensor, path: Path, vrange: tuple[float, float] | None
) -> None:
    """image | heat map blended on the image (viz.overlay without its ground-truth panel)."""
    lo, hi = vrange if vrange is not None else (float(amap.min()), float(amap.max()))
    row = overlay(image, amap, torch.zeros_like(amap), lo, hi)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(row[:, : 2 * image.shape[-1]])).save(path)


def default_output(run_dir: Path) -> Path:
    """``<run>/predictions/<YYYY-mm-dd_HH-MM-SS>`` (with ``-2``, ``-3`` ... if taken)."""
    stamp = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    base = run_dir / "predictions" / stamp
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{stamp}-{n}")
    return candidate


def prepare_output(path: Path) -> Path:
    """Create the output folder; refuse one that holds anything (never overwrite)."""
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise StadError(
            f"output {path} already exists and is not an empty folder; stad.predict never "
            "overwrites: pass a new output=<folder> (or leave output out for a new timestamped one)"
        )
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StadError(f"cannot create the output folder {path} ({err.strerror or err})") from None
    return path


# -- the command --------------------------------------------------------------------------------
@dataclass
class PredictResult:
    """What one prediction wrote."""

    output: Path
    scored: int
    skipped: list[Skipped]
    thresholds: dict[str, Any]


def predict(opts: dict[str, Any]) -> PredictResult:
    """Run one prediction from parsed options (see :data:`PREDICT_OPTIONS`)."""
    from stad.checkpoint import load_run  # timm and Lightning load only when there is work

    device = resolve_device(opts["device"])
    loaded = load_run(opts["run"], device)
    check_image_inputs(loaded.method, str(loaded.config.method.name))
    paths, base = list_inputs(opts["input"])
    thresholds = choose_thresholds(loaded, opts, device)
    vrange = overlay_range(thresholds, opts["overlay_range"])
    if thresholds["image"] is None:
        _warn(
            "the run holds no image threshold: the decision column stays empty; choose one with "
            "threshold=fixed image_threshold=<v>, threshold=f1 labelled=<folder> or "
            "threshold=quantile normal=<folder>"
        )
    out = prepare_output(opts["output"] or default_output(Path(opts["run"])))
    names = output_names(paths, base)
    rows, skipped = _write_predictions(loaded, opts, paths, names, out, thresholds, vrange, device)
    write_atomic(out / "predictions.csv", csv_text(rows, CSV_COLUMNS))
    write_atomic(
        out / "skipped.csv",
        csv_text([{"path": str(s.path), "reason": s.reason} for s in skipped], ("path", "reason")),
    )
    write_atomic(
        out / "thresholds.json",
        dumps_strict(_thresholds_document(loaded, opts, thresholds, vrange)) + "\n",
    )
    return PredictResult(out, len(rows), skipped, thresholds)


def _write_predictions(
    loaded: LoadedRun,
    opts: dict[str, Any],
    paths: list[Path],
    names: list[str],
    out: Path,
    thresholds: dict[str, Any],
    vrange: tuple[float, float, str] | None,
    device: torch.device,
) -> tuple[list[dict[str, Any]], list[Skipped]]:
    from tqdm.auto import tqdm  # lightning's dependency; imported where the bar is drawn

    image_t = thresholds["image"]["value"] if thresholds["image"] else None
    pixel_t = thresholds["pixel"]["value"] if thresholds["pixel"] else None
    suffix = ".npy" if opts["map_format"] == "npy" else ".png"
    rows: list[dict[str, Any]] = []
    skipped: list[Skipped] = []
    batches = iter_scored(
        loaded.method, paths, loaded.image_size, opts["batch_size"], device, opts["workers"]
    )
    with tqdm(total=len(paths), unit="img", desc="stad.predict", disable=None) as bar:
        for batch in batches:
            for item in batch.skipped:
                bar.write(f"stad.predict: warning: skipped {item.path}: {item.reason}", sys.stderr)
            skipped += batch.skipped
            for j, i in enumerate(batch.indices):
                amap = batch.maps[j]
                score = float(batch.scores[j])
                map_file = f"maps/{names[i]}{suffix}"
                lo, hi = save_map(amap[0].numpy(), out / map_file, opts["map_format"])
                overlay_file = ""
                if opts["overlay"]:
                    overlay_file = f"overlays/{names[i]}.png"
                    rng = vrange[:2] if vrange is not None else None
                    _save_overlay(batch.images[j], amap, out / overlay_file, rng)
                rows.append(
                    {
                        "path": str(paths[i]),
                        "name": names[i],
                        "score": score,
                        "decision": _decision(score, image_t),
                        "pixel_fraction": (
                            float((amap >= pixel_t).float().mean()) if pixel_t is not None else ""
                        ),
                        "map_min": lo,
                        "map_max": hi,
                        "map_file": map_file,
                        "overlay_file": overlay_file,
                        "width": batch.sizes[j][0],
                        "height": batch.sizes[j][1],
                    }
                )
            bar.update(len(batch.indices) + len(batch.skipped))
    return rows, skipped


def _decision(score: float, threshold: float | None) -> str:
    if threshold is None:
        return ""
    return "anomalous" if score >= threshold else "normal"


def _thresholds_document(
    loaded: LoadedRun,
    opts: dict[str, Any],
    thresholds: dict[str, Any],
    vrange: tuple[float, float, str] | None,
) -> dict[str, Any]:
    return {
        "threshold": opts["threshold"],
        "image": thresholds["image"],
        "pixel": thresholds["pixel"],
        "decision": "anomalous when score >= image.value",
        "pixel_fraction": "share of map pixels >= pixel.value",
        "overlay_range": list(vrange[:2]) if vrange else None,
        "overlay_range_source": vrange[2] if vrange else "per image (no threshold)",
        "map_format": opts["map_format"],
        "map_scaling": (
            "value = map_min + q / 65535 * (map_max - map_min), q the 16-bit pixel"
            if opts["map_format"] == "png16"
            else "float32 values as computed"
        ),
        "map_size": [loaded.image_size, loaded.image_size],
        "run": str(loaded.run_dir),
        "method": str(loaded.config.method.name),
        "stad_version": loaded.stad_version,
    }


def _warn(message: str) -> None:
    print(f"stad.predict: warning: {message}", file=sys.stderr, flush=True)


def _summary(result: PredictResult) -> str:
    lines = [f"scored {result.scored} image(s) → {result.output}"]
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)} file(s) (listed in skipped.csv):")
        lines += [f"  {s.path}: {s.reason}" for s in result.skipped]
    return "\n".join(lines)


SUMMARY = (
    "Score images with a trained run: predictions.csv (score, decision per image), anomaly maps,\n"
    "colour overlays and thresholds.json in the output folder."
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stad.predict run=<run dir> input=<images> [key=value ...]``; returns the exit
    status: 0 when at least one image was scored, 2 when none was or on a user error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage("stad.predict", PREDICT_OPTIONS, SUMMARY))
        return 0
    try:
        opts = parse_options(argv, PREDICT_OPTIONS, "stad.predict", required=("run", "input"))
        result = predict(opts)
    except StadError as err:
        print(f"stad.predict: error: {err}", file=sys.stderr, flush=True)
        return 2
    print(_summary(result), flush=True)
    if result.scored == 0:
        print("stad.predict: error: no image could be scored", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
