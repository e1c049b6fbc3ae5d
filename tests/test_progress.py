"""Progress output: a tqdm bar on a terminal, plain lines in a log (no carriage-return redraws)."""

from __future__ import annotations

import io
import subprocess
import sys

from magvit.progress import LogProgress, progress


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_progress_writes_a_line_per_interval_and_at_the_ends():
    out, clock = io.StringIO(), FakeClock()
    bar = LogProgress(total=150, desc="train", unit="step", file=out, interval=30.0, clock=clock)
    for _ in range(150):
        clock.now += 1.0  # one step per second: lines at 30, 60, 90, 120 s
        bar.update(1)
        bar.set_postfix(loss="0.1234")
    bar.close()
    bar.close()  # a second close writes nothing
    text = out.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 6  # the start, then 30, 60, 90, 120, 150 s (the end: not twice)
    assert lines[0].startswith("train: 0/150 step (0%)")
    assert lines[1].startswith("train: 30/150 step (20%), 00:30 elapsed, 1 step/s, 02:00 left, loss=0.1234")
    assert lines[-1].startswith("train: 150/150 step (100%), 02:30 elapsed")
    assert all(len(line) < 200 for line in lines)


def test_log_progress_resumed_run_counts_its_rate_from_the_resume_step():
    out, clock = io.StringIO(), FakeClock()
    bar = LogProgress(total=100, initial=60, unit="step", file=out, clock=clock)
    clock.now = 20.0
    bar.update(10)
    bar.close()
    assert out.getvalue().splitlines()[-1] == "70/100 step (70%), 00:20 elapsed, 0.5 step/s, 01:00 left"


def test_log_progress_iterates_and_disabled_writes_nothing():
    out = io.StringIO()
    assert list(LogProgress(range(3), desc="x", file=out)) == [0, 1, 2]
    assert out.getvalue().splitlines()[-1].startswith("x: 3/3 it (100%)")
    quiet = io.StringIO()
    assert list(progress(range(3), file=quiet, disable=True)) == [0, 1, 2]
    assert quiet.getvalue() == ""


def test_progress_picks_by_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    from tqdm import tqdm

    assert isinstance(progress(total=3, file=io.StringIO()), LogProgress)
    bar = progress(total=3, file=Tty())
    assert isinstance(bar, tqdm)
    bar.close()


def test_a_command_with_stderr_in_a_file_logs_lines(tmp_path):
    """A real prep command with stderr redirected to a file: one line per report, none with a carriage return."""
    log = tmp_path / "err.log"
    code = ("import sys; from magvit.progress import progress\n"
            "for _ in progress(range(500), desc='work', unit='clip'): pass\n")
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", code], stderr=f, check=True)
    text = log.read_text()
    assert "\r" not in text and text.splitlines()[-1].startswith("work: 500/500 clip (100%)")
