"""Conversations' caches in host memory (``runtime.serve.prompt_cache``, ``--cache-ram``):
the cache's rules on stand-in states, then `bridge serve --parallel 2` end to end: a
conversation whose slot was taken by others comes back without being evaluated again,
with the same answer, and never for another API key."""

from __future__ import annotations

import ctypes
import threading

import pytest

from runtime.serve.prompt_cache import MIN_TOKENS, Entry, PromptCache


def entry(tokens, scope="", size=100, text=None) -> Entry:
    return Entry(scope, list(tokens), (ctypes.c_uint8 * size)(), text=text,
                 ids=list(tokens) if text is not None else None)


LONG = list(range(100, 100 + 2 * MIN_TOKENS))


def test_the_longest_prefix_of_the_scope_is_found():
    cache = PromptCache(None)
    a, b = entry(LONG), entry(LONG[:MIN_TOKENS] + [7] * MIN_TOKENS)
    assert cache.add(a) and cache.add(b)
    assert cache.find("", LONG + [1, 2]) == (a, len(LONG))
    assert cache.find("", LONG[:MIN_TOKENS] + [7, 7, 9]) == (b, MIN_TOKENS + 2)
    assert cache.find("other", LONG) == (None, 0)  # another scope's never
    assert cache.find("", [1, 2, 3]) == (None, 0)


def test_chat_entries_match_by_text():
    cache = PromptCache(None)
    e = entry(LONG, text="<|user|>hello there, how are you?")
    cache.add(e)
    assert cache.find("", "<|user|>hello there, who are you?") == \
        (e, len("<|user|>hello there, "))
    assert cache.find("", LONG)[0] is e  # a completion's token ids match its tokens


def test_an_entry_put_back_whole_leaves_and_one_used_in_part_stays():
    cache = PromptCache(None)
    e = entry(LONG, size=1000)
    cache.add(e)
    assert cache.bytes == e.size
    assert e.within(LONG + [5]) and not e.within(LONG[:-1] + [5])
    assert cache.use(e, whole=False) is e  # the job cuts it: the cache keeps it whole
    assert len(cache) == 1 and cache.bytes == e.size
    assert cache.use(e, whole=True) is e  # the slot holds it all now
    assert len(cache) == 0 and cache.bytes == 0
    assert cache.hits == 2 and cache.tokens_restored == 2 * len(LONG)


def test_contained_entries_are_dropped_and_held_ones_not_added_again():
    cache = PromptCache(None)
    short = entry(LONG[:MIN_TOKENS + 4])
    cache.add(short)
    assert not cache.add(entry(LONG[:MIN_TOKENS + 2]))  # already held by `short`
    longer = entry(LONG)
    assert cache.add(longer)
    assert len(cache) == 1 and cache.find("", LONG)[0] is longer  # `short` was inside
    assert cache.add(entry(LONG[:MIN_TOKENS + 4], scope="other"))  # another scope's own


def test_the_oldest_go_first_past_the_budget_and_oversized_ones_stay_out():
    one = entry([0] * MIN_TOKENS).size
    cache = PromptCache(2 * one + 10)
    entries = [entry([i] * MIN_TOKENS) for i in range(3)]
    for e in entries:
        assert cache.add(e)
    assert len(cache) == 2 and cache.bytes <= cache.budget
    assert cache.find("", [0] * MIN_TOKENS) == (None, 0)  # the first went
    assert not cache.add(entry([9] * MIN_TOKENS, size=3 * one))  # larger than the budget
    assert not cache.add(entry([5] * (MIN_TOKENS - 1)))  # too short to be worth it
    with pytest.raises(ValueError):
        PromptCache(0)


# -- end to end -----------------------------------------------------------------------------

STORY = ("Here is a short story. A lighthouse keeper on a small island kept a logbook of "
         "every ship that passed. One winter night the lamp failed, and she climbed the "
         "stairs with a lantern to signal a fishing boat away from the rocks. ")


@pytest.fixture(scope="module")
def served(smollm2_gguf, tmp_path_factory):
    pytest.importorskip("fastapi", reason="bridge serve needs the serve extra")
    openai = pytest.importorskip("openai", reason="the server tests need the dev extra")
    from tests.test_server_parallel import _start, _stop

    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("key-one\nkey-two\n")
    proc, url = _start(smollm2_gguf, "--parallel", "2", "--cache-ram", "64",
                       "--api-key-file", str(keys))
    clients = [openai.OpenAI(base_url=f"{url}/v1", api_key=k, max_retries=0)
               for k in ("key-one", "key-two")]
    yield url, clients, smollm2_gguf.name
    assert _stop(proc) == 0


def _ask(client, model, messages, **kw):
    r = client.chat.completions.create(model=model, messages=messages, temperature=0,
                                       max_tokens=16, extra_body={"return_tokens": True},
                                       **kw)
    return r.choices[0].model_extra["tokens"], r.model_extra["timings"], r


def _others(client, model):
    """Two other conversations at once: each of the two slots is taken and cut."""
    done = []
    threads = [threading.Thread(target=lambda q=q: done.append(_ask(
        client, model, [{"role": "user", "content": f"{q} " * 12}]))) for q in ("Why?", "How?")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(done) == 2


def _metric(url, name) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer key-one"}).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return fams[name].samples[0].value


@pytest.mark.server
def test_a_conversation_comes_back_from_host_memory_with_the_same_answer(served):
    url, (one, _), model = served
    first = [{"role": "user", "content": STORY + "Summarise it in one sentence."}]
    _ask(one, model, first)
    # the reference: the slot's own cache reused, so the answer starts, as it will from
    # host memory, with one row after the cached prompt (a batch's shape moves llama.cpp's
    # rounding, and a fresh prompt's last row is part of a longer batch)
    tokens, timings, r = _ask(one, model, first)
    n_prompt = r.usage.prompt_tokens
    assert timings["cache_n"] == n_prompt - 1
    _others(one, model)
    assert _metric(url, "bridge_prompt_cache_entries") >= 1
    restores = _metric(url, "bridge_prompt_cache_restores")
    again, timings, _ = _ask(one, model, first)
    assert again == tokens  # the cells put back answer as evaluating them did
    assert timings["cache_n"] == n_prompt - 1  # all but the token re-read for its logits
    assert _metric(url, "bridge_prompt_cache_restores") == restores + 1
    # a follow-up continues the conversation from host memory too
    _others(one, model)
    follow = first + [{"role": "assistant", "content": r.choices[0].message.content},
                      {"role": "user", "content": "Who was on the boat?"}]
    _, timings, _ = _ask(one, model, follow)
    assert timings["cache_n"] >= n_prompt
    assert _metric(url, "bridge_prompt_cache_bytes") <= 64 << 20


@pytest.mark.server
def test_another_key_never_gets_a_conversation_back(served):
    url, (one, two), model = served
    secret = [{"role": "user", "content": STORY + "What did the keeper write down?"}]
    _ask(one, model, secret)
    _others(one, model)
    restores = _metric(url, "bridge_prompt_cache_restores")
    _, timings, r = _ask(two, model, secret)
    assert _metric(url, "bridge_prompt_cache_restores") == restores
    assert timings["cache_n"] < 8  # a slot of another key starts empty
    _, timings, _ = _ask(one, model, secret)  # its own key does get it back
    assert timings["cache_n"] == r.usage.prompt_tokens - 1
