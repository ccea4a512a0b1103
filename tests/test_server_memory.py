"""`bridge serve`'s drafting memory across requests, end to end on SmolLM2: the same
greedy answers with and without it, its bound, opting out, and the memory file (saved at
SIGTERM, loaded at start, a corrupt or foreign file warned about and ignored)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from runtime.drafters.memory import DraftMemory
from runtime.serve.app import MemoryConfig, open_memory, scope_of
from tests.exactness import batch_bound, same_or_near_tie
from tests.test_server import _start, _stop
from tests.test_speculative import chat_prompt

httpx = pytest.importorskip("httpx", reason="the server tests need the dev extra")

# a session of similar requests: the same instruction and answer shape, new records
RECORDS = [
    "Alice Martin lives in Paris and is 34.",
    "Bob Chen lives in Toronto and is 29.",
    "Carla Diaz lives in Madrid and is 41.",
    "David Okafor lives in Lagos and is 52.",
    "Emma Larsen lives in Oslo and is 23.",
]
N = 40
LOOKUP = ("--drafter", "lookup", "--draft-max", "8")  # after _start's --fixed-gamma


def _prompt(record: str) -> str:
    return chat_prompt("Write this person as JSON with the keys name, city and age. "
                       f"{record}")


def _complete(url: str, prompt: str, **extra) -> dict:
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "prompt": prompt, "temperature": 0, "max_tokens": N, "return_tokens": True,
        **extra})
    assert r.status_code == 200, r.text
    return r.json()


def _memory(url: str) -> dict:
    return httpx.get(f"{url}/stats", timeout=10).json()["memory"]


def _said(log) -> str:
    return re.sub(r"\s+", " ", log.read_text())  # the log handler may wrap long lines


@pytest.fixture(scope="module")
def mem_server(smollm2_gguf, smollm2_draft_gguf):
    proc, url, _ = _start(smollm2_gguf, smollm2_draft_gguf, *LOOKUP)
    yield url
    assert _stop(proc) == 0


@pytest.mark.slow
def test_greedy_answers_same_with_memory_on_and_off(mem_server, smollm2, smollm2_gguf):
    """Each record is answered with the memory off (shared_drafts false), then on; the
    later ones draft from the earlier answers, and every answer is the one without the
    memory, or first differs at a near-tie of the full model (batched kernels)."""
    accepted, bound = 0, batch_bound(smollm2_gguf)
    for rec in RECORDS:
        prompt = _prompt(rec)
        off = _complete(mem_server, prompt, shared_drafts=False)
        on = _complete(mem_server, prompt)
        assert "memory" not in off["timings"]["sources"]
        accepted += on["timings"]["sources"].get("memory", {}).get("accepted", 0)
        same_or_near_tie(smollm2, prompt, on["choices"][0]["tokens"],
                         off["choices"][0]["tokens"], bound)
    assert accepted > 0  # the memory really drafted (and was verified)


@pytest.mark.slow
def test_opted_out_requests_do_not_grow_the_memory(mem_server):
    before = _memory(mem_server)["tokens"]
    _complete(mem_server, _prompt("Fatima Zahra lives in Rabat and is 37."),
              shared_drafts=False)
    assert _memory(mem_server)["tokens"] == before
    _complete(mem_server, _prompt("Fatima Zahra lives in Rabat and is 37."))
    assert _memory(mem_server)["tokens"] > before


@pytest.mark.server
@pytest.mark.slow
def test_bound_and_file_saved_at_sigterm_then_loaded(smollm2_gguf, smollm2_draft_gguf,
                                                     tmp_path):
    path, log = tmp_path / "memory.npz", tmp_path / "serve.log"
    extra = (*LOOKUP, "--draft-memory", "300", "--draft-memory-file", str(path))
    proc, url, _ = _start(smollm2_gguf, smollm2_draft_gguf, *extra, log=log)
    try:
        for rec in RECORDS:  # ~80 tokens each: the oldest requests must go
            _complete(url, _prompt(rec))
            mem = _memory(url)
            assert 0 < mem["tokens"] <= mem["max_tokens"] == 300, mem
        saved = mem["tokens"]
    finally:
        assert _stop(proc) == 0
    assert path.is_file() and "saved to" in _said(log)
    proc, url, _ = _start(smollm2_gguf, smollm2_draft_gguf, *extra, log=log)
    try:
        assert _memory(url)["tokens"] == saved  # loaded from the file
        on = _complete(url, _prompt(RECORDS[-1]))
        assert on["timings"]["sources"].get("memory", {}).get("accepted", 0) > 0
    finally:
        assert _stop(proc) == 0


def _corrupt(path) -> None:
    path.write_bytes(b"PK\x03\x04 not really a zip file")


def _foreign(path) -> None:
    memory = DraftMemory()
    memory.add([1, 2, 3, 4, 5])
    memory.save(path, "0" * 64)  # another model's sha256


@pytest.mark.server
@pytest.mark.slow
@pytest.mark.parametrize("spoil", [_corrupt, _foreign], ids=["corrupt", "foreign"])
def test_bad_memory_file_warns_and_starts_empty(smollm2_gguf, smollm2_draft_gguf, tmp_path,
                                                spoil):
    path, log = tmp_path / "memory.npz", tmp_path / "serve.log"
    spoil(path)
    proc, url, _ = _start(smollm2_gguf, smollm2_draft_gguf, *LOOKUP,
                          "--draft-memory-file", str(path), log=log)
    try:
        assert _memory(url)["tokens"] == 0
        assert _complete(url, _prompt(RECORDS[0]))["choices"][0]["text"]
    finally:
        assert _stop(proc) == 0
    said = _said(log)
    assert "the server starts with an empty memory" in said
    assert ("another model" in said) == (spoil is _foreign)
    assert (f"{path} is not a bridge drafting-memory file" in said) == (spoil is _corrupt)


def test_scope_is_a_hash_of_the_bearer_token():
    a, b = scope_of("Bearer sesame"), scope_of("bearer other")
    assert a and b and a != b and "sesame" not in a
    assert scope_of("Bearer  sesame ") == a       # spacing is not part of the token
    assert scope_of(None) == scope_of("") == scope_of("Basic xyz") == ""


@pytest.mark.parametrize("kw, names", [
    ({"max_tokens": 0}, "--draft-memory"),                       # nothing could be stored
    ({"enabled": False, "path": Path("m.npz")}, "--no-shared-drafts"),  # a file, no memory
])
def test_memory_config_refuses_contradictions(kw, names):
    with pytest.raises(ValueError, match=names):
        MemoryConfig(**kw)


def test_memory_file_folder_must_exist(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        open_memory(MemoryConfig(path=tmp_path / "nowhere" / "m.npz"), tmp_path / "m.gguf")
