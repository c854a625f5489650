"""Progress bars where the output is not a terminal: a line per stage, not one per update."""

from __future__ import annotations

from tests.conftest import run_cli


def test_a_bar_into_a_log_is_one_line_per_stage():
    code = (
        "import time\nfrom brainlm.progress import bar\n"
        "for _ in bar(range(300), desc='stage', unit='x'):\n    time.sleep(0.001)\n"
        "for _ in bar(range(300), desc='inner detail', inner=True):\n    time.sleep(0.001)\n"
    )
    proc = run_cli("-c", code)  # stderr is a pipe, as in CI or `make demo > log`
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("\r") <= 2 and proc.stderr.count("\n") == 1, repr(proc.stderr)
    assert "stage: 100%" in proc.stderr and "inner detail" not in proc.stderr
