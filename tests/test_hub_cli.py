"""Hugging Face ids through the commands, against the fake Hub (tests/fakehub.py):
``bridge export org/name-GGUF:Q4_1`` writes only the draft and ``bridge generate`` on the same
id finds it; a split GGUF is joined on export; every command fails in one line on a bad id
and leaves nothing behind; and real processes honour HF_ENDPOINT, HF_HOME, HF_TOKEN and
HF_HUB_OFFLINE (download, then a revision check only, then no request at all).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bridge.cli import cli
from runtime import keys
from tests.conftest import GATED_REPO, GGUF_REPO, HUB_TOKEN, SPLIT_REPO, TINY_HF_REPO
from tests.fakehub import sha256_of

ROOT = Path(__file__).resolve().parent.parent
DRAFT = "SmolLM2-135M-Instruct-Q4_1.draft.gguf"
PROMPT = "The capital of France is"


def _run(*argv: str):
    return CliRunner().invoke(cli, list(argv))


def _errors(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


def test_export_from_a_gguf_repo_writes_the_draft_and_generate_finds_it(
        hf_env, smollm2_gguf, tmp_path):
    out = tmp_path / "out"
    result = _run("export", f"{GGUF_REPO}:Q4_1", "--drop-layers", "10-12", "-o", str(out))
    assert result.exit_code == 0, result.output
    assert sorted(os.listdir(out)) == [DRAFT]  # the cached GGUF is not copied
    assert "(in the Hugging Face cache, not copied" in result.output
    assert f"run    bridge chat {GGUF_REPO}:Q4_1" in result.output
    from runtime.context import LlamaModel

    with LlamaModel(out / DRAFT, vocab_only=True) as draft:
        assert draft.meta(keys.TARGET_SHA256) == sha256_of(smollm2_gguf)
    # the same id again (here through the Python API): the draft is found by the cached
    # file's sha256, which the draft records
    import bridge
    from runtime.config import RuntimeConfig, SpeculativeConfig

    with bridge.load(f"{GGUF_REPO}:Q4_1", runtime=RuntimeConfig(n_ctx=256, n_threads=2),
                     speculative=SpeculativeConfig(drafter="pruned")) as engine:
        assert engine.draft_path == out / DRAFT and "pruned" in engine.sources
    # the same bytes outside the HF cache: its draft would sit beside it, the index is not
    # asked (nor would an experiment's draft be picked up)
    with bridge.load(str(smollm2_gguf), runtime=RuntimeConfig(n_ctx=256, n_threads=2)) as engine:
        assert engine.draft_path is None
    assert hf_env.requests("/cdn/") == [("GET", f"/cdn/{sha256_of(smollm2_gguf)}")]


def test_copy_full_copies_the_cached_gguf(hf_env, smollm2_gguf, tmp_path):
    out = tmp_path / "out"
    result = _run("export", GGUF_REPO, "--drop-layers", "10-12", "-o", str(out),
                  "--copy-full")
    assert result.exit_code == 0, result.output
    full = out / "SmolLM2-135M-Instruct-Q4_1.gguf"
    assert sorted(os.listdir(out)) == [DRAFT, full.name]
    assert sha256_of(full) == sha256_of(smollm2_gguf)


def test_export_from_a_split_gguf_joins_it(hf_env, tmp_path):
    import gguf

    out = tmp_path / "out"
    result = _run("export", SPLIT_REPO, "--drop-layers", "10-12", "-o", str(out))
    assert result.exit_code == 0, result.output
    name = "SmolLM2-135M-Instruct-Q4_1"
    assert sorted(os.listdir(out)) == [f"{name}.draft.gguf", f"{name}.gguf"]
    reader = gguf.GGUFReader(out / f"{name}.gguf")
    assert len(reader.tensors) == 272 and gguf.Keys.Split.LLM_KV_SPLIT_COUNT not in \
        reader.fields


@pytest.mark.slow
def test_export_from_a_transformers_repo(hf_env, hf_repo, tmp_path):
    """``bridge export org/name``: config, tokenizer and safetensors only, then converted."""
    pytest.importorskip("torch")
    out = tmp_path / "out"
    result = _run("export", hf_repo, "--quant", "Q8_0", "--drop-layers", "10-12", "-o",
                  str(out), "--threads", "2")
    assert result.exit_code == 0, result.output
    name = "SmolLM2-135M-Instruct-Q8_0"
    assert sorted(os.listdir(out)) == [f"{name}.draft.gguf", f"{name}.gguf"]
    fetched = {path.split("/resolve/main/")[-1] for _, path in hf_env.requests("/resolve/")}
    assert "bridge-fixture.json" not in fetched and "model.safetensors" in fetched


@pytest.mark.parametrize("argv, message", [
    # every command, every bad id: one line that names the problem and the fix
    (["chat", "bridge-test/no-such-GGUF"], "no model bridge-test/no-such-GGUF on the Hugging "
                                           "Face Hub"),
    (["generate", f"{GGUF_REPO}:Q5_K_M", "-p", "hi"], "has no GGUF for 'Q5_K_M'; it has Q4_1"),
    (["serve", GATED_REPO], "is gated: accept its terms at"),
    (["bench", GGUF_REPO, "--revision", "nope"], "has no revision 'nope'"),
    (["generate", GGUF_REPO, "--draft", "bridge-test/no-such-GGUF", "-p", "hi"],
     "no model bridge-test/no-such-GGUF"),
    (["chat", TINY_HF_REPO], "holds a transformers checkpoint, not GGUF: make a GGUF and "
                             "its draft with `bridge export"),
    (["export", "bridge-test/no-such", "-o", "{out}"], "no model bridge-test/no-such"),
    (["export", f"{TINY_HF_REPO}:Q4_K_M", "-o", "{out}"], "has no GGUF files, only a "
                                                          "transformers checkpoint"),
    (["export", GATED_REPO, "-o", "{out}"], "is gated"),
    (["generate", "smollm2", "--revision", "main", "-p", "hi"], "--revision applies to a "
                                                                 "Hugging Face id"),
])
def test_bad_ids_fail_in_one_line(hf_env, tmp_path, argv, message):
    out = tmp_path / "out"
    result = _run(*[a.replace("{out}", str(out)) for a in argv])
    assert result.exit_code == 1, result.output
    errors = _errors(result)
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output
    assert not out.exists() or not os.listdir(out)
    assert not list((tmp_path / "hf").rglob("snapshots/*/*.gguf"))


def test_offline_with_nothing_cached_fails_in_one_line(hf_env, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = _run("chat", f"{GGUF_REPO}:Q4_1")
    assert result.exit_code == 1
    assert _errors(result) == [
        f"Error: offline (HF_HUB_OFFLINE is set), and {GGUF_REPO}:Q4_1 is not in the Hugging "
        f"Face cache (no {constants.HF_HUB_CACHE}/models--bridge-test--SmolLM2-135M-Instruct-"
        "GGUF/refs/main); run once online to download it"]
    assert hf_env.log == []


@pytest.mark.slow
def test_real_processes_honour_the_hf_variables(fake_hub, tmp_path):
    """What a user's shell does: HF_ENDPOINT, HF_HOME and HF_TOKEN set before bridge starts
    (huggingface_hub reads them at import). A second run starts with no download, only the
    revision check; offline, it asks nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_ENDPOINT=fake_hub.url, HF_HOME=str(tmp_path / "hf"), HF_TOKEN=HUB_TOKEN,
               XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "bridge.cli", "generate", f"{GATED_REPO}:Q4_1", "-p", PROMPT,
            "-n", "2", "--temp", "0", "--threads", "2", "-c", "256", "--drafter", "none"]
    logs = []
    for extra in ({}, {}, {"HF_HUB_OFFLINE": "1", "HF_TOKEN": ""}):
        fake_hub.reset()
        run = subprocess.run(argv, env={**env, **extra}, capture_output=True, text=True,
                             timeout=300, cwd=tmp_path)
        assert run.returncode == 0, run.stderr
        assert "Paris" in run.stdout
        logs.append(list(fake_hub.log))
    api = ("GET", f"/api/models/{GATED_REPO}")
    assert api in logs[0] and any(path.startswith("/cdn/") for _, path in logs[0])
    assert logs[1] == [api]  # cached: the revision check, no download
    assert logs[2] == []  # offline: nothing asked
    assert list((tmp_path / "hf" / "hub").glob("models--bridge-test--gated-GGUF/snapshots/*"))
