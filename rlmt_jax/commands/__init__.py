"""One module per `rlmt-jax` subcommand; each exposes `register(subparsers)`.

`register` adds its parser and sets `func=run` where `run(args) -> int` is the exit code.
"""

COMMANDS = ("train", "generate", "score", "export", "convert", "plot", "plan")
