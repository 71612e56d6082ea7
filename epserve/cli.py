"""The ``epserve`` command: one sub-command per module in ``epserve.commands``.

Each command module defines ``add_parser(subparsers)`` (flags and help) and ``run(args) -> int``.
Modules import heavy libraries inside ``run`` so ``epserve --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# command name → module under epserve.commands
COMMANDS = {
    "make-tiny-model": "make_tiny_model",
    "generate": "generate",
    "up": "up",
    "admin": "admin",
    "eplb": "eplb",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epserve",
        description="Mixture-of-experts serving with attention and expert workers as separate processes.",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level for stderr (default: INFO)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"epserve.commands.{module_name}")
        command = module.add_parser(subparsers)
        command.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
