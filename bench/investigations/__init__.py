"""One-off investigations: each was run for one results file or one paragraph of the docs
(which name it) and is kept runnable as ``python -m bench.investigations.<name>``, so the
figures can be checked again, but it is not a benchmark to rerun as the code changes."""
