"""stad.export: TorchScript and ONNX graphs of a trained run reproduce eager maps and scores,
a graph that does not is refused, every method traces, and user errors get one message."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY_METHODS, compose_config, random_batch, tiny_image_size

from stad.backbones import weights_from_checkpoint
from stad.checkpoint import load_run, save_checkpoint
from stad.data import build_dataset
from stad.errors import StadError
from stad.export import (
    RUNNERS,
    WRITERS,
    ExportMismatchError,
    InferenceGraph,
    check_images,
    export_run,
    main,
    trace,
)
from stad.methods import METHODS, build_method

TOLERANCE = 1e-4

# Tiny convolutions gain nothing from threads on a shared 2-core machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _test_images(run_dir) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Every test image of the run and the eager method's maps and scores on them."""
    loaded = load_run(run_dir)
    test = build_dataset(loaded.config.dataset, loaded.image_size).test
    images = torch.stack([test[i]["image"] for i in range(len(test))])
    with torch.no_grad():
        maps, scores = loaded.method({"image": images})
    return images, (maps, scores)


def _run_exported(path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if path.suffix == ".pt":
        with torch.no_grad():
            return torch.jit.load(str(path))(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maps, scores = session.run(None, {"image": images.numpy()})
    return torch.from_numpy(maps), torch.from_numpy(scores)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_the_export_reproduces_eager_maps_and_scores_on_the_test_images(
    trained, tmp_path, fmt, capsys
):
    path = tmp_path / {"torchscript": "model.pt", "onnx": "model.onnx"}[fmt]
    if fmt == "torchscript":  # once through the command's entry point, once through the function
        args = [f"run={trained.run_dir}", f"format={fmt}", f"output={tmp_path}", "check_images=6"]
        assert main(args) == 0
        assert f"exported {path}" in capsys.readouterr().out
    else:
        assert export_run(trained.run_dir, fmt, output=tmp_path, check_count=6).path == path
    record = json.loads((tmp_path / "export.json").read_text())[fmt]
    assert record["input"]["shape"] == ["batch", 3, 64, 64]
    assert record["check"]["images"] == 6
    assert record["check"]["max_abs_diff_map"] <= TOLERANCE
    assert record["check"]["max_abs_diff_score"] <= TOLERANCE
    assert record["versions"]["torch"] == torch.__version__
    assert record["thresholds"]["image"]["value"] == trained.record["thresholds"]["image"]["value"]
    # Independently of the command's own check: all 20 test images in one batch (the graph was
    # traced on a batch of 2, so this also proves the batch size is free).
    images, (want_maps, want_scores) = _test_images(trained.run_dir)
    maps, scores = _run_exported(path, images)
    assert maps.shape == want_maps.shape == (20, 1, 64, 64)
    assert (maps - want_maps).abs().max() <= TOLERANCE
    assert (scores - want_scores).abs().max() <= TOLERANCE
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.slow
def test_an_export_that_differs_from_eager_mode_is_refused_and_not_written(
    trained, tmp_path, monkeypatch
):
    # A stand-in exporter whose graph is eager mode plus 1e-3: only the check is under test.
    def write(method, example, path, opset):
        path.write_bytes(b"graph")
        exported["graph"] = InferenceGraph(method)
        return "test"

    def run(path, device):
        return lambda images: tuple(t + 1e-3 for t in exported["graph"](images))

    exported: dict = {}
    monkeypatch.setitem(WRITERS, "torchscript", write)
    monkeypatch.setitem(RUNNERS, "torchscript", run)
    with pytest.raises(ExportMismatchError, match=r"max \|Δmap\| = 0\.001"):
        export_run(trained.run_dir, "torchscript", output=tmp_path, check_count=2)
    assert list(tmp_path.iterdir()) == []  # neither the graph, nor a temporary file, nor a record


def test_onnx_without_its_packages_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import now raises ImportError
    with pytest.raises(StadError, match=r"pip install 'stad\[onnx\]'"):
        export_run(tmp_path, "onnx")


@pytest.mark.slow
def test_without_the_runs_dataset_the_check_uses_input_or_stops(trained, tmp_path):
    loaded = load_run(trained.run_dir)
    cfg = loaded.config.copy()
    cfg.dataset.name, cfg.dataset.root = "mvtec", str(tmp_path / "nowhere")
    save_checkpoint(tmp_path / "run", loaded.method, cfg, loaded.thresholds)
    with pytest.raises(StadError, match="input=<folder"):
        export_run(tmp_path / "run", "torchscript", check_count=2)
    good = trained.test_dir / "good"
    images, source = check_images(load_run(tmp_path / "run"), 3, good)
    assert images.shape == (3, 3, 64, 64) and source == f"3 images of {good}"
    reference = load_run(trained.run_dir)
    test = build_dataset(reference.config.dataset, 64).test
    first_good = next(i for i in range(len(test)) if test[i]["label"] == 0)
    assert torch.equal(images[0], test[first_good]["image"])  # decoded like the dataset


@pytest.mark.slow
def test_the_command_line_refuses_to_overwrite_an_export(trained, tmp_path):
    (tmp_path / "model.pt").write_text("keep")
    args = [f"run={trained.run_dir}", "format=torchscript", f"output={tmp_path}"]
    out = subprocess.run(
        [sys.executable, "-m", "stad.export", *args], capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 2
    assert out.stderr.startswith("stad.export: error:") and "force=true" in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "Traceback" not in out.stderr
    assert (tmp_path / "model.pt").read_text() == "keep"


# -- every method traces ----------------------------------------------------------------------
RANDOM_RESNET = ["backbone=resnet18", "backbone.weights=random"]
# The backbone each method traces with (conftest.TINY_METHODS makes the method small); US's
# patch networks need none, AST takes the offline EfficientNet-Lite.
BACKBONES = {"ast": ["backbone=tf_efficientnet_lite0"], "us": []}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_methods_inference_graph_traces_and_matches_eager_mode(name):
    backbone = BACKBONES.get(name, RANDOM_RESNET)
    size = tiny_image_size(name)
    cfg = compose_config(["image_size=64", *TINY_METHODS[name], *backbone])
    torch.manual_seed(0)
    with weights_from_checkpoint():  # random weights everywhere, no pretraining or download
        method = build_method(cfg.method, cfg.backbone).eval()
    traced = trace(method, random_batch(2, size)["image"])
    images = random_batch(3, size)["image"]  # another batch size than the traced one
    with torch.no_grad():
        want = InferenceGraph(method)(images)
        got = traced(images)
    for a, b in zip(want, got, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=TOLERANCE)
    assert np.isfinite(want[1].numpy()).all()
