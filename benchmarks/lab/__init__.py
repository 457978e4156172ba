"""The benchmarks' lab: what more than one benchmark script needs, in one place.

Every script under ``benchmarks/`` imports from here (and from the library), never from another script.

| module | what |
|---|---|
| `output` | where results go (``--output-dir`` / ``--update-results``), JSON + PNG, the command line, machine info, logging |
| `measure` | timing (interleaved rounds), peak RSS, fresh worker processes, machine load |
| `backbone` | random tiny Llamas (the speed and memory benchmarks), HMT on them, the tiny backbone a benchmark pretrains |
| `corpus` | the real-prose corpora (Debian packages, read offline), their deterministic splits, a tiny local text |
| `tokenizer` | a byte-level BPE tokenizer trained on a corpus |
| `tasks` | the retrieval tasks (needle, facts) as lm-eval tasks, and their episodes for training |
| `settings` | one `Settings` base (tiny backbone + HMT knobs) and `RetrievalSettings` (the retrieval backbone's) |
| `pretrain` | pretraining the tiny backbone (plain LM with a plateau rule; or with in-window task episodes) and its cache |
"""
