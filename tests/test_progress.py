"""Progress bars where the output is not a terminal: a line per stage, not one per update."""

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
