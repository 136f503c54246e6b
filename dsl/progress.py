"""Progress of long steps, on stderr: a live line on a terminal, a line every ~30 s in a log."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager


def duration(seconds: float) -> str:
    """``42.0s``, ``3m07s``, ``1h05m``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """Progress of long steps on stderr: a live line on a terminal, a line every ~30 s elsewhere.

    On a terminal the line is redrawn in place; in a log (CI, ``nohup``) a
    step prints a line when it starts, one about every ``interval`` seconds
    (rows, rows/s, ETA) and one when it ends.  The rate and ETA count from the
    end of the first batch, so loading a model does not distort them.  Silent
    with ``--quiet``.
    """

    def __init__(self, enabled: bool, stream=None, *, interval: float = 30.0, tty: bool | None = None):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval

    @contextmanager
    def bar(self, total: int, desc: str, unit: str = "rows"):
        if not self.enabled or total <= 0:
            yield NullBar()
            return
        task = _Task(self, total, desc, unit)
        try:
            yield task
        finally:
            task.close()

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.stream, flush=True)


class NullBar:
    """A bar that shows nothing (``--quiet``, or nothing to do)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str) -> None:
        pass


class _Task:
    """One step with a known amount of work (see :class:`Progress`)."""

    def __init__(self, progress: Progress, total: int, desc: str, unit: str):
        self.p, self.total, self.desc, self.unit = progress, total, desc, unit
        self.done = 0
        self.started = time.monotonic()
        self.first: tuple[float, int] | None = None  # (time, rows) at the end of the first batch
        self.last_shown = 0.0
        self.postfix = ""
        if not self.p.tty:
            self.p.line(f"{desc}: {total:,} {unit} to compute")

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def status(self) -> str:
        text = f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}"
        now = time.monotonic()
        if self.first is not None and now > self.first[0] and self.done > self.first[1]:
            rate = (self.done - self.first[1]) / (now - self.first[0])
            text += f", {rate:.3g} {self.unit}/s, ETA {duration((self.total - self.done) / rate)}"
        elif self.done < self.total:
            text += ", ETA after the first batch"
        return text + (f", {self.postfix}" if self.postfix else "")

    def update(self, n: int = 1) -> None:
        if n <= 0:
            return
        self.done += n
        now = time.monotonic()
        if self.first is None:
            self.first = (now, self.done)
        if self.p.tty:
            if now - self.last_shown >= 0.2 or self.done >= self.total:
                self.last_shown = now
                self.p.stream.write("\r\033[K" + self.status())
                self.p.stream.flush()
        elif now - self.last_shown >= self.p.interval and self.done < self.total:
            self.last_shown = now
            self.p.line(self.status())

    def close(self) -> None:
        elapsed = time.monotonic() - self.started
        if self.p.tty:
            self.p.stream.write("\r\033[K")
            self.p.stream.flush()
        if self.done:
            rate = f" ({self.done / elapsed:.3g} {self.unit}/s)" if elapsed > 0 else ""
            self.p.line(f"{self.desc}: {self.done:,} {self.unit} in {duration(elapsed)}{rate}")
