"""The ``selecsls`` command. Each subcommand lives in its own module with a ``register`` function."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from selecsls._io import printable
from selecsls._optional import MissingDependency

# Subcommand modules (``selecsls.cli.<name>``); each adds its parsers in ``register(subparsers)``.
# Building the parser must not import torch or an optional package (tests/cli/test_core_install.py):
# those imports stay inside the run functions, so ``selecsls --help`` takes a fraction of a second
# and works on the core install.
COMMAND_MODULES = ("models", "train", "prune", "deploy", "bench")


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


#: Exit status after Ctrl-C, as a shell reports a command killed by SIGINT (128 + 2).
INTERRUPTED = 130
#: The exit status of a command whose output pipe closed early (128 + SIGPIPE, as the shell reports it).
BROKEN_PIPE = 141


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="selecsls", description="SelecSLS Net: build, train, prune, benchmark and export fast CNN backbones."
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except BrokenPipeError:  # the reader of our output went away (`selecsls info ... | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the flush at exit cannot fail again
        return BROKEN_PIPE
    except (CLIError, MissingDependency, ValueError, OSError, RuntimeError) as exc:
        # One line, without the control characters a hand-made file name or class name may carry.
        print(f"selecsls {args.command}: error: {printable(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:  # Ctrl-C: one line (what was kept, how to go on), not a traceback
        print(f"selecsls {args.command}: interrupted" + (f": {printable(exc)}" if str(exc) else ""), file=sys.stderr)
        return INTERRUPTED
    return int(result or 0)
