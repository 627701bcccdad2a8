"""Nothing stad reads from disk is run as code: no eval/exec, no pickle, YAML only through
OmegaConf, every torch.load weights-only (checked on the source itself)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src"
FILES = sorted(SOURCE.rglob("*.py"))

FORBIDDEN_CALLS = {
    "eval",
    "exec",
    "compile",
    "__import__",
    "pickle.load",
    "pickle.loads",
    "yaml.load",
    "yaml.unsafe_load",
    "marshal.loads",
    "os.system",
}


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_name(node.value)}.{node.attr}"
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    given = [k.value for k in call.keywords if k.arg == name]
    return bool(given) and isinstance(given[0], ast.Constant) and given[0].value is value


def _calls(path: Path) -> list[ast.Call]:
    return [n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)]


def test_the_source_tree_is_found():
    assert any(p.name == "checkpoint.py" for p in FILES)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(SOURCE)))
def test_no_code_is_run_from_data(path):
    for call in _calls(path):
        name = _name(call.func)
        assert name not in FORBIDDEN_CALLS, f"{path}:{call.lineno} calls {name}"
        if name.endswith("torch.load"):
            assert _keyword_is(call, "weights_only", True), (
                f"{path}:{call.lineno}: torch.load must pass weights_only=True"
            )
        if name in ("np.load", "numpy.load"):
            assert _keyword_is(call, "allow_pickle", False), (
                f"{path}:{call.lineno}: np.load must pass allow_pickle=False"
            )
