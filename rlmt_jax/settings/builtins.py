"""`builtin:NAME` paths: things the package ships or makes itself (the tiny default).

`builtin:tiny-policy` and `builtin:tiny-reward` are built by the trainer from a fixed seed, `builtin:tiny-prompts`
is the prompt set in rlmt_jax/resources, `builtin:tiny-sft` 40 of its prompts with a written plan and answer each
(the SFT conversations of the tiny default).
"""

from __future__ import annotations

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = ("tiny-policy", "tiny-reward")
BUILTIN_DATA = {"tiny-prompts": "tiny_prompts.jsonl", "tiny-sft": "tiny_sft.jsonl"}


def builtin_name(path: str | None) -> str | None:
    """'tiny-policy' for 'builtin:tiny-policy'; None for an ordinary path."""
    if path is not None and path.startswith(BUILTIN_PREFIX):
        return path[len(BUILTIN_PREFIX):]
    return None


def builtin_list(names) -> str:
    """'builtin:a, builtin:b': the built-ins an error message offers."""
    return ", ".join(BUILTIN_PREFIX + name for name in names)
