"""runtime.native.on_passing_thread: init-time computations off the thread that will
generate, on a thread that has ended by the time it returns."""

from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from runtime.native import on_passing_thread, usable_cores


def test_it_returns_what_fn_returns_from_a_thread_that_has_ended():
    seen: list[threading.Thread] = []

    def fn():
        seen.append(threading.current_thread())
        return 42

    assert on_passing_thread(fn) == 42
    assert seen[0] is not threading.current_thread()
    assert not seen[0].is_alive()  # its OpenMP pool (if any) is freed with it


def test_its_errors_reach_the_caller():
    def fn():
        raise ValueError("bad probe")

    with pytest.raises(ValueError, match="bad probe"):
        on_passing_thread(fn)


def test_an_engines_shared_calibration_runs_off_the_callers_thread(smollm2_gguf,
                                                                   monkeypatch):
    """A server builds its engine on the main thread and decodes on its model thread: a
    calibration on the main thread would leave a second OpenMP pool, and libgomp stops
    spinning at barriers once its pools outnumber the cores."""
    from runtime.batching import SharedContext
    from runtime.config import RuntimeConfig, SpeculativeConfig
    from runtime.engine import Engine

    threads: list[threading.Thread] = []
    real = SharedContext.calibrate

    def calibrate(self, widths, *a, **kw):
        threads.append(threading.current_thread())
        return real(self, widths[:2], *a, **kw)  # two widths are enough to see where

    monkeypatch.setattr(SharedContext, "calibrate", calibrate)
    with Engine(smollm2_gguf, draft=None, runtime=RuntimeConfig(n_ctx=512, parallel=2),
                speculative=SpeculativeConfig(drafter="lookup", recalibrate=True)):
        pass
    assert threads and all(t is not threading.current_thread() for t in threads)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no affinity masks here")
def test_usable_cores_follow_the_affinity_mask():
    """A process pinned to one CPU (a container's cpuset, taskset, a test worker) gets one
    llama.cpp thread by default, not one per CPU of the machine."""
    code = ("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from runtime.native import usable_cores; print(usable_cores())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "1"
    assert usable_cores() == len(os.sched_getaffinity(0))
