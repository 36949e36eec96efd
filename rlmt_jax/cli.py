"""The `rlmt-jax` command line: train | generate | score | export | convert | plot | plan."""

from __future__ import annotations

import argparse
import importlib
import sys

from rlmt_jax.commands import COMMANDS
from rlmt_jax.errors import UserError
from rlmt_jax.host_memory import relaunch_with_reused_memory


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlmt-jax",
        description="RLMT in JAX: train chat models to plan before they answer, rewarded by a reward model.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"rlmt_jax.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"rlmt_jax.commands.{name}":
                raise
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"rlmt-jax {args.command}: error: {err}", file=sys.stderr)
        return 2


def entry() -> None:
    """The `rlmt-jax` console script: main() in a process that reuses host memory between XLA:CPU steps."""
    relaunch_with_reused_memory(["-m", "rlmt_jax.cli", *sys.argv[1:]])
    sys.exit(main())


if __name__ == "__main__":
    entry()
