"""Per-step cost of the zero-cost drafters: LookupDrafter (index update + lookup) and a
DraftMemory lookup, against a plain model step (~8 ms for SmolLM2-135M on a 2-core CPU).

    python -m bench.lookup [--tokens 4000] [--memory-tokens 200000]

No model is needed. The "realistic" sequence is built from text with a tiny word-level
tokenizer (code and prose from this repository), so it has the repeats real prompts have;
the synthetic one is uniformly random ids (index growth without many matches).
"""

from __future__ import annotations

import random
import re
import time
import tracemalloc

from bench.common import ROOT, arg_parser, percentile
from runtime.drafters.lookup import LookupDrafter
from runtime.drafters.memory import DraftMemory, MemoryDrafter

# words, single punctuation marks, runs of spaces, newlines: roughly what BPE merges
_WORD = re.compile(r"\w+| +|\n|[^\w\s]")


def realistic_tokens(n: int) -> list[int]:
    """Word-level ids of this repository's own source files, repeated until n tokens."""
    vocab: dict[str, int] = {}
    out: list[int] = []
    files = sorted((ROOT / "runtime").glob("*.py")) + sorted((ROOT / "exporters").glob("*.py"))
    while len(out) < n:
        for path in files:
            for word in _WORD.findall(path.read_text()):
                out.append(vocab.setdefault(word, len(vocab)))
            if len(out) >= n:
                break
    return out[:n]


def synthetic_tokens(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(49_152) for _ in range(n)]


def time_lookup(tokens: list[int], n_max: int = 8, seed: int = 0) -> tuple[float, float]:
    """Median and p90 microseconds per step: propose on a sequence grown by 1-9 tokens per
    step (as accepted drafts + the target's token), a 30% chance of a rejection rollback."""
    rng = random.Random(seed)
    d = LookupDrafter()
    n = 64
    d.propose(tokens[:n], n_max, 0.0)
    times = []
    while n < len(tokens):
        n = min(len(tokens), n + rng.randint(1, 9))
        seq = tokens[:n]                  # built by the decode loop, outside the drafter
        start = time.perf_counter()
        d.propose(seq, n_max, 0.0)
        times.append(time.perf_counter() - start)
        if rng.random() < 0.3:
            d.rollback(n - 1)             # the last token was a rejected draft
    return percentile(times, 50) * 1e6, percentile(times, 90) * 1e6


def time_memory(memory_tokens: int, n_steps: int = 2000, n_max: int = 8
                 ) -> tuple[float, float, float, float, int, float]:
    """Fill a memory with realistic sequences of 100-1,000 tokens, then time lookups on
    stored text (hits) and on random text (mostly misses). Returns add seconds, median
    and p90 lookup microseconds on hits, median on misses, bytes held, peak MB of add."""
    source = realistic_tokens(memory_tokens)
    rng = random.Random(1)
    mem = DraftMemory(max_tokens=memory_tokens)
    tracemalloc.start()
    start = time.perf_counter()
    at = 0
    while at < len(source):
        length = rng.randint(100, 1000)
        mem.add(source[at:at + length])
        at += length
    add_seconds = time.perf_counter() - start
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    drafter = MemoryDrafter(mem)
    hits, misses, drafted = [], [], 0
    for _ in range(n_steps):
        end = rng.randrange(16, len(source))
        start = time.perf_counter()
        draft = drafter.propose(source[end - 16:end], n_max, 0.0)
        hits.append(time.perf_counter() - start)
        drafted += len(draft.tokens)
        context = synthetic_tokens(16, seed=rng.randrange(1 << 30))
        start = time.perf_counter()
        drafter.propose(context, n_max, 0.0)
        misses.append(time.perf_counter() - start)
    return (add_seconds, percentile(hits, 50) * 1e6, percentile(hits, 90) * 1e6,
            percentile(misses, 50) * 1e6, mem.nbytes, peak)


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("--tokens", type=int, default=4000, help="sequence length for lookup")
    ap.add_argument("--memory-tokens", type=int, default=200_000)
    args = ap.parse_args(argv)
    for name, toks in [("synthetic", synthetic_tokens(args.tokens)),
                       ("realistic", realistic_tokens(args.tokens))]:
        med, p90 = time_lookup(toks)
        print(f"LookupDrafter, {name} {args.tokens:,} tokens: median {med:.1f} us/step, "
              f"p90 {p90:.1f} us")
    add_s, med, p90, miss, nbytes, peak = time_memory(args.memory_tokens)
    print(f"DraftMemory, {args.memory_tokens:,} tokens: add {add_s:.2f} s in all, "
          f"{nbytes / args.memory_tokens:.1f} bytes/token held ({nbytes / 2**20:.1f} MiB), "
          f"peak traced {peak:.1f} MiB during adds")
    print(f"DraftMemory lookup: median {med:.1f} us/step (p90 {p90:.1f}) on stored text, "
          f"median {miss:.1f} us on random text")


if __name__ == "__main__":
    main()
