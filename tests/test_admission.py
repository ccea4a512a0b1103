"""runtime.serve.admission without a model: the context policies, the cheap bounds and the
field ranges, as tables of cases."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("fastapi", reason="bridge serve needs the serve extra")

from runtime.serve.admission import (  # noqa: E402
    Limits,
    admit_completion,
    check_messages,
    check_ranges,
    policy_of,
)
from runtime.serve.openai_api import APIError  # noqa: E402

LIMITS = Limits(n_ctx=100, max_piece=4)


class _Words:
    """A stand-in tokenizer: one token per word."""

    def tokenize(self, text: str, add_special: bool = True, parse_special: bool = False):
        return list(range(len(text.split())))


@pytest.mark.parametrize("n_prompt, max_tokens, explicit, policy, want", [
    (50, 40, True, "error", 40),       # fits: untouched
    (50, 50, True, "error", 50),       # exactly the context
    (50, 60, True, "error", None),     # OpenAI's rule: a 400
    (50, 60, False, "error", 50),      # the server's default -n: capped
    (50, 100, True, "error", 50),      # no prompt could satisfy it: "as long as fits"
    (50, 60, True, "cap", 50),         # llama-server's rule
    (50, 60, True, "trim", 50),        # completions have no turns: trim caps
    (99, 5, True, "cap", 1),           # one token of room is still an answer
    (100, 5, True, "cap", None),       # the prompt alone fills the context: a 400 always
])
def test_completion_budget(n_prompt, max_tokens, explicit, policy, want):
    prompt = list(range(n_prompt))
    if want is None:
        with pytest.raises(APIError) as e:
            admit_completion(_Words(), prompt, max_tokens, explicit, policy, LIMITS)
        assert e.value.code == "context_length_exceeded" and e.value.status == 400
    else:
        assert admit_completion(_Words(), prompt, max_tokens, explicit, policy,
                                LIMITS).max_tokens == want


def test_text_prompts_are_bounded_by_bytes_before_tokenizing():
    class Never(_Words):
        def tokenize(self, *a, **k):
            raise AssertionError("tokenized")

    # 400 bytes at 4 bytes per token at most: at least 100 tokens, the whole context
    with pytest.raises(APIError, match="at least 100 tokens"):
        admit_completion(Never(), "x" * 400, 1, True, "error", LIMITS)
    assert admit_completion(_Words(), "a b c", 5, True, "error", LIMITS).prompt == [0, 1, 2]


def _msgs(*contents: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": c} for c in contents]


def test_message_count_and_bytes():
    with pytest.raises(APIError) as e:
        check_messages(_msgs(*["hi"] * 5), Limits(100, 4, max_messages=4), "error")
    assert e.value.code == "too_many_messages"
    with pytest.raises(APIError) as e:
        check_messages(_msgs("x" * 200, "x" * 200), LIMITS, "error")
    assert e.value.code == "context_length_exceeded"
    # trimming may drop the old ones: only the last must fit alone
    check_messages(_msgs("x" * 200, "x" * 200, "short"), LIMITS, "trim")


@pytest.mark.parametrize("fields, param", [
    ({"max_tokens": 2**31}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"top_k": 2**40}, "top_k"), ({"seed": 2**64}, "seed"), ({"seed": -1}, "seed"),
    ({"stop": ["a"] * 17}, "stop"), ({"stop": "a" * 1001}, "stop"),
])
def test_ranges(fields, param):
    body = SimpleNamespace(**{"max_tokens": None, "max_completion_tokens": None, "top_k": None,
                              "seed": None, "stop": None, **fields})
    with pytest.raises(APIError) as e:
        check_ranges(body)
    assert e.value.param == param


def test_policy_from_request_or_server():
    body = SimpleNamespace(model_extra={"context_overflow": "trim"})
    assert policy_of(body, LIMITS) == "trim"
    assert policy_of(SimpleNamespace(model_extra={}), Limits(100, 4, overflow="cap")) == "cap"
    with pytest.raises(APIError):
        policy_of(SimpleNamespace(model_extra={"context_overflow": "drop"}), LIMITS)
    with pytest.raises(ValueError, match="--context-overflow"):
        Limits(100, 4, overflow="drop")
