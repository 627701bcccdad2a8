"""The decode cache under concurrent reads: CPython <= 3.11.7 corrupts its AST recursion counter
when two threads parse Python source at once ("AST constructor recursion depth mismatch"), and
``numpy.load`` parses every ``.npy`` header with ``ast.literal_eval``. The preload threads read
the cache; these tests read it the hard way: many threads, a concurrent ``ast.parse`` loop,
collector pressure from finalisers and a tiny thread switch interval (which made the old
``.npz`` format fail on demand, docs/performance.md).

``STAD_THREAD_STRESS=<rounds>`` repeats the hammering for a longer stress run.
"""

from __future__ import annotations

import ast
import gc
import os
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stad.data.base import AnomalyDataset, Sample
from stad.data.images import DecodeCache

ROUNDS = int(os.environ.get("STAD_THREAD_STRESS", "1"))


class _Finaliser:
    """Cyclic garbage with a Python finaliser: the collector runs Python code wherever an
    allocation triggers it, a point where the interpreter may switch threads."""

    def __init__(self) -> None:
        self.me = self

    def __del__(self) -> None:
        sum(range(20))


@contextmanager
def interpreter_pressure(parser: bool = True) -> Iterator[list[BaseException]]:
    """Run a garbage thread (and a parser thread) around the block; yields the parser's errors."""
    errors: list[BaseException] = []
    stop = threading.Event()

    def parse() -> None:
        source = "[" + ",".join(["(1, {'a': [2, 3.5]})"] * 50) + "]"
        while not stop.is_set():
            try:
                ast.parse(source)
            except SystemError as err:
                errors.append(err)

    def litter() -> None:
        while not stop.is_set():
            [_Finaliser() for _ in range(10)]

    threshold, interval = gc.get_threshold(), sys.getswitchinterval()
    gc.set_threshold(50, 5, 5)
    sys.setswitchinterval(1e-6)
    helpers = [threading.Thread(target=litter)] + (
        [threading.Thread(target=parse)] if parser else []
    )
    for helper in helpers:
        helper.start()
    try:
        yield errors
    finally:
        stop.set()
        for helper in helpers:
            helper.join()
        sys.setswitchinterval(interval)
        gc.set_threshold(*threshold)
        gc.collect()


@pytest.mark.parametrize(
    ("threads", "parser"),
    [(8, True), (16, False)],
    ids=["8_threads_and_a_parser", "16_threads"],
)
@pytest.mark.slow
def test_one_entry_from_many_threads(tmp_path: Path, threads: int, parser: bool) -> None:
    """8 x 200 reads beside an ``ast.parse`` loop; 16 x 100 reads racing only each other (the
    way the old format failed in the preload: 61 of 32 000 reads raised SystemError)."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (3, 32, 32), dtype=np.uint8)
    mask = (rng.random((32, 32)) > 0.5).astype(np.uint8)
    cache = DecodeCache(tmp_path / "cache")
    key = "cd" + "1" * 62
    cache.store(key, image, mask, 5)

    def read(_: int) -> bool:
        [_Finaliser() for _ in range(3)]
        entry = cache.load(key, (32, 32))
        return entry is not None and entry[2] == 5 and np.array_equal(entry[0], image)

    for _ in range(ROUNDS):
        with interpreter_pressure(parser) as errors, ThreadPoolExecutor(threads) as pool:
            results = list(pool.map(read, range(1600)))
        assert errors == [] and all(results)
    assert cache.misses == 0 and cache.hits == ROUNDS * 1600


def test_full_warm_preload_twice_under_pressure(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    samples = []
    for i in range(24):
        path = tmp_path / f"{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        samples.append(Sample(path, None, 0, "good"))
    reference = AnomalyDataset(samples, 32, cache=tmp_path / "cache")  # cold: fills the cache
    for _ in range(2 * ROUNDS):
        cache = DecodeCache(tmp_path / "cache")
        with interpreter_pressure() as errors:
            warm = AnomalyDataset(samples, 32, cache=cache)
        assert errors == [] and (cache.hits, cache.misses) == (24, 0)
        assert warm._images is not None and reference._images is not None
        np.testing.assert_array_equal(warm._images, reference._images)
