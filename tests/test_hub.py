"""MODEL as a Hugging Face id: the choice of files (pure), and the real huggingface_hub
client against a fake Hub on loopback (``tests.fakehub``): download, cache hit, offline,
resume after a dropped connection, split GGUF, gated, unknown repo, unknown tag, full disk.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from runtime import hub
from runtime.hub import HubError, HubSpec, choose_gguf, gguf_quants
from tests.conftest import GATED_REPO, GGUF_REPO, HUB_TOKEN, SMOL_FILE, SPLIT_REPO, TINY_HF_REPO
from tests.fakehub import sha256_of

# -- choosing the files (llama.cpp's -hf rule) ---------------------------------------------

REPO = ["README.md", "x-Q2_K.gguf", "x-Q4_K_M.gguf", "x-Q8_0.gguf", "mmproj-x-F16.gguf",
        "x-Q4_K_M.draft.gguf", "x-imatrix.gguf"]
SPLIT = ["x-Q6_K-00001-of-00002.gguf", "x-Q6_K-00002-of-00002.gguf", "x-IQ4_XS.gguf"]


@pytest.mark.parametrize("files, tag, chosen", [
    (REPO, None, ("x-Q4_K_M.gguf",)),  # llama.cpp's default quant
    (REPO, "q8_0", ("x-Q8_0.gguf",)),  # tags are case-insensitive
    (REPO, "Q5_K_M", None),  # no such quant
    (["a-Q8_0.gguf", "a-Q2_K.gguf"], None, ("a-Q8_0.gguf",)),  # then Q8_0
    (["b-Q2_K.gguf", "a-Q3_K_S.gguf"], None, ("a-Q3_K_S.gguf",)),  # then the first, sorted
    (["mmproj-Q4_K_M.gguf", "x.draft.gguf"], None, None),  # projectors and drafts never
    (SPLIT, "Q6_K", tuple(SPLIT[:2])),  # a split model comes whole, first part first
    (SPLIT, None, ("x-IQ4_XS.gguf",)),  # fallback: the first file in order
    (["x-IQ4_K_M.gguf"], "Q4_K_M", None),  # the tag starts the quant name (unlike llama.cpp)
    (["Q8_0/x-Q8_0-00001-of-00002.gguf", "Q8_0/x-Q8_0-00002-of-00002.gguf"], "Q8_0",
     ("Q8_0/x-Q8_0-00001-of-00002.gguf", "Q8_0/x-Q8_0-00002-of-00002.gguf")),  # sub-folder
])
def test_choose_gguf(files, tag, chosen):
    assert choose_gguf(files, tag) == chosen


def test_a_split_with_a_missing_part_is_refused():
    with pytest.raises(HubError, match="split in 3 parts, and only parts 1, 3 are there"):
        choose_gguf(["m-00001-of-00003.gguf", "m-00003-of-00003.gguf"], None)


def test_quants_listed():
    assert gguf_quants(REPO) == ["Q2_K", "Q4_K_M", "Q8_0"]
    assert gguf_quants(SPLIT) == ["IQ4_XS", "Q6_K"]


@pytest.mark.parametrize("text, parsed", [
    ("org/name-GGUF:Q4_K_M", ("org/name-GGUF", "Q4_K_M")),
    ("org/name", ("org/name", None)),
    ("Qwen/Qwen2.5-1.5B-Instruct", ("Qwen/Qwen2.5-1.5B-Instruct", None)),
    ("no/such.gguf", None),  # a file name, never a repo
    ("no/such/model", None),  # a path
    ("./org/name", None),
    ("smollm2", None),
])
def test_spec_parse(text, parsed):
    spec = HubSpec.parse(text)
    assert (spec if spec is None else (spec.repo, spec.tag)) == parsed


# -- against the fake Hub (fixtures in conftest.py) ----------------------------------------

def _offline(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def _blobs(hf_cache: Path) -> list[str]:
    return sorted(p.name for p in hf_cache.rglob("blobs/*"))


def test_download_then_cache_hit_then_offline(hf_env, smollm2_gguf, tmp_path, monkeypatch):
    model = hub.resolve(HubSpec.parse(f"{GGUF_REPO}:Q4_1"))
    assert model.kind == "gguf" and model.downloaded and model.path.name == SMOL_FILE
    assert sha256_of(model.path) == sha256_of(smollm2_gguf)
    assert "README.md" not in os.listdir(model.path.parent)  # only the needed file
    assert hf_env.requests("/cdn/") == [("GET", f"/cdn/{sha256_of(smollm2_gguf)}")]
    hf_env.reset()
    again = hub.resolve(HubSpec.parse(f"{GGUF_REPO}:Q4_1"))
    assert again.path == model.path and not again.downloaded
    assert hf_env.log == [("GET", f"/api/models/{GGUF_REPO}")]  # the revision check only
    pinned = hub.resolve(HubSpec.parse(GGUF_REPO, revision=model.commit))
    assert pinned.path == model.path and len(hf_env.log) == 1  # a cached commit: no request
    hf_env.reset()
    _offline(monkeypatch)
    cached = hub.resolve(HubSpec.parse(GGUF_REPO))  # no tag: the same rule on the cache
    assert cached.path == model.path and hf_env.log == []


def test_drop_mid_download_resumes_in_the_same_run(hf_env, smollm2_gguf):
    hf_env.drop(GGUF_REPO, SMOL_FILE, after=10 << 20, times=1)
    model = hub.resolve(HubSpec.parse(GGUF_REPO))
    assert sha256_of(model.path) == sha256_of(smollm2_gguf)
    cdn = [path for _, path in hf_env.requests("/cdn/")]
    assert len(cdn) == 2 and cdn[1].endswith(f"bytes={10 << 20}-")  # huggingface_hub's retry


def test_a_rerun_resumes_a_broken_download(hf_env, smollm2_gguf, tmp_path):
    # the first answer breaks off at 30 MB, the client's 5 retries get nothing: the run
    # fails, keeps its partial file, and the next run asks for the rest only
    hf_env.drop(GGUF_REPO, SMOL_FILE, after=30 << 20, times=6)
    with pytest.raises(HubError, match=r"broke off at 31\.5 MB of 98\.4 MB .*run the same "
                                       r"command again to resume"):
        hub.resolve(HubSpec.parse(GGUF_REPO))
    cache = tmp_path / "hf" / "hub"
    assert _blobs(cache) == [f"{sha256_of(smollm2_gguf)}.incomplete"]
    assert not list(cache.rglob("snapshots/*/*.gguf"))  # nothing usable half-written
    hf_env.reset()
    model = hub.resolve(HubSpec.parse(GGUF_REPO))
    assert sha256_of(model.path) == sha256_of(smollm2_gguf)
    assert [p for _, p in hf_env.requests("/cdn/")] == [
        f"/cdn/{sha256_of(smollm2_gguf)} bytes={30 << 20}-"]
    assert _blobs(cache) == [sha256_of(smollm2_gguf)]


def test_split_gguf_downloads_whole_and_loads(hf_env, split_parts, smollm2_gguf):
    from runtime.config import GenerationConfig, RuntimeConfig, SamplingConfig, SpeculativeConfig
    from runtime.engine import Engine

    model = hub.resolve(HubSpec.parse(f"{SPLIT_REPO}:Q4_1"))
    assert model.files == tuple(p.name for p in split_parts)
    assert model.path.name == split_parts[0].name
    texts = []
    for path in (model.path, smollm2_gguf):  # llama.cpp finds parts 2 and 3 beside part 1
        with Engine(path, draft=None, runtime=RuntimeConfig(n_ctx=256, n_threads=2),
                    speculative=SpeculativeConfig(drafter="none"),
                    sampling=SamplingConfig(temp=0)) as engine:
            texts.append(engine.complete("The capital of France is",
                                         GenerationConfig(max_tokens=8))[0])
    assert texts[0] == texts[1]


def test_gated_repo_needs_a_token(hf_env, monkeypatch, tmp_path):
    with pytest.raises(HubError, match=f"{GATED_REPO} is gated: accept its terms at "
                                       f".*/{GATED_REPO}, then log in with `hf auth login` "
                                       "or set HF_TOKEN"):
        hub.resolve(HubSpec.parse(GATED_REPO))
    assert not _blobs(tmp_path / "hf" / "hub")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    with pytest.raises(HubError, match="your token has no access"):
        hub.resolve(HubSpec.parse(GATED_REPO))
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    assert hub.resolve(HubSpec.parse(GATED_REPO)).path.name == SMOL_FILE


@pytest.mark.parametrize("spec, revision, message", [
    # each bad input: one line naming the problem and the fix
    ("bridge-test/no-such-repo", None, "model not found: no file or folder bridge-test/no-such"
                                       "-repo here, and no model bridge-test/no-such-repo on "
                                       "the Hugging Face Hub .*; check the id, and if it is "
                                       "private, log in"),
    (f"{GGUF_REPO}:Q5_K_M", None, f"{GGUF_REPO} has no GGUF for 'Q5_K_M'; it has Q4_1 "
                                  f"\\(e.g. {GGUF_REPO}:Q4_1\\)"),
    (GGUF_REPO, "v9", f"{GGUF_REPO} has no revision 'v9'"),
    (TINY_HF_REPO, None, "holds a transformers checkpoint, not GGUF: make a GGUF and its "
                         f"draft with `bridge export {TINY_HF_REPO} --prune 0.25`"),
])
def test_bad_hub_ids(hf_env, spec, revision, message, tmp_path):
    with pytest.raises(HubError, match=message) as e:
        hub.resolve(HubSpec.parse(spec, revision))
    assert "\n" not in str(e.value)
    assert not _blobs(tmp_path / "hf" / "hub")


def test_no_such_repo_with_a_token(hf_env, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)  # signed in, the Hub answers 404, not 401
    with pytest.raises(HubError, match="no model bridge-test/nope on the Hugging Face Hub .*; "
                                       "check the id, and your token cannot see it if it is "
                                       "private"):
        hub.resolve(HubSpec.parse("bridge-test/nope"))
    assert hf_env.log[-1] == ("GET", "/api/models/bridge-test/nope")


def test_in_hf_cache(hf_env, tmp_path, smollm2_gguf):
    from runtime.hub_download import in_hf_cache

    model = hub.resolve(HubSpec.parse(GGUF_REPO))
    assert in_hf_cache(model.path) and not in_hf_cache(smollm2_gguf)


def test_offline_with_nothing_cached(hf_env, monkeypatch):
    _offline(monkeypatch)
    with pytest.raises(HubError, match=rf"offline \(HF_HUB_OFFLINE is set\), and "
                                       rf"{GGUF_REPO}:Q4_1 is not in the Hugging Face cache "
                                       r"\(no .*refs/main\); run once online"):
        hub.resolve(HubSpec.parse(f"{GGUF_REPO}:Q4_1"))
    assert hf_env.log == []


def test_unreachable_hub_falls_back_to_the_cache(hf_env, monkeypatch):
    from huggingface_hub import constants

    hub.resolve(HubSpec.parse(GGUF_REPO))
    dead = "http://127.0.0.1:9"  # the discard port: nothing listens
    monkeypatch.setattr(constants, "ENDPOINT", dead)
    assert hub.resolve(HubSpec.parse(GGUF_REPO)).path.name == SMOL_FILE
    with pytest.raises(HubError, match=r"cannot reach http://127.0.0.1:9 \(ConnectError\), "
                                       "and bridge-test/other is not in the Hugging Face"):
        hub.resolve(HubSpec.parse("bridge-test/other"))


def test_not_enough_disk_space(hf_env, monkeypatch, tmp_path):
    from runtime import hub_download

    monkeypatch.setattr(hub_download.shutil, "disk_usage",
                        lambda _: SimpleNamespace(total=10 << 30, used=10 << 30, free=1 << 20))
    with pytest.raises(HubError, match=r"not enough disk space for .*gguf: it needs 98\.4 MB "
                                       r"more, 1\.0 MB are free in .*; free some space or "
                                       "point HF_HOME at a larger disk"):
        hub.resolve(HubSpec.parse(GGUF_REPO))
    assert _blobs(tmp_path / "hf" / "hub") == []


def test_disk_full_mid_download_then_resume(hf_env, monkeypatch, smollm2_gguf, tmp_path):
    from runtime import hub_download

    class FullAfter:
        """A file that fills the disk after 20 MB, as ENOSPC does."""

        def __init__(self, f):
            self.f = f

        def write(self, data):
            if self.f.tell() + len(data) > 20 << 20:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(hub_download, "open", lambda p, m: FullAfter(open(p, m)), raising=False)
        with pytest.raises(HubError, match=r"the disk is full: .*gguf stopped at 2\d\.\d MB "
                                           r"of 98\.4 MB in .*blobs; free some space"):
            hub.resolve(HubSpec.parse(GGUF_REPO))
    assert not list((tmp_path / "hf" / "hub").rglob("snapshots/*/*.gguf"))
    hf_env.reset()  # space freed: the next run resumes
    model = hub.resolve(HubSpec.parse(GGUF_REPO))
    assert sha256_of(model.path) == sha256_of(smollm2_gguf)
    assert hf_env.requests("/cdn/")[0][1].endswith(f"bytes={20 << 20}-")


def test_transformers_repo_fetches_only_what_export_reads(hf_env):
    model = hub.resolve(HubSpec.parse(TINY_HF_REPO), "export")
    assert model.kind == "hf"
    assert sorted(os.listdir(model.path)) == ["config.json", "model.safetensors",
                                              "tokenizer.json", "tokenizer_config.json"]


def test_progress_lines_off_a_terminal(monkeypatch, caplog):
    """Off a terminal (pytest captures stderr) the bar is log lines, at most one per
    interval, none for the start and the end (the caller logs those)."""
    import logging

    from runtime import hub_download

    bar_class = hub_download.progress_class()
    assert bar_class is not None
    monkeypatch.setattr(hub_download, "_LINE_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="runtime.hub_download"):
        bar = bar_class(total=200_000_000, desc="model.gguf", unit="B", mininterval=0)
        bar.update(50_000_000)
        bar.update(150_000_000)
        bar.close()
    assert [r.getMessage() for r in caplog.records] == ["model.gguf: 50.0 MB of 200.0 MB (25%)"]
