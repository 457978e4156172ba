"""What README.md shows a user must be true: its API block runs as written, its figures are computed here, and
a long prompt does not make the tokenizer log a length warning."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import re
from pathlib import Path

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM, pipeline

import fixtures
from hmt_adapter import HMTConfig
from hmt_adapter.testing import tiny_causal_lm, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
HUB_ID = "HuggingFaceTB/SmolLM-135M"


def readme_api_block() -> str:
    """The Python block under the README's "The API in ..." heading."""
    start = README.index("## The API in")
    match = re.compile(r"```python\n(.*?)```", re.S).search(README, start)
    assert match is not None and match.start() < README.index("\n## ", start + 1), "no python block in the API section"
    return match.group(1)


LENGTH_WARNING = "Token indices sequence length is longer than the specified maximum sequence length"


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def length_warnings(self) -> list[str]:
        return [m for m in self.messages if LENGTH_WARNING in m]


@contextlib.contextmanager
def transformers_log():
    """Collect what transformers logs at WARNING and above (its default verbosity, whatever the environment set)."""
    handler, logger = Records(), logging.getLogger("transformers")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_readme_api_block_runs_as_written_on_a_tiny_local_backbone(tmp_path, monkeypatch) -> None:
    code = readme_api_block()
    assert HUB_ID in code
    # A stand-in for SmolLM-135M: a tiny Llama with SmolLM's 2048 positions (so the README's segment_length=1024 fits)
    # and a tokenizer whose saved limit is that window, as a real backbone's tokenizer carries.
    local = tmp_path / "backbone"
    tiny_causal_lm("llama", max_position_embeddings=2048).save_pretrained(local)
    tiny_tokenizer(model_max_length=2048).save_pretrained(local)
    monkeypatch.chdir(tmp_path)  # the block saves "smollm-hmt" in the working directory
    namespace: dict = {}
    with transformers_log() as log:
        exec(compile(code.replace(HUB_ID, str(local)), "README.md", "exec"), namespace)
    batch, new_ids = namespace["batch"], namespace["new_ids"]
    assert batch.input_ids.shape[1] > 2 * 1024  # a text longer than the backbone's window, read in segments
    assert torch.isfinite(namespace["out"].loss)
    assert isinstance(namespace["model"], peft.PeftModel) and (tmp_path / "smollm-hmt" / "adapter_model.safetensors").is_file()
    assert new_ids.shape[0] == 1 and new_ids.shape[1] > batch.input_ids.shape[1]
    assert not log.length_warnings()


# ---- a long prompt and the tokenizer's length limit -------------------------------------------------------------
LONG_PROMPT = " ".join(["the cat sees the dog ."] * 100) + " what does the cat see ?"  # 605 tokens


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # the examples run their work under `if __name__ == "__main__"` only
    return module


def test_long_prompt_through_the_generation_example_and_the_pipeline_logs_no_length_warning() -> None:
    example = load_example("generate_long")
    tokenizer, model = example.load_tokenizer(), example.load_model()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    with transformers_log() as log:  # transformers logs the warning once per tokenizer: nothing may tokenize before
        out = generator(LONG_PROMPT, max_new_tokens=2, do_sample=False, return_full_text=False)
        assert len(tokenizer(LONG_PROMPT).input_ids) > model.get_base_model().config.max_position_embeddings
    assert isinstance(out[0]["generated_text"], str)
    assert not log.length_warnings()
    assert "model_max_length=int(1e30)" in README and "model_max_length=int(1e30)" in Path(example.__file__).read_text()


def test_the_package_tiny_tokenizer_has_no_length_limit() -> None:
    with transformers_log() as log:
        tiny_tokenizer()(LONG_PROMPT)
    assert not log.length_warnings()
    with transformers_log() as log:  # the limit a caller asks for is kept (and the check above can fail)
        tiny_tokenizer(model_max_length=512)(LONG_PROMPT)
    assert log.length_warnings()


def test_lm_eval_hmt_model_lifts_the_tokenizer_limit() -> None:
    pytest.importorskip("lm_eval")
    from hmt_adapter.integrations.lm_eval import HMTLM

    model = peft.get_peft_model(tiny_causal_lm("llama"), HMTConfig(segment_length=8, num_sensory=2, recall_dim=8))
    lm = HMTLM(pretrained=model.eval(), tokenizer=tiny_tokenizer(model_max_length=64), batch_size=1)
    with transformers_log() as log:
        ids = lm.tok_encode(LONG_PROMPT)
    assert len(ids) > 64 and not log.length_warnings()


# ---- the adapter's size, as README.md states it -------------------------------------------------------------------
def readme_api_config() -> HMTConfig:
    """The HMTConfig the README's API block builds."""
    match = re.search(r"hmt_adapter\.HMTConfig\((.*)\)", readme_api_block())
    assert match is not None
    return eval(f"dict({match.group(1)})", {}, {})  # noqa: S307 - the README's own literal keyword arguments


def adapter_and_backbone_size(name: str, kwargs: dict) -> tuple[int, int]:
    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(fixtures.real_config(name))
    backbone = sum(p.numel() for p in base.parameters())
    model = peft.get_peft_model(base, HMTConfig(**kwargs))
    return sum(p.numel() for p in model.parameters() if p.requires_grad), backbone


def test_readme_adapter_size_figures_are_the_api_configs_real_counts() -> None:
    kwargs = readme_api_config()
    text = " ".join(README.split())  # the paragraph's line breaks do not matter
    small, smollm = adapter_and_backbone_size(HUB_ID, kwargs)
    assert f"gives {small:,} on SmolLM-135M (d = 576): {100 * small / smollm:.2f}% of its {smollm:,} parameters" in text
    assert f"`print_trainable_parameters()` shows {100 * small / (smollm + small):.2f}%" in text
    large, llama = adapter_and_backbone_size("meta-llama/Llama-2-7b-hf", kwargs)
    assert f"on Llama-2-7B (d = 4096): {large:,}, {100 * large / llama:.2f}%" in text
    assert "0.5-2%" not in text  # the old claim, which the README's own configuration did not meet on SmolLM


# ---- benchmark commands a reader can type --------------------------------------------------------------------------
def test_benchmark_commands_name_no_absolute_output_folder() -> None:
    docs = [REPO / "BENCHMARKS.md", *sorted((REPO / "benchmarks" / "results").glob("*.md"))]
    absolute = re.compile(r"--output[-_]dir[\s=]+/[^\s`]*")
    found = [f"{doc.name}: {m.group(0)!r}" for doc in docs for m in absolute.finditer(doc.read_text(encoding="utf-8"))]
    assert not found, found
    assert "--output-dir benchmarks/output/" in (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")


# ---- speed and memory figures: measured on the current engine, against something a reader knows ----------------
def section(text: str, start: str, end: str) -> str:
    return text[text.index(start):text.index(end)]


def test_speed_memory_and_streaming_figures_are_current_and_measured_against_named_baselines() -> None:
    benchmarks = (REPO / "BENCHMARKS.md").read_text(encoding="utf-8")
    texts = {
        "README.md": README,
        "BENCHMARKS.md inference": section(benchmarks, "## Inference", "## Demo"),
        "BENCHMARKS.md performance": section(benchmarks, "## Performance", "## Quality"),
        **{f.name: f.read_text(encoding="utf-8") for f in (REPO / "benchmarks" / "results").glob("*.md")},
    }
    for name, text in texts.items():
        flat = " ".join(text.split())
        assert "not re-run since" not in flat and "not re-run." not in flat, name  # quoted figures are current ones
        # a figure is stated against the limit of the method, the backbone alone or full attention, never against an
        # internal target a reader does not know ("targets scored" and LoRA's target_modules are other words)
        assert not re.search(r"\btargets?\b(?! scored)", flat), (name, re.search(r".{60}\btargets?\b.{60}", flat))
    # figures of the pre-engine runs (ingestion.json, throughput*.json, memory*.json) are no longer quoted
    for stale in ("1573 tok/s", "1.009", "25.4 MiB", "1.19-1.64", "1.11x the bare backbone", "43 MiB"):
        assert stale not in README and stale not in benchmarks, stale
