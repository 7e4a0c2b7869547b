"""Whose is the Snakemake lock of a working directory.

Snakemake's lock (`.snakemake/locks/`) does not say which run holds it. The workflow records
the run that holds it (`record_run`, at onstart: after Snakemake took the lock) and forgets it
when the run ends (`forget_run`, at onsuccess and onerror); a run killed with SIGKILL leaves
both behind. `lock_note()`, called while the Snakefile is read, says whether a lock that is
there belongs to a run still going (two runs in one working directory) or to one that was
killed (a stale lock: run once with --unlock).

Imports nothing of the package (what `snakemake -n` loads stays light).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

RUN_RECORD = Path(".snakemake") / "cnnvis_run.json"
LOCKS = Path(".snakemake") / "locks"


def _running(record: dict) -> bool:
    """Whether the recorded run is still going (a run on another machine: assumed so)."""
    if record.get("host") != socket.gethostname():
        return True
    try:
        pid = int(record["pid"])
        os.kill(pid, 0)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"snakemake" in f.read()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def lock_note() -> str | None:
    """One line about the lock in the working directory, or None when there is none."""
    try:
        if not (LOCKS.is_dir() and any(LOCKS.iterdir())):
            return None
    except OSError:
        return None
    try:
        record = json.loads(RUN_RECORD.read_text())
    except (OSError, ValueError):
        record = {}
    record = record if isinstance(record, dict) and "pid" in record else {}
    where = os.getcwd()
    if not record:
        return (f"cnnvis: {where}: .snakemake/locks holds the lock of another run (running, or "
                "killed): if none is running here, run the same command once with --unlock")
    started = record.get("started", "?")
    if not _running(record):
        return (f"cnnvis: {where}: the lock in .snakemake/locks was left by a run that was "
                f"killed (pid {record['pid']}, started {started}, is no longer running): run "
                "the same command once with --unlock, then run it again")
    return (f"cnnvis: {where}: another run is using this working directory (pid "
            f"{record['pid']} on {record.get('host')}, started {started}): two runs in one "
            "working directory would write the same files; wait for it to finish, or give this "
            "run its own --directory")


def record_run() -> None:
    """Record this process as the run holding the lock (best effort)."""
    try:
        RUN_RECORD.parent.mkdir(parents=True, exist_ok=True)
        RUN_RECORD.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                          "started": time.strftime("%Y-%m-%d %H:%M:%S")}))
    except OSError:
        pass


def forget_run() -> None:
    try:
        RUN_RECORD.unlink()
    except OSError:
        pass
