"""Errors a user can cause and fix: printed by the CLI as one clear line, never as a trace."""


class UserError(Exception):
    """Bad config, missing file, malformed input: the message names the thing that is wrong."""
