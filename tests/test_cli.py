"""The click layer: help, version, and honest placeholders for commands not built yet."""

from __future__ import annotations

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


@pytest.mark.parametrize("argv", [
    ["export", "model.gguf", "--prune", "0.4"],
    ["generate", "model.gguf", "-p", "hi"],
    ["chat", "model.gguf"],
    ["bench", "model.gguf"],
])
def test_unbuilt_commands_fail_plainly(argv):
    out = CliRunner().invoke(cli, argv)
    assert out.exit_code == 1
    assert "not built yet" in out.output
    assert "Traceback" not in out.output


def test_fetch_models_lists_paths(smollm2_gguf, gemma3_gguf):
    out = CliRunner().invoke(cli, ["fetch-models", "--no-hf-fixture"])
    assert out.exit_code == 0, out.output
    assert str(smollm2_gguf) in out.output and str(gemma3_gguf) in out.output
