"""The modules that run or rebuild runs never import the CLI (lorabench.cli is argument parsing and
command functions only; what they share lives in lorabench.launch and lorabench.validate)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

USERS_OF_THE_LAUNCHER = (
    "lorabench.train",
    "lorabench.reproduce",
    "lorabench.tuning",
    "lorabench.tuning.runs",
    "lorabench.tuning.search",
    "lorabench.export",
    "lorabench.worker",
    "lorabench.launch",
    "lorabench.validate",
    "lorabench.config_store",
)


@pytest.mark.parametrize("module", USERS_OF_THE_LAUNCHER)
def test_module_does_not_import_the_cli(module):
    code = f"import sys, {module}; print('lorabench.cli' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False", f"importing {module} imports lorabench.cli"


def test_the_check_sees_the_cli_when_imported():
    """The probe itself can fail: a module that does import the CLI is reported."""
    code = "import sys, lorabench.cli; print('lorabench.cli' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "True", result.stderr


def _imports_cli(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name == "lorabench.cli" for a in node.names):
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and (
            node.module == "lorabench.cli" or (node.module == "lorabench" and any(a.name == "cli" for a in node.names))
        ):
            lines.append(node.lineno)
    return lines


def test_no_package_module_imports_the_cli_even_lazily():
    """Also imports inside functions (run only when called): none outside lorabench/cli.py."""
    root = Path(__file__).resolve().parent.parent / "lorabench"
    found = {
        str(path.relative_to(root.parent)): lines
        for path in sorted(root.rglob("*.py"))
        if path.name != "cli.py" or path.parent != root
        if (lines := _imports_cli(ast.parse(path.read_text(), str(path))))
    }
    assert not found, f"modules importing lorabench.cli (file: lines): {found}"
    assert _imports_cli(ast.parse("def f():\n    from lorabench import cli\n")) == [2]  # the check can fail
