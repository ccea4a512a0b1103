"""``GET /metrics``: the server's counters in Prometheus's text format (version 0.0.4).

Names follow llama-server's where one exists (``llamacpp:prompt_tokens_total``,
``llamacpp:tokens_predicted_total``, ``llamacpp:requests_processing``,
``llamacpp:requests_deferred``, ...), so dashboards made for it read bridge too; bridge's
own figures are ``bridge_*``: drafted and accepted tokens per source, target steps, and the
shared batch's rounds and rows (rows per round is how full the batch runs).
"""

from __future__ import annotations

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _family(out: list[str], name: str, kind: str, help_: str,
            samples: list[tuple[dict[str, str], float]]) -> None:
    out.append(f"# HELP {name} {help_}")
    out.append(f"# TYPE {name} {kind}")
    for labels, value in samples:
        lab = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        out.append(f"{name}{{{lab}}} {_number(value)}" if lab else f"{name} {_number(value)}")


def _escape(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


def render_metrics(engine, worker) -> str:
    """The exposition text for ``engine`` served by ``worker``."""
    t = worker.totals
    out: list[str] = []

    def counter(name: str, help_: str, value: float) -> None:
        _family(out, name, "counter", help_, [({}, value)])

    def gauge(name: str, help_: str, value: float) -> None:
        _family(out, name, "gauge", help_, [({}, value)])

    counter("llamacpp:prompt_tokens_total", "Number of prompt tokens processed.",
            t.prompt_tokens)
    counter("llamacpp:prompt_seconds_total", "Prompt process time", t.prompt_seconds)
    counter("llamacpp:tokens_predicted_total", "Number of generation tokens processed.",
            t.predicted_tokens)
    counter("llamacpp:tokens_predicted_seconds_total", "Predict process time",
            t.predicted_seconds)
    shared = engine.shared
    rounds = shared.stats.rounds if shared is not None else t.target_steps
    counter("llamacpp:n_decode_total", "Total number of llama_decode() calls", rounds)
    gauge("llamacpp:prompt_tokens_seconds", "Average prompt throughput in tokens/s.",
          t.prompt_tokens / t.prompt_seconds if t.prompt_seconds else 0.0)
    gauge("llamacpp:predicted_tokens_seconds", "Average generation throughput in tokens/s.",
          t.predicted_tokens / t.predicted_seconds if t.predicted_seconds else 0.0)
    gauge("llamacpp:requests_processing", "Number of requests processing.", worker.n_running)
    gauge("llamacpp:requests_deferred", "Number of requests deferred.", worker.n_queued)
    counter("bridge_requests_total", "Generations that ended (any reason).", t.requests)
    counter("bridge_target_steps_total", "Target evaluations after each answer's first "
            "token, all sequences.", t.target_steps)
    gauge("bridge_tokens_per_target_step", "Generated tokens per target step after each "
          "answer's first token (1.0 for plain decoding).",
          (t.predicted_tokens - t.requests) / t.target_steps if t.target_steps else 1.0)
    # a copy made in one step: the model's thread may add a source meanwhile
    sources = dict(t.sources)
    names = sorted(sources)
    _family(out, "bridge_drafted_tokens_total", "counter", "Draft tokens verified, by source.",
            [({"source": n}, sources[n]["drafted"]) for n in names])
    _family(out, "bridge_accepted_tokens_total", "counter", "Draft tokens accepted, by source.",
            [({"source": n}, sources[n]["accepted"]) for n in names])
    gauge("bridge_parallel_sequences", "Sequences the KV cache holds (--parallel).",
          len(engine.lanes))
    gauge("bridge_queue_length", "Requests waiting for a free sequence.", worker.n_queued)
    if shared is not None:
        st = shared.stats
        counter("bridge_batch_rounds_total", "Shared rounds (one llama_decode each).",
                st.rounds)
        counter("bridge_batch_rows_total", "Rows evaluated in shared rounds, every "
                "sequence's.", st.rows)
        counter("bridge_batch_decode_seconds_total", "Seconds inside llama_decode in "
                "shared rounds (the rest of the model thread's time is Python or idle).",
                st.decode_seconds)
        counter("bridge_batch_deferred_total", "Requests that waited a round for rows or "
                "cells.", st.deferred)
        counter("bridge_kv_evictions_total", "Idle sequences' caches dropped for cells.",
                st.evictions)
    cache = worker.prompt_cache
    if cache is not None:
        gauge("bridge_prompt_cache_bytes", "Bytes of conversations' caches kept in host "
              "memory (--cache-ram).", cache.bytes)
        gauge("bridge_prompt_cache_entries", "Conversations kept in host memory.", len(cache))
        counter("bridge_prompt_cache_restores_total", "Conversations put back into a slot "
                "from host memory.", cache.hits)
        counter("bridge_prompt_cache_tokens_restored_total", "Tokens put back into slots "
                "from host memory instead of evaluated.", cache.tokens_restored)
    return "\n".join(out) + "\n"
