"""What the penalties cost (issue 34's target: under 5% of a plain step).

    python -m bench.penalties --model models/SmolLM2-135M-Instruct.Q4_1.gguf

Times one plain target step (a one-token ``llama_decode`` after a few hundred tokens of
context) and, on that step's real logits row, ``Sampler.choose`` with no penalty, with
the frequency/presence penalties, with DRY and with both, over a history with repeats
(the text the loops make) at the default 64-token windows and at the whole context
(-1). Prints each as milliseconds and as a share of the plain step.
"""

from __future__ import annotations

import statistics
import time

from bench.common import arg_parser, cpu_facts

SETTINGS = {
    "none (greedy argmax of the row)": {},
    "frequency 0.3 + presence 0.2": dict(frequency_penalty=0.3, presence_penalty=0.2),
    "DRY 0.8 (window 64)": dict(dry_multiplier=0.8),
    "DRY 0.8 + frequency 0.3": dict(dry_multiplier=0.8, frequency_penalty=0.3),
    "DRY 0.8, whole context (-1)": dict(dry_multiplier=0.8, dry_penalty_last_n=-1),
    "all, whole context (-1)": dict(dry_multiplier=0.8, dry_penalty_last_n=-1,
                                    frequency_penalty=0.3, repeat_last_n=-1),
}


def _median_ms(fn, n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--history", type=int, default=2048,
                    help="tokens of history (the whole-context rows read all of it)")
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=128, help="tokens per timed answer")
    ap.add_argument("--rounds", type=int, default=3, help="answers per setting (median)")
    a = ap.parse_args(argv)

    from runtime.config import GenerationConfig, RuntimeConfig, SamplingConfig, SpeculativeConfig
    from runtime.engine import Engine
    from runtime.sampling import Sampler

    rt = RuntimeConfig(n_ctx=max(4096, a.history + 64), n_threads=a.threads)
    with Engine(a.model, draft=None, runtime=rt,
                speculative=SpeculativeConfig(drafter="none")) as engine:
        ctx, model = engine.ctx, engine.model
        text = ("The invoice lists a line item, then the same line item again, and "
                '{"city": "Madrid", "items": [1, 2, 3]} repeated. ') * 64
        history = model.tokenize(text, add_special=True)[: a.history]
        ctx.eval(history[:256])
        pos = ctx.n_past

        def plain_step():
            ctx.truncate(pos)
            ctx.eval(history[256:257])

        plain_step()  # warm
        step_ms = _median_ms(plain_step, 50)
        row = ctx.eval(history[256:257])[-1].copy()
        ctx.truncate(pos)
        cpu, flags = cpu_facts()
        print(f"# {cpu}; {', '.join(flags) or 'no avx2/avx512/amx'}; {a.threads} threads")
        print(f"# {model.path.name}: plain step {step_ms:.3f} ms (one token after 256); "
              f"history {len(history)} tokens")
        print("| penalties | choose ms | share of a plain step |")
        print("|---|---:|---:|")
        for name, extra in SETTINGS.items():
            sampler = Sampler(SamplingConfig(temp=0, **extra), engine.dry_breakers)
            hist = history[-sampler.history_window:] if sampler.history_window else []
            sampler.choose(row, hist, len(history))  # warm (and the breaker table built)
            ms = _median_ms(lambda s=sampler, h=hist: s.choose(row, h, len(history)),
                            a.repeats)
            print(f"| {name} | {ms:.3f} | {100 * ms / step_ms:.1f}% |")
        # the whole decode loop: with a penalty the greedy choice leaves llama.cpp's graph
        # (the row is read back), so this is the cost a user sees, per generated token
        print("\n| penalties | plain decoding ms/token | vs none |")
        print("|---|---:|---:|")
        gen = GenerationConfig(max_tokens=a.tokens)
        prompt = ("<|im_start|>user\nWrite a long story about a lighthouse keeper."
                  "<|im_end|>\n<|im_start|>assistant\n")
        base = None
        for name, extra in SETTINGS.items():
            cfg = SamplingConfig(temp=0, **extra)
            per = []
            for _ in range(a.rounds):
                engine.reset()
                engine.complete(prompt, GenerationConfig(max_tokens=1), sampling=cfg)
                t = time.perf_counter()
                _, toks, st = engine.complete(prompt, gen, sampling=cfg)
                per.append((time.perf_counter() - t - st.prompt_seconds) / max(len(toks), 1))
            ms = statistics.median(per) * 1e3
            base = base or ms
            print(f"| {name} | {ms:.2f} | {ms / base:.3f}x |")


if __name__ == "__main__":
    main()
