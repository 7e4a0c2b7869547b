"""The command line: each command is registered by the module cli.COMMANDS names, so a job that
imports only that module gets the same parser for its command."""

from __future__ import annotations

import subprocess
import sys

from cnnvis_pipeline import cli


def _commands(parser) -> set[str]:
    action = next(a for a in parser._actions if a.dest == "command")
    return set(action.choices)


def test_commands_map_to_the_modules_that_register_them():
    assert _commands(cli.build_parser()) == set(cli.COMMANDS)
    for command, module in cli.COMMANDS.items():
        registered = _commands(cli.build_parser(command))
        assert command in registered, (command, module)
        assert registered == {c for c, m in cli.COMMANDS.items() if m == module}
    # An unknown word (or none) gets every command, so argparse can list them.
    assert _commands(cli.build_parser("no-such-command")) == set(cli.COMMANDS)


def test_a_job_command_imports_neither_torchvision_nor_reporting():
    """`cnnvis tables` (the workflow's layer job) starts without torchvision (torch._dynamo) and
    without the viz/report modules: seconds of start-up per job on a small machine."""
    code = ("import sys; from cnnvis_pipeline import cli; cli.build_parser('tables');"
            "from cnnvis_pipeline.tables import provenance;"
            "p = provenance(config_digest='x', dataset_digest=None);"
            "bad = sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'jinja2'}"
            " | {m for m in sys.modules if m.startswith(('cnnvis_pipeline.viz',"
            " 'cnnvis_pipeline.reports'))});"
            "print(p['torchvision_version']); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    import torchvision

    assert out[0] == torchvision.__version__
    assert out[1] == "[]"
