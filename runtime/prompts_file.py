"""Prompt files, read the same way by ``bridge export --calib`` and ``bridge bench --prompts``.

Two formats, chosen by the suffix: ``.jsonl`` holds one ``{"prompt": "..."}`` object per
line; anything else is text with one prompt per line. Blank lines are skipped in both.
"""

from __future__ import annotations

import json
from pathlib import Path


def read_prompts(path: Path | str) -> list[str]:
    """The prompts in ``path``, in file order.

    Args:
        path: a ``.txt`` (one prompt per line) or ``.jsonl`` (``{"prompt": ...}`` per line)
            file.

    Returns:
        The prompts, stripped of surrounding whitespace in a text file, as written in JSON.

    Raises:
        ValueError: the file is unreadable, malformed, or holds no prompt (one line says
            which and where).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read prompt file {path}: "
                         f"{getattr(e, 'strerror', None) or e}") from None
    if path.suffix.lower() == ".jsonl":
        prompts = [_jsonl_prompt(line, path, n) for n, line in enumerate(lines, 1)
                   if line.strip()]
    else:
        prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt; write one prompt per line "
                         "(.txt) or one {\"prompt\": ...} object per line (.jsonl)")
    return prompts


def _jsonl_prompt(line: str, path: Path, n: int) -> str:
    try:
        obj = json.loads(line)
    except ValueError:
        raise ValueError(f"{path} line {n} is not JSON; expected {{\"prompt\": \"...\"}}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise ValueError(f"{path} line {n} has no string \"prompt\" field; expected "
                         "{\"prompt\": \"...\"}")
    return obj["prompt"]
