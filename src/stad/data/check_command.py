"""``python -m stad.data.check``: a dataset's layout report without training (every category of
a config, a header pass over every file); exit code 0 when usable, 2 otherwise."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stad.data import LAYOUTS
from stad.data.check import LayoutReport, check_sizes
from stad.errors import DatasetError, StadError, lookup

USAGE = """\
usage: python -m stad.data.check dataset=<name> [dataset.root=PATH] [dataset.category=NAME|all]

Checks a dataset's folder layout as stad reads it and prints what it found (images per split and
defect type, masks) and every problem, without training. Any override of `python -m stad` is
accepted; only the dataset group matters. Exit code 0: usable; 2: not usable (message on stderr).
"""


def _compose(overrides: Sequence[str]) -> DictConfig:
    """The config ``python -m stad <overrides>`` would run, composed from the package conf."""
    from hydra import compose, initialize_config_module

    with initialize_config_module("stad.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _categories(dataset: DictConfig) -> list[str]:
    if str(dataset.category) != "all":
        return [str(dataset.category)]
    categories = dataset.get("categories")
    if not categories:
        raise StadError(
            f"dataset.category=all needs a `categories` list in conf/dataset/{dataset.name}.yaml; "
            "name one category instead."
        )
    return [str(c) for c in categories]


def check_dataset(cfg: DictConfig, headers: bool = True) -> list[LayoutReport]:
    """Reports of every category a config names (``dataset.category=all`` checks them all).

    Args:
        cfg: A composed run config (its ``dataset`` group is checked).
        headers: Also read every file header (unreadable files, mask sizes).

    Raises:
        StadError: The dataset name is unknown, or its root or category cannot be resolved.
    """
    scan = lookup(LAYOUTS, "dataset", str(cfg.dataset.name))
    reports = []
    for category in _categories(cfg.dataset):
        dataset = OmegaConf.to_container(cfg, resolve=False)
        one = OmegaConf.create(dataset)
        one.dataset.category = category
        try:
            report = scan(one.dataset)
        except DatasetError as err:
            # A fatal layout error (no root, no category folder) is that category's report.
            report = LayoutReport(str(cfg.dataset.name), Path(str(one.dataset.root)), "")
            report.problems.append(str(err))
        if headers and report.splits:
            check_sizes(report)
        reports.append(report)
    return reports


def main(argv: Sequence[str] | None = None) -> int:
    """Check a dataset's layout and print the report.

    Args:
        argv: Hydra overrides (default: ``sys.argv[1:]``).

    Returns:
        0 when every checked category is usable, 2 otherwise.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE, end="")
        return 0
    try:
        reports = check_dataset(_compose(args))
    except (StadError, HydraException, OmegaConfBaseException) as err:
        # Bad overrides, unknown datasets and unresolvable roots end the command alike.
        print(f"stad.data.check: error: {err}", file=sys.stderr, flush=True)
        return 2
    for report in reports:
        print(report.format(), flush=True)
    bad = [r for r in reports if not r.usable]
    for report in bad:
        try:
            report.raise_if_unusable()
        except DatasetError as err:
            print(f"stad.data.check: error: {err}", file=sys.stderr, flush=True)
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
