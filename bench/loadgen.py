"""Many clients at once against an OpenAI-compatible server: streamed chat requests, timed
chunk by chunk, and what they add up to.

Each client is a thread with its own connection that sends its requests one after another,
as an agent or an editor does; all clients start together (a barrier), so the wall time of a
run is from the first request's start to the last one's end. The stream is read as raw
server-sent events rather than through the ``openai`` client: any OpenAI-compatible server
works, and extra fields (llama-server's and bridge's ``timings``) come through untouched.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx

from bench.common import percentile

log = logging.getLogger(__name__)

# the llama-server ``timings`` fields (bridge adds n_steps and tokens_per_step) summed over
# requests; whichever a server returns are reported
TIMING_SUMS = ("predicted_n", "n_steps", "draft_n", "draft_n_accepted")


@dataclass
class RequestResult:
    """One streamed request, timed with ``time.perf_counter``.

    ``chunk_times`` are the arrival times of the chunks that carried content: the first is
    the first token's, and the gaps between them are the inter-token latencies (a server
    that sends several tokens in one chunk, as a speculative one may, shows fewer, longer
    gaps). ``tokens`` is the server's ``usage.completion_tokens`` when it sends usage.
    """

    client: int
    start: float
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)
    tokens: int = 0
    timings: dict | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None


def itl_gaps(times: Sequence[float]) -> list[float]:
    """Gaps between consecutive chunk arrivals of one stream."""
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def stream_chat(http: httpx.Client, base_url: str, body: dict, client: int,
                timeout: float) -> RequestResult:
    """Send one streamed chat completion and time it; never raises for a failed request.

    Args:
        http: the client's connection.
        base_url: the server's OpenAI base URL, ending in ``/v1``.
        body: the request body (``stream`` is set here).
        client: the client's index, kept in the result.
        timeout: seconds the whole request may take.
    """
    res = RequestResult(client, time.perf_counter())
    done = False
    try:
        with http.stream("POST", f"{base_url}/chat/completions", json={**body, "stream": True},
                         timeout=timeout) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read().decode()[:300]}")
            for line in r.iter_lines():
                now = time.perf_counter()
                if now - res.start > timeout:
                    raise TimeoutError(f"no end of stream after {timeout:.0f} s")
                if not line.startswith("data:"):
                    continue  # comments, event names, keep-alives
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise RuntimeError(f"error event: {json.dumps(chunk['error'])[:300]}")
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        res.chunk_times.append(now)
                        break
                if chunk.get("usage"):
                    res.tokens = chunk["usage"].get("completion_tokens", 0)
                res.timings = chunk.get("timings") or res.timings
        if not done:
            raise RuntimeError("the stream ended without data: [DONE]")
        res.tokens = res.tokens or len(res.chunk_times)
    except Exception as e:  # noqa: BLE001 - a failed request is a figure, not a crash
        res.error = f"{type(e).__name__}: {e}"
    res.end = time.perf_counter()
    return res


def run_clients(base_url: str, bodies: list[list[dict]], timeout: float,
                headers: dict | None = None) -> list[RequestResult]:
    """Run one client per entry of ``bodies``, each sending its requests in order.

    Args:
        base_url: the server's OpenAI base URL, ending in ``/v1``.
        bodies: per client, the request bodies it sends one after another.
        timeout: seconds each request may take.
        headers: sent with every request (an API key).

    Returns:
        Every request's result, in no particular order.
    """
    results: list[RequestResult] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(bodies))

    def client(i: int) -> None:
        with httpx.Client(headers=headers or {}) as http:
            barrier.wait()  # all clients start together
            for body in bodies[i]:
                res = stream_chat(http, base_url, body, i, timeout)
                with lock:
                    results.append(res)

    threads = [threading.Thread(target=client, args=(i,), daemon=True)
               for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def summarize(rounds: list[list[RequestResult]]) -> dict:
    """What one (server, clients, workload) cell adds up to over its rounds.

    Aggregate tok/s is completion tokens over wall time, summed over rounds (each round's
    wall from its first start to its last end); latencies pool every request of every
    round. ``tokens_per_step`` is ``(predicted_n - 1) / n_steps`` summed over requests: the
    first token comes with the prompt, each later target step yields its accepted drafts + 1.
    """
    rounds = [rs for rs in rounds if rs]
    walls = [max(r.end for r in rs) - min(r.start for r in rs) for rs in rounds]
    every = [r for rs in rounds for r in rs]
    ok = [r for r in every if r.error is None]
    tokens = sum(r.tokens for r in ok)
    per_round = [sum(r.tokens for r in rs if r.error is None) / w
                 for rs, w in zip(rounds, walls, strict=True) if w > 0]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    itl = [g for r in ok for g in itl_gaps(r.chunk_times)]
    errors = [r.error for r in every if r.error is not None]
    out = {
        "requests": len(every), "completed": len(ok), "errors": len(errors),
        "first_error": errors[0] if errors else None, "tokens": tokens, "wall_s": sum(walls),
        "tok_s": tokens / sum(walls) if sum(walls) > 0 else None,
        "tok_s_rounds": per_round,
        "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95),
        "itl_p50": percentile(itl, 50), "itl_p95": percentile(itl, 95),
    }
    timed = [r.timings for r in ok if r.timings]
    sums = {k: sum(t[k] for t in timed if k in t) for k in TIMING_SUMS
            if any(k in t for t in timed)}
    out["timings"] = sums
    with_steps = [t for t in timed if "n_steps" in t and "predicted_n" in t]
    steps = sum(t["n_steps"] for t in with_steps)
    if steps:
        out["tokens_per_step"] = sum(t["predicted_n"] - 1 for t in with_steps) / steps
    return out
