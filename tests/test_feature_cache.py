"""Frozen-feature cache: hits, misses, key changes, stale and corrupted disk files, bypass."""

import torch
from torch import nn

from stad.feature_cache import CachedFeatures


class _Extractor(nn.Module):
    """A tiny frozen extractor with two levels; counts nothing itself (the cache counts)."""

    def __init__(self, frozen=True, scale=1.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.scale = scale
        self.frozen = frozen
        self.requires_grad_(not frozen)

    def forward(self, x):
        a = self.conv(x) * self.scale
        return [a, a.mean(dim=1, keepdim=True)[..., ::2, ::2]]


def _images(paths, tmp_path, size=8):
    files = []
    for i, p in enumerate(paths):
        f = tmp_path / p
        f.write_bytes(bytes([i]))  # real files: the disk key reads their mtime and size
        files.append(str(f))
    g = torch.Generator().manual_seed(0)
    return torch.rand(len(paths), 3, size, size, generator=g), files


def test_memory_cache_hits_misses_and_partial_batches(tmp_path):
    torch.manual_seed(0)
    cache = CachedFeatures(_Extractor(), key="k")
    images, paths = _images(["a.png", "b.png", "c.png"], tmp_path)
    direct = cache.extractor(images)
    first = cache(images[:2], paths[:2])
    assert cache.forward_passes == 1
    again = cache(images[:2], paths[:2])
    assert cache.forward_passes == 1  # all hits
    for x, y, d in zip(first, again, direct, strict=True):
        assert torch.equal(x, y) and torch.allclose(x, d[:2], atol=1e-6)
    # b is cached, c is not: one forward pass on c only, and the order of the batch is kept.
    mixed = cache(images[[2, 1]], [paths[2], paths[1]])
    assert cache.forward_passes == 2
    assert torch.allclose(mixed[0], direct[0][[2, 1]], atol=1e-6)


def test_changed_key_or_resolution_recomputes(tmp_path):
    extractor = _Extractor()
    images, paths = _images(["a.png"], tmp_path)
    cache = CachedFeatures(extractor, key="backbone-1")
    cache(images, paths)
    cache.key = "backbone-2"
    cache(images, paths)
    assert cache.forward_passes == 2
    cache(torch.rand(1, 3, 16, 16), paths)  # same file, other size
    assert cache.forward_passes == 3


def test_unfrozen_extractor_or_missing_paths_bypass_the_cache(tmp_path):
    images, paths = _images(["a.png"], tmp_path)
    trainable = CachedFeatures(_Extractor(frozen=False), key="k")
    assert not trainable.enabled
    trainable(images, paths)
    trainable(images, paths)
    assert trainable.forward_passes == 2
    frozen = CachedFeatures(_Extractor(), key="k")
    frozen(images, None)
    frozen(images, None)
    assert frozen.forward_passes == 2


def test_disk_cache_survives_a_new_process_and_detects_changes(tmp_path):
    torch.manual_seed(0)
    images, paths = _images(["a.png", "b.png"], tmp_path)
    extractor = _Extractor()
    first = CachedFeatures(extractor, key="k", cache_dir=tmp_path / "cache")
    expected = first(images, paths)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2
    # A fresh wrapper (an empty memory, e.g. the next run) reads the files: no forward pass.
    second = CachedFeatures(extractor, key="k", cache_dir=tmp_path / "cache")
    got = second(images, paths)
    assert second.forward_passes == 0 and second.disk_hits == 2
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    # Another backbone (key) maps to other files: recomputed, never read from the old ones.
    doubled = _Extractor(scale=2.0)
    doubled.load_state_dict(extractor.state_dict())
    other = CachedFeatures(doubled, key="k2", cache_dir=tmp_path / "cache")
    out = other(images, paths)
    assert other.forward_passes == 1 and torch.allclose(out[0], 2 * expected[0], atol=1e-5)
    # An edited image file (new size/mtime) gets a new key.
    (tmp_path / "a.png").write_bytes(b"edited image")
    third = CachedFeatures(extractor, key="k", cache_dir=tmp_path / "cache")
    third(images[:1], paths[:1])
    assert third.forward_passes == 1


def test_corrupted_or_tampered_disk_file_is_rebuilt_not_used(tmp_path):
    torch.manual_seed(0)
    images, paths = _images(["a.png"], tmp_path)
    extractor = _Extractor()
    writer = CachedFeatures(extractor, key="k", cache_dir=tmp_path / "cache")
    expected = writer(images, paths)
    file = writer.disk_path(paths[0], (8, 8))

    file.write_bytes(file.read_bytes()[:50])  # truncated
    reader = CachedFeatures(extractor, key="k", cache_dir=tmp_path / "cache")
    got = reader(images, paths)
    assert reader.forward_passes == 1 and reader.rebuilt == 1
    assert torch.allclose(got[0], expected[0])

    data = bytearray(file.read_bytes())  # rewritten valid; now flip one byte of the tensor data
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))
    reader = CachedFeatures(extractor, key="k", cache_dir=tmp_path / "cache")
    got = reader(images, paths)
    assert reader.forward_passes == 1 and reader.rebuilt == 1
    assert torch.allclose(got[0], expected[0])
    # The rebuilt file is valid again.
    last = CachedFeatures(extractor, key="k", cache_dir=tmp_path / "cache")
    last(images, paths)
    assert last.forward_passes == 0 and last.rebuilt == 0


def test_backbone_teacher_reuses_training_features_but_never_at_evaluation():
    from stad.methods.common import pretrained_teacher

    teacher, _ = pretrained_teacher("resnet18", [1, 2], "random", cache=True)
    batch = {"image": torch.rand(2, 3, 64, 64), "path": ["a.png", "b.png"]}
    first = teacher(batch)
    again = teacher(batch)
    assert teacher.cache.forward_passes == 1
    for x, y in zip(first, again, strict=True):
        assert torch.equal(x, y)
    with torch.inference_mode():
        evaluated = teacher(batch)
    assert teacher.cache.forward_passes == 1  # evaluation bypassed the cache
    for x, y in zip(first, evaluated, strict=True):
        assert torch.allclose(x, y, atol=1e-6)
    plain, _ = pretrained_teacher("resnet18", [1, 2], "random", cache=False)
    assert plain.cache is None
