"""The layers of src/stad, read from its import statements: no import cycle, and no import
against the direction entry points → runner → methods, data, metrics → contract and building
blocks (docs/architecture.md). Imports under ``if TYPE_CHECKING:`` and in a module's
``if __name__ == "__main__":`` block are not dependencies of the module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(SRC).with_suffix("").parts)
    return name.removesuffix(".__init__")


MODULES = {_module_name(f): f for f in sorted((SRC / "stad").rglob("*.py"))}


def _is_guard(node: ast.If) -> bool:
    text = ast.unparse(node.test)
    return text in ("TYPE_CHECKING", "typing.TYPE_CHECKING") or "__name__" in text


def _imports(tree: ast.AST) -> set[str]:
    found: set[str] = set()
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_guard(node):
            found |= _imports(ast.Module(body=node.orelse, type_ignores=[]))
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        found |= _imports(node)
    return found


GRAPH = {
    name: {d for d in _imports(ast.parse(path.read_text())) if d in MODULES and d != name}
    for name, path in MODULES.items()
}


def _reaches(start: str, target: str) -> bool:
    seen, todo = set(), [start]
    while todo:
        for dep in GRAPH[todo.pop()]:
            if dep == target:
                return True
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return False


def test_there_is_no_import_cycle():
    cycles = sorted(m for m in GRAPH if _reaches(m, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        # The runner and the exporter do not import a command.
        ("stad.run", "stad.predict"),
        ("stad.export", "stad.predict"),
        # The contract imports no runner piece.
        ("stad.core", "stad.run"),
        ("stad.core", "stad.resume"),
        ("stad.core", "stad.results"),
        ("stad.core", "stad.distributed"),
        # Records and the resume state do not import each other both ways (results → resume only).
        ("stad.resume", "stad.results"),
    ],
)
def test_no_import_against_the_layers(module, forbidden):
    assert forbidden not in GRAPH[module], f"{module} imports {forbidden}"


def test_every_command_takes_key_value_options_never_argparse():
    # One CLI style: Hydra's overrides, or stad.cli's parser in the same key=value form.
    argparse_users = [
        m for m, f in MODULES.items() if "argparse" in _imports(ast.parse(f.read_text()))
    ]
    assert not argparse_users, f"parsing with argparse: {argparse_users}"
    for command in ("stad.predict", "stad.export", "stad.leaderboard"):
        assert "stad.cli" in GRAPH[command], command


def test_thresholds_live_in_one_module():
    # run and predict both take their threshold policies from stad.thresholds.
    assert "stad.thresholds" in GRAPH["stad.run"] and "stad.thresholds" in GRAPH["stad.predict"]
    text = (SRC / "stad" / "predict.py").read_text()
    assert "def labelled_thresholds" not in text and "def normal_thresholds" not in text


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("stad.methods")))
def test_methods_import_neither_data_nor_metrics(module):
    # A method's data needs (training files for pretraining, auxiliary streams) come through
    # the contract (core.PretrainData, core.Stream), provided by the runner.
    below = {d for d in GRAPH[module] if d.startswith(("stad.data", "stad.metrics"))}
    assert not below, f"{module} imports {sorted(below)}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("stad.data")))
def test_readers_import_no_metric(module):
    # LOCO's defect configuration is data (stad.defects) that the sPRO metric receives.
    assert not {d for d in GRAPH[module] if d.startswith("stad.metrics")}, module


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("stad.metrics")))
def test_metrics_import_no_reader(module):
    assert not {d for d in GRAPH[module] if d.startswith("stad.data")}, module


def test_help_and_cfg_import_neither_torch_nor_lightning_nor_timm(tmp_path):
    # Hydra imports every hydra_plugins module (stad's sweeper) before it prints the help; what
    # they import must stay light (benchmarks/startup.py measures the time).
    import subprocess
    import sys

    code = """
import runpy, sys
for args in (["--help"], ["--cfg", "job"]):
    sys.argv = ["stad", *args]
    try:
        runpy.run_module("stad", run_name="__main__")
    except SystemExit:
        pass
print("HEAVY", sorted(m for m in ("torch", "lightning", "timm") if m in sys.modules))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "HEAVY []", out.stdout[-2000:]
