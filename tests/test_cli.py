"""The click layer: help, version, and one-line errors for bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from bridge import __version__
from bridge.cli import cli


def test_help_lists_every_subcommand():
    out = CliRunner().invoke(cli, ["--help"])
    assert out.exit_code == 0
    for name in ("export", "generate", "chat", "bench", "fetch-models"):
        assert name in out.output


def test_version():
    out = CliRunner().invoke(cli, ["--version"])
    assert out.exit_code == 0 and __version__ in out.output


@pytest.mark.parametrize("argv, message", [
    # table of user mistakes: each gets one line naming the problem, exit 1, no traceback
    (["export", "no/such/model"], "not found"),
    (["generate", "no/such.gguf", "-p", "hi"], "not found"),
    (["chat", "no/such.gguf"], "not found"),
    (["bench", "no/such.gguf"], "not found"),
    (["generate", str(Path(__file__).parents[1] / "README.md"), "-p", "hi"], "is not a GGUF file"),
])
def test_bad_model_paths_fail_in_one_line(argv, message):
    out = CliRunner().invoke(cli, argv)
    assert out.exit_code == 1, out.output
    assert message in out.output
    assert "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1


def test_fetch_models_lists_paths(smollm2_gguf, gemma3_gguf):
    out = CliRunner().invoke(cli, ["fetch-models", "--no-hf-fixture"])
    assert out.exit_code == 0, out.output
    assert str(smollm2_gguf) in out.output and str(gemma3_gguf) in out.output
