"""The offline examples a user copies must keep running (each in a fresh interpreter, as a user runs it)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script", ["quickstart.py"])  # the long-document examples take minutes; their APIs have their own tests
def test_example_runs_offline(script: str, tmp_path: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    if script == "quickstart.py":
        assert "identical logits: True" in proc.stdout


def _run_example(script: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(REPO / "examples" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def test_push_to_hub_without_an_adapter_folder_is_one_line(tmp_path: Path) -> None:
    proc = _run_example("push_to_hub.py", "--adapter", "outputs/tiny-offline", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "--adapter 'outputs/tiny-offline' does not exist" in lines[0], proc.stderr
    assert "hmt-adapter train recipes/tiny-offline.yaml --output_dir" in lines[0]
    assert not (tmp_path / "outputs").exists()


def test_push_to_hub_dry_run_follows_the_readme(tmp_path: Path) -> None:
    """The docstring's dry run is run on the folder the README's tiny-recipe command writes."""
    import re

    from hmt_adapter_cli.recipes import parse_recipe, run_recipe

    doc = (REPO / "examples" / "push_to_hub.py").read_text()
    readme = (REPO / "README.md").read_text()
    train = re.search(r"hmt-adapter train recipes/tiny-offline\.yaml --output_dir (\S+)", readme)
    assert train, "the README no longer shows the tiny recipe's command"
    assert f"python examples/push_to_hub.py --adapter {train.group(1)} " in doc  # the same folder
    adapter = tmp_path / "hmt-tiny"  # stands for the README's folder
    run_recipe(*parse_recipe(str(REPO / "recipes" / "tiny-offline.yaml"), ["--output_dir", str(adapter)]))
    proc = _run_example("push_to_hub.py", "--adapter", str(adapter), "--staging-dir", str(tmp_path / "staging"),
                        cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run: pass --push to upload" in proc.stdout and str(tmp_path / "staging") in proc.stdout
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path / "staging"))
