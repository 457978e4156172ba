"""An HMT adapter loads wherever a PEFT adapter loads: no `import hmt_adapter` needed (docs/design.md, "Loading
without `import hmt_adapter`"). The lm-eval side (`python -m lm_eval --model hmt`) is in test_lm_eval.py."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import _hmt_adapter_autoload as autoload
from hmt_adapter import HMTConfig
from hmt_adapter import testing as T

HEAVY = ("torch", "transformers", "peft", "hmt_adapter", "lm_eval")


def fresh_python(code: str, cwd, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter of this environment (site-packages' .pth files run, nothing imported)."""
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", autoload.ENV_VAR)}
    environment.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=300)


def test_the_hook_is_installed_imports_nothing_heavy_and_turns_off(tmp_path) -> None:
    probe = f"import sys; print(type(sys.meta_path[0]).__name__, [m for m in {HEAVY!r} if m in sys.modules])"
    on = fresh_python(probe, tmp_path)
    assert on.stdout.split()[:1] == ["HookFinder"], (
        f"no hook in a fresh interpreter: is hmt-adapter installed with its hmt_adapter_autoload.pth (pip install -e "
        f". again)? {on.stdout} {on.stderr}")
    assert on.stdout.split()[1:] == ["[]"]  # cheap: nothing heavy imported at start-up
    for value in ("0", "off", "False"):
        off = fresh_python(probe, tmp_path, HMT_ADAPTER_AUTOLOAD=value)
        assert off.returncode == 0 and not off.stdout.startswith("HookFinder"), (value, off.stdout, off.stderr)


def test_a_failing_registration_warns_and_leaves_the_import_alone(monkeypatch) -> None:
    def broken(module):
        raise AttributeError("PeftType has no _member_map_")

    monkeypatch.setitem(autoload.HOOKS, "peft", broken)
    with pytest.warns(RuntimeWarning, match="could not register the HMT adapter type with PEFT.*AttributeError.*"
                                            "HMT_ADAPTER_AUTOLOAD=0"):
        autoload._run("peft", peft)


def test_a_fresh_interpreter_loads_an_adapter_without_importing_hmt_adapter(tmp_path) -> None:
    """PeftModel.from_pretrained and AutoPeftModelForCausalLM in a new process give the saved model's logits."""
    T.tiny_causal_lm("llama").save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # the adapter records this base path
    model = peft.get_peft_model(base, HMTConfig(segment_length=8, num_sensory=3, recall_dim=16)).eval()
    with torch.no_grad():  # memory that visibly changes the logits
        for name, p in model.named_parameters():
            if "hmt_" in name:
                p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(4, T.TINY_VOCAB_SIZE, (2, 30), generator=torch.Generator().manual_seed(3))
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        with model.disable_adapter():
            assert not torch.allclose(model(input_ids=ids).logits, expected)  # HMT does change them
    proc = fresh_python("""
        import sys
        assert "hmt_adapter" not in sys.modules and "peft" not in sys.modules
        import torch
        from peft import AutoPeftModelForCausalLM, PeftModel
        from transformers import AutoModelForCausalLM
        ids = torch.load("ids.pt")
        auto = AutoPeftModelForCausalLM.from_pretrained("adapter").eval()
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("base"), "adapter").eval()
        with torch.no_grad():
            torch.save({"auto": auto(input_ids=ids).logits, "plain": plain(input_ids=ids).logits}, "logits.pt")
        print(type(auto.base_model).__module__)
    """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split()[-1] == "hmt_adapter.tuner.model"
    logits = torch.load(tmp_path / "logits.pt")
    assert torch.equal(logits["auto"], expected) and torch.equal(logits["plain"], expected)
