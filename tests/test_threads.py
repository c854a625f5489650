"""Thread counts are chosen on purpose: the free cores shared by a machine's ranks, unless given."""

from __future__ import annotations

import os

import pytest

from brainlm import threads


def test_threads_follow_the_free_cores_and_the_ranks(monkeypatch):
    monkeypatch.delenv("BRAINLM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    assert threads.choose(1)[0] == 8 and threads.choose(2)[0] == 4 and threads.choose(16)[0] == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (3.4, 0.0, 0.0))  # three other busy processes
    assert threads.choose(1)[0] == 5 and threads.choose(2)[0] == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (40.0, 0.0, 0.0))  # a saturated machine: one thread, not zero
    assert threads.choose(1)[0] == 1


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
