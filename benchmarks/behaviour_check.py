"""Behaviour unchanged? Run the same short trainings at two git revisions and compare metrics.

    python benchmarks/behaviour_check.py OLD_REV NEW_REV [--methods stfpm rd ...] \\
        [--set method.x=y ...] [--out /tmp/behaviour]

Each revision's ``src`` and ``conf`` are exported with ``git archive`` into a scratch folder and
run with this environment's Python (``PYTHONPATH`` first), one thread, seed 0, on the generated
dataset (both categories, 64 px, 16 training images, 12 optimiser steps per stage and 12
pretraining steps). ``--set [METHOD:]KEY=VALUE`` adds an override to both sides, for every
method or for METHOD only (e.g. a default that changed on purpose between the revisions, pinned
to its old value). Exits non-zero unless image AUROC,
pixel AUROC and PRO are bit-equal for every run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KEYS = ("image_auroc", "pixel_auroc", "pro")
RUN = [
    "dataset=synthetic",
    "trainer=smoke",
    "trainer.max_steps=12",
    "trainer.pretrain_steps=12",
    "trainer.num_threads=1",
    "image_size=64",
    "dataset.generator.image_size=64",
    "dataset.generator.n_train=16",
    "dataset.generator.n_test_good=6",
    "dataset.generator.n_test_per_defect=3",
    "seed=0",
]


def export(revision: str, into: Path) -> Path:
    """``src`` and ``conf`` of ``revision``, with conf where the package finds it."""
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", revision, "src", "conf"],
        capture_output=True,
        check=True,
    ).stdout
    into.mkdir(parents=True)
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into, filter="data")
    (into / "src" / "stad" / "conf").symlink_to(into / "conf", target_is_directory=True)
    return into / "src"


def run(src: Path, method: str, category: str, out: Path, extra: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1"}
    run_dir = out / f"{method}-{category}"
    command = [sys.executable, "-m", "stad", f"method={method}", f"dataset.category={category}",
               *RUN, f"hydra.run.dir={run_dir}", f"output_root={out}", *extra]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{method}/{category} failed at {src}:\n{done.stderr[-2000:]}")
    metrics = json.loads((run_dir / "record.json").read_text())["metrics"]
    return {k: metrics[k] for k in KEYS}


def _applies(option: str, method: str) -> bool:
    head = option.split("=", 1)[0]
    return ":" not in head or head.split(":", 1)[0] == method


def _override(option: str) -> str:
    head, value = option.split("=", 1)
    return f"{head.split(':', 1)[-1]}={value}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument(
        "--methods", nargs="+", default=["stfpm", "rd", "dskd", "ast", "aand", "us"]
    )
    parser.add_argument("--set", action="append", default=[], metavar="[METHOD:]KEY=VALUE")
    parser.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="behaviour-")))
    args = parser.parse_args()
    sources = {
        rev: export(rev, args.out / f"src-{i}") for i, rev in enumerate((args.old, args.new))
    }
    same = True
    print(f"{'run':18s} {'metric':12s} {args.old:>20s} {args.new:>20s}")
    for method in args.methods:
        extra = [_override(o) for o in args.set if _applies(o, method)]
        for category in ("object", "texture"):
            values = [
                run(src, method, category, args.out / f"runs-{i}", extra)
                for i, src in enumerate(sources.values())
            ]
            for key in KEYS:
                a, b = values[0][key], values[1][key]
                same &= a == b
                flag = "" if a == b else "  DIFFERENT"
                print(f"{method + '/' + category:18s} {key:12s} {a!s:>20s} {b!s:>20s}{flag}")
    print("behaviour unchanged" if same else "behaviour CHANGED")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
