"""Owners for llama.cpp's native objects, through llama-cpp-python's low-level API.

``LlamaModel`` owns a ``llama_model`` (weights + vocabulary); ``LlamaContext`` owns a
``llama_context`` (KV cache) and the ``llama_batch`` it evaluates. Both free what they own
in ``close()`` and turn C return codes into exceptions that name the value. Logits are read
through zero-copy numpy views of llama.cpp's own output buffer, and only the rows asked for
are computed at all.

This module never imports torch or transformers.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from runtime.native import cpu_facts, usable_cores

log = logging.getLogger(__name__)
_native_log = logging.getLogger("bridge.llama_cpp")

_GGML_LOG_ERROR = 4  # ggml_log_level: 0 none, 1 debug, 2 info, 3 warn, 4 error, 5 cont


@llama_cpp.llama_log_callback
def _route_native_log(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
    # llama.cpp chats a lot on load; route it through logging instead of raw stderr.
    # Only its errors stay visible by default: its warnings are not things users can act on.
    lvl = logging.ERROR if level == _GGML_LOG_ERROR else logging.DEBUG
    if _native_log.isEnabledFor(lvl):
        _native_log.log(lvl, text.decode("utf-8", "replace").rstrip())


llama_cpp.llama_log_set(_route_native_log, ctypes.c_void_p(0))
llama_cpp.llama_backend_init()


class ContextFullError(RuntimeError):
    """The KV cache has no room for the tokens being evaluated."""


# llama.cpp's AMX extra buffer type (bundled with llama-cpp-python 0.3.36) segfaults in
# ggml_backend_amx_mul_mat on multi-token batches, so on AMX CPUs the extra buffer types
# (AMX and weight repacking) stay off; elsewhere they stay on for their speed.
_USE_EXTRA_BUFTS = "amx_int8" not in cpu_facts()[1]


def llama_cpp_version() -> str:
    """The llama-cpp-python version (it pins the llama.cpp build it bundles)."""
    return str(getattr(llama_cpp, "__version__", "unknown"))


class LlamaModel:
    """A loaded GGUF: weights and vocabulary.

    Args:
        path: the ``.gguf`` file.
        n_gpu_layers: layers to offload; -1 means all of them when the build has a GPU
            backend (and is harmless on CPU-only builds).
        vocab_only: load only the vocabulary and metadata (fast; for tokenizing).
        repack: let llama.cpp repack weights for its CPU gemm kernels (faster; off in
            exact mode, where a repacked matrix takes a different kernel for a 4-row
            group than for a leftover row, so a row's result depends on its batch).
        devices: a ``runtime.rpc.RpcDevices``: offload to those RPC workers (and this
            machine's GPUs) instead of every registered device.
    """

    def __init__(self, path: str | Path, n_gpu_layers: int = -1, vocab_only: bool = False,
                 repack: bool = True, devices=None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = 2**31 - 1 if n_gpu_layers < 0 else n_gpu_layers
        params.vocab_only = vocab_only
        params.use_extra_bufts = _USE_EXTRA_BUFTS and repack
        # params.devices points into this array: it must live until the load returns
        device_array = devices.for_model(params) if devices is not None else None
        self._model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        del device_array
        if not self._model:
            raise ValueError(f"llama.cpp could not load {self.path}: not a valid GGUF, "
                             "or an architecture this llama.cpp build does not know")
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_vocab: int = llama_cpp.llama_vocab_n_tokens(self._vocab)
        self._pieces: dict[int, bytes] = {}  # token_bytes(): token (or -1 - token) -> bytes
        self._eog: dict[int, bool] = {}
        self.n_layer: int = llama_cpp.llama_model_n_layer(self._model)
        self.n_ctx_train: int = llama_cpp.llama_model_n_ctx_train(self._model)

    @property
    def ptr(self) -> llama_cpp.llama_model_p:
        if not self._model:
            raise RuntimeError(f"model {self.path} is closed")
        return self._model

    @property
    def vocab(self) -> llama_cpp.llama_vocab_p:
        """The vocabulary handle (for libraries that read it, such as llguidance)."""
        self.ptr  # noqa: B018 - raises on a closed model
        return self._vocab

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False
                 ) -> list[int]:
        """Text -> token ids, exactly as llama.cpp tokenizes it."""
        return self.tokenize_bytes(text.encode("utf-8"), add_special, parse_special)

    def tokenize_bytes(self, data: bytes, add_special: bool = False,
                       parse_special: bool = False) -> list[int]:
        """Bytes -> token ids (bytes that may end inside a UTF-8 character, as DRY's
        sequence breakers cut at a token's edge)."""
        cap = len(data) + 8
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap,
                                     add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            cap = -n
            buf = (llama_cpp.llama_token * cap)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buf, cap,
                                         add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize returned {n} for a {len(data)}-byte text")
        return list(buf[:n])

    def token_bytes(self, token: int, special: bool = False) -> bytes:
        """One token's bytes (a token may hold part of a UTF-8 character). The vocabulary
        never changes, so each token is asked of llama.cpp once (this runs per emitted
        token)."""
        key = token if special else -1 - token
        piece = self._pieces.get(key)
        if piece is None:
            piece = self._pieces[key] = self._token_bytes(token, special)
        return piece

    def _token_bytes(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, special)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int], special: bool = False) -> str:
        return b"".join(self.token_bytes(t, special) for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        """End of generation (EOS, EOT, <|im_end|>, ...), as the GGUF declares it."""
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self._vocab, token))
        return eog

    def meta(self, key: str) -> str | None:
        """A GGUF metadata value rendered as a string, or None when absent."""
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        if n < 0:
            return None
        if n >= len(buf):
            buf = ctypes.create_string_buffer(n + 1)
            llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace")

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token takes in an F16 KV cache: K and V of every layer (key and value
        widths from the GGUF, else n_embd / n_head per head; sliding-window layers are
        counted whole, so this is an upper bound for them)."""
        if self.n_layer == 0:
            raise ValueError(f"{self.path.name} was opened for its vocabulary only; its "
                             "cache size needs the whole model")
        m = self.ptr
        arch = self.meta("general.architecture") or ""
        n_head = max(llama_cpp.llama_model_n_head(m), 1)
        n_head_kv = llama_cpp.llama_model_n_head_kv(m) or n_head
        head = llama_cpp.llama_model_n_embd(m) // n_head
        k = int(self.meta(f"{arch}.attention.key_length") or head)
        v = int(self.meta(f"{arch}.attention.value_length") or head)
        return self.n_layer * n_head_kv * (k + v) * 2

    def chat_template(self) -> str | None:
        tmpl = llama_cpp.llama_model_chat_template(self.ptr, None)
        return tmpl.decode("utf-8") if tmpl else None

    def close(self) -> None:
        if self._model:
            llama_cpp.llama_model_free(self._model)
            self._model = None

    def __enter__(self) -> LlamaModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a safety net only; owners call close()
        if getattr(self, "_model", None):
            self.close()


# ggml_type ids (ggml.h) of the KV cache types exact mode may choose
_KV_TYPES = {"f16": 1, "f32": 0}


@dataclass(frozen=True)
class Numerics:
    """How llama.cpp computes a batch, where that decides whether a row's logits depend on
    the other rows in its batch.

    On CPUs, a one-row matrix product takes ggml's vec_dot kernels and a product of two or
    more rows takes llamafile's tinyBLAS (for F16/F32/BF16/Q8_0/Q4_0/Q5_0 matrices, the KV
    cache included), whose sums run in another order; repacked weights take a 4-row gemm
    for full groups of four and a gemv for the rest; flash attention tiles batches of
    queries. So by default a verify batch and a one-token step differ by rounding, which can
    flip a near-tie.

    Args:
        min_rows: evaluate at least this many rows per llama_decode, padding with throwaway
            rows (2 in exact mode: every product then takes the multi-row kernels, whose
            result for one row does not depend on how many rows share it, up to a width
            that ``runtime.numerics.exact_width`` measures: Gemma 3 changes at 8 rows).
        flash_attn: llama.cpp's flash attention: None (its default, auto), True or False.
        kv_type: the KV cache's type, ``f16`` (llama.cpp's default) or ``f32``.
        repack: weight repacking for the CPU gemm kernels.
    """

    min_rows: int = 1
    flash_attn: bool | None = None
    kv_type: str = "f16"
    repack: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.min_rows <= 8:
            raise ValueError(f"min_rows must be in 1..8, got {self.min_rows}")
        if self.kv_type not in _KV_TYPES:
            raise ValueError(f"kv_type must be one of {', '.join(_KV_TYPES)}, got "
                             f"{self.kv_type!r}")

    @classmethod
    def exact(cls) -> Numerics:
        """The settings under which a row's logits equal in any batch (measured by
        ``runtime.numerics``; see README's "What identical means")."""
        return cls(min_rows=2, flash_attn=False, kv_type="f16", repack=False)

    def apply(self, params: llama_cpp.llama_context_params) -> None:
        if self.flash_attn is not None:
            params.flash_attn_type = 1 if self.flash_attn else 0
        params.type_k = params.type_v = _KV_TYPES[self.kv_type]


class LlamaContext:
    """One KV cache on one model, holding a single sequence of ``n_past`` tokens.

    Args:
        model: the owner of the weights; must outlive this context.
        n_ctx: context length in tokens.
        n_batch: most tokens evaluated per ``llama_decode``; longer inputs are chunked.
        n_threads: CPU threads (default: every core this process may use).
        n_seq: sequences the cache can hold (``decode_rows``); the single-sequence
            methods use sequence 0.
        unified: the sequences share one cache of ``n_ctx`` cells, any of them may use
            any cell (llama.cpp's ``kv_unified``); False gives each a stream of its own of
            ``n_ctx / n_seq`` cells, laid out as a one-sequence cache is (so a row's logits
            do not depend on where the other sequences' cells sit).
        numerics: how llama.cpp computes; ``Numerics.exact()`` makes a row's logits
            independent of the batch it is evaluated in (see ``Numerics``).
        backend_argmax: let ``eval_argmax`` take the argmax inside llama.cpp's graph
            (backend sampling), so no logits row is copied out or read by Python; False
            reads the logits and takes numpy's argmax (the same batches either way).
    """

    def __init__(self, model: LlamaModel, n_ctx: int = 4096, n_batch: int = 512,
                 n_threads: int | None = None, numerics: Numerics | None = None,
                 backend_argmax: bool = True, n_seq: int = 1, unified: bool = True):
        if n_seq < 1:
            raise ValueError(f"n_seq must be >= 1, got {n_seq}")
        self.model = model
        self.numerics = numerics or Numerics()
        params = llama_cpp.llama_context_default_params()
        # the throwaway rows of a padded batch need cache cells beyond the last token
        params.n_ctx = n_ctx + self.numerics.min_rows - 1
        params.n_batch = params.n_ubatch = n_batch
        threads = n_threads or usable_cores()
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        # backend sampling may take a token from every row of a verify batch (llama.cpp's
        # default allows one output per sequence); 0 means up to n_batch
        params.n_outputs_max_per_seq = 0
        # several sequences share one cache of n_ctx cells (``decode_rows``), however
        # their lengths differ
        params.n_seq_max, params.kv_unified = n_seq, n_seq > 1 and unified
        self.numerics.apply(params)
        self._ctx = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self._ctx:
            raise RuntimeError(f"llama_init_from_model failed for {model.path} (n_ctx={n_ctx})")
        self.n_ctx: int = llama_cpp.llama_n_ctx(self._ctx) - (self.numerics.min_rows - 1)
        # the cells one sequence can hold: all of them in a unified cache
        self.n_ctx_seq: int = self.n_ctx if params.kv_unified else self.n_ctx // n_seq
        # llama.cpp may lower the batch sizes (n_batch is capped at the context size) and
        # asserts that no llama_decode exceeds them, so chunk by what it really uses.
        self.n_batch = min(n_batch, llama_cpp.llama_n_batch(self._ctx),
                           llama_cpp.llama_n_ubatch(self._ctx))
        if self.n_batch < self.numerics.min_rows:
            raise ValueError(f"a batch of {self.n_batch} tokens cannot hold the "
                             f"{self.numerics.min_rows} rows exact mode evaluates at least")
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(self.n_batch, 0, 1)
        self._batch_live = True
        for i in range(self.n_batch):  # every row is of the one sequence, 0: set once
            self._batch.n_seq_id[i] = 1
            self._batch.seq_id[i][0] = 0
        self.n_past = 0
        self.eval_seconds = 0.0  # cumulative time inside llama_decode (+ logits sync)
        self.busy_since: float | None = None  # monotonic start of a running llama_decode
        self._views: dict[tuple[int | None, int], np.ndarray] = {}
        self.backend_argmax = backend_argmax
        self._greedy_chain = None  # the sampler chain attached while eval_argmax runs

    def eval(self, tokens: list[int], all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` at ``n_past`` and return their logits.

        Returns:
            A read-only float32 view ``[n_rows, n_vocab]`` into llama.cpp's buffer (valid
            until the next ``eval``): one row per token when ``all_logits``, else only the
            last token's row. Only those rows are computed.
        """
        self._attach_argmax(False)
        n_rows, start = self._eval(tokens, all_logits)
        # llama_get_logits waits for the backend, so the timing covers GPU work too
        ptr = llama_cpp.llama_get_logits(self._ctx)
        self.eval_seconds += time.perf_counter() - start
        return self._logits_view(ptr, n_rows)

    def eval_argmax(self, tokens: list[int], all_rows: bool = False) -> list[int]:
        """Append ``tokens`` at ``n_past`` and return the greedy choice (argmax of the
        logits) after each of them when ``all_rows``, else after the last only.

        With ``backend_argmax`` the argmax is a node of llama.cpp's own graph: the logits
        never leave it (no copy of an n_vocab row per token, which on a CPU costs more
        than the argmax itself: ~50 us cold for SmolLM2's 49k vocabulary, and on a GPU a
        device-to-host transfer), and only the token ids come back. The batch is the
        same as ``eval``'s, so the logits, and so the choices, are the same. ggml's
        argmax returns the last of exactly equal maxima, numpy's the first; either is the
        model's own choice.
        """
        if not self.backend_argmax:
            rows = self.eval(tokens, all_rows)
            return np.argmax(rows, axis=1).tolist()
        self._attach_argmax(True)
        n_rows, start = self._eval(tokens, all_rows)
        # llama_get_sampled_token_ith waits for the backend (as llama_get_logits does)
        get, ctx = llama_cpp.llama_get_sampled_token_ith, self._ctx
        out = [get(ctx, i) for i in range(n_rows)] if all_rows else [get(ctx, -1)]
        self.eval_seconds += time.perf_counter() - start
        if out[-1] < 0:
            raise RuntimeError(f"llama.cpp sampled no token at n_past={self.n_past}")
        return out

    def _attach_argmax(self, on: bool) -> None:
        """Attach a greedy sampler chain to sequence 0 (llama.cpp then appends an argmax
        per output row to the graph and copies out token ids instead of logits), or
        detach it so that ``eval`` gets logits again. A chain can be initialised for a
        backend only once, so each attach makes a new one. Either way llama.cpp re-reserves
        its graph at the next decode, so this switches per generation, never per step."""
        if on == (self._greedy_chain is not None):
            return
        if on:
            chain = llama_cpp.llama_sampler_chain_init(
                llama_cpp.llama_sampler_chain_default_params())
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            if not llama_cpp.llama_set_sampler(self._ctx, 0, chain):
                llama_cpp.llama_sampler_free(chain)
                log.info("llama.cpp cannot take the argmax on this backend; reading logits")
                self.backend_argmax = False
                return
            self._greedy_chain = chain
        else:
            llama_cpp.llama_set_sampler(self._ctx, 0, None)
            llama_cpp.llama_sampler_free(self._greedy_chain)
            self._greedy_chain = None

    def _eval(self, tokens: list[int], all_logits: bool) -> tuple[int, float]:
        """Decode ``tokens`` (chunked by n_batch). Returns the number of output rows of
        the last chunk and when decoding began (the callers time it until the outputs are
        read)."""
        if not tokens:
            raise ValueError("eval() needs at least one token")
        if self.n_past + len(tokens) > self.n_ctx:
            raise ContextFullError(f"{self.n_past} + {len(tokens)} tokens exceed the context "
                                   f"of {self.n_ctx}; raise -c/--ctx or shorten the input")
        if all_logits and len(tokens) > self.n_batch:
            raise ValueError(f"all_logits over {len(tokens)} tokens exceeds n_batch={self.n_batch}")
        n_rows = 0
        start_time = time.perf_counter()
        try:
            for start in range(0, len(tokens), self.n_batch):
                chunk = tokens[start:start + self.n_batch]
                last_chunk = start + len(chunk) == len(tokens)
                n_rows = self._decode(chunk, all_logits, want_last=last_chunk)
        except BaseException:
            # Ctrl-C lands between llama_decode returning and n_past moving on: ask the
            # cache what it holds, so callers can roll back to a known state.
            self._resync()
            raise
        return n_rows, start_time

    def _logits_view(self, ptr, n_rows: int) -> np.ndarray:
        """A read-only view [n_rows, n_vocab] of llama.cpp's output buffer. Building one
        through ctypes costs ~10 µs, every step; llama.cpp keeps the buffer until it
        needs a bigger one, so views are kept per (address, rows)."""
        key = (ctypes.cast(ptr, ctypes.c_void_p).value, n_rows)
        view = self._views.get(key)
        if view is None:
            if len(self._views) > 64:
                self._views.clear()
            view = np.ctypeslib.as_array(ptr, shape=(n_rows, self.model.n_vocab))
            view.flags.writeable = False
            self._views[key] = view
        return view

    def _decode(self, chunk: list[int], all_logits: bool, want_last: bool) -> int:
        b = self._batch
        n = len(chunk)
        # Exact mode pads a short batch with throwaway rows (the last token again, at the
        # next positions, no logits): the causal mask hides them from the real rows, so
        # the real rows only change kernel, to the one every longer batch takes too.
        n_rows = max(n, self.numerics.min_rows)
        token, pos, logits, n_past = b.token, b.pos, b.logits, self.n_past
        for i in range(n_rows):
            token[i] = chunk[min(i, n - 1)]
            pos[i] = n_past + i
            logits[i] = i < n and (all_logits or (want_last and i == n - 1))
        b.n_tokens = n_rows
        self.busy_since = time.monotonic()  # for runtime.rpc.Watchdog
        try:
            rc = llama_cpp.llama_decode(self._ctx, b)
        finally:
            self.busy_since = None
        if rc == 1:
            raise ContextFullError(f"llama_decode found no KV slot at n_past={self.n_past} "
                                   f"(n_ctx={self.n_ctx})")
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} at n_past={self.n_past}")
        if n_rows > n and not llama_cpp.llama_memory_seq_rm(self._mem, 0, self.n_past + n, -1):
            raise RuntimeError(f"llama_memory_seq_rm failed dropping padding at "
                               f"{self.n_past + n}")
        self.n_past += n
        return n if all_logits else int(want_last)

    def decode_rows(self, tokens: Sequence[int], pos: Sequence[int], seq: Sequence[int],
                    want: Sequence[bool]) -> np.ndarray:
        """One ``llama_decode`` of rows from several sequences: row r is token
        ``tokens[r]`` at position ``pos[r]`` of sequence ``seq[r]``.

        Returns:
            A read-only float32 view [sum(want), n_vocab] of the logits of the rows with
            ``want[r]``, in row order (valid until the next decode). ``n_past`` does not
            move: the caller keeps each sequence's positions.
        """
        n = len(tokens)
        if not 0 < n <= self.n_batch:
            raise ValueError(f"decode_rows needs 1..{self.n_batch} rows, got {n}")
        self._attach_argmax(False)  # the caller reads the logits
        b = self._batch
        for r in range(n):
            b.token[r], b.pos[r] = tokens[r], pos[r]
            b.seq_id[r][0], b.logits[r] = seq[r], bool(want[r])
        b.n_tokens = n
        start_time = time.perf_counter()
        self.busy_since = time.monotonic()  # for runtime.rpc.Watchdog
        try:
            rc = llama_cpp.llama_decode(self._ctx, b)
        finally:
            self.busy_since = None
            for r in range(n):  # the other decodes write sequence 0 only (see __init__)
                b.seq_id[r][0] = 0
        if rc == 1:
            raise ContextFullError(f"llama_decode found no KV slot for {n} rows of sequences "
                                   f"{min(seq)}..{max(seq)} (n_ctx={self.n_ctx})")
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for {n} rows of sequences "
                               f"{min(seq)}..{max(seq)} (n_ctx={self.n_ctx})")
        ptr = llama_cpp.llama_get_logits(self._ctx)
        self.eval_seconds += time.perf_counter() - start_time
        return self._logits_view(ptr, sum(map(bool, want)))

    def remove_seq(self, seq: int, start: int) -> None:
        """Forget positions ``start..`` of sequence ``seq`` (``decode_rows``' sequences:
        their positions are the caller's to keep, as ``n_past`` is for sequence 0)."""
        if not llama_cpp.llama_memory_seq_rm(self._mem, seq, start, -1):
            raise RuntimeError(f"llama_memory_seq_rm failed for sequence {seq} at {start}")

    def seq_state(self, seq: int) -> ctypes.Array:
        """Sequence ``seq``'s cells (positions, K and V of every layer), serialized by
        llama.cpp: what ``load_seq_state`` puts back, into this sequence or another."""
        n = llama_cpp.llama_state_seq_get_size(self._ctx, seq)
        buf = (ctypes.c_uint8 * n)()
        got = llama_cpp.llama_state_seq_get_data(self._ctx, buf, n, seq)
        if got != n:
            raise RuntimeError(f"llama_state_seq_get_data wrote {got} of {n} bytes of "
                               f"sequence {seq}")
        return buf

    def load_seq_state(self, seq: int, state: ctypes.Array) -> None:
        """Put ``seq_state``'s cells into sequence ``seq`` (empty before: the caller
        removed what it held). Raises ``ContextFullError`` when llama.cpp finds no room."""
        if not llama_cpp.llama_state_seq_set_data(self._ctx, state, len(state), seq):
            raise ContextFullError(f"no room to restore {len(state)} bytes of cached "
                                   f"prompt into sequence {seq}")

    def seq_cells(self, seq: int) -> int:
        """How many positions sequence ``seq`` holds in the cache (its highest + 1)."""
        return int(llama_cpp.llama_memory_seq_pos_max(self._mem, seq)) + 1

    def greedy_native(self, first: int, n_tokens: int, is_eog, backend: bool = False
                      ) -> tuple[list[int], float]:
        """The leanest greedy loops llama-cpp-python allows, as benchmark baselines: one
        token per ``llama_decode`` and no Python between decodes but the loop itself.
        ``backend`` False: llama.cpp's default CPU sampler (``llama_sampler_sample``,
        which copies the logits row and builds an n_vocab candidate array per token, as
        llama-server does by default); True: its backend sampling (the argmax a node of
        the graph, llama-server's experimental ``--backend-sampling``). Continues after
        ``first`` (already chosen, not yet evaluated) for up to ``n_tokens`` tokens or an
        end-of-generation token.

        Returns:
            (tokens generated, seconds the loop took).
        """
        if self.n_past + n_tokens > self.n_ctx:
            raise ContextFullError(f"{self.n_past} + {n_tokens} tokens exceed the context")
        self._attach_argmax(backend)
        backend = self._greedy_chain is not None
        smpl = llama_cpp.llama_sampler_init_greedy()
        batch = self._batch
        batch.n_tokens, batch.logits[0] = 1, True
        decode, ctx = llama_cpp.llama_decode, self._ctx
        sample = llama_cpp.llama_get_sampled_token_ith if backend \
            else functools.partial(llama_cpp.llama_sampler_sample, smpl)
        out: list[int] = []
        tok = first
        try:
            start = time.perf_counter()
            for _ in range(n_tokens):
                batch.token[0], batch.pos[0] = tok, self.n_past
                self.busy_since = time.monotonic()
                rc = decode(ctx, batch)
                self.busy_since = None
                if rc != 0:
                    raise RuntimeError(f"llama_decode returned {rc} at n_past={self.n_past}")
                self.n_past += 1
                tok = sample(ctx, -1)
                out.append(tok)
                if is_eog(tok):
                    break
            return out, time.perf_counter() - start
        except BaseException:
            self._resync()
            raise
        finally:
            llama_cpp.llama_sampler_free(smpl)

    def acquire(self) -> bool:
        """A generation takes the context: its cache is as the last one left it (a
        sequence of a shared cache may have been evicted: ``SequenceView.acquire``)."""
        return True

    def release(self) -> None:
        """The generation is over (a shared cache may now evict this one's cells)."""

    def truncate(self, n_keep: int) -> None:
        """Forget every token from position ``n_keep`` on (roll back the KV cache)."""
        if not 0 <= n_keep <= self.n_past:
            raise ValueError(f"truncate({n_keep}) outside 0..{self.n_past}")
        try:
            if n_keep < self.n_past:
                ok = llama_cpp.llama_memory_seq_rm(self._mem, 0, n_keep, -1)
                if not ok:
                    raise RuntimeError(f"llama_memory_seq_rm failed at {n_keep} "
                                       f"(n_past={self.n_past})")
            self.n_past = n_keep
        except BaseException:
            self._resync()
            raise

    def _resync(self) -> None:
        self.n_past = int(llama_cpp.llama_memory_seq_pos_max(self._mem, 0)) + 1

    def reset(self) -> None:
        llama_cpp.llama_memory_clear(self._mem, True)
        self.n_past = 0

    def close(self) -> None:
        self._views.clear()  # they point into llama.cpp's buffer
        if self._ctx:
            self._attach_argmax(False)  # the chain is ours: detach it, then free it
        if self._batch_live:
            llama_cpp.llama_batch_free(self._batch)
            self._batch_live = False
        if self._ctx:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None

    def __enter__(self) -> LlamaContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_ctx", None):
            self.close()
