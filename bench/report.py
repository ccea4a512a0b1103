"""The markdown table of a concurrency sweep: one row per client count and server, with
ratios to a baseline server at the same client count (the comparison issue 33's targets
are written in), and the first error of every cell that had any, below the table."""

from __future__ import annotations

COLUMNS = ("clients", "server", "done", "errors", "tok/s", "tok/s vs base", "TTFT p50 s",
           "TTFT p95 s", "TTFT p50 vs base", "ITL p50 ms", "ITL p95 ms", "tok/step",
           "accepted/drafted")


def _num(x: float | None, fmt: str, scale: float = 1.0) -> str:
    return "-" if x is None else format(x * scale, fmt)


def _ratio(x: float | None, base: float | None) -> str:
    return f"{x / base:.2f}x" if x is not None and base else "-"


def format_table(rows: list[dict], baseline: str) -> list[str]:
    """Markdown lines for ``rows`` (summaries from :func:`bench.loadgen.summarize` with
    ``clients`` and ``server`` added), in the order given.

    Args:
        rows: one per (client count, server) of one workload.
        baseline: the server the ratio columns divide by, at the same client count; a
            missing baseline leaves them "-".
    """
    base = {r["clients"]: r for r in rows if r["server"] == baseline}
    out = ["| " + " | ".join(COLUMNS) + " |",
           "|" + "|".join(" --- " if c == "server" else " ---: " for c in COLUMNS) + "|"]
    errors = []
    for r in rows:
        b = base.get(r["clients"], {})
        tok_s = _num(r["tok_s"], ".1f")
        rounds = r.get("tok_s_rounds") or []
        if len(rounds) > 1:
            tok_s += f" ({min(rounds):.1f}–{max(rounds):.1f})"
        t = r.get("timings") or {}
        drafts = f"{t['draft_n_accepted']}/{t['draft_n']}" if "draft_n" in t \
            and "draft_n_accepted" in t else "-"
        cells = [str(r["clients"]), r["server"], f"{r['completed']}/{r['requests']}",
                 str(r["errors"]), tok_s, _ratio(r["tok_s"], b.get("tok_s")),
                 _num(r["ttft_p50"], ".2f"), _num(r["ttft_p95"], ".2f"),
                 _ratio(r["ttft_p50"], b.get("ttft_p50")),
                 _num(r["itl_p50"], ".1f", 1e3), _num(r["itl_p95"], ".1f", 1e3),
                 _num(r.get("tokens_per_step"), ".2f"), drafts]
        out.append("| " + " | ".join(cells) + " |")
        if r["errors"]:
            errors.append(f"- {r['clients']} clients, {r['server']}: {r['errors']} of "
                          f"{r['requests']} failed; first: {r['first_error']}")
    return out + ([""] + errors if errors else [])
