"""The recipe runner with two CPU processes (DDP over gloo), launched by torchrun."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
from safetensors.torch import load_file

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), os.pardir))


@pytest.mark.slow
def test_tiny_recipe_under_two_cpu_processes(tmp_path):
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    cmd = [
        torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "hmt_adapter_cli.cli", "train",
        os.path.join(ROOT, "recipes", "tiny-offline.yaml"), "--output_dir", str(tmp_path),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "training processes: 2" in proc.stdout
    assert proc.stdout.count("stage2:") == 1  # only rank 0 reports
    final = load_file(str(tmp_path / "adapter_model.safetensors"))
    stage1 = load_file(str(tmp_path / "stage1" / "adapter_model.safetensors"))
    assert any("hmt_recall_q" in k for k in final) and not any("hmt_recall_q" in k for k in stage1)
