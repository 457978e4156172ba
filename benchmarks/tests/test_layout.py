"""The benchmarks are a lab, not a chain of scripts: every script under benchmarks/ imports from benchmarks.lab (and
the library), never from another script, and the lab imports no script."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "__init__.py")
LAB = sorted((BENCHMARKS / "lab").glob("*.py"))


def benchmark_imports(path: Path) -> set[str]:
    """The ``benchmarks.*`` modules a file imports (``from benchmarks import x`` counts as ``benchmarks.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "benchmarks"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "benchmarks":
            found |= {f"benchmarks.{a.name}" for a in node.names} if node.module == "benchmarks" else {node.module}
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_a_script_imports_only_the_lab(script: Path) -> None:
    outside = {m for m in benchmark_imports(script) if m != "benchmarks.lab" and not m.startswith("benchmarks.lab.")}
    assert not outside, f"{script.name} imports {sorted(outside)}: move what it shares into benchmarks/lab/"


@pytest.mark.parametrize("module", LAB, ids=lambda p: p.name)
def test_the_lab_imports_no_script(module: Path) -> None:
    scripts = {f"benchmarks.{p.stem}" for p in SCRIPTS}
    assert not benchmark_imports(module) & scripts


def test_a_benchmark_run_drops_the_bitsandbytes_notice_before_peft_is_imported() -> None:
    """A fresh interpreter that imports a benchmark has the CLI's narrow bitsandbytes filter on the logger that
    prints the notice, installed before peft's import could emit it (`hmt_adapter_cli.quiet`)."""
    code = ("import logging; import benchmarks.long_context; "
            "from hmt_adapter_cli.quiet import BNB_LOGGER, _DropNotice; "
            "print(sum(isinstance(f, _DropNotice) for f in logging.getLogger(BNB_LOGGER).filters))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=BENCHMARKS.parent, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "1"
    assert "gemm_4bit_forward" not in proc.stderr
