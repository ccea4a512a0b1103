"""Side-by-side speed of plain decoding and each way of drafting, in one process, interleaved.

Every mode (plain; adaptive over all sources; adaptive with one source; fixed gammas)
decodes every prompt from an empty cache, and the order of modes rotates from prompt to
prompt so that all of them share the machine's noise. Two prompt sets are run: open-ended
prompts, and copy-heavy ones where lookups in the context pay. Next to the measured speedup
of a fixed-gamma mode sits the one the cost model predicts from its measured acceptance
alpha and the measured costs (``runtime.costmodel.speedup``), so a gap between the two
points at overhead rather than at the draft.

Exactness is reported, not assumed: for each mode, how many greedy outputs were identical
to plain decoding, and, where one differs, the full model's top-2 logit margin at the first
difference (llama.cpp's logits depend on the batch size, so a verify batch and a one-token
step may order a near-tie differently).
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import llama_cpp
import numpy as np

from runtime import costmodel
from runtime.bench_prompts import PROMPT_SETS
from runtime.chat import ChatSession
from runtime.context import LlamaContext
from runtime.controller import PRUNED, GammaController
from runtime.engine import Engine
from runtime.native import cpu_facts, gpu_offload_supported
from runtime.numerics import DEFAULT_WIDTHS, measure_bound
from runtime.speculative import SpeculativeDecoder, Stats

log = logging.getLogger(__name__)

# llama.cpp's own greedy loops, no Python per token but the loop: llama_decode and its
# default CPU sampler (what llama-server does by default), or its backend sampling (the
# argmax a node of the graph: llama-server's experimental --backend-sampling)
LEAN = "llama.cpp loop"
LEAN_BACKEND = "llama.cpp loop, backend argmax"


@dataclass(frozen=True)
class BenchConfig:
    """What to run. ``fixed_gammas`` adds one fixed-gamma pruned-draft mode each;
    ``lookup_gamma`` one forced lookup mode (0: none)."""

    prompt_sets: tuple[str, ...] = ("open", "copy")
    prompts: tuple[str, ...] | None = None  # a user's prompt file replaces the sets
    max_tokens: int = 128
    fixed_gammas: tuple[int, ...] = (2, 4)
    lookup_gamma: int = 8
    verify_k_max: int = 16
    chat: bool = True

    def __post_init__(self) -> None:
        if self.prompts is not None and not self.prompts:
            raise ValueError("the prompt file is empty; give --prompts a file with one "
                             "prompt per line")
        bad = [s for s in self.prompt_sets if s not in PROMPT_SETS]
        if bad or not self.prompt_sets:
            raise ValueError(f"unknown prompt set {bad}; choose from {', '.join(PROMPT_SETS)}")
        if self.max_tokens < 1:
            raise ValueError(f"-n must be >= 1, got {self.max_tokens}")
        if any(g < 1 or g > 32 for g in self.fixed_gammas):
            raise ValueError(f"--gammas values must be in 1..32, got {self.fixed_gammas}")
        if not 0 <= self.lookup_gamma <= 32:
            raise ValueError(f"--lookup-gamma must be in 0..32, got {self.lookup_gamma}")

    def sets(self) -> dict[str, tuple[str, ...]]:
        if self.prompts is not None:
            return {"prompts": self.prompts}
        return {name: tuple(p for _, p in PROMPT_SETS[name]) for name in self.prompt_sets}


@dataclass
class ModeResult:
    """One mode's runs on one prompt set. Its controller lives across prompts, as in a chat
    session or a server, so adaptive modes pay their calibration once per run."""

    name: str
    sources: tuple[str, ...]      # () is plain decoding
    controller: GammaController
    lean: bool = False            # llama.cpp's own greedy loop, not bridge's
    lean_backend: bool = False    # ... with the argmax in llama.cpp's graph
    stats: list[Stats] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    step_us: list[float] = field(default_factory=list)  # bridge's own µs, each step

    @property
    def tokens_per_s(self) -> float:
        secs = sum(s.decode_seconds for s in self.stats)
        return sum(s.n_tokens for s in self.stats) / secs if secs else 0.0

    def total(self, attr: str) -> int:
        return sum(getattr(s, attr) for s in self.stats)


def make_modes(engine: Engine, cfg: BenchConfig) -> list[ModeResult]:
    """plain, auto, one adaptive mode per source, forced lookup, fixed pruned gammas."""
    dm = engine.draft_cap(engine.spec_cfg.draft_max)
    have = engine.sources
    has_pruned = PRUNED in have

    def mode(name, sources, adaptive=True, gamma=dm):
        return ModeResult(name, tuple(sources),
                          GammaController(gamma, adaptive, has_pruned=PRUNED in sources))

    modes = [mode("plain", (), adaptive=False), mode("auto", have)]
    # the baseline "never slower than plain" is checked against: llama.cpp's own loop on
    # the same context (not in exact mode, whose numerics are not llama.cpp's defaults)
    if engine.sampling.greedy and not engine.runtime.exact:
        modes.append(ModeResult(LEAN, (), GammaController(1, False), lean=True))
        modes.append(ModeResult(LEAN_BACKEND, (), GammaController(1, False), lean=True,
                                lean_backend=True))
    if len(have) > 1:
        modes += [mode(src, (src,)) for src in have]
    if "lookup" in have and cfg.lookup_gamma:
        g = engine.draft_cap(cfg.lookup_gamma)  # exact mode caps the batch width
        modes.append(mode(f"lookup γ={g}", ("lookup",), False, g))
    if has_pruned:
        gammas = sorted({engine.draft_cap(g) for g in cfg.fixed_gammas})
        modes += [mode(f"pruned γ={g}", (PRUNED,), False, g) for g in gammas]
    return modes


def measure_costs(engine: Engine, k_max: int, reps: int = 5, n_context: int = 64) -> dict:
    """Median seconds for the target to verify k = 1..k_max tokens in one batch, and for
    one draft step, both after ``n_context`` tokens of context."""
    context = engine.model.tokenize("The history of science " * (n_context // 4), True)
    context = context[:n_context]

    def curve(ctx: LlamaContext, ks: range) -> dict[int, float]:
        ctx.reset()
        ctx.eval(context)
        out = {}
        for k in ks:
            samples = []
            for _ in range(reps + 1):
                t = time.perf_counter()
                ctx.eval(context[:k] if k <= len(context) else [context[0]] * k,
                         all_logits=True)
                samples.append(time.perf_counter() - t)
                ctx.truncate(len(context))
            out[k] = statistics.median(samples[1:])  # the first run of a shape warms up
        ctx.reset()
        return out

    verify = curve(engine.ctx, range(1, k_max + 1))
    draft = curve(engine.draft_ctx, range(1, 2))[1] if engine.draft_path else None
    return {"verify": verify, "draft": draft}


def theoretical_speedup(costs: dict, source: str, gamma: int, alpha: float) -> float:
    """The cost model's speedup for ``gamma`` drafts from ``source`` at acceptance alpha."""
    verify = costs["verify"]
    c = costs["draft"] if source == PRUNED else 0.0
    if gamma == 0 or c is None or gamma + 1 not in verify:
        return 1.0
    return costmodel.speedup(gamma, alpha, c, verify.__getitem__)


def run_bench(engine: Engine, cfg: BenchConfig) -> dict:
    """Run every mode on every prompt of every set; return the figures as a JSON-ready dict."""
    if not engine.sources:
        raise ValueError("bench needs a draft source; drop --drafter none")
    # chat models get their template; a base model (no template) gets the raw prompt
    session = ChatSession(engine) if cfg.chat and engine.model.chat_template() else None
    results = {}
    for set_name, prompts in cfg.sets().items():
        modes = make_modes(engine, cfg)
        all_ids = []
        for i, prompt in enumerate(prompts):
            ids = (session.render([{"role": "user", "content": prompt}]) if session
                   else engine.model.tokenize(prompt, True, True))
            all_ids.append(ids)
            for j in range(len(modes)):
                mode = modes[(i + j) % len(modes)]  # rotate the order: shared noise
                stats, tokens = _run_mode(engine, mode, ids, cfg.max_tokens)
                mode.stats.append(stats)
                mode.outputs.append(tokens)
            log.info("%s: prompt %d/%d done", set_name, i + 1, len(prompts))
        results[set_name] = (modes, all_ids)
    costs = measure_costs(engine, cfg.verify_k_max)
    out = _report(engine, cfg, results, costs)
    out["numerics"] = measure_numerics(engine)
    return out


def measure_numerics(engine: Engine, n_positions: int = 64) -> dict:
    """This machine's bound on |batched - one-token logits| for the engine's target and
    settings (``runtime.numerics``), over the batch widths its verification uses."""
    widths = tuple(w for w in DEFAULT_WIDTHS
                   if engine.max_rows is None or w <= engine.max_rows)
    ids = engine.model.tokenize("The history of science is", True)

    def make() -> LlamaContext:
        return LlamaContext(engine.model, n_ctx=len(ids) + n_positions + 64,
                            n_threads=engine.runtime.n_threads, numerics=engine.numerics)

    bound = measure_bound(make, ids, n_positions, widths)
    return {"exact": engine.runtime.exact, "max_rows": engine.max_rows,
            "bound": bound.as_dict(), "describe": bound.describe()}


def _run_lean(engine: Engine, mode: ModeResult, ids: list[int], max_tokens: int
              ) -> tuple[Stats, list[int]]:
    """llama.cpp's own loop (``LlamaContext.greedy_native``) from the same prefill."""
    engine.reset()
    ctx = engine.ctx
    first = ctx.eval_argmax(ids)[-1]
    stats = Stats(mode=mode.name, n_prompt=len(ids))
    tokens = [first]
    if not engine.model.is_eog(first) and max_tokens > 1:
        more, stats.decode_seconds = ctx.greedy_native(first, max_tokens - 1,
                                                       engine.model.is_eog,
                                                       backend=mode.lean_backend)
        tokens += more
    stats.llama_seconds = stats.decode_seconds
    stats.n_tokens, stats.n_steps = len(tokens), len(tokens) - 1
    ctx.reset()
    engine.reset()
    return stats, tokens


def _run_mode(engine: Engine, mode: ModeResult, ids: list[int], max_tokens: int):
    if mode.lean:
        return _run_lean(engine, mode, ids, max_tokens)
    drafters = [engine.drafters[s] for s in mode.sources]
    decoder = SpeculativeDecoder(engine.ctx, drafters, engine.sampler, mode.controller,
                                 engine.spec_cfg.p_min if mode.controller.adaptive else 0.0)
    engine.reset()
    stats = Stats()
    tokens: list[int] = []
    # bridge's own time per step, measured from outside the loop: the wall time between
    # two steps less the time the models spent in llama_decode
    ctxs = [engine.ctx] + [c for d in drafters if (c := getattr(d, "ctx", None)) is not None]
    last = None
    for step in decoder.generate(ids, max_tokens, engine.model.is_eog, stats):
        now, llama = time.perf_counter(), sum(c.eval_seconds for c in ctxs)
        if last is not None:  # the first yield is the prefill's token
            mode.step_us.append(1e6 * ((now - last[0]) - (llama - last[1])))
        last = now, llama
        tokens.extend(step.tokens)
    engine.reset()
    return stats, tokens


def divergence_margin(engine: Engine, prompt: list[int], plain: list[int],
                      other: list[int]) -> float | None:
    """The full model's top-2 logit margin where ``other`` first leaves ``plain`` (None
    when they agree): small means a near-tie that batch-size rounding may flip."""
    i = next((i for i, (a, b) in enumerate(zip(plain, other, strict=False)) if a != b), None)
    if i is None:
        return None
    engine.reset()
    row = np.sort(np.array(engine.ctx.eval(prompt + plain[:i])[0], dtype=np.float64))
    engine.reset()
    return float(row[-1] - row[-2])


def _report(engine: Engine, cfg: BenchConfig, results: dict, costs: dict) -> dict:
    t1 = costs["verify"][1]
    out = {
        "machine": machine_info(),
        "model": engine.model.path.name,
        "draft": engine.draft_path.name if engine.draft_path else None,
        "sources": engine.sources,
        "max_tokens": cfg.max_tokens,
        "greedy": engine.sampling.greedy,
        "costs": {
            "target_step_ms": round(1e3 * t1, 3),
            "draft_step_ms": round(1e3 * costs["draft"], 3) if costs["draft"] else None,
            "c": round(costs["draft"] / t1, 3) if costs["draft"] else None,
            "verify_curve": {k: round(v / t1, 3) for k, v in costs["verify"].items()},
        },
        "sets": {},
    }
    for set_name, (modes, prompts) in results.items():
        rows = {m.name: _mode_row(engine, m, modes[0], prompts, costs) for m in modes}
        # "never slower than plain", against llama.cpp itself: the faster of its loops
        lean = max((rows[n]["tokens_per_s"] for n in (LEAN, LEAN_BACKEND) if n in rows),
                   default=0.0)
        for row in rows.values():
            row["vs_llama_cpp"] = round(row["tokens_per_s"] / lean, 3) if lean else None
        out["sets"][set_name] = {"n_prompts": len(prompts), "modes": rows}
    return out


def _mode_row(engine: Engine, m: ModeResult, plain: ModeResult, prompts: list[list[int]],
              costs: dict) -> dict:
    n_drafted, n_acc = m.total("n_drafted"), m.total("n_accepted")
    judged = n_acc + m.total("n_rejections")
    alpha = n_acc / judged if judged else 0.0
    gammas = [g for s in m.stats for g in s.gamma_history]
    sources: dict[str, dict[str, int]] = {}
    for s in m.stats:
        for name, v in s.sources.items():
            agg = sources.setdefault(name, {"steps": 0, "drafted": 0, "accepted": 0})
            for k in agg:
                agg[k] += v[k]
    margins = [] if m is plain or not engine.sampling.greedy else [
        divergence_margin(engine, p, a, b)
        for p, a, b in zip(prompts, plain.outputs, m.outputs, strict=True) if a != b]
    n_steps = m.total("n_steps")
    row = {
        "tokens_per_s": round(m.tokens_per_s, 2),
        "speedup": round(m.tokens_per_s / plain.tokens_per_s, 3) if plain.tokens_per_s
        else None,
        "tokens_per_step": round((m.total("n_tokens") - len(m.stats)) / n_steps, 3)
        if n_steps else 1.0,
        "acceptance_rate": round(n_acc / n_drafted, 4) if n_drafted else 0.0,
        "alpha": round(alpha, 4),
        "sources": sources,
        "identical_to_plain": sum(a == b for a, b in zip(m.outputs, plain.outputs,
                                                          strict=True)),
        "divergence_margins": [round(x, 4) for x in margins if x is not None],
        "python_overhead": round(statistics.mean(s.python_overhead for s in m.stats), 4),
        "python_us_per_step": round(_python_us(m.stats), 1),
        "python_us_per_step_median": round(statistics.median(m.step_us), 1)
        if m.step_us else 0.0,
        "mean_gamma": round(statistics.mean(gammas), 3) if gammas else 0.0,
        "gamma_over_time": gammas[:64],
    }
    if not m.controller.adaptive and m.sources:
        row["theoretical_speedup"] = round(theoretical_speedup(
            costs, m.sources[0], m.controller.draft_max, alpha), 3)
    notes = {s.note for s in m.stats if s.note}
    if notes:
        row["note"] = sorted(notes)[0]
    return row


def _python_us(stats: list[Stats]) -> float:
    """bridge's own microseconds per target step over a mode's runs (time outside
    llama_decode, pooled over prompts so short answers do not weigh as much as long)."""
    steps = sum(s.n_steps for s in stats)
    outside = sum(max(0.0, s.decode_seconds - s.llama_seconds) for s in stats)
    return 1e6 * outside / steps if steps else 0.0


def machine_info() -> dict:
    """The CPU (model name and its SIMD flags that change llama.cpp's kernels), core count,
    and the llama.cpp build, for naming beside every figure."""
    cpu, flags = cpu_facts()
    system = llama_cpp.llama_print_system_info().decode("utf-8", "replace").strip()
    return {"cpu": cpu, "cpu_flags": list(flags), "cores": os.cpu_count(),
            "gpu_offload": gpu_offload_supported(), "llama_cpp_python": llama_cpp.__version__,
            "llama_cpp_system": system, "python": platform.python_version()}


def cpu_summary(info: dict | None = None) -> str:
    """One line naming the CPU for a results table: model, cores, AVX-512/AMX or not."""
    info = info or machine_info()
    flags = info.get("cpu_flags", [])
    wide = [f for f in flags if f.startswith(("avx512", "amx"))]
    kind = ("AVX-512" if any(f.startswith("avx512") for f in wide) else
            "AVX2 only" if "avx2" in flags else "no AVX2")
    amx = ", AMX" if any(f.startswith("amx") for f in wide) else ", no AMX"
    return (f"{info['cpu']}, {info['cores']} cores, {kind}{amx if wide or flags else ''}; "
            f"llama-cpp-python {info['llama_cpp_python']}")
