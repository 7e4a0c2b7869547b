"""The cause of a failed workflow job, on the screen (the workflow's `onerror` handler).

failed_job_errors(snakemake_logs): for each failed job of Snakemake's main log(s), the job log's
`error:` line(s) (else its traceback's exception line, else its last line that is not a
progress bar; a job killed by a signal is said to be, with the likely cause), each after the
log's path; and a line when the working directory's file system is full. The commands write to
their log files only. Imports nothing of the package (the Snakefile loads it at every start).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal

# A progress bar (tqdm) redraws its line with "\r" and no newline, so whatever a job prints next
# (its `error:` line) lands after the bar on the same line.
_BAR_END = r"(?:^|[\]|])\s*"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _failed_logs(text):
    """Log files of the failed jobs in a Snakemake main log: from the `log: ... (check log
    file(s) ...)` line of a job's error block, else (with `--quiet rules` there is no such block)
    from the `> LOG 2>&1' returned non-zero exit status` end of its command."""
    found = []
    for m in re.finditer(
        r"^\s*log: (.+?) \(check log file\(s\) for error details\)", text, re.M
    ):
        found += m.group(1).split(", ")
    for m in _COMMAND_END.finditer(text):
        try:
            found += shlex.split(m.group(1))
        except ValueError:
            continue
    return list(dict.fromkeys(found))


# The end of a failed shell command in Snakemake's log: its job log, and its exit status (the
# shell reports a command killed by signal N as 128 + N; Python's own "died with <Signals...>").
_COMMAND_END = re.compile(
    r"> ('(?:[^']|'\\'')*'|\S+) 2>&1' (?:returned non-zero exit status (-?\d+)|died with "
    r"<Signals\.\w+: (\d+)>)"
)


def _killed_by(text):
    """{job log: signal number} for the failed commands of a Snakemake log killed by a signal."""
    out = {}
    for m in _COMMAND_END.finditer(text):
        status = int(m.group(2)) if m.group(2) else -int(m.group(3))
        sig = status - 128 if status > 128 else -status if status < 0 else 0
        if sig:
            try:
                out.update(dict.fromkeys(shlex.split(m.group(1)), sig))
            except ValueError:
                continue
    return out


def _signal_line(sig):
    try:
        name = signal.Signals(sig).name
    except ValueError:
        name = f"signal {sig}"
    why = {9: "out of memory?", 15: f"{name}: stopped by a user or a scheduler?"}
    return f"killed by signal {sig} ({why.get(sig, name)})"


def _log_error_lines(text):
    """A job log's `error:` line(s), else its traceback's exception line, else its last line
    that is not a progress bar."""
    text = _ANSI.sub("", text.replace("\r", "\n"))
    found = [
        m.group(1).strip() for m in re.finditer(_BAR_END + r"(error: .*)$", text, re.M)
    ]
    found = list(dict.fromkeys(found))
    if not found and "Traceback (most recent call last):" in text:
        tb = text.rsplit("Traceback (most recent call last):", 1)[1].splitlines()
        exception = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Interrupt)\b")
        found = [ln for ln in tb if exception.match(ln)][:1]
    if not found:
        bar = re.compile(r"\d+%\|.*\|")
        found = [
            ln.strip() for ln in text.splitlines() if ln.strip() and not bar.search(ln)
        ][-1:]
    return found


def _disk_note():
    """A line when the working directory's file system is full: the jobs' own messages (and
    Snakemake's metadata) may not have been written at all."""
    try:
        free = shutil.disk_usage(".").free
    except OSError:
        return []
    if free >= 64 * 1024:
        return []
    return [
        f"{os.getcwd()}: no space left on device ({free} bytes free): free space and run "
        "again (outputs of the failed jobs were removed or never completed)"
    ]


def failed_job_errors(snakemake_logs):
    """The `error:` line(s) of each failed job's log (else its traceback's exception line, else its
    last line that is not a progress bar; a job killed by a signal is said to be), each after the
    log's path.

    The commands write to their log files only; this puts the cause on the screen (onerror).
    """
    failed, killed = [], {}
    for main_log in snakemake_logs or []:
        try:
            text = open(main_log, encoding="utf-8", errors="replace").read()
        except OSError:
            continue
        failed += [p for p in _failed_logs(text) if p not in failed]
        killed.update(_killed_by(text))
    lines = []
    for path in failed:
        if path in killed:
            lines.append(f"{path}: {_signal_line(killed[path])}")
            continue
        try:
            text = open(path, encoding="utf-8", errors="replace").read()
        except OSError:
            continue
        lines += [f"{path}: {ln}" for ln in _log_error_lines(text)]
    return lines + _disk_note()
