"""The validator's list of problems, bounded whatever the dataset.

- Problems: a list of messages that keeps the first `limit` problems of each kind (the message
  with its file, line, quoted values and numbers taken out) and counts the rest; `total` is every
  problem found, listed or not; `finish()` appends one line per kind with unlisted problems.
- missing_where(root, path): which directory of a dataset seems missing, for the early stop.
- count_rows(path): the lines of a CSV after its header, counted without parsing.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

LIMIT_PER_KIND = 100
_WHERE = re.compile(r"^.*?: line \d+: ")
_VARIABLE = re.compile(r"'[^']*'|\"[^\"]*\"|\S*/\S*|\d+")


def problem_kind(message: str) -> str:
    """`index.csv: line 7: /d/images/a.jpg: image is missing` -> `#: image is missing`."""
    return _VARIABLE.sub("#", _WHERE.sub("", message, count=1))


class Problems(list):
    """Messages, at most `limit` of each kind; `total` counts every problem found."""

    def __init__(self, limit: int = LIMIT_PER_KIND):
        super().__init__()
        self.limit = limit
        self.total = 0
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}

    def keep(self, message: str) -> bool:
        """Count `message`; True while its kind has fewer than `limit` listed."""
        kind = problem_kind(message)
        self.total += 1
        self.counts[kind] += 1
        self.first.setdefault(kind, message)
        return self.counts[kind] <= self.limit

    def append(self, message: str) -> None:
        if self.keep(message):
            super().append(message)

    def finish(self) -> None:
        """One line per kind with unlisted problems (the first of them as the example)."""
        for kind, n in self.counts.items():
            if n > self.limit:
                super().append(f"... and {n - self.limit:,} more problems of the kind of: "
                               f"{self.first[kind]}")


def missing_where(root: Path, path: Path) -> str:
    """The highest directory between `root` and the missing `path` that does not exist
    (`images/` for a copy without images/), else `files named in index.csv`."""
    for parent in reversed(path.parents):
        if parent == root or root not in parent.parents:
            continue
        if not parent.exists():
            return f"{parent.relative_to(root)}/"
    return "files named in index.csv"


def count_rows(path: Path) -> int:
    """Lines of a file after the header (a CSV row spans lines only when quoted)."""
    lines, last = 0, b"\n"
    try:
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                lines += block.count(b"\n")
                last = block[-1:]
    except OSError:
        return 0
    return max(0, lines + (last != b"\n") - 1)
