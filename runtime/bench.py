"""Side-by-side speed of plain and speculative decoding, in one process, interleaved.

Every mode (plain, adaptive gamma, fixed gammas) decodes every prompt from an empty cache,
and the order of modes rotates from prompt to prompt so that all of them share the
machine's noise. Next to the measured speedup sits the one the cost model predicts from the
measured acceptance alpha, gamma and step costs:

    S(gamma) = E(gamma, alpha) * t_verify(1) / (gamma * t_draft + t_verify(gamma + 1))

so a gap between the two points at overhead rather than at the draft.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from dataclasses import dataclass, field

import llama_cpp

from runtime.bench_prompts import BENCH_PROMPTS
from runtime.chat import ChatSession
from runtime.context import LlamaContext, gpu_offload_supported
from runtime.controller import CostModel, GammaController
from runtime.engine import Engine
from runtime.speculative import SpeculativeDecoder, Stats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """What to run. ``fixed_gammas`` adds one fixed-gamma mode each."""

    prompts: tuple[str, ...] = tuple(p for _, p in BENCH_PROMPTS)
    max_tokens: int = 128
    fixed_gammas: tuple[int, ...] = (2, 4)
    verify_k_max: int = 16
    chat: bool = True

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("the prompt set is empty; give --prompts a file with one prompt "
                             "per line")
        if self.max_tokens < 1:
            raise ValueError(f"-n must be >= 1, got {self.max_tokens}")
        if any(g < 1 or g > 32 for g in self.fixed_gammas):
            raise ValueError(f"--draft-max values must be in 1..32, got {self.fixed_gammas}")


@dataclass
class ModeResult:
    """One mode's runs. Its controller lives across prompts, as in a chat session or a
    server, so adaptive mode pays its few calibration steps once per run, not per prompt."""

    name: str
    gamma: int | None  # None: adaptive; 0: plain
    controller: GammaController
    stats: list[Stats] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        secs = sum(s.decode_seconds for s in self.stats)
        return sum(s.n_tokens for s in self.stats) / secs if secs else 0.0

    def total(self, attr: str) -> int:
        return sum(getattr(s, attr) for s in self.stats)


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


def theoretical_speedup(costs: dict, gamma: int, alpha: float) -> float:
    verify = costs["verify"]
    if gamma == 0 or costs["draft"] is None or gamma + 1 not in verify:
        return 1.0
    step = gamma * costs["draft"] + verify[gamma + 1]
    return CostModel.expected_tokens(gamma, alpha) * verify[1] / step


def run_bench(engine: Engine, cfg: BenchConfig) -> dict:
    """Run every mode on every prompt; return the figures as a JSON-ready dict."""
    if engine.draft_path is None:
        raise ValueError("bench needs a draft: put MODEL.draft.gguf beside the model or "
                         "pass --draft")
    draft_max = engine.spec_cfg.draft_max
    modes = [ModeResult("plain", 0, GammaController(draft_max, adaptive=False)),
             ModeResult("adaptive", None, GammaController(draft_max))]
    modes += [ModeResult(f"gamma={g}", g, GammaController(g, adaptive=False))
              for g in cfg.fixed_gammas]
    # chat models get their template; a base model (no template) gets the raw prompt
    session = ChatSession(engine) if cfg.chat and engine.model.chat_template() else None
    for i, prompt in enumerate(cfg.prompts):
        ids = (session.render([{"role": "user", "content": prompt}]) if session
               else engine.model.tokenize(prompt, True, True))
        for j in range(len(modes)):
            mode = modes[(i + j) % len(modes)]  # rotate the order: shared noise
            stats, tokens = _run_mode(engine, mode, ids, cfg.max_tokens)
            mode.stats.append(stats)
            mode.outputs.append(tokens)
        log.info("prompt %d/%d done", i + 1, len(cfg.prompts))
    costs = measure_costs(engine, cfg.verify_k_max)
    return _report(engine, cfg, modes, costs)


def _run_mode(engine: Engine, mode: ModeResult, ids: list[int], max_tokens: int):
    drafter = engine.decoder.drafter if mode.gamma != 0 else None
    decoder = SpeculativeDecoder(engine.ctx, drafter, engine.sampler, mode.controller,
                                 engine.spec_cfg.p_min if mode.gamma is None else 0.0)
    decoder.reset()
    if engine.decoder.drafter:
        engine.decoder.drafter.reset()
    stats = Stats()
    tokens: list[int] = []
    for step in decoder.generate(ids, max_tokens, engine.model.is_eog, stats):
        tokens.extend(step.tokens)
    decoder.reset()
    return stats, tokens


def _report(engine: Engine, cfg: BenchConfig, modes: list[ModeResult], costs: dict) -> dict:
    plain = modes[0]
    t1 = costs["verify"][1]
    out = {
        "machine": machine_info(),
        "model": engine.model.path.name,
        "draft": engine.draft_path.name if engine.draft_path else None,
        "n_prompts": len(cfg.prompts),
        "max_tokens": cfg.max_tokens,
        "greedy": engine.sampling.greedy,
        "costs": {
            "target_step_ms": round(1e3 * t1, 3),
            "draft_step_ms": round(1e3 * costs["draft"], 3) if costs["draft"] else None,
            "c": round(costs["draft"] / t1, 3) if costs["draft"] else None,
            "verify_curve": {k: round(v / t1, 3) for k, v in costs["verify"].items()},
        },
        "modes": {},
    }
    for m in modes:
        n_drafted, n_acc = m.total("n_drafted"), m.total("n_accepted")
        judged = n_acc + m.total("n_rejections")
        alpha = n_acc / judged if judged else 0.0
        gammas = [g for s in m.stats for g in s.gamma_history]
        row = {
            "tokens_per_s": round(m.tokens_per_s, 2),
            "speedup": round(m.tokens_per_s / plain.tokens_per_s, 3) if plain.tokens_per_s
            else None,
            "acceptance_rate": round(n_acc / n_drafted, 4) if n_drafted else 0.0,
            "alpha": round(alpha, 4),
            "mean_accepted_per_step": round(n_acc / max(m.total("n_steps"), 1), 3),
            "identical_to_plain": sum(a == b for a, b in zip(m.outputs, plain.outputs,
                                                              strict=True)),
            "python_overhead": round(statistics.mean(s.python_overhead for s in m.stats), 4),
            "mean_gamma": round(statistics.mean(gammas), 3) if gammas else 0.0,
            "gamma_over_time": gammas[:64],
        }
        if m.gamma:
            row["theoretical_speedup"] = round(theoretical_speedup(costs, m.gamma, alpha), 3)
        notes = {s.note for s in m.stats if s.note}
        if notes:
            row["note"] = sorted(notes)[0]
        out["modes"][m.name] = row
    return out


def machine_info() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu_offload": gpu_offload_supported(),
            "llama_cpp_python": llama_cpp.__version__, "python": platform.python_version()}
