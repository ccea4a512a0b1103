"""bridge's benchmarks, each a module run as ``python -m bench.<name>`` from the repository root
(``--help`` says what it measures and how).

- serving: ``serve`` (HTTP's cost, the session workload and the drafting memory),
  ``concurrency`` (many clients), ``attack`` (hardening on loopback), ``agent`` and
  ``tool_validity`` (tool calls), ``structured`` and ``endings`` (JSON schemas),
  ``llamacpp`` (against llama-server's own speculation), ``rpc`` (over llama.cpp's RPC
  workers, through the ``rpc_proxy`` relay);
- the decode loop: ``exact`` (``--exact``), ``numerics`` (which settings make a batch's
  logits equal a step's), ``overhead`` (bridge's own time per step) and
  ``predict_overhead`` (the same on a device not measured), ``oneshot``, ``lookup``,
  ``penalties``;
- exporting: ``export`` and ``streamed`` (time and memory; ``synth_gguf`` writes a
  random-weight model of any shape), ``scoring``, ``layers``, ``chain`` (export, then
  ``bridge bench``, on the bundled models).

Helpers every benchmark needs (ports, starting and stopping servers, RSS, CPU facts,
percentiles) live once in :mod:`bench.common`; the load generator in :mod:`bench.loadgen`,
its table in :mod:`bench.report`, the request workloads in :mod:`bench.workloads`. One-off
investigations are under ``bench/investigations/``. Dated results go to ``bench/results/``,
each naming the command that made it.
"""
