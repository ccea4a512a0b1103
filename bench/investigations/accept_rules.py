"""Per-token acceptance of a pruned draft under two exact rules, on the bench prompts.

- rejection sampling (Leviathan et al.): a draft x ~ q is kept with probability
  min(1, p(x) / q(x)), so the expected acceptance per token is sum_x min(p(x), q(x));
- coupled sampling (bridge's rule): draft and target share Gumbel noise G per position
  and a draft is kept iff argmax(log q + G) == argmax(log p + G); estimated here over
  ``--noise`` independent seeds per position.

Both are measured teacher-forced on the full model's own sampled continuations, with the
same filters on p and q (SamplingConfig), so the figures compare the rules, not the text.

    python -m bench.investigations.accept_rules MODEL.gguf DRAFT.gguf [--temp 0.8] [-n 64]
"""

from __future__ import annotations

import numpy as np

from bench.common import arg_parser
from runtime.bench_prompts import BENCH_PROMPTS
from runtime.chat import ChatSession
from runtime.config import GenerationConfig, RuntimeConfig, SamplingConfig, SpeculativeConfig
from runtime.context import LlamaContext, LlamaModel
from runtime.engine import Engine
from runtime.sampling import Sampler, gumbel_noise


def main(argv: list[str] | None = None) -> None:
    ap = arg_parser(__spec__.name, __doc__)
    ap.add_argument("model")
    ap.add_argument("draft")
    ap.add_argument("--temp", type=float, default=0.8)
    ap.add_argument("-n", type=int, default=64, help="tokens per prompt")
    ap.add_argument("--noise", type=int, default=64, help="noise seeds per position")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)

    cfg = SamplingConfig(temp=args.temp, seed=0)
    rt = RuntimeConfig(n_ctx=1024, n_threads=args.threads)
    rej, coup = [], []
    with Engine(args.model, draft=None, runtime=rt, sampling=cfg,
                speculative=SpeculativeConfig(drafter="none")) as eng, \
            LlamaModel(args.draft) as dm, LlamaContext(dm, 1024, 512, args.threads) as dctx:
        chat = ChatSession(eng)
        sampler = Sampler(cfg)
        for _, prompt in BENCH_PROMPTS:
            ids = chat.render([{"role": "user", "content": prompt}])
            _, out, _ = eng.complete(ids, GenerationConfig(max_tokens=args.n))
            seq = ids + out
            eng.reset()
            p_rows = np.array(eng.ctx.eval(seq, all_logits=True), dtype=np.float64)
            eng.reset()
            dctx.reset()
            q_rows = np.array(dctx.eval(seq, all_logits=True), dtype=np.float64)
            for t in range(len(ids) - 1, len(seq) - 1):
                p = sampler.probs(p_rows[t], [])
                q = sampler.probs(q_rows[t], [])
                rej.append(float(np.minimum(p, q).sum()))
                pc, pz = sampler.candidates(p_rows[t], [])
                qc, qz = sampler.candidates(q_rows[t], [])
                hits = sum(
                    pc[np.argmax(pz + gumbel_noise(s, t, pc))]
                    == qc[np.argmax(qz + gumbel_noise(s, t, qc))]
                    for s in range(args.noise))
                coup.append(hits / args.noise)
    print(f"{len(rej)} positions, temp {args.temp}: per-token acceptance "
          f"rejection sampling {np.mean(rej):.3f}, coupled (Gumbel) {np.mean(coup):.3f}")


if __name__ == "__main__":
    main()
