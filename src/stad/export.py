"""Export a trained run as an inference graph: ``python -m stad.export run=<dir> format=onnx``.

The graph takes images B×3×H×W (float32 in [0, 1], H = W = the run's image size, any batch
size) and returns the anomaly maps B×1×H×W and the image scores (B,), exactly what the method
computes in eager mode (:class:`InferenceGraph` builds the batch dict inside). TorchScript comes
from ``torch.jit.trace``, ONNX from ``torch.onnx.export`` (the TorchScript-based exporter, the
``torch.export``-based one when that fails). Before anything is written the command runs the
exported file on the run's test images (or ``input=<folder>``) and refuses it when a map or a
score differs from eager mode by more than ``tolerance`` (peer projects shipped exports that
disagreed with their checkpoints). ONNX needs the optional extra ``pip install 'stad[onnx]'``.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import json
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence, Sized
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import Tensor, nn

import stad
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
from stad.scoring import check_image_inputs, iter_scored, list_inputs

if TYPE_CHECKING:
    from stad.checkpoint import LoadedRun
    from stad.core import Method

FILES = {"torchscript": "model.pt", "onnx": "model.onnx"}
RECORD = "export.json"
ONNX_INSTALL = "pip install 'stad[onnx]'"
# The legacy exporter's default; the torch.export-based one needs at least 18.
ONNX_OPSET = 17
DYNAMO_OPSET = 18


class ExportMismatchError(StadError):
    """The exported graph's outputs differ from eager mode beyond the tolerance."""


class InferenceGraph(nn.Module):
    """A method as a plain tensor function, for tracing and export.

    ``forward(image B×3×H×W in [0, 1]) -> (maps B×1×H×W float32, scores (B,) float32)``.
    """

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method = method

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        maps, scores = self.method({"image": image})
        return maps.float(), scores.float()


@contextlib.contextmanager
def _quiet_tracing() -> Iterator[None]:
    # Tracing warns about every shape-dependent Python branch (the graph is fixed to the traced
    # image size by design) and that torch.jit is deprecated; both are expected here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*jit.*deprecated.*")
        warnings.filterwarnings("ignore", message=".*dynamic_axes.*")
        yield


def trace(method: Method, example: Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of :class:`InferenceGraph` on an example batch (eval mode, no grad).

    Raises:
        StadError: the method cannot be traced (the message names it and the cause).
    """
    graph = InferenceGraph(method).eval()
    try:
        with torch.no_grad(), _quiet_tracing():
            return torch.jit.trace(graph, example, check_trace=False)
    except Exception as err:
        raise StadError(
            f"method {method.name or type(method.teacher).__name__} cannot be traced "
            f"({type(err).__name__}: {_first_line(err)}); it needs data-dependent Python control "
            "flow in forward to become tensor operations"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


# -- the two formats ------------------------------------------------------------------------------
def _require_onnx() -> dict[str, Any]:
    """The ONNX packages, or a StadError saying how to install them."""
    modules = {}
    for name in ("onnx", "onnxruntime"):
        try:
            modules[name] = importlib.import_module(name)
        except ImportError:
            raise StadError(
                f"format=onnx needs the package {name}, which is not installed; install the "
                f"optional extra: {ONNX_INSTALL}"
            ) from None
    return modules


def _write_torchscript(method: Method, example: Tensor, path: Path, opset: int) -> str:
    traced = trace(method, example)
    with _quiet_tracing():
        torch.jit.save(traced, str(path))
    return "torch.jit.trace"


def _run_torchscript(path: Path, device: torch.device) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    with _quiet_tracing():
        module = torch.jit.load(str(path), map_location=device).eval()

    def run(images: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            maps, scores = module(images.to(device))
        return maps.float().cpu(), scores.float().cpu()

    return run


ONNX_NAMES: dict[str, Any] = {"input_names": ["image"], "output_names": ["map", "score"]}


def _onnx_via_torchscript(graph: nn.Module, example: Tensor, path: Path, opset: int) -> None:
    batch = {"image": {0: "batch"}, "map": {0: "batch"}, "score": {0: "batch"}}
    # torch >= 2.9 defaults to the torch.export-based exporter; ask for this one by name.
    choose: dict[str, Any] = {"dynamo": False} if _has_dynamo_exporter() else {}
    with torch.no_grad(), _quiet_tracing():
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            opset_version=opset,
            dynamic_axes=batch,
            **ONNX_NAMES,
            **choose,
        )


def _onnx_via_torch_export(graph: nn.Module, example: Tensor, path: Path, opset: int) -> None:
    dims = ({0: torch.export.Dim("batch", min=1, max=4096)},)
    # It reports its progress on stdout; keep stdout for the command's own result line.
    with torch.no_grad(), _quiet_tracing(), contextlib.redirect_stdout(sys.stderr):
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dims,
            **ONNX_NAMES,
        )


def _has_dynamo_exporter() -> bool:
    return "dynamo" in inspect.signature(torch.onnx.export).parameters


def _write_onnx(method: Method, example: Tensor, path: Path, opset: int) -> str:
    """Export with the TorchScript-based exporter (fast); fall back to the torch.export-based
    one when it fails (it handles graphs the old one cannot, e.g. convolutions whose kernel
    shape depends on the input, but takes far longer)."""
    graph = InferenceGraph(method).eval()
    try:
        _onnx_via_torchscript(graph, example, path, opset)
        return f"torch.onnx.export (TorchScript-based, opset {opset})"
    except Exception as err:
        first = f"{type(err).__name__}: {_first_line(err)}"
        if not _has_dynamo_exporter():
            raise StadError(
                f"method {method.name or '?'} cannot be exported to ONNX ({first})"
            ) from err
    opset = max(opset, DYNAMO_OPSET)
    try:
        _onnx_via_torch_export(graph, example, path, opset)
    except Exception as err:
        raise StadError(
            f"method {method.name or '?'} cannot be exported to ONNX: the TorchScript-based "
            f"exporter failed ({first}) and so did the torch.export-based one "
            f"({type(err).__name__}: {_first_line(err)})"
        ) from err
    return (
        f"torch.onnx.export (torch.export-based, opset {opset}); the TorchScript-based "
        f"exporter failed: {first}"
    )


def _run_onnx(path: Path, device: torch.device) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    ort = _require_onnx()["onnxruntime"]
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    session = ort.InferenceSession(str(path), providers=providers)

    def run(images: Tensor) -> tuple[Tensor, Tensor]:
        maps, scores = session.run(["map", "score"], {"image": images.cpu().numpy()})
        return torch.from_numpy(np.asarray(maps)).float(), torch.from_numpy(
            np.asarray(scores)
        ).float()

    return run


WRITERS = {"torchscript": _write_torchscript, "onnx": _write_onnx}
RUNNERS = {"torchscript": _run_torchscript, "onnx": _run_onnx}


# -- check images -------------------------------------------------------------------------------
def check_images(loaded: LoadedRun, count: int, folder: Path | None = None) -> tuple[Tensor, str]:
    """Images N×3×H×W in [0, 1] to compare exported and eager outputs on, and where they came
    from: ``count`` evenly spaced images of the run's test split (rebuilt from its saved config),
    or of ``folder`` when given (decoded like stad.predict does)."""
    if folder is not None:
        paths, _ = list_inputs(str(folder))
        chosen = [paths[i] for i in _spread(len(paths), count)]
        images = [
            b.images for b in iter_scored(loaded.method, chosen, loaded.image_size) if b.indices
        ]
        if not images:
            raise StadError(f"no image in {folder} could be decoded to check the export on")
        return torch.cat(images), f"{sum(len(i) for i in images)} images of {folder}"
    from stad.data import build_dataset

    cfg = loaded.config
    try:
        test = build_dataset(cfg.dataset, loaded.image_size).test
    except StadError as err:
        raise StadError(
            f"the run's test images ({cfg.dataset.name} at {cfg.dataset.get('root')}) are not "
            f"available to check the export on ({_first_line(err)}); pass input=<folder of "
            "images> to check it on those"
        ) from None
    picked = _spread(len(cast(Sized, test)), count)
    stacked = torch.stack([test[i]["image"] for i in picked])
    return stacked, f"{len(picked)} test images of {cfg.dataset.name}/{cfg.dataset.category}"


def _spread(n: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(n)`` (all of them when n <= count)."""
    if n <= count:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, count).round().astype(int).tolist()))


def _outputs(
    fn: Callable[[Tensor], tuple[Tensor, Tensor]], images: Tensor, batch: int
) -> tuple[Tensor, Tensor]:
    maps, scores = [], []
    for start in range(0, len(images), batch):
        m, s = fn(images[start : start + batch])
        maps.append(m)
        scores.append(s)
    return torch.cat(maps), torch.cat(scores)


def _eager(method: Method, device: torch.device) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    def run(images: Tensor) -> tuple[Tensor, Tensor]:
        with torch.inference_mode():
            maps, scores = method({"image": images.to(device)})
        return maps.float().cpu(), scores.float().cpu()

    return run


def max_differences(want: tuple[Tensor, Tensor], got: tuple[Tensor, Tensor]) -> tuple[float, float]:
    """Largest absolute differences of maps and of scores (inf on a shape mismatch or NaN)."""
    out = []
    for a, b in zip(want, got, strict=True):
        if a.shape != b.shape:
            out.append(float("inf"))
            continue
        diff = (a.detach().double() - b.detach().double()).abs()
        same_nan = torch.isnan(a) & torch.isnan(b)
        diff = torch.where(same_nan, torch.zeros_like(diff), diff)
        out.append(float(torch.nan_to_num(diff, nan=float("inf")).max()) if diff.numel() else 0.0)
    return out[0], out[1]


# -- the command --------------------------------------------------------------------------------
@dataclass
class ExportResult:
    """What one export wrote: the graph file and its entry of ``export.json``."""

    path: Path
    info: dict[str, Any]


def export_run(
    run_dir: Path | str,
    fmt: str,
    output: Path | None = None,
    check_count: int = 16,
    tolerance: float = 1e-4,
    force: bool = False,
    folder: Path | None = None,
    device: str = "cpu",
    batch_size: int = 8,
    opset: int = ONNX_OPSET,
) -> ExportResult:
    """Export a run's method, check it against eager mode, and write it with ``export.json``.

    Raises:
        StadError: bad format, an existing file without ``force``, missing ONNX packages, no
            check images, a method that reads more than images or cannot be exported.
        ExportMismatchError: the exported outputs differ by more than ``tolerance`` (nothing
            is written).
    """
    if fmt not in FILES:
        raise StadError(f"format={fmt!r}; use one of {', '.join(FILES)}")
    if fmt == "onnx":
        _require_onnx()
    run_dir = Path(run_dir)
    out_dir = Path(output) if output is not None else run_dir / "export"
    target = out_dir / FILES[fmt]
    if target.exists() and not force:
        raise StadError(f"{target} exists; pass force=true to replace it")
    from stad.checkpoint import load_run  # timm and Lightning load only when there is work

    torch_device = resolve_device(device)
    loaded = load_run(run_dir, torch_device)
    method = loaded.method
    method.name = method.name or str(loaded.config.method.name)
    check_image_inputs(method, method.name)
    images, source = check_images(loaded, check_count, folder)
    eager = _outputs(_eager(method, torch_device), images, batch_size)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StadError(f"cannot create {out_dir} ({err.strerror or err})") from None
    checked: dict[str, Any] = {}

    def write_and_check(tmp: Path) -> None:
        # Written, read back and compared before it takes the final name; a mismatch raises and
        # write_atomic removes the file.
        example = images[: min(2, len(images))].to(torch_device)
        checked["exporter"] = WRITERS[fmt](method, example, tmp, opset)
        exported = _outputs(RUNNERS[fmt](tmp, torch_device), images, batch_size)
        d_map, d_score = max_differences(eager, exported)
        if not (d_map <= tolerance and d_score <= tolerance):
            raise ExportMismatchError(
                f"the exported {fmt} graph differs from eager mode on {source}: max |Δmap| = "
                f"{d_map:.3g}, max |Δscore| = {d_score:.3g} > tolerance {tolerance:g}; nothing "
                f"was written. Export on the device you will run on (device=...), or report it"
            )
        checked.update(d_map=d_map, d_score=d_score)

    write_atomic(target, write_and_check)
    exporter, d_map, d_score = checked["exporter"], checked["d_map"], checked["d_score"]
    info = _info(
        loaded, fmt, target, exporter, source, len(images), d_map, d_score, tolerance, torch_device
    )
    _update_record(out_dir / RECORD, fmt, info)
    return ExportResult(target, info)


def _info(
    loaded: LoadedRun,
    fmt: str,
    target: Path,
    exporter: str,
    source: str,
    n: int,
    d_map: float,
    d_score: float,
    tolerance: float,
    device: torch.device,
) -> dict[str, Any]:
    size = loaded.image_size
    versions = {"stad": stad.__version__, "torch": torch.__version__}
    if fmt == "onnx":
        for name, module in _require_onnx().items():
            versions[name] = module.__version__
    return {
        "format": fmt,
        "file": target.name,
        "exporter": exporter,
        "device": str(device),
        "input": {
            "name": "image",
            "shape": ["batch", 3, size, size],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "preprocessing": "RGB, resized to image_size (antialiased"
            " bilinear, no crop), divided by 255; the graph normalises",
        },
        "outputs": {"map": ["batch", 1, size, size], "score": ["batch"]},
        "method": str(loaded.config.method.name),
        "backbone": str(loaded.config.backbone.name),
        "image_size": size,
        "thresholds": loaded.thresholds,
        "check": {
            "images": n,
            "source": source,
            "max_abs_diff_map": d_map,
            "max_abs_diff_score": d_score,
            "tolerance": tolerance,
        },
        "versions": versions,
        "run": str(loaded.run_dir),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _update_record(path: Path, fmt: str, info: dict[str, Any]) -> None:
    """``export.json`` holds one entry per format; other formats' entries are kept."""
    record: dict[str, Any] = {}
    if path.is_file():
        with contextlib.suppress(OSError, ValueError):
            record = json.loads(path.read_text())
    record[fmt] = info
    write_atomic(path, dumps_strict(record) + "\n")


def _tolerance(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise ValueError("must be >= 0")
    return value


EXPORT_OPTIONS: dict[str, Option] = {
    "run": Option(Path, None, "a finished run's folder (holds model.safetensors)"),
    "format": Option(parse_choice(*FILES), None, " | ".join(FILES)),
    "output": Option(optional_path, None, "folder for model.pt|model.onnx; default <run>/export"),
    "check_images": Option(positive_int, 16, "test images the export is checked on"),
    "tolerance": Option(_tolerance, 1e-4, "largest absolute difference to eager maps and scores"),
    "force": Option(parse_bool, False, "replace an existing export"),
    "input": Option(optional_path, None, "images to check on when the run's dataset is absent"),
    "device": Option(parse_choice("cpu", "cuda"), "cpu", "device to trace and check on"),
    "batch_size": Option(positive_int, 8, "images per batch of the check"),
    "opset": Option(int, ONNX_OPSET, "ONNX opset version"),
}

SUMMARY = (
    "Export a trained run as TorchScript or ONNX: images B×3×H×W in [0, 1] → anomaly maps\n"
    "B×1×H×W and scores (B,), checked against eager mode on the run's test images."
)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stad.export run=<run dir> format=torchscript|onnx [key=value ...]``; returns
    the exit status (0 written, 2 on a user error or a failed check)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage("stad.export", EXPORT_OPTIONS, SUMMARY))
        return 0
    try:
        opts = parse_options(argv, EXPORT_OPTIONS, "stad.export", required=("run", "format"))
        result = export_run(
            opts["run"],
            opts["format"],
            output=opts["output"],
            check_count=opts["check_images"],
            tolerance=opts["tolerance"],
            force=opts["force"],
            folder=opts["input"],
            device=opts["device"],
            batch_size=opts["batch_size"],
            opset=opts["opset"],
        )
    except StadError as err:
        print(f"stad.export: error: {err}", file=sys.stderr, flush=True)
        return 2
    check = result.info["check"]
    print(
        f"exported {result.path} ({result.info['exporter']}); max |Δmap| "
        f"{check['max_abs_diff_map']:.3g}, max |Δscore| {check['max_abs_diff_score']:.3g} on "
        f"{check['source']} (tolerance {check['tolerance']:g})",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
