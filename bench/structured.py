"""Structured output on a real model: validity, forced tokens, tokens per target step and the
constraint's cost, on an extraction workload (people, invoices, log lines), enum answers and
a nested schema with arrays.

    python -m bench.structured [MODEL.gguf] [--seeds 4] [--threads 1] [--out FILE.md]

Greedy modes, interleaved per prompt so they share the machine's noise, all under the schema
unless named "free":
- ``plain free``: plain decoding without a schema (the unconstrained baseline);
- ``plain``: constrained plain decoding (``--drafter none``);
- ``lookup``: forced lookup (fixed gamma 8), forced-text drafting off;
- ``lookup+forced``: the same with the grammar's forced text drafted too;
- ``auto``: the adaptive controller with lookup and forced text.
Then ``--seeds`` sampled answers (temperature 1.0) per prompt under ``auto`` for validity,
and (unless ``--no-serve``) the same workload through a real ``bridge serve`` started from
this checkout, asked by the ``openai`` client with ``response_format: json_schema``.
Tokens per target step and the share of forced tokens do not depend on the hardware;
tokens/s do. Predicted speedups for other verify curves use the measured step sizes.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench.common import (
    BRIDGE,
    arg_parser,
    free_port,
    json_valid,
    openai_client,
    start_server,
    stop_server,
)
from exporters import testmodels
from runtime import costmodel
from runtime.bench import cpu_summary
from runtime.config import (
    GenerationConfig,
    RuntimeConfig,
    SamplingConfig,
    SpeculativeConfig,
)
from runtime.constraint import ConstraintSpec
from runtime.engine import Engine

S = {"type": "string", "maxLength": 30}
PERSON = {"type": "object", "additionalProperties": False,
          "required": ["name", "age", "email", "city"],
          "properties": {"name": S, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "email": {"type": "string", "maxLength": 40,
                                   "pattern": "^[a-z.]+@[a-z]+\\.[a-z]{2,3}$"},
                         "city": S}}
INVOICE = {"type": "object", "additionalProperties": False,
           "required": ["number", "customer", "total", "currency"],
           "properties": {"number": {"type": "string", "pattern": "^INV-[0-9]{4}$"},
                          "customer": S,
                          "total": {"type": "number", "minimum": 0, "maximum": 100000},
                          "currency": {"enum": ["USD", "EUR", "GBP"]}}}
LOGLINE = {"type": "object", "additionalProperties": False,
           "required": ["date", "level", "service", "code", "message"],
           "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"},
                          "level": {"enum": ["DEBUG", "INFO", "WARN", "ERROR"]},
                          "service": S, "code": {"type": "integer", "minimum": 100,
                                                 "maximum": 599},
                          "message": {"type": "string", "maxLength": 60}}}
SENTIMENT = {"type": "object", "additionalProperties": False,
             "required": ["sentiment", "confidence"],
             "properties": {"sentiment": {"enum": ["positive", "negative", "neutral"]},
                            "confidence": {"type": "number", "minimum": 0, "maximum": 1}}}
ORDER = {"type": "object", "additionalProperties": False, "required": ["customer", "items"],
         "properties": {"customer": S,
                        "items": {"type": "array", "minItems": 1, "maxItems": 4,
                                  "items": {"type": "object", "additionalProperties": False,
                                            "required": ["product", "quantity"],
                                            "properties": {"product": S,
                                                           "quantity": {"type": "integer",
                                                                        "minimum": 1,
                                                                        "maximum": 99}}}}}}
WORKLOAD = [
    ("person", PERSON, "Extract the person as JSON. Text: Maria Lopez, 29, lives in Madrid; "
                       "write to maria.lopez@example.com."),
    ("person", PERSON, "Extract the person as JSON. Text: John Carter (age 52) from Boston, "
                       "email john@carter.org."),
    ("person", PERSON, "Extract the person as JSON. Text: Our new hire is Wei Chen, 31, "
                       "based in Singapore, wei@mail.sg."),
    ("invoice", INVOICE, "Extract the invoice as JSON. Text: Invoice INV-0042 for Acme "
                         "Corp, total due 1250.00 USD."),
    ("invoice", INVOICE, "Extract the invoice as JSON. Text: Please pay invoice INV-7781 "
                         "(customer: Globex Ltd) amounting to 89.90 EUR."),
    ("log", LOGLINE, "Parse this log line as JSON: 2026-11-30 ERROR payments 503 upstream "
                     "timeout after 30s"),
    ("log", LOGLINE, "Parse this log line as JSON: 2026-12-01 WARN auth 401 token expired "
                     "for user 1182"),
    ("log", LOGLINE, "Parse this log line as JSON: 2026-12-02 INFO search 200 query "
                     "served in 12ms"),
    ("enum", SENTIMENT, "Classify the sentiment of this review as JSON: The battery lasts "
                        "all day and the screen is gorgeous."),
    ("enum", SENTIMENT, "Classify the sentiment of this review as JSON: It broke after two "
                        "days and support never answered."),
    ("nested", ORDER, "Extract the order as JSON. Text: Dana Scott ordered 2 notebooks, 1 "
                      "stapler and 10 pens."),
    ("nested", ORDER, "Extract the order as JSON. Text: For Ravi Patel: three coffee mugs "
                      "and one teapot."),
]
MODES = {
    "plain free": SpeculativeConfig(drafter="none"),
    "plain": SpeculativeConfig(drafter="none"),
    "lookup": SpeculativeConfig(drafter="lookup", adaptive=False, forced_drafts=False),
    "lookup+forced": SpeculativeConfig(drafter="lookup", adaptive=False),
    "auto": SpeculativeConfig(drafter="lookup"),
}
GEN = GenerationConfig(max_tokens=200)
# A 7B model on a CPU is memory-bound: verifying a few more tokens in one batch costs little
# more than one. Assumed, not measured here: V(k) = 1 + 0.1 (k - 1).
CURVES = {"GPU (flat to k=8)": costmodel.flat_verify(8),
          "7B-shaped CPU (V(k)=1+0.1(k-1))": costmodel.linear_verify(0.1)}


def smollm2_prompt(text: str) -> str:
    """SmolLM2's chat template around one user message."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def answer(engine: Engine, prompt: str, spec: ConstraintSpec | None,
           sampling: SamplingConfig | None = None) -> dict:
    """One answer and its figures: steps and their batch sizes, constraint seconds."""
    sizes: list[int] = []
    observe = engine.controller.observe

    def record(rec):  # the batch size of every target step, for the predicted curves
        sizes.append(rec.n_verified)
        observe(rec)

    engine.controller.observe = record
    c = engine.compile(spec) if spec is not None else None
    c_before = c.seconds if c is not None else 0.0
    try:
        text, ids, stats = engine.complete(prompt, GEN, constraint=spec, sampling=sampling)
    finally:
        engine.controller.observe = observe
    return {"text": text, "ids": ids, "stats": stats, "sizes": sizes,
            "constraint_s": (c.seconds - c_before) if c is not None else 0.0}


def single_allowed(engine: Engine, spec: ConstraintSpec, n_prompt: int, ids: list[int]) -> int:
    """How many of ``ids`` were the only token the grammar allowed at their position."""
    c = engine.compile(spec)
    c.bind(n_prompt)
    n = 0
    for t in ids:
        n += int(c.allowed().sum() == 1)
        if c.done:
            break
        c.consume(t)
    return n


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--seeds", type=int, default=4, help="sampled answers per prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, help="also write the Markdown report here")
    ap.add_argument("--no-serve", action="store_true",
                    help="skip the run through bridge serve and the openai client")
    ap.add_argument("--llama-server", type=Path,
                    help="also run the workload through this llama-server binary (built by "
                         "python -m bench.llamacpp from the pinned sources), for comparison")
    args = ap.parse_args(argv)
    model = args.model or testmodels.fetch_gguf(testmodels.SMOLLM2)
    rt = RuntimeConfig(n_ctx=1024, n_threads=args.threads)
    greedy = SamplingConfig(temp=0.0)
    engines = {name: Engine(model, draft=None, runtime=rt, speculative=spec, sampling=greedy)
               for name, spec in MODES.items()}
    results: dict[str, list[dict]] = {name: [] for name in MODES}
    n_valid = n_answers = 0
    try:
        for _, schema, text in WORKLOAD:
            spec = ConstraintSpec.from_schema(schema)
            for name, engine in engines.items():
                r = answer(engine, smollm2_prompt(text), None if name == "plain free" else spec)
                r["schema"] = schema
                results[name].append(r)
                if name != "plain free":
                    n_valid += json_valid(r["text"], schema)
                    n_answers += 1
        sampled = engines["auto"]
        for _, schema, text in WORKLOAD:
            spec = ConstraintSpec.from_schema(schema)
            for seed in range(args.seeds):
                r = answer(sampled, smollm2_prompt(text), spec,
                           SamplingConfig(temp=1.0, seed=seed))
                n_valid += json_valid(r["text"], schema)
                n_answers += 1
        plain = engines["plain"]
        n_single = sum(single_allowed(plain, ConstraintSpec.from_schema(r["schema"]),
                                      r["stats"].n_prompt, r["ids"]) for r in results["plain"])
        curve = engines["auto"].controller.costs.relative()["verify"]
    finally:
        for e in engines.values():
            e.close()
    report = render(results, n_valid, n_answers, n_single, curve, args)
    if not args.no_serve:
        report += "\n" + through_serve(model, args)
    if args.llama_server:
        report += "\n" + through_llama_server(model, args)
    print(report)
    if args.out:
        args.out.write_text(report)


def render(results: dict[str, list[dict]], n_valid: int, n_answers: int, n_single: int,
           curve: dict[int, float], args) -> str:
    def tot(name: str, key: str) -> float:
        return sum(getattr(r["stats"], key) for r in results[name])

    free_step = tot("plain free", "decode_seconds") / max(1, tot("plain free", "n_steps"))
    base_tps = {n: tot(n, "n_tokens") / tot(n, "decode_seconds") for n in results}
    lines = [f"# Structured output: {len(WORKLOAD)} prompts, greedy, {time.strftime('%Y-%m-%d')}",
             "", f"CPU: {cpu_summary()}; {args.threads} thread(s); model SmolLM2-135M-Instruct "
             "Q4_1; JSON in one layout (no free whitespace).", "",
             f"**Valid:** {n_valid}/{n_answers} answers parse and validate against their "
             f"schema (jsonschema): {n_answers - len(WORKLOAD) * args.seeds} greedy across "
             f"the constrained modes, {len(WORKLOAD) * args.seeds} sampled at temperature "
             "1.0.", "",
             "| mode | tokens | target steps | tokens/step | tok/s | vs constrained plain | "
             "vs free plain | forced text kept | constraint per token |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, rs in results.items():
        n_tok, n_steps = tot(name, "n_tokens"), tot(name, "n_steps")
        forced = sum(r["stats"].sources.get("grammar", {}).get("accepted", 0) for r in rs)
        cost = sum(r["constraint_s"] for r in rs) / n_tok
        lines.append(
            f"| {name} | {n_tok:.0f} | {n_steps:.0f} | "
            f"{(n_tok - len(rs)) / n_steps:.2f} | {base_tps[name]:.1f} | "
            f"{base_tps[name] / base_tps['plain']:.2f}x | "
            f"{base_tps[name] / base_tps['plain free']:.2f}x | "
            f"{forced / n_tok:.0%} | "
            + (f"{cost * 1e6:.0f} us = {cost / free_step:.1%} of a plain step |"
               if name != "plain free" else "- |"))
    n_plain = tot("plain", "n_tokens")
    tps = {n: (tot(n, "n_tokens") - len(results[n])) / tot(n, "n_steps") for n in results}
    measured = ", ".join(f"V({k}) = {v:.2f}" for k, v in curve.items())
    lines += ["", f"A plain SmolLM2 step here: {free_step * 1e3:.2f} ms; the verify curve the "
              f"controller measured, in plain steps: {measured}. Tokens the grammar "
              f"allowed alone (one token in the mask): {n_single}/{n_plain:.0f} = "
              f"{n_single / n_plain:.0%} of the greedy answers' tokens.",
              f"Forced text drafted, tokens per target step: {tps['lookup+forced']:.2f} "
              f"(lookup+forced) against {tps['lookup']:.2f} without forced drafting = "
              f"{tps['lookup+forced'] / tps['lookup']:.2f}x.", "",
              "Predicted speedup against constrained plain decoding, from the measured steps "
              "(each step's batch size k costs V(k) plain steps; drafting is free):", "",
              "| mode | " + " | ".join(CURVES) + " |", "| --- |" + " --- |" * len(CURVES)]
    for name in ("lookup", "lookup+forced", "auto"):
        rs = results[name]
        n_gen = sum(r["stats"].n_tokens - 1 for r in rs)  # the first token is the prompt's
        cells = [f"{n_gen / sum(v(k) for r in rs for k in r['sizes']):.2f}x (predicted)"
                 for v in CURVES.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def through_serve(model: Path, args) -> str:
    """The workload through a real ``bridge serve`` (this checkout's code, lookup and forced
    text, adaptive) and the ``openai`` client: validity and the server's own timings."""
    port = free_port()
    proc = start_server([*BRIDGE, "serve", str(model), "--port", str(port), "--threads",
                         str(args.threads), "-c", "1024", "--drafter", "lookup"], port,
                        "bridge serve")
    try:
        client, model_id = _client_and_model(port)
        counts = {"steps": 0, "forced": 0}

        def timing(t: dict) -> tuple[int, float]:
            counts["steps"] += t["n_steps"]
            counts["forced"] += t["sources"].get("grammar", {}).get("accepted", 0)
            return t["predicted_n"], t["predicted_ms"] / 1e3

        n_valid, n, tokens, seconds = _serve_workload(client, model_id, args, True, timing)
        steps, forced = counts["steps"], counts["forced"]
    finally:
        stop_server(proc)
    return (f"**Through `bridge serve`** (`--drafter lookup`, adaptive; the `openai` client, "
            f"`response_format: json_schema`, strict): {n_valid}/{n} answers valid, "
            f"{tokens} tokens at {tokens / seconds:.1f} tok/s, "
            f"{(tokens - n) / max(1, steps):.2f} tokens per target step, "
            f"{forced / max(1, tokens):.0%} of tokens drafted from forced text and kept.\n")


def _client_and_model(port: int):
    """An ``openai`` client for the server on ``port`` and the model id it serves."""
    client = openai_client(port, timeout=300)
    return client, client.models.list().data[0].id


def _serve_workload(client, model_id: str, args, constrained: bool,
                    timing) -> tuple[int, int, int, float]:
    """(valid, answers, tokens, seconds) of the workload, greedy and sampled; ``timing``
    reads (tokens, seconds) from a response's server timings."""
    n_valid = n = tokens = 0
    seconds = 0.0
    for temp, seeds in ((0.0, [0]), (1.0, range(args.seeds))):
        for _, schema, text in WORKLOAD:
            fmt = {"type": "json_schema",
                   "json_schema": {"name": "answer", "strict": True, "schema": schema}}
            for seed in seeds:
                r = client.chat.completions.create(
                    model=model_id, messages=[{"role": "user", "content": text}],
                    temperature=temp, seed=seed, max_tokens=200,
                    **({"response_format": fmt} if constrained else {}))
                n += 1
                n_valid += json_valid(r.choices[0].message.content, schema)
                t, sec = timing(r.model_extra["timings"])
                tokens, seconds = tokens + t, seconds + sec
    return n_valid, n, tokens, seconds


def through_llama_server(model: Path, args) -> str:
    """The same workload through llama-server (``--jinja``, the same model, threads and
    context) with the same ``json_schema``, and without it for its own unconstrained
    speed: validity and tok/s from its ``timings``."""
    port = free_port()
    proc = start_server([str(args.llama_server), "-m", str(model), "--port", str(port),
                         "--host", "127.0.0.1", "-t", str(args.threads), "-c", "1024",
                         "--jinja", "-np", "1"], port, "llama-server")

    def timing(t: dict) -> tuple[int, float]:
        return t["predicted_n"], t["predicted_ms"] / 1e3

    try:
        client, model_id = _client_and_model(port)
        valid_c, n, tok_c, sec_c = _serve_workload(client, model_id, args, True, timing)
        valid_f, _, tok_f, sec_f = _serve_workload(client, model_id, args, False, timing)
    finally:
        stop_server(proc)
    return (f"**Through llama-server** (`{args.llama_server.name} --jinja -t {args.threads} "
            f"-c 1024`, the same requests): with `json_schema` {valid_c}/{n} answers valid, "
            f"{tok_c / sec_c:.1f} tok/s; without it {valid_f}/{n} happen to validate, "
            f"{tok_f / sec_f:.1f} tok/s; constrained/unconstrained "
            f"{(tok_c / sec_c) / (tok_f / sec_f):.2f}x.\n")


if __name__ == "__main__":
    main()
