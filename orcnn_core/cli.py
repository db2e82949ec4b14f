"""The ``orcnn-core`` command line.

Each subcommand's work lives in the module that owns it; this file only parses arguments.
Bad input raises :class:`orcnn_core.errors.InputError`, printed as one line, exit code 2.
"""

import argparse
import sys

from orcnn_core import __version__
from orcnn_core.errors import InputError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="orcnn-core",
        description="ORCNN amodal instance segmentation: data, training, evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_subparsers(dest="command", metavar="COMMAND")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except InputError as exc:
        print(f"orcnn-core {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
