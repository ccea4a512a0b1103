"""bridge's benchmarks, each a module run as ``python -m bench.<name>`` from the repository root.

Helpers every benchmark needs (ports, starting and stopping servers, RSS, CPU facts,
percentiles) live once in :mod:`bench.common`; dated results go to ``bench/results/`` next to
the command that made them.
"""
