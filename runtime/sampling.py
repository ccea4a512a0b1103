"""Turning logits into tokens, and the rule that verifies drafted tokens.

Both models' logits go through the same filters (``SamplingConfig``): the penalties
(repeat, frequency, presence, DRY: ``runtime.penalties``), top-k, top-p, min-p,
temperature. Sampling is *coupled* (Gumbel-max): the token at
absolute position t is

    argmax_x (z_x / temp + G(seed, t, x)),   G ~ Gumbel(0, 1) i.i.d. per (t, x),

over the tokens the filters keep, which is an exact draw from the filtered softmax p.
The noise depends only on (seed, position, token id), never on how many tokens were
drafted, so draft and target share it and:

- verification is an exact token comparison, as under greedy decoding: a drafted token is
  kept iff the target's own coupled draw at that position is that token. Every emitted
  token is therefore the target's draw, distributed exactly as p, for any draft source
  (a pruned model, or a lookup whose q is one-hot);
- a sampled answer is a deterministic function of (seed, files, prompt, settings): the
  same with --no-draft, any gamma, and any drafter.

Greedy decoding is the temp -> 0 limit: argmax of the penalized logits.
Everything is vectorized over the candidates; nothing loops over the vocabulary in Python.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import numpy as np

from runtime.config import SamplingConfig
from runtime.penalties import Breakers, Penalties

_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def _mix64(x: int) -> int:
    """splitmix64's finalizer on a Python int (a bijection on 64-bit words)."""
    x = ((x ^ (x >> 30)) * _M1) & _MASK
    x = ((x ^ (x >> 27)) * _M2) & _MASK
    return x ^ (x >> 31)


def gumbel_noise(seed: int, position: int, tokens: np.ndarray) -> np.ndarray:
    """G(seed, position, x) for each token id x: i.i.d. Gumbel(0, 1) from a counter-based
    hash, so any subset of the vocabulary can be drawn in any order with the same values.

    u = (top 53 bits of splitmix64(key(seed, position) + x * golden) + 0.5) / 2^53 in (0, 1),
    G = -log(-log u).
    """
    key = np.uint64(_mix64((seed * _GOLDEN + position) & _MASK))
    # uint64 array arithmetic wraps modulo 2^64, which is what the hash wants
    x = np.asarray(tokens, dtype=np.uint64) * np.uint64(_GOLDEN) + key
    x = (x ^ (x >> np.uint64(30))) * np.uint64(_M1)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(_M2)
    x ^= x >> np.uint64(31)
    u = ((x >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
    return -np.log(-np.log(u))


class Sampler:
    """Applies one ``SamplingConfig`` to logit rows and makes coupled draws.

    Args:
        cfg: the sampling settings; ``cfg.seed`` None picks a random seed once, so one
            engine's answers are still reproducible from ``self.seed``.
        breakers: DRY's sequence breakers as tokens, for a tuple of breaker strings (the
            model's vocabulary decides them); needed only for settings with DRY on.
    """

    def __init__(self, cfg: SamplingConfig,
                 breakers: Callable[[tuple[str, ...]], Breakers] | None = None):
        self.breakers = breakers
        self.seed = cfg.seed if cfg.seed is not None else int.from_bytes(os.urandom(4), "little")
        self.reconfigure(cfg)

    def reconfigure(self, cfg: SamplingConfig) -> None:
        """New settings for the following draws (a server request's own temperature, ...).
        The seed follows ``cfg.seed`` when it names one."""
        self.cfg = cfg
        self.penalties = Penalties.of(cfg, self.breakers)
        if cfg.seed is not None:
            self.seed = cfg.seed

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no penalty: a token is the plain argmax of its logits row, which
        llama.cpp can take itself (``LlamaContext.eval_argmax``)."""
        return self.cfg.greedy and self.penalties is None

    @property
    def history_window(self) -> int:
        """How many recent tokens the filters look at (only the penalties do), so callers
        pass that tail rather than copy the whole sequence every step."""
        return self.penalties.window if self.penalties is not None else 0

    def penalized(self, logits: np.ndarray, history: Sequence[int]) -> np.ndarray:
        """A float64 copy of one logits row with the penalties for the token after
        ``history`` applied (``runtime.penalties``)."""
        row = logits.astype(np.float64)
        if self.penalties is not None:
            self.penalties.apply(row, history)
        return row

    def argmax(self, logits: np.ndarray, history: Sequence[int]) -> int:
        if self.penalties is None:
            return int(np.argmax(logits))
        return int(np.argmax(self.penalized(logits, history)))

    def candidates(self, logits: np.ndarray, history: Sequence[int],
                   allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(token ids the filters keep, their logits / temp), after penalty, top-k, top-p
        and min-p in llama.cpp's order. ``allowed`` (bool [n_vocab]) is a constraint's
        mask, applied first: the filters then see only the allowed tokens."""
        cfg = self.cfg
        # without a penalty the row is read in place (float32): only the kept candidates
        # are widened to float64, the same values the full copy would give
        row = logits if self.penalties is None else self.penalized(logits, history)
        if allowed is None:
            cand = top_k_ids(row, cfg.top_k)
        else:
            # the filters run on the allowed subset, so top-k never fills up with
            # forbidden tokens and no -inf reaches the softmax
            ids = np.flatnonzero(allowed)
            cand = ids[top_k_ids(row[ids], cfg.top_k)]
        z = row[cand].astype(np.float64)
        if cfg.top_p < 1.0 or cfg.min_p > 0.0:
            # top-p and min-p judge the untempered softmax, as llama.cpp does
            p = np.exp(z - z.max())
            p /= p.sum()
            keep = np.ones(cand.size, dtype=bool)
            if cfg.top_p < 1.0:
                order = np.argsort(-p, kind="stable")
                cum = np.cumsum(p[order])
                # smallest prefix whose mass reaches top_p (always at least one token)
                n_keep = int(np.searchsorted(cum, cfg.top_p) + 1)
                keep[order[n_keep:]] = False
            if cfg.min_p > 0.0:
                keep &= p >= cfg.min_p * p.max()
            cand, z = cand[keep], z[keep]
        return cand, z / (cfg.temp if cfg.temp > 0 else 1.0)

    def probs(self, logits: np.ndarray, history: Sequence[int],
              allowed: np.ndarray | None = None) -> np.ndarray:
        """The dense filtered distribution p [n_vocab] that ``choose`` draws from."""
        cand, z = self.candidates(logits, history, allowed)
        out = np.zeros(logits.shape[-1], dtype=np.float64)
        e = np.exp(z - z.max())
        out[cand] = e / e.sum()
        return out

    def choose(self, logits: np.ndarray, history: Sequence[int], position: int,
               allowed: np.ndarray | None = None) -> int:
        """The token at absolute ``position``: greedy argmax, or the coupled draw
        argmax(z / temp + G(seed, position, x)) over the filtered candidates x; with a
        constraint's ``allowed`` mask, among the allowed tokens only."""
        if self.cfg.greedy and allowed is None:
            return self.argmax(logits, history)
        if self.cfg.greedy:
            ids = np.flatnonzero(allowed)
            row = logits if self.penalties is None else self.penalized(logits, history)
            return int(ids[np.argmax(row[ids])])
        cand, z = self.candidates(logits, history, allowed)
        return int(cand[np.argmax(z + gumbel_noise(self.seed, position, cand))])


def top_k_ids(row: np.ndarray, k: int) -> np.ndarray:
    """Ids of the k largest entries of ``row`` (all of them when k is 0 or >= its size).

    A full argpartition of a 50k vocabulary costs ~0.2 ms, 1-2% of a small model's
    step, and it ran once per sampled token. The top k all lie within some distance
    ``width`` of the maximum, so the ids within ``width`` are gathered first (widening
    until there are k of them) and only those are partitioned: the same set, for the
    price of one comparison pass over the row.
    """
    if not 0 < k < row.size:
        return np.arange(row.size)
    top, width = row.max(), 8.0
    while width < 1e4:
        near = np.flatnonzero(row >= top - width)
        if near.size >= k:
            return near if near.size == k else near[np.argpartition(row[near], -k)[-k:]]
        width *= 2.0
    # logits spread over more than 1e4 (or NaN): the plain way
    return np.argpartition(row, -k)[-k:]


def top1_prob(logits: np.ndarray) -> float:
    """Softmax probability of the top token: 1 / sum(exp(l - max))."""
    row = logits.astype(np.float64)
    return float(1.0 / np.exp(row - row.max()).sum())


def verify(sampler: Sampler, target_rows: np.ndarray, drafts: Sequence[int],
           history: list[int], position: int, constraint=None,
           masks: list[np.ndarray] | None = None) -> tuple[int, int]:
    """Keep drafts while each equals the target's own choice; exact for greedy and for
    coupled sampling alike.

    Args:
        target_rows: [len(drafts) + 1, n_vocab]; row i is the target's prediction for the
            token after history + drafts[:i], i.e. for absolute position ``position + i``.
        drafts: the drafted tokens.
        history: the recent tokens before row 0 (``Sampler.history_window`` of them; the
            penalties read them, and row i's are ``history + drafts[:i]``).
        position: absolute position of the token that row 0 predicts.
        constraint: a ``runtime.constraint.Constraint`` that has consumed everything
            before row 0 (drafts already cut to what it accepts). Row i is then masked by
            its state after drafts[:i], and every emitted token is consumed.
        masks: when given, the mask each emitted token was chosen under is appended.

    Returns:
        (number of drafts accepted, the target's own next token after them).
    """
    if constraint is not None:
        return _verify_constrained(sampler, target_rows, drafts, history, position,
                                   constraint, masks)
    if sampler.plain_greedy:
        # one vectorized argmax over every row
        return accept_prefix(np.argmax(target_rows, axis=1).tolist(), drafts)
    n_acc = 0
    while True:
        tok = sampler.choose(target_rows[n_acc], history + list(drafts[:n_acc]),
                             position + n_acc)
        if n_acc == len(drafts) or tok != drafts[n_acc]:
            return n_acc, tok
        n_acc += 1


def accept_prefix(choices: Sequence[int], drafts: Sequence[int]) -> tuple[int, int]:
    """The verify rule on the target's own choices: ``choices[i]`` is its token after
    drafts[:i] (len(drafts) + 1 of them). Keep the longest prefix of ``drafts`` equal to
    them, then the target's next choice: (number accepted, that token)."""
    n_acc = 0
    while n_acc < len(drafts) and choices[n_acc] == drafts[n_acc]:
        n_acc += 1
    return n_acc, int(choices[n_acc])


def _verify_constrained(sampler: Sampler, rows: np.ndarray, drafts: Sequence[int],
                        history: list[int], position: int, constraint,
                        masks: list[np.ndarray] | None) -> tuple[int, int]:
    """``verify`` under a grammar: row by row, because row i's mask is the grammar's state
    after drafts[:i]; only the rows actually judged cost a mask. Stops early where the
    grammar is complete (a draft that finishes the answer is then the last token)."""
    plain_greedy = sampler.plain_greedy
    n_acc = 0
    while True:
        row = rows[n_acc]
        tok = int(np.argmax(row)) if plain_greedy and masks is None else -1
        # the target's top token is usually allowed: then it is the masked argmax too
        if tok < 0 or not constraint.allows(tok):
            allowed = constraint.allowed()
            if masks is not None:
                masks.append(allowed)
            tok = sampler.choose(row, history + list(drafts[:n_acc]), position + n_acc,
                                 allowed)
        constraint.consume(tok)
        if n_acc == len(drafts) or tok != drafts[n_acc] or constraint.done:
            return n_acc, tok
        n_acc += 1


def logprobs(row: np.ndarray, token: int, n_top: int, allowed: np.ndarray | None = None
             ) -> tuple[float, list[tuple[int, float]]]:
    """The target's log-probability of ``token`` and its ``n_top`` most likely tokens, from
    the softmax of the raw logits (before temperature and the sampling filters), over the
    ``allowed`` tokens when a constraint masked the row."""
    ids = np.flatnonzero(allowed) if allowed is not None else None
    z = (row[ids] if ids is not None else row).astype(np.float64)
    top = z.max()
    lse = top + np.log(np.exp(z - top).sum())
    lp_tok = float(row[token]) - lse
    out: list[tuple[int, float]] = []
    if n_top > 0:
        k = min(n_top, z.size)
        part = np.argpartition(-z, k - 1)[:k]
        part = part[np.argsort(-z[part], kind="stable")]
        toks = ids[part] if ids is not None else part
        out = [(int(t), float(z[i] - lse)) for t, i in zip(toks, part, strict=True)]
    return float(lp_tok), out
