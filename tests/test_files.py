"""runtime.files: the sha256 cache and the index of exported drafts (how `bridge chat
org/name-GGUF` finds a draft that is not beside the cached model)."""

from __future__ import annotations

import json
import os

import pytest

from runtime import files


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "bridge"


def test_a_remembered_sha256_is_not_recomputed(tmp_path):
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    files.remember_sha256(model, "f" * 64)  # what a download computed while verifying
    assert files.sha256_file_cached(model) == "f" * 64
    model.write_bytes(b"GGUF2")  # another size: the entry no longer applies
    assert files.sha256_file_cached(model) == files.sha256_file(model)


def test_drafts_are_found_by_sha256_newest_first(tmp_path):
    a, b, other = (tmp_path / f"{n}.draft.gguf" for n in ("a", "b", "other"))
    for path in (a, b, other):
        path.write_bytes(b"draft")
    files.remember_draft(a, "1" * 64)
    files.remember_draft(other, "2" * 64)
    files.remember_draft(b, "1" * 64)
    assert files.drafts_for("1" * 64) == [b, a]
    files.remember_draft(a, "1" * 64)  # re-exported: first again, listed once
    assert files.drafts_for("1" * 64) == [a, b]
    assert files.drafts_for("3" * 64) == []


def test_stale_entries_are_skipped_and_dropped(tmp_path, cache):
    a, b, c = (tmp_path / f"{n}.draft.gguf" for n in "abc")
    for path in (a, b):
        path.write_bytes(b"draft")
    files.remember_draft(a, "1" * 64)
    files.remember_draft(b, "1" * 64)
    a.unlink()  # deleted
    b.write_bytes(b"a draft of another model")  # rewritten: may belong to another model
    assert files.drafts_for("1" * 64) == []
    c.write_bytes(b"draft")
    files.remember_draft(c, "2" * 64)  # writing the index drops what no longer exists
    assert list(json.loads((cache / "drafts.json").read_text())) == ["2" * 64]


def test_an_unreadable_index_is_an_empty_one(tmp_path, cache):
    cache.mkdir(parents=True)
    (cache / "drafts.json").write_text("not json")
    assert files.drafts_for("1" * 64) == []
    draft = tmp_path / "d.draft.gguf"
    draft.write_bytes(b"draft")
    files.remember_draft(draft, "1" * 64)
    assert files.drafts_for("1" * 64) == [draft]
    os.chmod(cache, 0o500)  # a read-only cache never stops an export (root may still write)
    try:
        files.remember_draft(draft, "2" * 64)
    finally:
        os.chmod(cache, 0o700)
