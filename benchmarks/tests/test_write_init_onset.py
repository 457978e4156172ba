"""benchmarks/write_init_onset.py: the long-context recipe's settings, refusals before any work, its figure."""

from __future__ import annotations

from benchmarks import write_init_onset as W


def test_settings_are_the_long_context_quick_recipe_at_this_corpus_seed_and_length():
    args = W.make_parser().parse_args(["--corpus", "python-docs", "--seed", "2", "--steps", "40", "--log-every", "5"])
    s = W.settings(args)
    assert (s.corpus, s.seed, s.hmt_steps, s.hmt_logging_steps, s.threads) == ("python-docs", 2, 40, 5, 1)
    assert s.methods == (W.METHOD,) and s.max_train_segments == 8 and s.segment_length == 64
    assert args.init_texts == ["default", " The secret word is", "."]


def test_bad_arguments_and_a_missing_corpus_are_one_line_refusals(tmp_path, capsys):
    assert W.main(["--steps", "0", "--output-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    assert W.main(["--corpus", "no-such-corpus", "--output-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written


def test_plot_draws_one_curve_per_start(tmp_path):
    payload = {"settings": {"corpus": "austen", "seed": 1},
               "curves": {"default": {"steps": [50, 100], "loss": [2.9, 2.8]},
                          " The secret word is": {"steps": [50, 100], "loss": [0.9, 0.3]}}}
    W.plot(payload, tmp_path / "onset.png")
    assert (tmp_path / "onset.png").stat().st_size > 1000
