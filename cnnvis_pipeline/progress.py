"""Progress lines for a job's log: what a long job has done, how fast and how long it still takes.

A job's log is a file (the rules redirect stdout and stderr into results/logs/...), where a
progress bar is one line redrawn with carriage returns. `Progress` writes plain log lines
instead, through the `logging` module (the CLI sends them to stderr):

    extract synthnet: 640/1200 images (53%), 212.4 images/s, ETA 3 s

one when the work starts, then at most one every `every` seconds (10 by default), and one at the
end with the total time. Follow a running job with `tail -f results/logs/<model>/<job>.log`.

The console: a job started with the environment variable CNNVIS_STATUS_FD=<fd> (the workflow's
long rules: `CNNVIS_STATUS_FD=3 python -m cnnvis_pipeline ... 3>&2 > log 2>&1`, fd 3 being
Snakemake's own stderr) also writes its latest log line there once a minute
(`status_handler`), so that Snakemake's default output shows where a long job is.
"""

from __future__ import annotations

import logging
import os
import time

log = logging.getLogger("cnnvis_pipeline.progress")


def duration(seconds: float) -> str:
    """"42 s", "3 min 5 s", "2 h 14 min"."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


class Progress:
    """Log lines of `done/total unit` with the rate and the time left.

    `update(n)` adds n done; `close()` logs the last line (also when the work stopped early).
    `clock` is a function returning seconds (time.monotonic; tests pass their own).
    """

    def __init__(self, what: str, total: int, unit: str = "images", *, every: float = 10.0,
                 enabled: bool = True, logger: logging.Logger | None = None, clock=time.monotonic):
        self.what, self.total, self.unit, self.every = what, int(total), unit, float(every)
        self.enabled, self.log, self.clock = enabled, logger or log, clock
        self.done = 0
        self.start = self.last = clock()
        self.closed = False
        if enabled:
            self.log.info("%s: %d %s to do", what, self.total, unit)

    def line(self) -> str:
        elapsed = self.clock() - self.start
        rate = self.done / elapsed if elapsed > 0 else float("nan")
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = f"{self.what}: {self.done}/{self.total} {self.unit}{share}"
        if rate == rate and rate > 0:
            text += f", {rate:.1f} {self.unit}/s"
            if self.done < self.total:
                text += f", ETA {duration((self.total - self.done) / rate)}"
        return text

    def update(self, n: int = 1) -> None:
        self.done += int(n)
        now = self.clock()
        if self.enabled and now - self.last >= self.every and self.done < self.total:
            self.last = now
            self.log.info("%s", self.line())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.enabled:
            self.log.info("%s in %s", self.line(), duration(self.clock() - self.start))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


STATUS_FD = "CNNVIS_STATUS_FD"
STATUS_EVERY = 60.0  # seconds between two status lines on the console


class StatusHandler(logging.Handler):
    """Writes an INFO record to `stream` when `every` seconds have passed since the job started
    or since its last status line (the records in between only go to the log)."""

    def __init__(self, stream, job: str, every: float = STATUS_EVERY, clock=time.monotonic):
        super().__init__(logging.INFO)
        self.stream, self.job, self.every, self.clock = stream, job, every, clock
        self.last = clock()

    def emit(self, record: logging.LogRecord) -> None:
        now = self.clock()
        if now - self.last < self.every:
            return
        self.last = now
        try:
            self.stream.write(f"[{time.strftime('%H:%M:%S')}] {self.job}: {record.getMessage()}\n")
            self.stream.flush()
        except (OSError, ValueError):  # the console went away: the log still has everything
            self.every = float("inf")


def status_handler(job: str) -> StatusHandler | None:
    """The console's status handler when CNNVIS_STATUS_FD names an open file descriptor."""
    fd = os.environ.get(STATUS_FD, "")
    if not fd.isdigit():
        return None
    try:
        stream = os.fdopen(int(fd), "w", buffering=1, closefd=False)
    except OSError:
        return None
    return StatusHandler(stream, job, every=STATUS_EVERY)
