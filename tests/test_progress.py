"""What reaches the terminal: progress bars where the output is not one (a line per stage, not one per update), and
the library's messages, which the commands show and a notebook keeps quiet until asked."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_a_bar_into_a_log_is_one_line_per_stage():
    code = (
        "import time\nfrom brainlm.progress import bar\n"
        "for _ in bar(range(300), desc='stage', unit='x'):\n    time.sleep(0.001)\n"
        "for _ in bar(range(300), desc='inner detail', inner=True):\n    time.sleep(0.001)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)  # stderr a pipe, as in CI
    raw = proc.stderr  # bytes: text mode would turn every carriage return into a newline
    assert proc.returncode == 0, raw
    assert raw.count(b"\r") <= 2 and raw.count(b"\n") == 1, raw
    assert b"stage: 100%" in raw and b"inner detail" not in raw


def test_library_messages_reach_the_terminal_only_through_a_command():
    code = (
        "import logging\nfrom brainlm.logs import to_terminal\n"
        "log = logging.getLogger('brainlm.eval.reconstruct')\n"
        "log.info('quiet note'); log.warning('said warning')\n"  # unconfigured, as a notebook: warnings only
        "to_terminal(); to_terminal()\n"  # as every command: one handler however often it is asked
        "log.info('shown note'); log.warning('shown warning'); logging.getLogger('data_prep.build').info('built')\n"
        "logging.getLogger('mlflow').info('not ours')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "shown note\nbuilt\n", proc.stdout
    assert proc.stderr == "said warning\nwarning: shown warning\n", proc.stderr
