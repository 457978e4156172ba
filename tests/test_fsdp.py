"""FSDP2 with two CPU processes over gloo trains HMT like one process on the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize(("checkpointing", "lora"), [(False, False), (True, True)])
def test_two_process_fsdp_matches_one_process(tmp_path, checkpointing, lora) -> None:
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "--master_port", str(29600 + 2 * checkpointing + lora),
         os.path.join(HERE, "fsdp_worker.py"), str(tmp_path / "adapter"), str(int(checkpointing)), str(int(lora))],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert result["grad_names"] == result["fsdp_grad_names"] and all(".hmt_" in n for n in result["grad_names"])
    assert any(".hmt_lora_" in n for n in result["grad_names"]) == lora
    assert result["fsdp_loss"] == pytest.approx(result["ref_loss"], rel=1e-5)
    assert result["max_grad_diff"] <= 1e-5 * max(1.0, result["max_grad"])
    assert result["saved_vs_reference_after_step"] < 1e-5  # the adapter gathered on rank 0 is the trained one
    files = sorted(os.listdir(tmp_path / "adapter"))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
