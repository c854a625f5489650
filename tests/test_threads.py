"""Thread counts are chosen on purpose: the free cores shared by a machine's ranks, unless given."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

from brainlm import threads


def test_threads_follow_the_free_cores_and_the_ranks(monkeypatch):
    monkeypatch.delenv("BRAINLM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(threads, "busy_cores", lambda: 0.2)
    assert threads.choose(1)[0] == 8 and threads.choose(2)[0] == 4 and threads.choose(16)[0] == 1
    monkeypatch.setattr(threads, "busy_cores", lambda: 3.4)  # three other busy processes
    assert threads.choose(1)[0] == 5 and threads.choose(2)[0] == 2
    monkeypatch.setattr(threads, "busy_cores", lambda: 40.0)  # a saturated machine: one thread, not zero
    assert threads.choose(1)[0] == 1

    def unsampled() -> float:
        raise AssertionError("the load was sampled where the answer cannot depend on it")

    monkeypatch.setattr(threads, "busy_cores", unsampled)  # as many ranks as cores: one thread each, no wait
    assert threads.choose(8) == (1, "8 core(s), 8 rank(s)") and threads.choose(16)[0] == 1


def test_busy_cores_are_measured_now_not_over_the_last_minute():
    """A busy loop started a moment ago shows at once (the 1-minute load average would still be near 0)."""
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        assert threads.busy_cores() >= 0.5  # a whole core, or its share beside the suite's other processes
    finally:
        loop.kill()
        loop.wait()


def test_this_process_s_own_work_is_not_counted_as_another_s(monkeypatch):
    """/proc/stat says one of two cores was busy over the sample: another process's (1 core), or this one's (0)."""
    samples = iter([(0, 0), (100, 200)] * 2)  # (busy, total) jiffies: 50% of 2 cores
    monkeypatch.setattr(threads, "_cpu_times", lambda cpus: next(samples))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert threads.busy_cores(0.3) == pytest.approx(1.0, abs=0.05)  # sleeping here: the busy core is another's
    spin = threading.Event()

    def work() -> None:
        while not spin.is_set():
            sum(range(1000))

    worker = threading.Thread(target=work)
    worker.start()
    try:
        own = threads.busy_cores(0.3)  # this process kept (about) a core busy: none is left for the others
    finally:
        spin.set()
        worker.join()
    assert own < 0.5


def test_a_thread_count_given_wins(monkeypatch):
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose(1) == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv("BRAINLM_THREADS", "2")
    assert threads.choose(1) == (2, "BRAINLM_THREADS")
    assert threads.choose(1, given=5) == (5, "--threads")


def test_a_leading_threads_flag_reaches_the_commands_with_parsers_of_their_own(monkeypatch):
    from brainlm import cli

    monkeypatch.setenv("BRAINLM_THREADS", "1")  # recorded, so what the command sets is undone after the test
    assert cli._leading_threads(["--threads", "3", "pretrain", "--config", "r.yaml"]) == [
        "pretrain",
        "--config",
        "r.yaml",
    ]
    assert os.environ["BRAINLM_THREADS"] == "3" and threads.choose(1) == (3, "BRAINLM_THREADS")
    assert cli._leading_threads(["--threads=1", "pretrain"]) == ["pretrain"] and threads.choose(1)[0] == 1
    with pytest.raises(SystemExit, match="does not apply to `data`; use brainlm data build --workers"):
        cli._leading_threads(["--threads", "2", "data", "build"])
    assert cli._leading_threads(["--threads", "2", "reconstruct"]) == ["--threads", "2", "reconstruct"]  # main parser's
    with pytest.raises(SystemExit, match="whole number of at least 1, got 'x'"):
        cli._leading_threads(["--threads", "x", "pretrain"])
