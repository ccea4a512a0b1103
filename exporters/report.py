"""What layer scoring found: ``<name>-<QUANT>.layers.json``, a chart, a terminal table,
and progress reporting for the long stages.

The files are written by the export's staging (temporary name, rename when complete);
this module only renders them. Progress goes through a ``Stages`` callable so that the
library never draws on the terminal by itself: the CLI passes ``rich_stages``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

# stages(description, total) -> context manager yielding advance(n)
Stages = Callable[[str, int], AbstractContextManager[Callable[[int], None]]]


@contextlib.contextmanager
def log_stages(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """Default progress: one log line per stage."""
    log.info("%s (%d steps)", description, total)
    yield lambda n: None


@contextlib.contextmanager
def rich_stages(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar with ETA on stderr (for the CLI)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


@dataclass
class LayerReport:
    """Everything scoring decided, as written to ``.layers.json``.

    ``scores[method][i]``: layer i's importance by that method (higher = keep).
    ``heldout_alpha``: teacher-forced top-1 agreement of the draft with the full model on
    the held-out prompts (PyTorch). ``auto``: the ``--prune auto`` table and decision.
    ``prompts_offered``: the calibration prompts given (built-in or ``--calib``), of which
    ``calib_prompts + heldout_prompts`` fit ``time_budget_s`` (None: no budget).
    """

    model: str
    n_layers: int
    method: str
    protected: list[int]
    dropped: list[int]
    scores: dict[str, list[float]]
    heldout_alpha: float
    calib_prompts: int
    heldout_prompts: int
    calib_tokens: int
    device_profile: str
    draft_bytes_fraction: float
    gamma: int
    predicted_speedup: float
    seconds: dict[str, float] = field(default_factory=dict)
    auto: dict | None = None
    prompts_offered: int = 0
    time_budget_s: float | None = None


def to_json(report: LayerReport) -> str:
    return json.dumps(asdict(report), indent=2)


def write_json(report: LayerReport, path: Path) -> None:
    path.write_text(to_json(report) + "\n")


def write_png(report: LayerReport, path: Path) -> None:
    """Per-layer scores of each method (normalized to its max), dropped layers shaded."""
    import matplotlib

    matplotlib.use("Agg")  # no display; safe in threads and on servers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    layers = list(range(report.n_layers))
    for method, values in report.scores.items():
        top = max(max(values), 1e-12)
        ax.plot(layers, [v / top for v in values], marker="o", ms=3, label=method)
    for i in report.dropped:
        ax.axvspan(i - 0.5, i + 0.5, color="red", alpha=0.15, lw=0)
    ax.set_xlabel("layer")
    ax.set_ylabel("importance (/ max)")
    ax.set_title(f"{report.model}: dropped {len(report.dropped)}/{report.n_layers} by "
                 f"{report.method} (shaded), held-out acceptance {report.heldout_alpha:.2f}")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=100)
    plt.close(fig)


def table(report: LayerReport):
    """A rich Table of the per-layer scores, dropped layers marked (the CLI prints it)."""
    from rich.table import Table

    t = Table(title=f"layer choice for {report.model}")
    t.add_column("layer", justify="right")
    for method in report.scores:
        t.add_column(method, justify="right")
    t.add_column("")
    for i in range(report.n_layers):
        mark = "dropped" if i in report.dropped else ("kept*" if i in report.protected else "")
        t.add_row(str(i), *(f"{v[i]:.4f}" for v in report.scores.values()), mark)
    return t


def summary(report: LayerReport) -> str:
    """The decision in a line (two with --prune auto), printed under the table: a table
    caption would be wrapped to the table's narrow width."""
    used = report.calib_prompts + report.heldout_prompts
    cut = (f"\ncalibrated on {used} of {report.prompts_offered} prompts "
           f"({report.calib_prompts} scored, {report.heldout_prompts} held out) to fit the "
           f"time budget of {report.time_budget_s / 60:g} min; --time-budget raises it"
           if used < report.prompts_offered and report.time_budget_s else "")
    return (f"dropped {report.dropped} by {report.method}; held-out acceptance "
            f"{report.heldout_alpha:.3f}; predicted {report.predicted_speedup:.2f}x "
            f"(gamma {report.gamma}, '{report.device_profile}' profile)"
            + (f"\n{report.auto['reason']}" if report.auto else "") + cut)
