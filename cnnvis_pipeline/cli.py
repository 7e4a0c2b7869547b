"""Command line of cnnvis-pipeline: `python -m cnnvis_pipeline <command>` or `cnnvis <command>`.

Each stage's `commands.py` (and only those) defines `register(subparsers)`, which adds its
subcommands with `set_defaults(func=...)`; a func takes the parsed args and returns an exit
status. The lists below are the one place that names them. A CnnvisError becomes `error: <message>` and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from cnnvis_pipeline import __version__
from cnnvis_pipeline.errors import CnnvisError
from cnnvis_pipeline.fileio import all_or_none, error_line
from cnnvis_pipeline.progress import status_handler

COMMAND_MODULES = [
    "cnnvis_pipeline.data.commands",
    "cnnvis_pipeline.data.sources.commands",
    "cnnvis_pipeline.models.commands",
    "cnnvis_pipeline.dissection.commands",
    "cnnvis_pipeline.interventions.commands",
    "cnnvis_pipeline.viz.commands",
    "cnnvis_pipeline.reports.commands",
]


# Which module registers each command: a job imports only its command's module (the others
# pull in what it never needs). tests/test_cli.py checks this against the modules' parsers.
COMMANDS = {
    **{c: "cnnvis_pipeline.data.commands" for c in ("synth", "download", "digest", "validate",
                                                         "prepare")},
    **{c: "cnnvis_pipeline.data.sources.commands"
       for c in ("source-digest", "source-validate", "source-prepare")},
    "layers": "cnnvis_pipeline.models.commands",
    **{c: "cnnvis_pipeline.dissection.commands"
       for c in ("train", "check-model", "extract", "tables", "layer-units", "summary",
                 "dissect", "compositional", "formulas", "segment", "plan")},
    **{c: "cnnvis_pipeline.interventions.commands" for c in ("ablate", "attack")},
    "visualize": "cnnvis_pipeline.viz.commands",
    "report": "cnnvis_pipeline.reports.commands",
    "summary-page": "cnnvis_pipeline.reports.commands",
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; given a known command, only with the subcommands of that command's module."""
    parser = argparse.ArgumentParser(prog="cnnvis", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"cnnvis-pipeline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    modules = [m for m in COMMAND_MODULES if m == COMMANDS.get(command)] or COMMAND_MODULES
    for name in modules:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(next((a for a in argv if not a.startswith("-")), None))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    status = status_handler(f"cnnvis {args.command}")  # the workflow's long jobs: console lines
    if status is not None:
        logging.getLogger().addHandler(status)
    try:
        with all_or_none():  # a command that fails leaves none of its outputs looking complete
            return int(args.func(args) or 0)
    except CnnvisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a quota, a read-only or forbidden directory
        line = error_line(e)
        if line is None:
            raise
        print(f"error: {line}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
