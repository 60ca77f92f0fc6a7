"""Live progress of a run on stderr, as tqdm and Ray Data show it. Top level only (the CLI).

On a terminal, one bar redrawn in place (`\\r`, then erase to the end of the line):

    docs 12/40 [██████░░░░░░░░░░░░░░] 30% | chunks 85 | 1,234 tok/s | 00:42<01:38 | failed 1

When stderr is not a terminal (CI logs, a pipe, a file), the same facts as plain lines, one
every `interval_s` seconds (5 by default) and a last one at the end. `quiet` prints nothing.

The total is the number of documents when it is known in advance (`total`, e.g. the files of a
directory store or `--limit`), else the number started so far (`?` until the store is read to
its end); the ETA assumes the remaining documents take as long as the finished ones.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import TextIO

_BAR_WIDTH = 20


def format_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ProgressBar:
    """Call it with a RunStats as often as you like; it draws at most every `redraw_s` on a
    terminal and every `interval_s` otherwise. `close()` ends the line (terminal) or prints
    the last plain line."""

    def __init__(self, quiet: bool = False, *, total: int | None = None,
                 stream: TextIO | None = None, interval_s: float = 5.0,
                 redraw_s: float = 0.2, is_tty: bool | None = None) -> None:
        self.quiet = quiet
        self.total = total
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if is_tty is None else is_tty
        self.interval_s = interval_s
        self.redraw_s = redraw_s
        self._last_draw = float("-inf")
        self._last_stats = None
        self._drawn = False

    def __call__(self, stats) -> None:
        if self.quiet:
            return
        self._last_stats = stats
        now = time.monotonic()
        if now - self._last_draw < (self.redraw_s if self.tty else self.interval_s):
            return
        self._last_draw = now
        self._draw(stats)

    def line(self, stats, width: int | None = None) -> str:
        done = stats.num_ok + stats.num_failed
        total = self.total if self.total is not None else None
        rate = (stats.prompt_tokens + stats.generated_tokens) / stats.wall_s if stats.wall_s else 0.0
        eta = None
        if total is not None and done:
            eta = stats.wall_s * max(0, total - done) / done
        elif total is not None and total == 0:
            eta = 0.0
        if total is not None and total > 0:
            frac = min(1.0, done / total)
            filled = int(frac * _BAR_WIDTH)
            bar = "█" * filled + "░" * (_BAR_WIDTH - filled)
            head = f"docs {done}/{total} [{bar}] {frac:4.0%}"
        else:
            head = f"docs {done}/{stats.num_docs}?"
        parts = [head, f"chunks {stats.num_chunks}", f"{rate:,.0f} tok/s",
                 f"{format_duration(stats.wall_s)}<{format_duration(eta)}"]
        if stats.num_failed:
            parts.append(f"failed {stats.num_failed}")
        text = " | ".join(parts)
        if width is not None and len(text) > width - 1:
            text = text[: max(0, width - 1)]
        return text

    def _draw(self, stats) -> None:
        if self.tty:
            width = shutil.get_terminal_size((100, 24)).columns
            self.stream.write("\r" + self.line(stats, width) + "\x1b[K")
            self._drawn = True
        else:
            self.stream.write(self.line(stats) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.quiet:
            return
        if self._last_stats is not None:
            if self.total is None:  # the store was read to its end: the total is known now
                self.total = self._last_stats.num_docs
            self._draw(self._last_stats)
        if self.tty and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
