"""Tests of the benchmark scripts and their lab, beside them (collected by ``python -m pytest``: see pyproject.toml's
``testpaths``). A package, so that pytest imports them as ``benchmarks.tests.*`` with the repository root on the path."""
