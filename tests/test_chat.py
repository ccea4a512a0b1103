"""runtime.chat on the real SmolLM2: a follow-up turn evaluates only its own new tokens."""

from __future__ import annotations

import pytest

from runtime.chat import ChatSession
from runtime.config import GenerationConfig, RuntimeConfig, SamplingConfig, SpeculativeConfig
from runtime.engine import Engine
from runtime.speculative import Stats

RT = RuntimeConfig(n_ctx=2048, n_threads=1)


@pytest.mark.parametrize("seed", [2, 5])
def test_second_turn_evaluates_only_its_new_tokens(smollm2_gguf, seed):
    """Sampled answers often tokenize differently when re-rendered as text (issue 16 saw a
    second turn evaluate 162 of 262 prompt tokens). The session keeps the generated ids, so
    the second turn evaluates exactly the new turn's glue and text (plus the last answer
    token, which was emitted but never evaluated)."""
    with Engine(smollm2_gguf, draft=None, runtime=RT,
                sampling=SamplingConfig(temp=0.8, seed=seed),
                speculative=SpeculativeConfig(drafter="lookup")) as eng:
        chat = ChatSession(eng, system="You are a helpful assistant.")
        s1, s2 = Stats(), Stats()
        answer = "".join(c.text for c in chat.ask("Tell me about the moon.",
                                                  GenerationConfig(max_tokens=80), s1))
        assert answer and chat.turns[-1] == {"role": "assistant", "content": answer}
        before = chat._text
        list(chat.ask("And the sun?", GenerationConfig(max_tokens=8), s2))
        new_text = chat.render_text(chat.messages()[:-1])[len(before):]
        n_new = len(eng.model.tokenize(new_text, add_special=False, parse_special=True))
        print(f"second turn: evaluated {s2.n_prompt_new} of {s2.n_prompt} prompt tokens; "
              f"the new turn has {n_new}")
        assert s2.n_prompt_new in (n_new, n_new + 1)
        assert s2.n_prompt > 3 * s2.n_prompt_new


def test_ask_messages_reuses_the_cache_and_refuses_bad_input(smollm2_gguf):
    with Engine(smollm2_gguf, draft=None, runtime=RT, sampling=SamplingConfig(temp=0)) as eng:
        chat = ChatSession(eng)
        msgs = [{"role": "user", "content": "Name a colour."}]
        s1, s2 = Stats(), Stats()
        a1 = "".join(c.text for c in chat.ask_messages(msgs, GenerationConfig(max_tokens=16),
                                                       s1))
        msgs += [{"role": "assistant", "content": a1}, {"role": "user", "content": "Another."}]
        list(chat.ask_messages(msgs, GenerationConfig(max_tokens=8), s2))
        assert s2.n_prompt_new < s2.n_prompt // 2
        with pytest.raises(ValueError, match="last message must come from the user"):
            list(chat.ask_messages(msgs[:2], GenerationConfig(max_tokens=8)))
        chat.reset()
        assert chat.messages() == [] and eng.decoder.kv == []
