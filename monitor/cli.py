"""`python -m monitor` / `ecg-monitor`: one subcommand per module, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help). Each module has `add_arguments(parser)` and `main(args) -> int`.
COMMANDS = {
    "run": ("monitor.daemon.loop", "run the monitoring daemon (settings from MONITOR_* env / .env)"),
    "check": ("monitor.daemon.check", "validate settings, model and broker connectivity, print a summary"),
    "replay": ("monitor.tools.replay", "replay ECG5000 beats or a signal file to Kafka as sensor streams"),
    "demo": ("monitor.tools.demo", "the whole product in one command: broker, model, monitor, replayed streams"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Only the chosen subcommand's module is imported (torch is slow to import);
    top-level --help lists every command without importing any."""
    from monitor import __version__

    parser = argparse.ArgumentParser(prog="ecg-monitor", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        command = sub.add_parser(name, help=help_text, description=help_text,
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        command.set_defaults(_module=module)
        if name in argv[:1]:
            importlib.import_module(module).add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    return int(importlib.import_module(args._module).main(args) or 0)
