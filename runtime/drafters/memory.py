"""A drafting memory shared across requests: earlier prompts and answers as a draft source.

A server sees the same system prompts, boilerplate and answers again and again. The memory
stores finished token sequences and drafts by frequency, like SuffixDecoding: find the
longest suffix of the current sequence (up to ``n_match_max`` tokens) that occurred in the
memory, then walk forward choosing at each position the most frequent next token among
all stored occurrences of the context walked so far, while that token's share of the
occurrences stays >= ``min_share`` and its count >= ``min_count``. Draft length therefore
adapts: a context that was always followed by the same text drafts all of it; a context
with many continuations drafts nothing.

Index layout (per scope). Stored sequences are concatenated into one int32 buffer, each
followed by a -1 separator. Every position p is keyed by its *reversed* context (tokens p,
p-1, ..., p-n_match_max+1, each as token+1, 0 before the sequence start), 3 tokens of 21
bits per int64 column. Sorted lexicographically, the positions whose last m tokens equal a
query form one range for every m: one ``searchsorted`` per column finds it. New sequences
go to a small "fresh" segment; when it, or the evicted entries, pass a quarter of the main
segment, all is rebuilt into one (amortized O(log n) per token). Evicted sequences are
masked out at once and leave the arrays at the next rebuild.

Bytes per stored token: 4 (buffer) + 1 (alive mask) + 8 (position) + 8 per key column
(3 for ``n_match_max=8``) = 37, up to ~1.5x that with fresh and evicted entries awaiting a
rebuild, plus ~45 transiently while a rebuild sorts: the default bound, 1,000,000 tokens,
holds ~40-60 MB and peaks below ~110 MB.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np

from runtime.drafting import Draft, DraftCost

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 1_000_000
N_MATCH_MAX = 8
N_MIN = 2           # a single shared token is too weak a context across many requests
MIN_SHARE = 0.5     # stop drafting where the best next token wins less than this share
MIN_COUNT = 1       # ... or was seen fewer times than this
MAX_SUPPORT = 128   # occurrences examined per context (an even sample beyond that)

FORMAT = "bridge-draft-memory"
FORMAT_VERSION = 1
_BITS = 21                      # bits per token in a key column
_PER_COL = 3                    # tokens per int64 column (63 bits)
MAX_TOKEN_ID = (1 << _BITS) - 3  # token+1 and the range bound token+2 must fit a field
_FRESH_MIN = 16_384             # entries a segment may hold before a rebuild is weighed
_HEAD = 16                      # leading tokens that key the superseded-prefix check


class _Segment:
    """Positions sorted by their reversed-context keys: (pos, cols) of equal length."""

    def __init__(self, pos: np.ndarray, cols: list[np.ndarray]):
        order = np.lexsort(cols[::-1])  # lexsort's primary key is the last one
        self.pos = pos[order]
        self.cols = [c[order] for c in cols]

    def __len__(self) -> int:
        return len(self.pos)

    def longest(self, bounds: list[list[int]]) -> tuple[int, int, int]:
        """(m, lo, hi): the longest m such that positions [lo, hi) end with the context;
        m = 0 when none does. ``bounds[c]`` holds the key ranges of the context's first
        1, 2, 3 tokens within column c (see ``_bounds``).

        Each column holds 3 tokens, so a full match costs one binary search per column;
        only the column where the match ends tries shorter prefixes of itself.
        """
        lo, hi, m = 0, len(self.pos), 0
        for c, chunk in enumerate(bounds):
            col = self.cols[c][lo:hi]  # all earlier columns are equal in [lo, hi)
            # the k-token ranges are nested: one call finds all of them
            edges = col.searchsorted(chunk).tolist()
            k = n_tok = len(chunk) // 2
            while k and edges[2 * k - 2] == edges[2 * k - 1]:
                k -= 1
            if not k:
                return m, lo, hi
            lo, hi, m = lo + edges[2 * k - 2], lo + edges[2 * k - 1], c * _PER_COL + k
            if k < n_tok:
                break
        return m, lo, hi


def _bounds(fields: list[int]) -> list[list[int]]:
    """Per column: [key_1, end_1, key_2, end_2, ...] where [key_k, end_k) holds the keys
    whose first k tokens are those of ``fields`` (token d back has ``fields[d]``)."""
    out = []
    for c in range(0, len(fields), _PER_COL):
        key, chunk = 0, []
        for r, field in enumerate(fields[c:c + _PER_COL]):
            shift = (_PER_COL - 1 - r) * _BITS
            key |= field << shift
            chunk += [key, key + (1 << shift)]
        out.append(chunk)
    return out


def _entries(buf: np.ndarray, start: int, n_cols: int, n_depth: int
             ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Positions and key columns for every token in ``buf[start:]`` (which begins at a
    sequence start; separators are -1)."""
    b = buf[start:].astype(np.int64)
    pos = np.flatnonzero(b >= 0)
    seq = np.cumsum(b < 0)  # which sequence a position belongs to
    cols = []
    for c in range(n_cols):
        key = np.zeros(len(pos), dtype=np.int64)
        for r in range(_PER_COL):
            d = c * _PER_COL + r
            if d >= n_depth:
                break
            src = pos - d
            ok = src >= 0
            src = np.where(ok, src, 0)
            ok &= (seq[src] == seq[pos]) & (b[src] >= 0)
            key |= np.where(ok, b[src] + 1, 0) << ((_PER_COL - 1 - r) * _BITS)
        cols.append(key)
    return pos + start, cols


class _Scope:
    """The sequences of one scope and their index."""

    def __init__(self, n_depth: int):
        self.n_depth = n_depth
        self.n_cols = -(-n_depth // _PER_COL)
        self.buf = np.empty(1024, dtype=np.int32)
        self.alive = np.zeros(1024, dtype=bool)
        self.n = 0                                    # used length of buf
        self.seqs: dict[int, tuple[int, int]] = {}    # seq id -> (start, length)
        self.heads: dict[tuple[int, ...], list[int]] = {}
        self.main = self.fresh = self._empty()
        self.n_dead = 0

    def _empty(self) -> _Segment:
        return _Segment(np.empty(0, np.int64), [np.empty(0, np.int64)] * self.n_cols)

    def nbytes(self) -> int:
        segs = sum(s.pos.nbytes + sum(c.nbytes for c in s.cols) for s in (self.main, self.fresh))
        return self.buf.nbytes + self.alive.nbytes + segs

    def add(self, seq_id: int, tokens: np.ndarray, index: bool = True) -> None:
        need = self.n + len(tokens) + 1
        if need > len(self.buf):
            cap = max(need, 2 * len(self.buf))
            self.buf = np.resize(self.buf, cap)
            self.alive = np.concatenate([self.alive[:self.n], np.zeros(cap - self.n, bool)])
        start = self.n
        self.buf[start:start + len(tokens)] = tokens
        self.buf[start + len(tokens)] = -1
        self.alive[start:start + len(tokens) + 1] = True
        self.n = need
        self.seqs[seq_id] = (start, len(tokens))
        self.heads.setdefault(tuple(tokens[:_HEAD].tolist()), []).append(seq_id)
        if index:
            pos, cols = _entries(self.buf[:self.n], start, self.n_cols, self.n_depth)
            fresh = self.fresh
            self.fresh = _Segment(np.concatenate([fresh.pos, pos]),
                                  [np.concatenate(p) for p in zip(fresh.cols, cols, strict=True)])
            self._maybe_rebuild()

    def prefixes_of(self, tokens: np.ndarray) -> list[int]:
        """Stored sequences that ``tokens`` starts with (a chat's earlier turns)."""
        # a sequence's head key is its first min(len, _HEAD) tokens: try every such head
        head = tokens[:_HEAD].tolist()
        out = []
        for k in range(1, len(head) + 1):
            for sid in self.heads.get(tuple(head[:k]), ()):
                start, length = self.seqs[sid]
                if length <= len(tokens) and np.array_equal(self.buf[start:start + length],
                                                             tokens[:length]):
                    out.append(sid)
        return out

    def remove(self, seq_id: int) -> int:
        start, length = self.seqs.pop(seq_id)
        head = tuple(self.buf[start:start + min(length, _HEAD)].tolist())
        self.heads[head].remove(seq_id)
        if not self.heads[head]:
            del self.heads[head]
        self.alive[start:start + length + 1] = False
        self.n_dead += length
        self._maybe_rebuild()
        return length

    def _maybe_rebuild(self) -> None:
        limit = max(_FRESH_MIN, len(self.main) // 4)
        if len(self.fresh) > limit or self.n_dead > limit:
            self.rebuild()

    def rebuild(self) -> None:
        """Compact the buffer to the live sequences and index them as one segment."""
        order = sorted(self.seqs.items(), key=lambda kv: kv[1][0])
        parts, seqs, at = [], {}, 0
        for sid, (start, length) in order:
            parts.append(self.buf[start:start + length + 1])
            seqs[sid] = (at, length)
            at += length + 1
        self.buf = np.concatenate(parts) if parts else np.empty(1024, np.int32)
        self.alive = np.arange(len(self.buf)) < at
        self.n, self.seqs, self.n_dead = at, seqs, 0
        pos, cols = _entries(self.buf[:at], 0, self.n_cols, self.n_depth)
        self.main, self.fresh = _Segment(pos, cols), self._empty()

    def match(self, context: list[int], n_min: int) -> tuple[np.ndarray, int]:
        """Live positions ending the longest stored match of ``context``'s suffix, and m."""
        fields = []
        for tok in reversed(context[-self.n_depth:]):
            if not 0 <= tok <= MAX_TOKEN_ID:
                break  # such a token was never stored
            fields.append(tok + 1)
        segs = [seg for seg in (self.main, self.fresh) if len(seg)]
        while len(fields) >= n_min:
            bounds = _bounds(fields)
            found = [(seg, seg.longest(bounds)) for seg in segs]
            m = max((r[0] for _, r in found), default=0)
            if m < n_min:
                break
            parts = [seg.pos[lo:hi] for seg, (mm, lo, hi) in found if mm == m]
            pos = np.concatenate(parts) if len(parts) > 1 else parts[0]
            if len(pos) > MAX_SUPPORT:  # sample before the live check, which costs O(pos)
                sample = pos[::len(pos) // MAX_SUPPORT]
                sample = sample[self.alive[sample]]
                if len(sample):
                    return sample, m
            pos = pos[self.alive[pos]]
            if len(pos):
                return pos, m
            fields = fields[:m - 1]  # every occurrence was evicted: try a shorter context
        return np.empty(0, np.int64), 0

    def walk(self, pos: np.ndarray, n_max: int, min_share: float, min_count: int
             ) -> list[int]:
        """Most frequent continuation of the occurrences ``pos``, token by token."""
        if len(pos) > MAX_SUPPORT:
            pos = pos[::-(-len(pos) // MAX_SUPPORT)]  # an even sample keeps the shares
        # rows[i][j]: token j + 1 after occurrence i; -1 ends its sequence, and the clip
        # only touches entries past that -1 (the buffer ends with a separator). At most
        # MAX_SUPPORT x n_max small ints: plain Python beats numpy's per-call overhead.
        idx = np.minimum(pos[:, None] + np.arange(1, n_max + 1), self.n - 1)
        rows = self.buf[idx].tolist()
        out: list[int] = []
        for j in range(n_max):
            if len(rows) < min_count:
                break
            first = rows[0][j]
            if all(r[j] == first for r in rows):  # the common case: share 1
                if first < 0:
                    break
                out.append(first)
                continue
            # occurrences at a sequence's end (-1) have no next token
            counts = Counter(r[j] for r in rows if r[j] >= 0)
            if not counts:
                break
            best = max(counts.values())
            tok = min(t for t, c in counts.items() if c == best)  # ties: smallest id
            if best < min_count or best < min_share * sum(counts.values()):
                break
            out.append(tok)
            rows = [r for r in rows if r[j] == tok]  # the occurrences that continue so
        return out


class DraftMemory:
    """Bounded store of finished token sequences, grouped by scope, that drafts by
    frequency. Thread-safe: ``add`` and lookups may come from different threads.

    Args:
        max_tokens: most tokens stored across all scopes; the oldest sequences go first.
        n_match_max: longest context compared.
        n_min: shortest context match that drafts.
        min_share: the walk stops where the best next token has a smaller share.
        min_count: ... or fewer occurrences than this.
    """

    def __init__(self, max_tokens: int = DEFAULT_MAX_TOKENS, n_match_max: int = N_MATCH_MAX,
                 n_min: int = N_MIN, min_share: float = MIN_SHARE, min_count: int = MIN_COUNT):
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if not 1 <= n_min <= n_match_max:
            raise ValueError(f"need 1 <= n_min <= n_match_max, got {n_min}, {n_match_max}")
        self.max_tokens, self.n_match_max, self.n_min = max_tokens, n_match_max, n_min
        self.min_share, self.min_count = min_share, min_count
        self._scopes: dict[str, _Scope] = {}
        self._order: OrderedDict[int, str] = OrderedDict()  # live seq id -> scope, oldest first
        self._next_id = self._n_tokens = 0
        self._lock = threading.RLock()  # a server adds and drafts from several threads

    @property
    def n_tokens(self) -> int:
        """Tokens currently stored, all scopes together."""
        return self._n_tokens

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers and indexes."""
        with self._lock:
            return sum(s.nbytes() for s in self._scopes.values())

    def add(self, tokens: list[int], scope: str = "") -> None:
        """Store one finished sequence (a whole prompt + answer).

        A stored sequence of the same scope that ``tokens`` starts with (the previous turn
        of the same chat) is replaced, so a conversation is stored once, not once per turn.
        A sequence longer than ``max_tokens`` keeps its last ``max_tokens`` tokens.

        Args:
            tokens: token ids, each in 0..MAX_TOKEN_ID.
            scope: requests draft only from sequences of their own scope.
        """
        arr = np.asarray(tokens, dtype=np.int64)[-self.max_tokens:]
        if not len(arr):
            return
        if arr.min() < 0 or arr.max() > MAX_TOKEN_ID:
            raise ValueError(f"token ids must lie in 0..{MAX_TOKEN_ID}")
        with self._lock:
            self._add(arr.astype(np.int32), scope, index=True)

    def _add(self, arr: np.ndarray, scope: str, index: bool) -> None:
        sc = self._scopes.get(scope)
        if sc is None:
            sc = self._scopes[scope] = _Scope(self.n_match_max)
        for sid in sc.prefixes_of(arr):
            self._n_tokens -= sc.remove(sid)
            del self._order[sid]
        sid, self._next_id = self._next_id, self._next_id + 1
        sc.add(sid, arr, index=index)
        self._order[sid] = scope
        self._n_tokens += len(arr)
        while self._n_tokens > self.max_tokens:
            old, old_scope = self._order.popitem(last=False)
            self._n_tokens -= self._scopes[old_scope].remove(old)
            if not self._scopes[old_scope].seqs:
                del self._scopes[old_scope]

    def lookup(self, context: list[int], n_max: int, scope: str = "") -> tuple[list[int], int]:
        """The most frequent stored continuation of ``context``.

        Args:
            context: the current sequence (only its last ``n_match_max`` tokens are read).
            n_max: most tokens to return.
            scope: only sequences added with this scope are used.

        Returns:
            (tokens, m): up to ``n_max`` tokens and the length of the context match
            (0 and no tokens when fewer than ``n_min`` tokens match).
        """
        if n_max <= 0:
            return [], 0
        with self._lock:
            sc = self._scopes.get(scope)
            if sc is None:
                return [], 0
            pos, m = sc.match(context[-self.n_match_max:], self.n_min)
            if not m:
                return [], 0
            return sc.walk(pos, n_max, self.min_share, self.min_count), m

    def save(self, path: str | Path, fingerprint: str) -> None:
        """Write the memory atomically (a temp file in the same folder, then a rename).

        Args:
            path: the ``.npz`` file to write.
            fingerprint: names what the token ids mean (e.g. the model's sha256); ``load``
                refuses a file with another one.
        """
        path = Path(path)
        with self._lock:
            names = sorted(self._scopes)
            ids = {name: i for i, name in enumerate(names)}
            spans = [(self._scopes[scope], *self._scopes[scope].seqs[sid], ids[scope])
                     for sid, scope in self._order.items()]  # oldest first
            seqs = [sc.buf[start:start + length] for sc, start, length, _ in spans]
        lengths, scope_ids = [s[2] for s in spans], [s[3] for s in spans]
        header = {"format": FORMAT, "version": FORMAT_VERSION, "fingerprint": fingerprint}
        arrays = {
            "header": np.array(json.dumps(header)),
            "tokens": np.concatenate(seqs) if seqs else np.empty(0, np.int32),
            "lengths": np.array(lengths, dtype=np.int64),
            "scope_ids": np.array(scope_ids, dtype=np.int32),
            "scopes": np.array(names, dtype=str),
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path, fingerprint: str,
             max_tokens: int = DEFAULT_MAX_TOKENS, **kwargs) -> DraftMemory:
        """Read a memory written by ``save``; never raises for a bad file.

        Args:
            path: the file ``save`` wrote.
            fingerprint: must equal the one it was saved with.
            max_tokens: the bound of the returned memory (the oldest sequences beyond it
                are dropped); further keyword arguments go to ``DraftMemory``.

        Returns:
            The stored memory, or an empty one (with one warning logged) when the file is
            missing, corrupt, of another format version or of another fingerprint.
        """
        memory = cls(max_tokens, **kwargs)
        if not Path(path).exists():
            log.warning("draft memory %s does not exist yet; the server starts with an empty "
                        "memory", path)
            return memory
        if not _is_memory_file(path):
            # say plainly what the file is not, rather than what numpy guessed it was
            log.warning("%s is not a bridge drafting-memory file (damaged, or something "
                        "else); the server starts with an empty memory and will replace the "
                        "file at its next save", path)
            return memory
        try:
            with np.load(path, allow_pickle=False) as z:
                header = json.loads(str(z["header"]))
                if header.get("format") != FORMAT or header.get("version") != FORMAT_VERSION:
                    raise ValueError(f"format {header.get('format')!r} version "
                                     f"{header.get('version')!r}, expected {FORMAT!r} "
                                     f"version {FORMAT_VERSION}")
                if header.get("fingerprint") != fingerprint:
                    raise ValueError("it was saved for another model (fingerprint "
                                     f"{header.get('fingerprint')!r}, expected {fingerprint!r})")
                tokens, lengths = z["tokens"], z["lengths"]
                scope_ids, names = z["scope_ids"], [str(s) for s in z["scopes"]]
            if lengths.sum() != len(tokens) or len(scope_ids) != len(lengths) or \
                    (len(lengths) and lengths.min() < 1) or \
                    (len(tokens) and (tokens.min() < 0 or tokens.max() > MAX_TOKEN_ID)):
                raise ValueError("inconsistent arrays")
            ends = np.cumsum(lengths)
            # only the newest sequences that fit are read, so none is evicted while loading
            first = len(lengths)
            while first and ends[-1] - ends[first - 1] + lengths[first - 1] <= max_tokens:
                first -= 1
            with memory._lock:
                # index once at the end, not once per sequence
                for i in range(first, len(lengths)):
                    seq = tokens[ends[i] - lengths[i]:ends[i]].astype(np.int32)
                    memory._add(seq, names[scope_ids[i]], index=False)
                for sc in memory._scopes.values():
                    sc.rebuild()
        except Exception as e:  # noqa: BLE001 - a bad cache file must never stop a server
            log.warning("draft memory %s not loaded (%s); the server starts with an empty "
                        "memory", path, e)
            return cls(max_tokens, **kwargs)
        return memory


def _is_memory_file(path: str | Path) -> bool:
    """Whether ``path`` is an npz holding a JSON header of bridge's format (any version
    and model: those are told apart with their own message)."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return json.loads(str(z["header"])).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - any failure means "not ours"
        return False


class MemoryDrafter:
    """Drafter protocol view of a ``DraftMemory`` for one request.

    The request's own tokens are not in the memory until the engine adds the finished
    sequence; a ``LookupDrafter`` covers those. Lookups read only the last
    ``n_match_max`` tokens, so there is no per-request state to roll back.

    Args:
        memory: the shared memory.
        scope: the requester's scope (e.g. an API-key hash); "" when there is one.
    """

    source = "memory"
    cost = DraftCost.FREE

    def __init__(self, memory: DraftMemory, scope: str = ""):
        self.memory = memory
        self.scope = scope

    def propose(self, tokens: list[int], n_max: int, p_min: float) -> Draft:
        """Up to ``n_max`` tokens of the most frequent stored continuation.

        Args:
            tokens: the whole sequence so far.
            n_max: most tokens to draft.
            p_min: ignored; shares are already thresholded by the memory.

        Returns:
            ``Draft(source="memory", match_len=m)``.
        """
        start = time.perf_counter()
        out, m = self.memory.lookup(tokens[-self.memory.n_match_max:], n_max, self.scope)
        return Draft(tokens=out, source=self.source, match_len=m,
                     seconds=time.perf_counter() - start)

    def time_step(self) -> float:
        return 0.0

    def rollback(self, n_keep: int) -> None:
        pass

    def reset(self) -> None:
        pass
