"""Constraints on what an answer may be: a JSON schema, any JSON, a regex or a GBNF grammar.

The engine is llguidance (the one llama.cpp, vLLM and SGLang can use): it builds its
tokenizer from llama.cpp's own vocabulary, computes a token mask in tens of microseconds,
checks a whole draft at once (``validate_tokens``), reports the tokens the grammar forces
(``compute_ff_tokens``) and rolls back. Nothing here parses grammars by hand.

A ``Constraint`` is a cache like the KV cache: it has consumed exactly the answer's tokens
emitted so far (pending one included), and ``rollback`` puts it back to a shorter sequence,
in the same ``finally`` that rolls the contexts back.

JSON is generated in one canonical layout, ``{"a": 1, "b": [2, 3]}`` (json.dumps's default
separators, no other whitespace), so an answer cannot spend its tokens on whitespace and
every separator is forced text.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("json_schema", "json", "regex", "gbnf")

# One layout for JSON: "{"a": 1, "b": [2, 3]}". llguidance's default allows any run of
# whitespace between tokens, which is how llama-server's answers ran out of tokens.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class ConstraintSpec:
    """What the answer must match.

    Args:
        kind: ``json_schema`` (``text`` is the schema as JSON), ``json`` (any JSON object,
            ``text`` unused), ``regex``, or ``gbnf`` (llama.cpp's grammar format; Lark
            syntax is accepted too).
        text: the schema, regex or grammar.
    """

    kind: str
    text: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"constraint kind must be one of {', '.join(KINDS)}, "
                             f"got {self.kind!r}")
        if self.kind != "json" and not self.text.strip():
            raise ValueError(f"the {self.kind} is empty")

    @classmethod
    def from_schema(cls, schema: Any) -> ConstraintSpec:
        """A JSON schema given as a dict (or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema))

    def grammar(self) -> str:
        """llguidance's grammar text for this spec.

        Raises:
            ValueError: the grammar cannot be converted (a GBNF syntax error, ...).
        """
        import llguidance

        if self.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(
                {"type": "object"}, overrides=_JSON_OPTIONS)
        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(
                self.text, overrides=_JSON_OPTIONS)
        if self.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(self.text)
        try:
            return llguidance.grammar_from("gbnf", self.text)
        except ValueError as e:
            raise ValueError(f"the grammar does not parse: {e}") from None


class Constraint:
    """A compiled constraint's state over one answer.

    Args:
        matcher: llguidance's ``LLMatcher`` for the grammar (owned).
        n_vocab: the model's vocabulary size (rows of logits are this wide).

    ``seconds`` adds up the time spent in constraint work (masks, consuming, validating,
    forced tokens, rollback) so callers can weigh it against a decode step.
    """

    def __init__(self, matcher, n_vocab: int):
        self._m = matcher
        self.n_vocab = n_vocab
        self._bits = np.zeros((n_vocab + 31) // 32, dtype=np.int32)
        self._fresh = False  # _bits holds the mask of the current state
        self._allowed: np.ndarray | None = None  # _bits unpacked, when asked for
        self.start = 0          # sequence position where the answer begins
        self.n_consumed = 0     # answer tokens consumed
        self.seconds = 0.0
        self.n_masks = 0

    def fresh(self) -> Constraint:
        """A copy with a state of its own (the compiled grammar is shared): two answers
        under one schema, at once, must not move each other's matcher."""
        return Constraint(self._m.deep_copy(), self.n_vocab)

    def bind(self, start: int) -> None:
        """Start a new answer at sequence position ``start`` (the prompt's length)."""
        t = time.perf_counter()
        self._m.reset()
        self._fresh, self._allowed = False, None
        self.start, self.n_consumed = start, 0
        self.seconds += time.perf_counter() - t

    @property
    def done(self) -> bool:
        """No token can follow: the answer is complete (or, on an error, can never be)."""
        return self._m.is_stopped()

    @property
    def error(self) -> str:
        return self._m.get_error()

    def _compute(self) -> None:
        if not self._fresh:
            t = time.perf_counter()
            self._m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
            self._fresh, self._allowed = True, None
            self.n_masks += 1
            self.seconds += time.perf_counter() - t

    def allows(self, token: int) -> bool:
        """Whether the grammar allows ``token`` next: one bit of the mask, so a greedy
        choice that is allowed (the common case) never unpacks the whole mask."""
        self._compute()
        return bool((int(self._bits[token >> 5]) >> (token & 31)) & 1)

    def allowed(self) -> np.ndarray:
        """bool [n_vocab]: the tokens the grammar allows next (end-of-generation tokens
        only where the answer may end)."""
        self._compute()
        if self._allowed is None:
            t = time.perf_counter()
            bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
            self._allowed = bits[: self.n_vocab].view(bool)
            self.seconds += time.perf_counter() - t
        return self._allowed

    def consume(self, token: int) -> None:
        t = time.perf_counter()
        ok = self._m.consume_token(token)
        self._fresh, self._allowed = False, None
        self.seconds += time.perf_counter() - t
        # callers only consume tokens chosen under the mask or validated first
        assert ok, f"the constraint refused token {token}: {self._m.get_error()}"
        self.n_consumed += 1

    def validate(self, tokens: list[int]) -> int:
        """How many of ``tokens`` the grammar accepts from here, in order."""
        if not tokens:
            return 0
        t = time.perf_counter()
        n = self._m.validate_tokens(tokens)
        self.seconds += time.perf_counter() - t
        return n

    def forced(self) -> list[int]:
        """The grammar's forced text as tokens (its canonical tokenization)."""
        t = time.perf_counter()
        out = [] if self._m.is_stopped() else list(self._m.compute_ff_tokens())
        self.seconds += time.perf_counter() - t
        return out

    def rollback(self, n_keep: int) -> None:
        """The sequence is now ``n_keep`` tokens long: forget answer tokens beyond it."""
        n = max(0, n_keep - self.start)
        if n < self.n_consumed:
            t = time.perf_counter()
            self._m.rollback(self.n_consumed - n)
            self.n_consumed = n
            self._fresh, self._allowed = False, None
            self.seconds += time.perf_counter() - t


class ConstraintCompiler:
    """Compiles specs against one model's vocabulary (llguidance's tokenizer is built once,
    lazily: about 0.3 s for a 49k vocabulary).

    Args:
        model: a ``runtime.context.LlamaModel``.
    """

    def __init__(self, model):
        self.model = model
        self._tokenizer = None

    def tokenizer(self):
        if self._tokenizer is None:
            from llguidance.llamacpp import lltokenizer_from_vocab

            vocab = self.model.vocab
            # every end-of-generation token may end an answer the grammar accepts
            eog = [t for t in range(self.model.n_vocab) if self.model.is_eog(t)]
            with warnings.catch_warnings():  # llguidance calls a deprecated alias per token
                warnings.simplefilter("ignore", DeprecationWarning)
                self._tokenizer = lltokenizer_from_vocab(vocab, eos_token=eog or None)
        return self._tokenizer

    def compile(self, spec: ConstraintSpec) -> Constraint:
        """A fresh ``Constraint`` for ``spec``.

        Raises:
            ValueError: the schema or grammar is invalid or uses what llguidance lacks,
                naming the problem.
        """
        import llguidance

        grammar = spec.grammar()
        tok = self.tokenizer()
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tok)
        if is_error:
            raise ValueError(f"invalid {_WHAT[spec.kind]}: {messages[0] if messages else '?'}")
        for m in messages:
            log.warning("%s: %s", _WHAT[spec.kind], m)
        matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {_WHAT[spec.kind]}: {matcher.get_error()}")
        return Constraint(matcher, self.model.n_vocab)


_WHAT = {"json_schema": "JSON schema", "json": "JSON", "regex": "regex",
         "gbnf": "grammar"}
