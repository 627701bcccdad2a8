"""How long `python -m stad --help` and `python -m stad --cfg job` take (wall and CPU seconds),
the best of a few runs; they import no torch, Lightning or timm (tests/test_architecture.py).

    python benchmarks/startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time


def measure(args: list[str], repeat: int) -> tuple[float, float]:
    """Best wall and CPU seconds of ``python -m stad <args>`` over ``repeat`` runs."""
    walls, cpus = [], []
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(repeat):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "stad", *args],
                cwd=folder,
                check=True,
                stdout=subprocess.DEVNULL,
            )
            walls.append(time.perf_counter() - start)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return min(walls), min(cpus)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    repeat = parser.parse_args().repeat
    for args in (["--help"], ["--cfg", "job"]):
        wall, cpu = measure(args, repeat)
        command = "python -m stad " + " ".join(args)
        print(f"{command}: {wall:.2f} s wall, {cpu:.2f} s CPU (best of {repeat})")


if __name__ == "__main__":
    main()
