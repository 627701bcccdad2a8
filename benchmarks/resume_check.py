"""Kill a training at a random step, resume it, and compare its final metrics with those of an
uninterrupted run of the same config and seed (issue: resumable, reproducible runs).

    python benchmarks/resume_check.py --method aand --seed 3
    python benchmarks/resume_check.py --method stfpm -- trainer.max_epochs=4

Each run is ``python -m stad`` in a subprocess on the generated dataset; the kill is a SIGKILL
(nothing is flushed or cleaned up), sent at a random moment after the first epoch checkpoint of
a random stage appeared. Exit status 0 when the resumed run's metrics equal the uninterrupted
run's exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHECKPOINTS = "checkpoints"
BASE = [
    "trainer=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.max_epochs=4",
    "trainer.inference_timing.enabled=false",
    "dataset.generator.image_size=128",
    "dataset.generator.n_train=48",
    "examples=0",
]


def _command(method: str, seed: int, run_dir: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "stad",
        f"method={method}",
        f"seed={seed}",
        f"hydra.run.dir={run_dir}",
        *BASE,
        *extra,
    ]


def _metrics(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "record.json").read_text())["metrics"]


def _kill_during_training(
    cmd: list[str], run_dir: Path, rng: random.Random, wanted: int | None = None
) -> str:
    """Start ``cmd``; SIGKILL it a random moment after its ``wanted``-th epoch checkpoint (over
    all stages; random in 1..3 when None) appeared."""
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wanted = wanted or rng.randint(1, 3)
    seen: set[tuple[str, float]] = set()
    while process.poll() is None:
        for ckpt in (run_dir / CHECKPOINTS).glob("*/last.ckpt"):
            try:
                seen.add((ckpt.parent.name, ckpt.stat().st_mtime))
            except FileNotFoundError:
                continue
        if len(seen) >= wanted:
            time.sleep(rng.uniform(0.0, 2.0))
            process.send_signal(signal.SIGKILL)
            process.wait()
            return f"killed after {len(seen)} epoch checkpoint(s) ({sorted(s for s, _ in seen)})"
        time.sleep(0.05)
    return f"finished before the kill (exit {process.returncode}); use more epochs"


def main(argv: list[str] | None = None) -> int:
    """Run the check; prints the metrics of both runs and whether they are equal."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="stfpm")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moment")
    parser.add_argument(
        "--after", type=int, default=None, help="kill after this many epoch checkpoints"
    )
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both runs")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    os.environ.update(env)
    with tempfile.TemporaryDirectory(prefix="stad-resume-") as tmp:
        whole, killed = Path(tmp) / "whole", Path(tmp) / "killed"
        start = time.perf_counter()
        subprocess.run(_command(args.method, 0, whole, args.overrides), check=True)
        seconds = time.perf_counter() - start
        cmd = _command(args.method, 0, killed, args.overrides)
        what = _kill_during_training(cmd, killed, rng, args.after)
        print(f"{args.method}: {what}")
        resumed_cmd = _command(args.method, 0, killed, [*args.overrides, "resume=true"])
        subprocess.run(resumed_cmd, check=True, stdout=subprocess.DEVNULL)
        a, b = _metrics(whole), _metrics(killed)
    keys = ("image_auroc", "pixel_auroc", "pro")
    print(f"uninterrupted ({seconds:.0f} s): " + ", ".join(f"{k} {a[k]:.6f}" for k in keys))
    print("killed+resumed:       " + ", ".join(f"{k} {b[k]:.6f}" for k in keys))
    equal = a == b
    print("identical metrics" if equal else "METRICS DIFFER")
    return 0 if equal else 1


if __name__ == "__main__":
    sys.exit(main())
