"""The live progress bar: redrawn in place on a pseudo-terminal, plain lines through a pipe."""

import os
import pty
import select
import subprocess
import sys
import textwrap

from pipeline.progress import ProgressBar, format_duration
from pipeline.runner import RunStats

# A fake run: 8 documents finishing one every 50 ms, reported every 10 ms.
SCRIPT = textwrap.dedent("""
    import sys, time
    from pipeline.progress import ProgressBar
    from pipeline.runner import RunStats

    bar = ProgressBar(quiet=sys.argv[1] == "quiet", total=8, interval_s=0.1, redraw_s=0.01)
    stats = RunStats(num_docs=8)
    t0 = time.monotonic()
    for step in range(40):
        time.sleep(0.01)
        stats.num_ok = step // 5
        stats.num_chunks = 3 * stats.num_ok
        stats.prompt_tokens = 1000 * step
        stats.wall_s = time.monotonic() - t0
        bar(stats)
    stats.num_ok = 8
    bar.close()
""")


def run_script(quiet: bool, use_pty: bool) -> str:
    args = [sys.executable, "-c", SCRIPT, "quiet" if quiet else "loud"]
    if not use_pty:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=os.getcwd())
        assert proc.returncode == 0, proc.stderr
        return proc.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=slave, cwd=os.getcwd())
    os.close(slave)
    out = b""
    while True:
        ready, _, _ = select.select([master], [], [], 30)
        if not ready:
            break
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    os.close(master)
    assert proc.wait(timeout=30) == 0
    return out.decode("utf-8")


def test_bar_redraws_in_place_on_a_terminal():
    out = run_script(quiet=False, use_pty=True)
    frames = [f for f in out.split("\r") if f.strip()]
    assert len(frames) >= 5  # many redraws of one line
    assert out.count("\n") <= 2  # one line, ended once (the pty may echo \n as \r\n)
    assert all(f.rstrip("\r\n").endswith("\x1b[K") for f in frames)  # each erases what was left
    last = frames[-1]
    assert "docs 8/8 [" + "█" * 20 + "] 100%" in last
    assert "chunks" in last and "tok/s" in last and "<00:00" in last  # elapsed<ETA
    middle = frames[len(frames) // 2]
    assert "░" in middle and "tok/s" in middle


def test_plain_lines_through_a_pipe():
    out = run_script(quiet=False, use_pty=False)
    lines = out.splitlines()
    assert "\r" not in out and "\x1b" not in out
    assert 2 <= len(lines) <= 8  # every interval_s (0.1 s over ~0.45 s), plus the last one
    assert lines[-1].startswith("docs 8/8 [") and "100%" in lines[-1]
    assert all(" | chunks " in line and " tok/s | " in line for line in lines)


def test_quiet_prints_nothing():
    assert run_script(quiet=True, use_pty=False) == ""
    assert run_script(quiet=True, use_pty=True) == ""


def test_eta_and_unknown_total():
    stats = RunStats(num_docs=5, num_ok=2, num_chunks=7, prompt_tokens=900, generated_tokens=100,
                     wall_s=10.0)
    assert ProgressBar(total=10, is_tty=False).line(stats) == (
        "docs 2/10 [████░░░░░░░░░░░░░░░░]  20% | chunks 7 | 100 tok/s | 00:10<00:40")
    assert ProgressBar(is_tty=False).line(stats) == "docs 2/5? | chunks 7 | 100 tok/s | 00:10<?"
    assert format_duration(3725) == "1:02:05"
