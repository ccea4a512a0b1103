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


@pytest.mark.parametrize(
    "argv, message",
    [
        # table of user mistakes: each gets one line naming the problem, exit 1, no traceback
        (["export", "no/such/model"], "not found"),
        (["generate", "no/such.gguf", "-p", "hi"], "not found"),
        (["chat", "no/such.gguf"], "not found"),
        (["bench", "no/such.gguf"], "not found"),
        (
            ["generate", str(Path(__file__).parents[1] / "README.md"), "-p", "hi"],
            "is not a GGUF file",
        ),
    ],
)
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


def test_draft_from_another_model_is_refused(smollm2_gguf, gemma3_gguf):
    out = CliRunner().invoke(
        cli, ["generate", str(smollm2_gguf), "--draft", str(gemma3_gguf), "-p", "hi", "-n", "4"]
    )
    assert out.exit_code == 1
    assert "does not belong" in out.output and "--no-draft" in out.output


@pytest.mark.parametrize(
    "argv, message",
    [
        (["-n", "0"], "-n must be >= 1"),
        (["--top-p", "1.5"], "--top-p must be in"),
        (["--temp", "-1"], "--temp must be in"),
        (["--draft", "missing.draft.gguf"], "draft file not found"),
        (["-c", "10"], "-c/--ctx must be"),
        (["--drafter", "nope"], "'nope' is not one of 'auto', 'lookup', 'pruned', 'none'"),
        (["--drafter", "pruned"], "--drafter pruned needs a draft GGUF"),
        (["--drafter", "lookup", "--no-draft"], "--no-draft contradicts --drafter lookup"),
    ],
)
def test_bad_generate_options(smollm2_gguf, argv, message):
    out = CliRunner().invoke(cli, ["generate", str(smollm2_gguf), "-p", "hi", *argv])
    assert out.exit_code in (1, 2) and message in out.output, out.output  # 2: click usage
    assert "Traceback" not in out.output


def test_generate_json_is_one_object(smollm2_gguf):
    import json

    out = CliRunner().invoke(
        cli,
        [
            "generate",
            str(smollm2_gguf),
            "--no-draft",
            "--temp",
            "0",
            "--threads",
            "1",
            "-p",
            "The capital of France is",
            "-n",
            "8",
            "--json",
        ],
    )
    assert out.exit_code == 0, out.output
    obj = json.loads(out.stdout)
    assert len(obj["tokens"]) == 8 and "Paris" in obj["text"]
    assert set(obj["stats"]) >= {
        "mode",
        "tokens_per_s",
        "n_steps",
        "n_drafted",
        "n_accepted",
        "acceptance_rate",
        "mean_accepted_per_step",
    }
    assert obj["stats"]["mode"] == "plain"
    assert obj["finish_reason"] == "length" == obj["stats"]["finish_reason"]


def test_generate_says_when_speculation_was_off(smollm2_gguf):
    """A stats line never says 'speculative' when nothing was drafted."""
    out = CliRunner().invoke(cli, ["generate", str(smollm2_gguf), "--drafter", "lookup",
                                   "--temp", "0", "--threads", "1", "-p", "Hi", "-n", "4",
                                   "--recalibrate"])
    assert out.exit_code == 0, out.output
    line = out.stderr.strip().splitlines()[-1]
    assert "4 tokens" in line
    assert ("plain (speculation off)" in line) or ("drafts carried by" in line), line


def test_tiny_context_never_aborts(smollm2_gguf):
    """Issue 16: -c 64 with a 71-token prompt aborted in llama.cpp (exit 134); any -c gives
    an answer or one clean line."""
    import subprocess
    import sys

    prompt = "one two three four five six seven eight nine ten " * 7
    for ctx in ("64", "96"):
        r = subprocess.run([sys.executable, "-m", "bridge.cli", "generate", str(smollm2_gguf),
                            "-p", prompt, "-c", ctx, "--no-draft", "--threads", "1",
                            "-n", "4"], capture_output=True, text=True, timeout=120)
        assert r.returncode in (0, 1), r.stderr[-500:]
        assert "Traceback" not in r.stderr and "GGML_ASSERT" not in r.stderr
        if r.returncode == 1:
            assert "context holds" in r.stderr


def test_chat_with_closed_stdin_exits_cleanly(smollm2_gguf):
    out = CliRunner().invoke(
        cli, ["chat", str(smollm2_gguf), "--no-draft", "--threads", "1"], input=""
    )
    assert out.exit_code == 0
    assert "Traceback" not in out.output


def test_chat_turns_and_commands(smollm2_gguf):
    script = "What is 2+2?\n/stats\n/bogus\n/reset\n/exit\n"
    out = CliRunner().invoke(
        cli,
        ["chat", str(smollm2_gguf), "--no-draft", "--temp", "0", "--threads", "1", "-n", "12"],
        input=script,
    )
    assert out.exit_code == 0, out.output
    assert "4" in out.output  # the answer
    assert '"tokens_per_s"' in out.output  # /stats
    assert '"gamma": "0x' in out.output    # gamma summarised, not one number per line
    assert "unknown command /bogus" in out.output
    assert "conversation cleared" in out.output


@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_bench_json(which, smollm2_gguf, smollm2_draft_gguf, gemma3_gguf, tmp_path):
    """`bridge bench --json -` on a chat model and on a base model without a template."""
    import json
    import shutil

    if which == "smollm2":
        model, draft = smollm2_gguf, smollm2_draft_gguf
    else:
        from exporters.prune import DraftInfo, write_draft
        from runtime.files import sha256_file_cached

        model = tmp_path / "g.gguf"
        shutil.copy(gemma3_gguf, model)
        draft = tmp_path / "g.draft.gguf"
        write_draft(model, draft, [i for i in range(18) if i != 16],
                    DraftInfo("manual", sha256_file_cached(model)))
    prompts = tmp_path / "p.txt"
    prompts.write_text("Why is the sky blue?\nWrite a haiku about rain.\n")
    out = CliRunner().invoke(cli, ["bench", str(model), "--draft", str(draft), "--prompts",
                                   str(prompts), "-n", "6", "--gammas", "2", "--lookup-gamma",
                                   "4", "--threads", "1", "--json", "-"])
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    modes = r["sets"]["prompts"]["modes"]
    lean = ("llama.cpp loop", "llama.cpp loop, backend argmax")
    assert set(modes) == {"plain", "auto", "lookup", "pruned", "lookup γ=4", "pruned γ=2",
                          *lean}
    # the faster of llama.cpp's own greedy loops is the baseline, with its answers compared
    assert max(modes[n]["vs_llama_cpp"] for n in lean) == 1.0
    assert all(modes[n]["vs_llama_cpp"] <= 1.0 for n in lean)
    assert all(m["python_us_per_step"] >= 0 and m["python_us_per_step_median"] >= 0
               for m in modes.values())
    for m in modes.values():  # every difference from plain is reported with its margin
        assert len(m["divergence_margins"]) == 2 - m["identical_to_plain"]
    assert modes["pruned γ=2"]["sources"]["pruned"]["drafted"] > 0
    assert r["costs"]["verify_curve"]["1"] == 1.0 and len(r["costs"]["verify_curve"]) == 16
    assert modes["plain"]["tokens_per_s"] > 0
    # the machine's measured bound on batched vs one-token logits is part of every report
    bound = r["numerics"]["bound"]
    assert bound["max_abs"] >= 0 and bound["n_positions"] > 0 and not r["numerics"]["exact"]
    assert "single-token logits" in r["numerics"]["describe"]
    assert r["machine"]["cpu_flags"] is not None and "llama_cpp_system" in r["machine"]


def test_bench_exact_caps_the_batch(smollm2_gguf, smollm2_draft_gguf, tmp_path):
    """`bridge bench --exact`: every greedy answer equals plain decoding's, and the
    report says the bound is zero over the widths exact mode verifies."""
    import json

    prompts = tmp_path / "p.txt"
    prompts.write_text("Why is the sky blue?\nWrite a haiku about rain.\n")
    out = CliRunner().invoke(cli, ["bench", str(smollm2_gguf), "--draft",
                                   str(smollm2_draft_gguf), "--prompts", str(prompts), "-n",
                                   "24", "--gammas", "4", "--threads", "1", "--exact",
                                   "--json", "-"])
    assert out.exit_code == 0, out.output
    r = json.loads(out.stdout)
    assert r["numerics"]["exact"] and r["numerics"]["bound"]["max_abs"] == 0.0
    assert max(r["numerics"]["bound"]["widths"]) <= r["numerics"]["max_rows"]
    for name, m in r["sets"]["prompts"]["modes"].items():
        assert m["identical_to_plain"] == 2, name


# -- constraints on the answer: --json-schema, --format json, --grammar --------------------

def _files(tmp_path: Path) -> dict[str, Path]:
    files = {"bad.json": "{not json", "bad_schema.json": '{"type": 7}',
             "bad.gbnf": 'root ::= "a', "empty.gbnf": "  \n",
             "yes.gbnf": 'root ::= "yes" | "no"',
             "person.json": '{"type": "object", "additionalProperties": false, '
                            '"required": ["name", "age"], "properties": {"name": '
                            '{"type": "string", "maxLength": 20}, "age": {"type": '
                            '"integer", "minimum": 0, "maximum": 120}}}'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return {name: tmp_path / name for name in files}


@pytest.mark.parametrize("cmd", ["generate", "chat"])
@pytest.mark.parametrize("opts, message", [
    # each bad file or combination: one line naming the problem, exit 1
    (["--json-schema", "bad.json"], "not valid JSON"),
    (["--json-schema", "bad_schema.json"], "invalid JSON schema"),
    (["--json-schema", "missing.json"], "file not found"),
    (["--grammar", "bad.gbnf"], "grammar"),
    (["--grammar", "empty.gbnf"], "the gbnf is empty"),
    (["--grammar", "yes.gbnf", "--format", "json"], "give one of"),
])
def test_bad_constraint_files_fail_in_one_line(smollm2_gguf, tmp_path, cmd, opts, message):
    files = _files(tmp_path)
    opts = [str(files.get(o, tmp_path / o)) if o.endswith((".json", ".gbnf")) else o
            for o in opts]
    argv = [cmd, str(smollm2_gguf), "--threads", "1", "--no-draft", *opts]
    if cmd == "generate":
        argv += ["-p", "hi"]
    out = CliRunner().invoke(cli, argv, input="")
    assert out.exit_code == 1, out.output
    assert message in out.output and out.output.startswith("Error:"), out.output
    assert "Traceback" not in out.output
    assert len(out.output.strip().splitlines()) == 1


def test_generate_with_a_schema_and_a_grammar(smollm2_gguf, tmp_path):
    import json

    files = _files(tmp_path)
    base = ["generate", str(smollm2_gguf), "--threads", "1", "--temp", "0", "--chat",
            "--json", "-n", "64"]
    out = CliRunner().invoke(cli, [*base, "--json-schema", str(files["person.json"]),
                                   "-p", "Extract the person: Ann Bell, 29."])
    assert out.exit_code == 0, out.output
    answer = json.loads(out.output.strip().splitlines()[-1])
    person = json.loads(answer["text"])
    assert set(person) == {"name", "age"} and 0 <= person["age"] <= 120
    assert answer["finish_reason"] == "eog"
    out = CliRunner().invoke(cli, [*base, "--grammar", str(files["yes.gbnf"]),
                                   "-p", "Is the sky blue?"])
    assert json.loads(out.output.strip().splitlines()[-1])["text"] in ("yes", "no")
