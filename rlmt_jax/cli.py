"""The `rlmt-jax` command line: train | generate | score | export | convert | plot | plan.

The arguments are parsed before anything heavy is imported (JAX, transformers: each command imports what it
needs when it runs) and before the process starts itself again for XLA:CPU (rlmt_jax/scale/host_memory.py), so
`--help` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys

from rlmt_jax.commands import COMMANDS
from rlmt_jax.commands.train import DISK_ERRORS, EXIT_INTERRUPTED
from rlmt_jax.core.errors import UserError
from rlmt_jax.scale.host_memory import module_command, relaunch_with_reused_memory

EXIT_STATUSES = ("exit status: 0 finished, 1 a non-finite loss/gradient/update/reward, 2 a user error (one line), "
                 "3 stopped by a signal with a checkpoint, 130 interrupted (Ctrl-C) where it could not stop in order "
                 "(train: before its first step)")
# transformers' advice at import when torch is not installed: rlmt-jax needs no torch (its models are Flax).
TORCH_ADVICE = "PyTorch was not found."


class _NoTorchAdvice(logging.Filter):
    """Drops transformers' "PyTorch was not found. Models won't be available ..." record, and only that."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(TORCH_ADVICE))


_NO_TORCH_ADVICE = _NoTorchAdvice()


def silence_torch_advice() -> None:
    """Keeps transformers from telling every command that PyTorch is missing (call it before transformers is
    imported: the message is logged once, at import, on the `transformers` logger)."""
    logger = logging.getLogger("transformers")
    if _NO_TORCH_ADVICE not in logger.filters:
        logger.addFilter(_NO_TORCH_ADVICE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rlmt-jax",
        description="RLMT in JAX: train chat models to plan before they answer, rewarded by a reward model.",
        epilog=EXIT_STATUSES,
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


def dashed_override_hint(argv: list[str], unknown: list[str]) -> str | None:
    """For `--rollout.temperature=0.8` or `--rollout.temperature 0.8` given to a command that takes overrides:
    the message that says how to write it; None when the unknown arguments are not dashed dotted keys."""
    for token in unknown:
        key, sep, value = token.lstrip("-").partition("=")
        if not token.startswith("--") or "." not in key:
            continue
        if not sep:
            at = argv.index(token)
            following = argv[at + 1] if at + 1 < len(argv) else ""
            value = following if following and not following.startswith("-") else "VALUE"
        return f"overrides are key=value without dashes: did you mean {key}={value}?"
    return None


def check_own_models_package() -> None:
    """UserError unless `import models` gives the package installed beside rlmt_jax: another `models` folder
    (the current one, a PYTHONPATH entry, an unrelated distribution) must never be imported, let alone run."""
    ours = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models")
    loaded = sys.modules.get("models")
    if loaded is not None:
        found = os.path.dirname(os.path.abspath(getattr(loaded, "__file__", None) or ""))
    else:
        spec = importlib.util.find_spec("models")  # locates the package without running its __init__
        found = os.path.dirname(os.path.abspath(spec.origin)) if spec is not None and spec.origin else None
    if found is None or os.path.realpath(found) != os.path.realpath(ours):
        raise UserError(f"a package named 'models' at {found} comes before rlmt-jax's own ({ours}) on the Python "
                        "path; run from another folder or take it off PYTHONPATH")


def _without_current_folder() -> None:
    """Drops the current folder from sys.path (`python -m rlmt_jax.cli` puts it first)."""
    cwd = os.path.realpath(os.getcwd())
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != cwd
                   or os.path.realpath(p) == os.path.dirname(os.path.dirname(os.path.realpath(__file__)))]


def parse(argv: list[str]) -> argparse.Namespace | int:
    """The arguments of a command to run, or the exit status when there is none: argparse's message or the
    help was printed (`--help` exits here, with status 0)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        hint = dashed_override_hint(argv, unknown) if hasattr(args, "overrides") else None
        if hint is None:
            parser.parse_args(argv)  # argparse's own message and exit status 2
        print(f"rlmt-jax {args.command}: error: {hint}", file=sys.stderr)
        return 2
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return args


def run_command(args: argparse.Namespace) -> int:
    """Runs the parsed command -> its exit status; a user error, a full or read-only disk and Ctrl-C are one
    line on stderr."""
    silence_torch_advice()
    try:
        if hasattr(args, "overrides"):
            from rlmt_jax.settings.config import check_distinct_overrides

            given = [args.config] if args.config and "=" in args.config else []
            check_distinct_overrides([*given, *args.overrides])
        check_own_models_package()
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"rlmt-jax {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in DISK_ERRORS:
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"rlmt-jax {args.command}: error: {err.strerror}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before a command's own handler (train's, from its first step) was in place
        print(f"rlmt-jax {args.command}: interrupted (Ctrl-C)", file=sys.stderr)
        return EXIT_INTERRUPTED


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    return args if isinstance(args, int) else run_command(args)


def entry() -> None:
    """The `rlmt-jax` console script: the arguments are checked, then the command runs in a process that reuses
    host memory between XLA:CPU steps (started again, see rlmt_jax/scale/host_memory.py)."""
    _without_current_folder()
    try:
        args = parse(sys.argv[1:])
        if isinstance(args, int):
            sys.exit(args)
        relaunch_with_reused_memory(module_command("rlmt_jax.cli", sys.argv[1:]))
    except KeyboardInterrupt:
        print("rlmt-jax: interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(run_command(args))


if __name__ == "__main__":
    entry()
