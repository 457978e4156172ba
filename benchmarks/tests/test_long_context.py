"""The long-context benchmark (benchmarks/long_context.py) trains its adapters with the product's own training code
(`hmt_adapter_cli.prompt_completion.train_prompt_completion`, which `hmt-adapter train` runs on prompt/completion
data), with the same losses and weights as the benchmark's own trainer had before."""

from __future__ import annotations

import random
from dataclasses import asdict, replace

import peft
import pytest
import torch
from trl import SFTConfig, SFTTrainer

from benchmarks import long_context as L
from benchmarks import question_border as Q
from benchmarks.lab import retrieval as R
from benchmarks.lab import tasks as T
from benchmarks.lab.backbone import llama
from benchmarks.lab.corpus import TINY_TEXT
from benchmarks.lab.tokenizer import train_tokenizer
from hmt_adapter_cli import prompt_completion as P


def reference_train_hmt(backbone, tokenizer, dataset, method, s, work):
    """`benchmarks.long_context.train_hmt` before it went through `train_prompt_completion` (copied verbatim)."""
    model = peft.get_peft_model(backbone, R.hmt_config(method, s))
    args = SFTConfig(
        output_dir=work, max_steps=s.hmt_steps, per_device_train_batch_size=s.hmt_batch, learning_rate=s.hmt_lr,
        lr_scheduler_type=s.hmt_schedule, warmup_steps=max(1, s.hmt_steps // 30), max_length=None,
        max_grad_norm=s.hmt_max_grad_norm, weight_decay=0.0,
        train_sampling_strategy="sequential" if s.curriculum else "random",
        completion_only_loss=True, gradient_checkpointing=False, logging_steps=max(1, s.hmt_steps // 10),
        save_strategy="no", report_to="none", use_cpu=True, bf16=False, seed=s.seed, disable_tqdm=True,
    )
    optimizers = (None, None)
    if s.lora_lr > 0:  # two parameter groups: LoRA (hmt_lora_*) at lora_lr, the memory parameters at hmt_lr
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in trainable if "hmt_lora_" in n], "lr": s.lora_lr},
                  {"params": [p for n, p in trainable if "hmt_lora_" not in n], "lr": s.hmt_lr}]
        optimizers = (torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=0.0), None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         optimizers=optimizers)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return model.eval(), losses


@pytest.fixture(scope="module")
def corpus():
    tok = train_tokenizer([TINY_TEXT, T.task_sentences(repeats=5)], vocab_size=600)
    return tok, tok(TINY_TEXT, add_special_tokens=False).input_ids, T.Vocab.of(tok)


@pytest.mark.parametrize("method, curriculum", [("hmt_write_gate_spread_stable", True), ("hmt_write_lora_slow", False)])
def test_benchmark_training_runs_the_recipe_code_with_the_same_losses(tmp_path, monkeypatch, corpus, method,
                                                                      curriculum):
    tok, stream, vocab = corpus
    s = R.quick(segment_length=32, num_sensory=2, recall_dim=8, hmt_steps=4, hmt_batch=2, max_train_segments=3,
                curriculum=curriculum, seed=0)
    ms = R.method_settings(method, s)
    dataset = R.train_dataset(tok, stream, vocab, ms, R.hmt_config(method, s).num_sensory)

    def train(fn, work):
        backbone = llama(len(tok), 32, 2, 4, 64, 128, True, seed=0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
        backbone.eval().requires_grad_(False)
        torch.manual_seed(s.seed + 31)  # as the benchmark's run does before train_hmt
        model, losses = fn(backbone, tok, dataset, method, ms, str(tmp_path / work))
        return losses, {n: p.detach().clone() for n, p in model.named_parameters() if "hmt_" in n}

    calls = []
    shared = P.train_prompt_completion
    monkeypatch.setattr(P, "train_prompt_completion", lambda *a, **k: calls.append(k) or shared(*a, **k))
    new_losses, new_params = train(R.train_hmt, "new")
    assert len(calls) == 1  # the benchmark trained through the recipe's function
    assert (calls[0]["lora_learning_rate"] is not None) == (ms.lora_lr > 0)
    old_losses, old_params = train(reference_train_hmt, "old")
    assert len(new_losses) == 4 and new_losses == old_losses
    assert new_params.keys() == old_params.keys()
    assert all(torch.equal(new_params[n], old_params[n]) for n in new_params)


def test_a_method_whose_write_token_starts_from_text_trains_through_the_run(tmp_path, corpus):
    """`train_method` hands the run's tokenizer to the method's `HMTConfig`: with a zero learning rate the trained
    write token is exactly the input embedding of the question's last token (' is')."""
    from types import SimpleNamespace

    tok, stream, vocab = corpus
    s = R.quick(segment_length=32, num_sensory=2, recall_dim=8, hmt_steps=2, hmt_batch=2, max_train_segments=3,
                hmt_lr=0.0, seed=0)
    backbone = llama(len(tok), 32, 2, 4, 64, 128, True, seed=0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    backbone.eval().requires_grad_(False)
    prep = SimpleNamespace(tokenizer=tok, vocab=vocab)
    model, losses, gate = R.train_method("hmt_write_init_spread_stable", backbone, prep, stream, s, tmp_path)
    assert len(losses) == 2 and gate is None
    config = model.peft_config["default"]
    assert config.write_token_init_text == " The secret word is"
    assert config.tokenizer_name_or_path == str(tmp_path / "tokenizer")
    (w,) = [p for n, p in model.named_parameters() if "hmt_write_token" in n]
    is_id = tok(" The secret word is", add_special_tokens=False).input_ids[-1]
    assert torch.equal(w.detach(), backbone.get_input_embeddings().weight[is_id])
    saved = tmp_path / "adapters" / "hmt_write_init_spread_stable"
    assert (saved / "adapter_config.json").is_file()
    # the recall diagnostics' --at-init rebuilds it as training started it: with lr 0, the trained weights exactly
    from benchmarks.recall_diagnostics import fresh_adapter

    trained = {n: p.detach().clone() for n, p in model.named_parameters() if "hmt_" in n}
    ids = torch.tensor([stream[:100]])
    logits = model(input_ids=ids).logits
    backbone = model.unload()
    # --adapters-from scores exactly what was trained
    loaded = L.saved_adapter(backbone, tmp_path, "hmt_write_init_spread_stable")
    assert torch.allclose(loaded(input_ids=ids).logits, logits, atol=1e-6)
    loaded.peft_config[loaded.active_adapter].recall_window = 1  # what --eval-recall-window sets: read at forward
    assert not torch.allclose(loaded(input_ids=ids).logits, logits, atol=1e-4)
    backbone = loaded.unload()
    with pytest.raises(ValueError, match="no adapter for 'hmt'"):
        L.saved_adapter(backbone, tmp_path, "hmt")
    fresh = fresh_adapter(backbone, saved, s.seed)
    assert {n: p.detach() for n, p in fresh.named_parameters() if "hmt_" in n}.keys() == trained.keys()
    assert all(torch.equal(p, trained[n]) for n, p in fresh.named_parameters() if "hmt_" in n)


def test_adapters_from_rescores_a_finished_run_with_its_settings_and_only_evaluation_options(tmp_path, capsys):
    import json

    run_dir = tmp_path / "run"
    assert L.main(["--adapters-from", str(run_dir)]) == 2
    assert "no long_context.json there" in capsys.readouterr().err
    stored = replace(R.quick(corpus="austen", seed=2, hmt_seed=1, backbone_cache="/old/cache"),
                     methods=("sliding_window", "hmt_write_init_spread_stable"))
    (run_dir / "adapters" / "hmt_write_init_spread_stable").mkdir(parents=True)
    (run_dir / "adapters" / "hmt_write_init_spread_stable" / "adapter_config.json").write_text("{}")
    (run_dir / "long_context.json").write_text(json.dumps({"settings": L.asdict(stored)}))
    args = ["--adapters-from", str(run_dir), "--needle-offsets", "spread", "--backbone-cache", "/new/cache"]
    parser = L.make_parser()
    s = L.settings_of_run(parser.parse_args(args), parser)
    assert s == replace(stored, needle_offsets="spread", backbone_cache="/new/cache")
    s = L.settings_of_run(parser.parse_args([*args, "--needle-depths", "1", "--needle-lengths", "16384", "65536",
                                             "--examples-longest", "20", "--facts-tasks"]), parser)
    assert (s.needle_depths, s.needle_lengths, s.examples_longest, s.facts_tasks) == ((1.0,), (16384, 65536), 20, ())
    assert s.hmt_steps == stored.hmt_steps and s.corpus == "austen"
    assert L.main([*args, "--hmt-steps", "5", "--seed", "0"]) == 2  # would not be the run that was trained
    assert "drop --hmt-steps, --seed" in capsys.readouterr().err
    assert L.main([*args, "--methods", "hmt"]) == 2
    assert "no adapter for 'hmt'" in capsys.readouterr().err
    assert L.main([*args, "--needle-depths", "50"]) == 2  # a percentage where a fraction is meant: before any loading
    assert "depths must be relative depths in [0, 1], got [50.0]" in capsys.readouterr().err
    assert L.main([*args, "--eval-recall-window", "0"]) == 2
    assert "--eval-recall-window must be >= 1" in capsys.readouterr().err


def test_combine_refuses_runs_scored_on_different_needle_grids(tmp_path, capsys):
    import json

    paths = []
    for seed, offsets in ((0, "depth"), (1, "spread")):
        run = _run("austen", seed, {1024: 1.0}, 1.0)
        run["settings"]["needle_offsets"] = offsets
        paths.append(tmp_path / f"s{seed}.json")
        paths[-1].write_text(json.dumps(run))
    assert L.main(["--combine", *map(str, paths), "--output-dir", str(tmp_path / "out")]) == 2
    assert "different needle grids" in capsys.readouterr().err


def test_train_method_overrides_start_the_write_token_elsewhere_and_nothing_else(tmp_path, corpus):
    """The onset benchmark's starts (`benchmarks.write_init_onset`): ``overrides`` replace the method's write-token
    text ('.', or None for the random start) while every other initial weight stays the same draw, and ``name``
    picks the adapter's folder."""
    from types import SimpleNamespace

    tok, stream, vocab = corpus
    s = R.quick(segment_length=32, num_sensory=2, recall_dim=8, hmt_steps=2, hmt_batch=2, max_train_segments=3,
                hmt_lr=0.0, seed=0, hmt_logging_steps=1)
    backbone = llama(len(tok), 32, 2, 4, 64, 128, True, seed=0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    backbone.eval().requires_grad_(False)
    prep = SimpleNamespace(tokenizer=tok, vocab=vocab)
    weights = {}
    for name, text in (("dot", "."), ("random", None), ("is", " The secret word is")):
        model, losses, _ = R.train_method("hmt_write_init_spread_stable", backbone, prep, stream, s, tmp_path,
                                          overrides={"write_token_init_text": text}, name=name)
        assert len(losses) == 2  # logged every step
        assert model.peft_config["default"].write_token_init_text == text
        assert (tmp_path / "adapters" / name / "adapter_config.json").is_file()
        weights[name] = {n: p.detach().clone() for n, p in model.named_parameters() if "hmt_" in n}
        backbone = model.unload()
    embedding = backbone.get_input_embeddings().weight
    (key,) = [n for n in weights["dot"] if "hmt_write_token" in n]
    assert torch.equal(weights["dot"][key], embedding[tok(".", add_special_tokens=False).input_ids[-1]])
    assert not any(torch.equal(weights["random"][key], row) for row in embedding)
    for name in ("dot", "random"):
        assert all(torch.equal(p, weights["is"][n]) for n, p in weights[name].items() if n != key)


def test_every_method_is_a_valid_hmt_config_with_its_own_knobs(tmp_path):
    """Each HMT method of the benchmark builds its `HMTConfig` (validated) and carries its spec's fields."""
    s = R.quick()
    for method, (config_overrides, _) in R.METHOD_SPECS.items():
        config = R.hmt_config(method, s, str(tmp_path))
        for field, value in config_overrides.items():
            assert getattr(config, field) == value, (method, field)
        assert (config.tokenizer_name_or_path is not None) == bool(config.write_token_init_text), method
    assert R.hmt_config("hmt_write_init_logn_spread_stable", s, str(tmp_path)).recall_scale == "log_n"


def _run(corpus: str, seed: int, hmt: dict[int, float], depth100: float) -> dict:
    """A minimal long_context.json payload: needle rows of the window (always 20%) and of HMT at two depths."""
    rows = []
    for n, acc in hmt.items():
        rows += [dict(task="needle", method="sliding_window", context_tokens=n, depth=d, accuracy=0.2, n=10,
                      corpus=corpus, seed=seed) for d in (0.0, 1.0)]
        rows += [dict(task="needle", method="hmt", context_tokens=n, depth=0.0, accuracy=acc, n=10, corpus=corpus,
                      seed=seed),
                 dict(task="needle", method="hmt", context_tokens=n, depth=1.0, accuracy=depth100, n=10,
                      corpus=corpus, seed=seed)]
    return {"command": "cmd", "settings": {"corpus": corpus, "seed": seed}, "seconds": 1.0, "chance": {"needle": 1 / 30},
            "hmt_train_loss": {"hmt": [2.5, 0.1]}, "backbone_in_window": [], "results": rows}


def test_combine_reports_the_worst_run_beside_the_mean_and_every_run(tmp_path):
    import json

    paths = []
    for seed, hmt, d100 in ((0, {1024: 1.0, 65536: 0.8}, 1.0), (1, {1024: 0.6, 65536: 0.2}, 0.4)):
        path = tmp_path / f"s{seed}.json"
        path.write_text(json.dumps(_run("austen", seed, hmt, d100)))
        paths.append(str(path))
    payload = L.combine(paths, tmp_path / "out")
    entry = payload["summary"]["austen"]["hmt"]
    assert entry["worst_seed"] == 1
    # per length: the two depths averaged per run, then mean and worst over runs
    assert entry["needle"][1024]["runs"] == [1.0, 0.5] and entry["needle"][1024]["worst"] == 0.5
    assert entry["needle"][65536]["mean"] == pytest.approx((0.9 + 0.3) / 2)
    assert entry["worst_depth100"] == {1024: 0.4, 65536: 0.4}
    text = (tmp_path / "out" / "long_context_summary.md").read_text()
    # the lengths these runs did not score (4k, 16k) stay empty cells, so every column keeps its length
    assert "| austen | hmt | 2 (0, 1) | 75 (worst 50) |  |  | 60 (worst 30) | 40 / - / - / 40 |" in text
    # every run, the worst included, each cell with its 95% Wilson interval over the run's 20 questions per length
    assert "| austen | 1 | hmt | 50 (30-70) |  |  | 30 (15-52) | 40 / - / - / 40 |  | 2.50 -> 0.10 |" in text
    assert "| austen | 0 | sliding_window | 20 (8-42) |  |  | 20 (8-42) | 20 / - / - / 20 |  |  |" in text
    assert all(line.count("|") == text.splitlines()[2].count("|") for line in text.splitlines()
               if line.startswith("| austen"))  # every row as wide as the headers (both tables have ten columns)
    assert (tmp_path / "out" / "long_context_austen_worst_needle.png").is_file()


def test_heatmap_titles_break_long_method_names_at_underscores():
    title = L.panel_title("hmt_write_init_null_decoy_border_spread_stable (worst: seed 0)")
    lines = title.split("\n")
    assert "".join(lines[:-1]) == "hmt_write_init_null_decoy_border_spread_stable" and lines[-1] == "(worst: seed 0)"
    assert len(lines) == 3 and all(len(line) <= 35 for line in lines)
    assert L.panel_title("sliding_window") == "sliding_window"


def test_quick_trains_the_border_recipe_on_rows_of_up_to_32_segments():
    """The recipe the six-run screen chose (BENCHMARKS.md): what ``--quick`` trains, unless told otherwise."""
    s = L.settings_from_args(L.make_parser().parse_args(["--quick"]))
    hmt = [m for m in s.methods if m != "sliding_window"]
    assert hmt == ["hmt_write_init_null_decoy_border_spread_stable"] and "sliding_window" in s.methods
    trained = R.method_settings(hmt[0], s)
    assert (trained.max_train_segments, trained.question_border_fraction, trained.decoy_fraction) == (32, 0.5, 0.5)
    s = L.settings_from_args(L.make_parser().parse_args(["--quick", "--max-train-segments", "16"]))
    assert s.max_train_segments == 16


def test_facts_examples_from_the_command_line_and_checked():
    import pytest

    assert L.settings_from_args(L.make_parser().parse_args(["--quick"])).facts_examples == 20
    s = L.settings_from_args(L.make_parser().parse_args(["--quick", "--facts-examples", "50"]))
    assert s.facts_examples == 50
    with pytest.raises(ValueError, match="facts_examples must be >= 1"):
        L.check_evaluation(replace(s, facts_examples=0))
    L.check_evaluation(replace(s, facts_examples=0, facts_tasks=()))  # no facts task: nothing to count


def test_train_tasks_from_the_command_line_set_what_hmt_trains_on(corpus):
    tok, stream, vocab = corpus
    s = L.settings_from_args(L.make_parser().parse_args(["--quick", "--train-tasks", "facts_qa1"]))
    assert s.train_tasks == ("facts_qa1",)
    assert L.settings_from_args(L.make_parser().parse_args(["--quick"])).train_tasks == ("needle",)
    s = replace(s, hmt_steps=2, hmt_batch=3, max_train_segments=3, segment_length=32)
    rows = R.train_dataset(tok, stream, vocab, s, num_sensory=4)
    places = {tok(" " + p, add_special_tokens=False).input_ids[0] for p in vocab.places}
    for ids, mask in zip(rows["input_ids"], rows["completion_mask"]):
        answer = ids[mask.index(1)]
        assert answer in places  # a qa1 episode: the answer is where the person went


def test_boundary_facts_open_a_segment_with_their_answer_beyond_the_window(corpus):
    tok, stream, vocab = corpus
    s = replace(R.quick(), placement="segment", boundary_fraction=1.0, segment_length=32)
    rng = random.Random(0)
    for _ in range(40):
        segments = rng.randint(3, 8)
        depth, in_window = R.fact_depth(s, segments, 4, rng)
        ids, answer_at = T.episode_ids(tok, T.needle_example(tok, stream, vocab, segments * 32 - 1, depth, rng))
        key = ids[answer_at]
        first = ids.index(key)  # the planted key (the filler has no answer words at this size)
        assert not in_window and first // 32 in range(1, segments - 1) and first % 32 <= 3
    plain = replace(s, boundary_fraction=0.0)
    offsets = []
    for _ in range(200):
        depth, _ = R.fact_depth(plain, 8, 4, rng)
        ids, answer_at = T.episode_ids(tok, T.needle_example(tok, stream, vocab, 8 * 32 - 1, depth, rng))
        offsets.append(ids.index(ids[answer_at]) % 32)
    assert sum(o <= 3 for o in offsets) < 60  # without the lever, the answer opens a segment far less often
    with pytest.raises(ValueError, match="placement='segment'"):
        R.fact_depth(replace(s, placement="depth"), 8, 4, rng)  # not silently ignored


def test_question_border_rows_end_the_question_just_past_a_segment_border(corpus):
    tok, stream, vocab = corpus
    s = replace(R.quick(), placement="segment", in_window_fraction=0.5, question_border_fraction=1.0,
                segment_length=32, hmt_steps=10, hmt_batch=4, min_train_segments=3, max_train_segments=6,
                curriculum=False)
    keys = {tok(" " + k, add_special_tokens=False).input_ids[0] for k in vocab.keys}
    rows = R.train_dataset(tok, stream, vocab, s, num_sensory=4)
    spilled = 0
    for ids, mask in zip(rows["input_ids"], rows["completion_mask"]):
        answer_at = mask.index(1)
        last = answer_at - 1  # the position that predicts the answer
        assert (answer_at + 1) // 32 <= 6  # still at most max_train_segments segments
        spilled += last % 32 <= 9  # among the first 8 tokens of its segment, give or take the re-tokenization
        key = next(i for i in range(answer_at) if ids[i] in keys)
        assert ids[key] == ids[answer_at]
    assert spilled >= 36  # of 40 rows (re-tokenizing the decoded text moves a few by a token or two)
    plain = R.train_dataset(tok, stream, vocab, replace(s, question_border_fraction=0.0), num_sensory=4)
    ends = [(mask.index(1) - 1) % 32 for mask in plain["completion_mask"]]
    assert sum(e <= 9 for e in ends) <= 8  # whole segments: the question ends at the end of one


def test_question_border_counts_the_training_rows_that_end_past_a_border(corpus, tmp_path):
    tok, stream, vocab = corpus
    tok.save_pretrained(tmp_path / "tokenizer")
    s = asdict(replace(R.quick(), segment_length=32, hmt_batch=4, max_train_segments=6))
    streams = {s["corpus"]: stream}  # the training stream, as the script would tokenize it from the corpus

    def count(method: str) -> dict[str, int]:
        return Q.training_row_ends(tok, str(tmp_path / "tokenizer"), s, method, 60, 8, 32, streams)

    border = count("hmt_write_init_null_decoy_border_spread_stable")
    plain = count("hmt_write_init_null_decoy_spread_stable")
    assert border["rows"] == plain["rows"] == 60
    assert plain["past"] <= 6 < 18 <= border["past"]  # whole segments vs half the rows (3 segments or more) past one


def test_decoy_episodes_answer_the_key_in_the_window_with_another_key_beyond_it(corpus):
    tok, stream, vocab = corpus
    s = replace(R.quick(), placement="segment", in_window_fraction=1.0, decoy_fraction=1.0, segment_length=32,
                hmt_steps=10, hmt_batch=4, max_train_segments=6)
    keys = {tok(" " + k, add_special_tokens=False).input_ids[0] for k in vocab.keys}
    rows = R.train_dataset(tok, stream, vocab, s, num_sensory=4)
    for ids, mask in zip(rows["input_ids"], rows["completion_mask"]):
        answer_at = mask.index(1)
        planted = [i for i in range(answer_at) if ids[i] in keys]  # the filler has no answer words at this size
        assert len(planted) == 2  # the decoy, then the key (the question names no key)
        decoy, key = planted
        assert ids[decoy] != ids[answer_at] == ids[key]
        last = (len(ids) - 1) // 32
        assert key // 32 == last and decoy // 32 < last  # the key in the window, the decoy beyond it
    plain = R.train_dataset(tok, stream, vocab, replace(s, decoy_fraction=0.0), num_sensory=4)
    for ids, mask in zip(plain["input_ids"], plain["completion_mask"]):
        assert sum(i in keys for i in ids[: mask.index(1)]) == 1  # no decoy without the lever
    with pytest.raises(ValueError, match="training episodes"):
        T.needle_example(tok, stream, vocab, 200, 0.5, random.Random(0), segment_length=32, decoy_depth=0.1)


def test_wilson_interval_is_the_score_interval_and_refuses_impossible_counts():
    low, high = L.wilson_interval(16, 20)  # 80%: the textbook values 0.584 and 0.919
    assert (round(low, 3), round(high, 3)) == (0.584, 0.919)
    assert L.wilson_interval(20, 20)[1] == 1.0 and 0.83 < L.wilson_interval(20, 20)[0] < 0.84  # not empty at 100%
    assert L.wilson_interval(0, 5)[0] == 0.0 and L.wilson_interval(0, 5)[1] > 0.4
    narrow, wide = L.wilson_interval(90, 100), L.wilson_interval(18, 20)
    assert wide[0] < narrow[0] < 0.9 < narrow[1] < wide[1]  # more questions, a narrower interval around the rate
    for right, asked in ((3, 2), (-1, 5), (0, 0)):
        with pytest.raises(ValueError, match="wilson_interval"):
            L.wilson_interval(right, asked)


def test_a_run_log_line_gives_counts_and_intervals():
    rows = [dict(task="needle", method="hmt", context_tokens=65536, depth=d, accuracy=a, n=10)
            for d, a in ((0.0, 0.7), (1.0, 0.9))]
    assert L._summary(rows) == "needle@65536: 80% (16/20, 58-92)"


def _answers(task: str, length: int, depth: float, outcomes: str, texts: str = "abcdefghij") -> list[dict]:
    """What `evaluate` returns for one cell: one row per question, here given in reverse doc order."""
    return [{"task_name": f"lc_{task}_{length}", "depth": depth, "length": length, "acc": float(o == "1"),
             "doc_id": i, "question": T.question_digest({"context": texts[i], "choices": ["x", "y"], "answer": 0})}
            for i, o in reversed(list(enumerate(outcomes)))]


def test_aggregate_keeps_every_questions_outcome_in_doc_order_and_a_digest_of_the_questions():
    rows = L.aggregate("hmt", _answers("needle", 1024, 0.5, "1101") + _answers("needle", 1024, 1.0, "0011"))
    assert [(r["depth"], r["outcomes"], r["accuracy"], r["n"]) for r in rows] == [(0.5, "1101", 0.75, 4),
                                                                                 (1.0, "0011", 0.5, 4)]
    assert rows[0]["questions"] == rows[1]["questions"]  # the same four questions at both depths of this fake
    again = L.aggregate("window", _answers("needle", 1024, 0.5, "0000"))[0]
    other = L.aggregate("hmt", _answers("needle", 1024, 0.5, "1101", texts="abcz"))[0]
    assert again["questions"] == rows[0]["questions"] != other["questions"]  # digests the questions, not the answers
    assert T.question_digest({"context": "a", "choices": ["x"], "answer": 0}) != T.question_digest(
        {"context": "a", "choices": ["x"], "answer": 1})


def test_evaluate_records_each_samples_doc_id_and_question(monkeypatch, tmp_path):
    lm_eval = pytest.importorskip("lm_eval")
    doc = {"context": "The secret word is apple.", "choices": [" apple", " river"], "answer": 0, "depth": 0.0,
           "length": 64}
    samples = {"lc_needle_64": [{"doc_id": 1, "doc": doc, "acc": 0.0}, {"doc_id": 0, "doc": doc, "acc": 1.0}]}
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kwargs: {"samples": samples})
    rows = L.evaluate(object(), ["lc_needle_64"], tmp_path)
    assert [(r["doc_id"], r["acc"], r["question"]) for r in rows] == [(1, 0.0, T.question_digest(doc)),
                                                                      (0, 1.0, T.question_digest(doc))]
    assert L.aggregate("hmt", rows)[0]["outcomes"] == "10"


def test_mcnemar_p_is_the_exact_two_sided_binomial_test_on_the_discordant_questions():
    assert L.mcnemar_p(0, 0) == 1.0 and L.mcnemar_p(3, 3) == 1.0
    assert L.mcnemar_p(5, 0) == pytest.approx(2 / 32) == L.mcnemar_p(0, 5)
    assert L.mcnemar_p(9, 1) == pytest.approx(2 * 11 / 1024)  # P(X <= 1) for X ~ Binomial(10, 1/2), twice
    assert L.mcnemar_p(12, 2) < 0.05 < L.mcnemar_p(9, 3)
    with pytest.raises(ValueError, match="counts >= 0"):
        L.mcnemar_p(-1, 2)


def _scored(method: str, cells: dict[float, str], texts: str = "abcdefghij") -> dict:
    rows = []
    for depth, outcomes in cells.items():
        rows += L.aggregate(method, _answers("needle", 65536, depth, outcomes, texts))
    return {"results": rows}


def test_compare_pairs_two_runs_question_by_question(tmp_path, capsys):
    import json

    a = _scored("hmt", {0.0: "1111111111", 1.0: "1111100000"})
    b = _scored("hmt_other", {0.0: "1111111110", 1.0: "0000011111"})
    b["results"] += L.aggregate("sliding_window", _answers("needle", 65536, 0.0, "0000000000"))
    rows = L.compare_runs(a["results"], [r for r in b["results"] if r["method"] == "hmt_other"])
    # 15 and 14 right of 20; 6 questions right in A only, 5 in B only: the same accuracy within sampling
    assert rows == [{"task": "needle", "context_tokens": 65536, "asked": 20, "right_a": 15, "right_b": 14,
                     "only_a": 6, "only_b": 5, "p": pytest.approx(L.mcnemar_p(6, 5))}]
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, payload in zip(paths, (a, b)):
        path.write_text(json.dumps(payload))
    out = tmp_path / "out"
    assert L.main(["--compare", *map(str, paths), "--output-dir", str(out)]) == 0  # B's only HMT method
    assert "| needle | 65536 | 20 | 15 | 14 | 6 | 5 | 1 |" in capsys.readouterr().out
    written = json.loads((out / "long_context_compare.json").read_text())
    assert written["b"]["method"] == "hmt_other" and written["results"][0]["only_a"] == 6
    assert L.main(["--compare", *map(str, paths), "--methods", "hmt", "sliding_window", "--output-dir", str(out)]) == 0
    assert "| needle | 65536 | 10 | 10 | 0 | 10 | 0 | 0.00195 |" in capsys.readouterr().out  # depth 0 only


def test_compare_refuses_other_questions_old_rows_and_unclear_methods(tmp_path, capsys):
    import json

    a = _scored("hmt", {0.0: "1111"})
    with pytest.raises(ValueError, match="asked different questions"):
        L.compare_runs(a["results"], _scored("hmt", {0.0: "1111"}, texts="abcz")["results"])
    old = [{k: v for k, v in r.items() if k not in ("outcomes", "questions")} for r in a["results"]]
    with pytest.raises(ValueError, match="score its adapters again with --adapters-from"):
        L.compare_runs(a["results"], old)
    with pytest.raises(ValueError, match="share no task, length and depth"):
        L.compare_runs(a["results"], _scored("hmt", {0.5: "1111"})["results"])
    both = {"results": a["results"] + _scored("hmt_other", {0.0: "0000"})["results"]}
    paths = [tmp_path / "a.json", tmp_path / "both.json"]
    paths[0].write_text(json.dumps(a))
    paths[1].write_text(json.dumps(both))
    assert L.main(["--compare", *map(str, paths)]) == 2
    assert "both.json holds 2 methods (hmt, hmt_other); name the one with --methods" in capsys.readouterr().err
    assert L.main(["--compare", str(paths[0]), str(tmp_path / "missing.json")]) == 2
    assert "missing.json: no such file" in capsys.readouterr().err
    assert L.main(["--compare", *map(str, paths), "--methods", "hmt", "hmt", "hmt"]) == 2
    assert "one method for both runs or one per run" in capsys.readouterr().err
    combined = {"results": [dict(r, seed=s) for s in (0, 1) for r in a["results"]]}  # two seeds, the same cells
    paths[1].write_text(json.dumps(combined))
    assert L.main(["--compare", *map(str, paths)]) == 2
    assert "holds several runs of 'hmt' (a --combine result?)" in capsys.readouterr().err
    paths[1].write_text("{not json")
    assert L.main(["--compare", *map(str, paths)]) == 2
    assert "both.json: not a long_context.json" in capsys.readouterr().err


def test_compare_pairs_two_backbones_on_their_in_window_questions_and_only_with_compare(tmp_path, capsys):
    import json

    a = {"results": [], "backbone_in_window": _scored("backbone_in_window", {1.0: "1000000000"})["results"]}
    b = {"results": [], "backbone_in_window": _scored("backbone_in_window", {1.0: "1111111000"})["results"]}
    paths = [tmp_path / "a.json", tmp_path / "b.json"]
    for path, payload in zip(paths, (a, b)):
        path.write_text(json.dumps(payload))
    out = tmp_path / "out"
    assert L.main(["--compare", *map(str, paths), "--methods", "backbone_in_window", "--output-dir", str(out)]) == 0
    assert "| needle | 65536 | 10 | 1 | 7 | 0 | 6 | 0.0312 |" in capsys.readouterr().out
    paths[1].write_text(json.dumps({"results": []}))
    assert L.main(["--compare", *map(str, paths), "--methods", "backbone_in_window"]) == 2
    assert "has no backbone_in_window rows" in capsys.readouterr().err
    assert L.main(["--quick", "--methods", "backbone_in_window"]) == 2
    assert "use it with --compare" in capsys.readouterr().err


def test_drill_options_out_of_range_are_one_line_before_any_loading(capsys):
    import pytest

    base = ["--quick", "--corpus", "no-such-corpus", "--pretrain-tasks", "facts_qa1_dense", "needle"]
    for option, value, message in (("--drill-people", "1", "drill_people must be in 2..8"),
                                   ("--drill-question-share", "1.0", "drill_question_share must be in (0, 1)"),
                                   ("--drill-stale-share", "-0.1", "drill_stale_share must be in [0, 1]"),
                                   ("--drill-filler-share", "1.0", "drill_filler_share must be in [0, 1)"),
                                   ("--drill-hard-after", "2", "drill_hard_after must be in [0, 1]"),
                                   ("--drill-spread", "1", "drill_spread must be 0 (off) or in 2..12")):
        assert L.main([*base, option, value]) == 2  # before the corpus (which does not exist) is looked for
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        L.main([*base, "--pretrain-schedule", "linear"])
